"""Hub ids in submitted specs: the hub cache must lie inside the model roots, a cached id is
pinned to the commit it holds, a missing one is accepted only when downloads are allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.jobs import JobService
from services.protocol import InvalidSpec, PathRefused
from services.settings import Settings


def service(roots: list[Path], cache: Path, tmp_path: Path, allow_downloads: bool = False) -> JobService:
    (tmp_path / "data").mkdir(exist_ok=True)
    settings = Settings(model_roots=tuple(map(str, roots)), data_roots=(str(tmp_path / "data"),),
                        runs_dir=str(tmp_path / "runs"), hub_cache=str(cache), allow_downloads=allow_downloads)
    return JobService(settings, store=None, ray_ping=lambda: True, cluster=lambda: None)  # accept() reads no store


def body(**sections) -> bytes:
    doc = {"student": {"model": "tiny-org/student"}, "teacher": {"local_model": "tiny-org/teacher"},
           "data": {"path": "train.jsonl"}, "checkpoint": {"dir": "job"}}
    for key, value in sections.items():
        doc[key] = {**doc[key], **value} if key in doc else value
    return json.dumps(doc).encode()


def test_hub_ids_are_accepted_through_a_cache_inside_the_roots_and_pinned(hub_cache, tmp_path):
    jobs = service([hub_cache.path.parent], hub_cache.path, tmp_path)
    spec = jobs.accept(body(teacher={"local_model": None, "ray_actor": {"model": "tiny-org/teacher"}}))
    assert (spec.student.model, spec.student.revision) == ("tiny-org/student", hub_cache.student_commit)
    assert (spec.teacher.ray_actor.model, spec.teacher.ray_actor.revision) == ("tiny-org/teacher",
                                                                               hub_cache.teacher_commit)
    spec = jobs.accept(body(student={"revision": "v1"}))  # a tag, pinned to its commit
    assert spec.student.revision == hub_cache.student_commit
    assert spec.teacher.revision == hub_cache.teacher_commit
    with pytest.raises(PathRefused, match="revision v2.*downloads are off"):
        jobs.accept(body(student={"revision": "v2"}))


def test_a_cache_outside_the_roots_is_refused(hub_cache, tmp_path):
    (tmp_path / "models").mkdir()
    jobs = service([tmp_path / "models"], hub_cache.path, tmp_path)
    with pytest.raises(PathRefused, match="student.model 'tiny-org/student' is a hub id.*outside the model roots"):
        jobs.accept(body())


def test_an_uncached_id_needs_downloads_allowed(hub_cache, tmp_path):
    missing = body(student={"model": "tiny-org/other"})
    with pytest.raises(PathRefused, match="student.model: tiny-org/other .* downloads are off"):
        service([hub_cache.path.parent], hub_cache.path, tmp_path).accept(missing)
    spec = service([hub_cache.path.parent], hub_cache.path, tmp_path, allow_downloads=True).accept(missing)
    assert (spec.student.model, spec.student.revision) == ("tiny-org/other", None)  # the workers fetch it


def test_paths_stay_paths_and_a_snapshot_linked_out_of_the_roots_is_refused(hub_cache, tiny_student, tmp_path):
    root = tmp_path / "models"
    cache = root / "hub"
    (root / "local-org" / "student").mkdir(parents=True)  # a directory shaped like a hub id wins
    hub_cache.lay_out(cache, "tiny-org/student", tiny_student, hub_cache.student_commit)
    hub_cache.lay_out(cache, "tiny-org/teacher", tiny_student, hub_cache.teacher_commit)
    jobs = service([root], cache, tmp_path)
    spec = jobs.accept(body(student={"model": "local-org/student"}))
    assert spec.student.model == str(root / "local-org" / "student") and spec.student.revision is None
    with pytest.raises(InvalidSpec, match="student.revision applies to hub ids"):
        jobs.accept(body(student={"model": "local-org/student", "revision": "main"}))
    snapshots = cache / "models--tiny-org--student" / "snapshots"
    (tmp_path / "elsewhere").mkdir()
    (snapshots / ("5" * 40)).symlink_to(tmp_path / "elsewhere")
    (cache / "models--tiny-org--student" / "refs" / "evil").write_text("5" * 40)
    with pytest.raises(PathRefused, match="outside the model roots"):
        jobs.accept(body(student={"revision": "evil"}))


def test_ray_jobs_get_the_services_downloads_switch_whatever_the_nodes_say(tmp_path, monkeypatch):
    from services.scheduler import Scheduler

    monkeypatch.setenv("DISTILLERY_ALLOW_DOWNLOADS", "1")  # a node's own setting does not count
    for allow, want in ((False, "0"), (True, "1")):
        scheduler = Scheduler(Settings(runs_dir=str(tmp_path), allow_downloads=allow), store=object(), ray=object())
        assert scheduler._job_env()["DISTILLERY_ALLOW_DOWNLOADS"] == want
    assert Settings.from_env({}).allow_downloads is False  # off unless the operator turns it on
    assert Settings.from_env({"DISTILLERY_ALLOW_DOWNLOADS": "1", "HF_HOME": "/h"}).hub_cache == "/h/hub"
