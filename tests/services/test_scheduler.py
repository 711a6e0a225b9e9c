"""Scheduler: decisions against a fake Ray (fast), then whole jobs on a real local Ray with its Jobs
API and the faults R-20..R-24 (slow). Redis is real throughout; every test has its own prefix."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.rayapi import cluster_of
from services.scheduler import LIVE, Scheduler, events_url, submission_id
from services.settings import Settings
from services.store import TERMINAL, JobStore, TransitionRefused

FAST_SPEC = {"name": "fast", "student": {"model": "/models/student"}, "teacher": {"local_model": "/models/teacher"},
             "data": {"path": "/data/train.jsonl"}}


class FakeRay:
    """Ray Jobs as the scheduler sees them. Statuses are set by the test; a submitted job is
    `start` (RUNNING: Ray started its driver at once); a stop takes effect at `settle()`, as Ray's
    does a moment later. `before_status` runs once, at the next status call. `nodes` are the
    cluster's nodes (their resources); None: the dashboard does not answer."""

    def __init__(self, nodes: list[dict] | None = None, start: str = "RUNNING") -> None:
        self.start = start
        self.jobs: dict[str, dict] = {}
        self.stops: list[str] = []
        self.before_status = None
        self.refusals: list[str] = []  # errors the next submissions raise, one each
        self.nodes = nodes if nodes is not None else [{"CPU": 64.0, "memory": 256.0 * 2**30}]

    def cluster(self):
        return None if self.nodes is None else cluster_of(self.nodes)

    def submit(self, sid: str, entrypoint: str, *, metadata: dict, env_vars: dict) -> None:
        if self.refusals:
            raise RuntimeError(self.refusals.pop(0))
        assert sid not in self.jobs, f"{sid} submitted twice"
        self.jobs[sid] = {"status": self.start, "message": "", "logs": "", "entrypoint": entrypoint,
                          "metadata": metadata, "env": env_vars, "stopping": False}

    def status(self, sid: str):
        hook, self.before_status = self.before_status, None
        if hook is not None:
            hook(sid)
        job = self.jobs.get(sid)
        return None if job is None else (job["status"], job["message"])

    def stop(self, sid: str) -> bool:
        self.stops.append(sid)
        job = self.jobs.get(sid)
        if job is None or job["status"] not in LIVE:
            return False
        job["stopping"] = True
        return True

    def settle(self) -> None:
        for job in self.jobs.values():
            if job["stopping"] and job["status"] in LIVE:
                job["status"] = "STOPPED"

    def logs(self, sid: str) -> str:
        return self.jobs[sid]["logs"]

    def set(self, sid: str, status: str, message: str = "", logs: str = "") -> None:
        self.jobs[sid].update(status=status, message=message, logs=logs)


def settings(redis_url: str, prefix: str, runs: Path, name: str = "sched-a", lease_s: float = 30.0,
             ray_address: str = "http://127.0.0.1:1", max_running_jobs: int = 0) -> Settings:
    return Settings(redis_url=redis_url, redis_prefix=prefix, runs_dir=str(runs), lease_s=lease_s,
                    scheduler_id=name, ray_address=ray_address, max_running_jobs=max_running_jobs)


def state_events(store: JobStore, job_id: str) -> list[dict]:
    return [e for _, e in store.events(job_id, count=100_000) if e.get("kind") == "state"]


def drive(schedulers: list[Scheduler], until, timeout_s: float, every_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, "timed out"
        for s in schedulers:
            s.tick()
        time.sleep(every_s)


@pytest.fixture
def store(redis_url, redis_prefix) -> JobStore:
    return JobStore(redis_url, redis_prefix)


@pytest.fixture
def make(redis_url, redis_prefix, tmp_path):
    """make(ray, name=..., lease_s=...) -> a Scheduler on this test's prefix and runs directory."""
    def build(ray, name: str = "sched-a", lease_s: float = 30.0, ray_address: str = "http://127.0.0.1:1",
              max_running_jobs: int = 0):
        return Scheduler(settings(redis_url, redis_prefix, tmp_path / "runs", name, lease_s, ray_address,
                                  max_running_jobs), ray=ray, poll_s=0.1)

    return build


# ====================================================================== fast: a fake Ray
def test_a_claimed_job_runs_as_a_ray_job_and_its_success_is_recorded(store, make, tmp_path, redis_url,
                                                                      redis_prefix):
    ray = FakeRay(start="PENDING")
    sched = make(ray)
    job_id, _ = store.create(FAST_SPEC, name="fast")
    sched.tick()

    sid = submission_id(job_id, 1)
    assert sid == f"{job_id}-a1" and list(ray.jobs) == [sid]
    run_dir = (tmp_path / "runs" / job_id).resolve()
    submitted = ray.jobs[sid]
    assert submitted["metadata"]["distillery_job_id"] == job_id
    assert submitted["env"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert shlex.split(submitted["entrypoint"]) == [
        "python", "-m", "student_worker.run", f"--spec={run_dir}/spec.json", f"--job-id={job_id}",
        "--attempt=1", f"--events=file:{run_dir}/events.jsonl",
        f"--events=redis-file:{run_dir}/.events-url"]
    # The Redis URL is never on the command line (the Ray dashboard shows it): a 0600 file.
    assert redis_url not in submitted["entrypoint"]
    url_file = run_dir / ".events-url"
    assert url_file.read_text() == f"{redis_url}?prefix={redis_prefix}&max_events=10000"
    assert url_file.stat().st_mode & 0o777 == 0o600
    from student_worker.config import JobSpec

    written = JobSpec.from_file(run_dir / "spec.json")
    assert written.checkpoint.dir == str(run_dir) and written.student.model == "/models/student"
    job = store.get(job_id)  # submitted, and Ray has not started its driver yet: still starting
    assert (job.state, job.attempt, job.owner, job.submission_id) == ("starting", 1, "sched-a", sid)
    assert store.r.pttl(store.k.lease(job_id)) > 0

    ray.set(sid, "RUNNING")
    sched.tick()
    assert store.get(job_id).state == "running"
    sched.tick()  # still running: nothing changes
    assert store.get(job_id).state == "running"
    (run_dir / "summary.json").write_text('{"stage": "done", "eval": {"student": {"n": 4}}}')
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest").write_text("done-00000000")
    ray.set(sid, "SUCCEEDED", "Job finished successfully.")
    sched.tick()

    job = store.get(job_id)
    assert job.state == "succeeded" and job.summary["eval"]["student"]["n"] == 4
    assert job.checkpoint == "done-00000000"
    assert not store.r.exists(store.k.lease(job_id)) and store.active_ids() == [] and sched.held == {}
    assert [(e["previous"], e["state"]) for e in state_events(store, job_id)] == [
        ("starting", "running"), ("running", "succeeded")]


@pytest.mark.parametrize("logs, reason, error", [
    ("step 3\njob {id} failed: NonFiniteLoss: 3 non-finite losses in a row at distill step 3\n",
     "non_finite_loss", "NonFiniteLoss: 3 non-finite losses in a row at distill step 3"),
    ("job {id} failed: TeacherUnavailable: teacher unavailable at 127.0.0.1:50051 since 2026-03-01T12:00:00.000"
     "+00:00: no answer after 9 attempt(s) in 300.0s (last: UNAVAILABLE: connection refused)\n",
     "teacher_unavailable", "TeacherUnavailable: teacher unavailable at 127.0.0.1:50051 since 2026-03-01T12:00:00"
     ".000+00:00: no answer after 9 attempt(s) in 300.0s (last: UNAVAILABLE: connection refused)"),
    ("job {id} failed: ValueError: prompts of 16 tokens exceed the teacher's limit\n",
     "job_failed", "ValueError: prompts of 16 tokens exceed the teacher's limit"),
    ("Killed\n", "ray_job_failed", "Job entrypoint command failed with exit code 137"),
])
def test_a_failed_ray_job_is_failed_with_its_error_and_reason(store, make, logs, reason, error):
    ray = FakeRay()
    sched = make(ray)
    job_id, _ = store.create(FAST_SPEC, name="fast")
    sched.tick()
    ray.set(submission_id(job_id, 1), "FAILED", "Job entrypoint command failed with exit code 137",
            logs=logs.format(id=job_id))
    sched.tick()
    job = store.get(job_id)
    assert (job.state, job.reason, job.error) == ("failed", reason, error)


def test_r24_corrupt_payloads_fail_with_a_reason_and_the_scheduler_keeps_going(store, make):
    ray = FakeRay()
    sched = make(ray)
    garbage, _ = store.create(FAST_SPEC, name="garbage")
    store.r.hset(store.k.job(garbage), "spec", "{not json at all")  # binary garbage: the next test
    wrong, _ = store.create({**FAST_SPEC, "distill": {"steps": -3}, "extra": 1}, name="wrong")
    good, _ = store.create(FAST_SPEC, name="good")
    sched.tick()

    for job_id in (garbage, wrong):
        job = store.get(job_id)
        assert (job.state, job.reason) == ("failed", "invalid_spec"), job
    assert "student: Field required" in store.get(garbage).error
    assert "distill.steps" in store.get(wrong).error and "extra" in store.get(wrong).error
    assert store.get(good).state == "running" and list(ray.jobs) == [submission_id(good, 1)]


def test_r24_a_payload_that_is_not_even_text_fails_with_a_reason(store, make):
    ray = FakeRay()
    sched = make(ray)
    garbage, _ = store.create(FAST_SPEC, name="garbage")
    store.r.hset(store.k.job(garbage), "spec", b"\x00{\xff\xfe")
    good, _ = store.create(FAST_SPEC, name="good")
    for _ in range(3):
        sched.tick()
    assert (store.get(garbage).state, store.get(garbage).reason) == ("failed", "invalid_spec")
    assert store.get(good).state == "running"


def test_a_submission_ray_refuses_for_now_is_retried_and_a_bad_one_fails_the_job(store, make):
    ray = FakeRay()
    sched = make(ray)
    ray.refusals = ["Request failed with status code 500: No available agent to submit job, please try again later."]
    job_id, _ = store.create(FAST_SPEC, name="retry")
    sched.tick()
    assert store.get(job_id).state == "starting" and ray.jobs == {}
    sched.tick()
    assert store.get(job_id).state == "running" and list(ray.jobs) == [submission_id(job_id, 1)]
    ray.refusals = ["Request failed with status code 400: bad runtime env"]
    bad, _ = store.create(FAST_SPEC, name="bad")
    sched.tick()
    assert (store.get(bad).state, store.get(bad).reason) == ("failed", "submit_failed")


def test_cancel_stops_the_ray_job_and_ends_cancelled(store, make):
    ray = FakeRay()
    sched = make(ray)
    job_id, _ = store.create(FAST_SPEC, name="fast")
    sched.tick()
    sid = submission_id(job_id, 1)
    ray.set(sid, "RUNNING")
    assert store.request_cancel(job_id) == "cancelling"
    sched.tick()
    assert ray.stops == [sid] and store.get(job_id).state == "cancelling"  # until Ray says it stopped
    sched.tick()
    assert ray.stops == [sid]  # asked once
    ray.settle()
    sched.tick()
    job = store.get(job_id)
    assert (job.state, job.reason) == ("cancelled", "cancelled_by_user") and sched.held == {}


def test_a_cancel_that_lands_during_submission_still_stops_the_ray_job(store, make):
    ray = FakeRay()
    sched = make(ray)
    job_id, _ = store.create(FAST_SPEC, name="fast")
    ray.before_status = lambda _sid: store.request_cancel(job_id)  # between claim and submission
    sched.tick()
    sid = submission_id(job_id, 1)
    assert sid in ray.jobs and store.get(job_id).state == "cancelling"
    sched.tick()
    ray.settle()
    sched.tick()
    assert ray.stops == [sid] and store.get(job_id).state == "cancelled"


def test_an_unreachable_ray_keeps_the_job_queued_with_a_reason_not_failed(store, make):
    """With Ray's dashboard down nothing is known to fit: the job waits queued, saying why, and
    its queue entry stays with this scheduler until Ray answers."""
    ray = FakeRay()
    ray.nodes = None
    sched = make(ray)
    job_id, _ = store.create(FAST_SPEC, name="fast")
    sched.tick()
    sched.tick()
    job = store.get(job_id)
    assert (job.state, job.owner, job.error) == ("queued", "", "") and "did not answer" in job.waiting
    assert sched.held == {} and ray.jobs == {}
    ray.nodes = [{"CPU": 2.0}]
    sched.tick()
    job = store.get(job_id)
    assert (job.state, job.owner, job.waiting) == ("running", "sched-a", "")


def test_a_lapsed_lease_over_a_live_ray_job_is_adopted_not_restarted(store, make, caplog):
    """R-20 in small: A's lease lapses while its Ray job runs; B adopts that very submission (same
    attempt, no stop, no second driver) and records its end; A, back, lets go and stops nothing."""
    ray = FakeRay()
    a, b = make(ray, "sched-a", lease_s=0.6), make(ray, "sched-b")
    job_id, _ = store.create(FAST_SPEC, name="fast")
    a.tick()
    a1 = submission_id(job_id, 1)
    assert store.get(job_id).state == "running"
    time.sleep(0.7)  # A does not tick: its lease lapses

    b.tick()
    job = store.get(job_id)
    assert (job.state, job.attempt, job.owner, job.submission_id) == ("running", 1, "sched-b", a1)
    assert ray.stops == [] and list(ray.jobs) == [a1] and job_id in b.held
    adopted = [e for _, e in store.events(job_id) if e.get("kind") == "adopted"]
    assert [(e["owner"], e["previous_owner"], e["attempt"]) for e in adopted] == [("sched-b", "sched-a", 1)]

    events_before = state_events(store, job_id)
    a.tick()  # A finds its lease renewed by B, not by itself
    assert a.held == {} and ray.stops == [] and "sched-b carries on" in caplog.text
    assert state_events(store, job_id) == events_before
    ray.set(a1, "SUCCEEDED")
    b.tick()
    job = store.get(job_id)
    assert (job.state, job.attempt, job.owner) == ("succeeded", 1, "sched-b")
    assert [(e["state"], e["attempt"]) for e in state_events(store, job_id)] == [("running", 1), ("succeeded", 1)]


def test_a_lapsed_lease_over_a_ray_job_ray_lost_is_requeued_as_a_new_attempt(store, make):
    """A restarted Ray head forgets its jobs: B requeues the job and runs attempt 2 (which resumes
    from the run directory's checkpoints); A, back, lets go and writes nothing."""
    ray = FakeRay()
    a, b = make(ray, "sched-a", lease_s=0.6), make(ray, "sched-b")
    job_id, _ = store.create(FAST_SPEC, name="fast")
    a.tick()
    a1, a2 = submission_id(job_id, 1), submission_id(job_id, 2)
    del ray.jobs[a1]
    time.sleep(0.7)

    b.tick()
    job = store.get(job_id)
    assert (job.state, job.attempt, job.owner, job.submission_id) == ("running", 2, "sched-b", a2)
    events_before = state_events(store, job_id)
    a.tick()
    assert a.held == {} and state_events(store, job_id) == events_before
    states = [(e["state"], e["attempt"], e.get("reason")) for e in events_before]
    assert states == [("running", 1, None), ("queued", 1, "lease_lapsed"), ("running", 2, None)]


def test_a_requeued_job_waits_for_an_earlier_attempt_still_alive(store, make):
    """A scheduler that died between submitting and recording the submission leaves a record Ray
    cannot be asked about: the job is requeued, and attempt 2 starts only once attempt 1 stopped."""
    ray = FakeRay()
    a, b = make(ray, "sched-a", lease_s=0.6), make(ray, "sched-b")
    job_id, _ = store.create(FAST_SPEC, name="fast")
    a.tick()
    a1, a2 = submission_id(job_id, 1), submission_id(job_id, 2)
    store.r.hset(store.k.job(job_id), "submission_id", "")  # the write that did not reach Redis
    time.sleep(0.7)

    b.tick()
    job = store.get(job_id)
    assert (job.state, job.attempt, job.owner) == ("starting", 2, "sched-b")
    assert a1 in ray.stops and a2 not in ray.jobs  # attempt 1 still running: no second driver yet
    ray.settle()
    b.tick()
    assert a2 in ray.jobs and store.get(job_id).state == "running"


def test_r21_a_stale_schedulers_write_is_refused_by_the_fence(store, make, caplog):
    """A reads its job's end, pauses, and meanwhile B adopts the job and records that end: A's
    write is refused by the owner fence, A lets go, and the record stays B's."""
    ray = FakeRay()
    a, b = make(ray, "sched-a"), make(ray, "sched-b")
    job_id, _ = store.create(FAST_SPEC, name="fast")
    a.tick()
    a1 = submission_id(job_id, 1)

    def takeover(_sid: str) -> None:  # what happens elsewhere while A is paused
        store.r.delete(store.k.lease(job_id))
        b.tick()

    ray.set(a1, "SUCCEEDED")
    ray.before_status = takeover
    a.tick()

    assert "write refused" in caplog.text and "state:succeeded" in caplog.text
    assert a.held == {} and b.held == {}
    job = store.get(job_id)
    assert (job.state, job.attempt, job.owner) == ("succeeded", 1, "sched-b")
    assert [e["state"] for e in state_events(store, job_id)] == ["running", "succeeded"]


def sized(workers: int, cpus: float = 1.0, **resources) -> dict:
    return {**FAST_SPEC, "resources": {"workers": workers, "cpus_per_worker": cpus, **resources}}


def test_admission_caps_running_jobs_and_starts_the_rest_in_order(store, make):
    ray = FakeRay()
    sched = make(ray, max_running_jobs=1)
    ids = [store.create(FAST_SPEC, name=f"j{i}")[0] for i in range(3)]
    for _ in range(2):
        sched.tick()
    assert [store.get(i).state for i in ids] == ["running", "queued", "queued"]
    assert store.get(ids[1]).waiting == "1 job running, at most 1 at once"
    for n, job_id in enumerate(ids):
        ray.set(submission_id(job_id, 1), "SUCCEEDED")
        sched.tick()  # records the end and admits the next in the same pass
        assert [store.get(i).state for i in ids] == ["succeeded"] * (n + 1) + ["running"] * (n < 2) + \
            ["queued"] * max(1 - n, 0)
    assert store.get(ids[2]).waiting == ""


def test_admission_waits_for_free_resources_first_in_first_out(store, make):
    """2 CPUs: a 2-worker job takes both; a 1-CPU job waits with the numbers, and a smaller job
    queued after it waits behind it (FIFO), then both start as the CPUs free up."""
    ray = FakeRay(nodes=[{"CPU": 2.0, "memory": 8.0 * 2**30}])
    sched = make(ray)
    big, _ = store.create(sized(2), name="big")
    one, _ = store.create(sized(1), name="one")
    half, _ = store.create(sized(1, cpus=0.5), name="half")
    sched.tick()
    assert [store.get(i).state for i in (big, one, half)] == ["running", "queued", "queued"]
    assert store.get(one).waiting == "needs 1 CPU (1 worker x 1 CPU); 0 CPU of 2 CPU free with 1 job running"
    assert store.get(half).waiting == ""  # behind `one`, not looked at
    ray.set(submission_id(big, 1), "SUCCEEDED")
    sched.tick()
    assert [store.get(i).state for i in (big, one, half)] == ["succeeded", "running", "running"]


def test_admission_counts_memory_and_teacher_replicas_and_the_largest_node(store, make):
    ray = FakeRay(nodes=[{"CPU": 4.0, "memory": 8.0 * 2**30}, {"CPU": 4.0, "memory": 8.0 * 2**30}])
    sched = make(ray)
    teacher = {"ray_actor": {"model": "/models/teacher", "replicas": 2, "num_cpus": 2}}
    with_teacher, _ = store.create({**sized(4), "teacher": teacher}, name="teacher")  # 4 + 2 x 2 CPU = 8
    memory, _ = store.create(sized(1, cpus=0.5, memory_gb_per_worker=2), name="mem")
    sched.tick()
    assert store.get(with_teacher).state == "running"
    assert store.get(memory).waiting.startswith("needs 0.5 CPU (1 worker x 0.5 CPU + 2 GiB memory); 0 CPU")
    ray.set(submission_id(with_teacher, 1), "SUCCEEDED")
    sched.tick()
    assert store.get(memory).state == "running"
    wide, _ = store.create(sized(1, cpus=6), name="wide")  # 6 CPUs in all, but on no single node
    sched.tick()
    assert store.get(wide).waiting == ("one placement of the job needs 6 CPU on one node (1 worker x 6 CPU); "
                                       "the largest node has 4 CPU; waiting for the cluster to grow")


def test_a_job_larger_than_the_cluster_waits_for_it_to_grow(store, make):
    """With an autoscaling cluster the API accepts it; it waits, saying so, until nodes join."""
    ray = FakeRay(nodes=[{"CPU": 2.0}])
    sched = make(ray)
    job_id, _ = store.create(sized(4), name="four")
    sched.tick()
    assert store.get(job_id).waiting == ("the job needs 4 CPU (4 workers x 1 CPU); the cluster has 2 CPU in all "
                                         "(1 node); waiting for the cluster to grow")
    ray.nodes.append({"CPU": 2.0})
    sched.tick()
    assert store.get(job_id).state == "running"


def test_a_waiting_entry_is_kept_from_other_schedulers_until_its_holder_dies(store, make):
    """A's waiting entry is not taken over while A keeps looking at it, and no scheduler reads past
    it (first in, first out across schedulers); once A is gone for a lease, B takes it over and
    admits it when it fits, before the job queued after it."""
    ray = FakeRay(nodes=[{"CPU": 1.0}])
    a, b = make(ray, "sched-a", lease_s=0.6), make(ray, "sched-b", lease_s=0.6)
    first, _ = store.create(sized(1), name="first")
    second, _ = store.create(sized(1), name="second")
    third, _ = store.create(sized(1), name="third")
    a.tick()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # A keeps the lease of `first` and its look at `second`
        a.tick()
        b.tick()
        time.sleep(0.1)
    assert [e.job_id for e in a.waiting] == [second] and b.waiting == []  # B did not read `third`
    ray.set(submission_id(first, 1), "SUCCEEDED")
    time.sleep(0.7)  # A is gone: its lease of `first` and its entry of `second` lapse
    drive([b], lambda: store.get(second).state == "running", 5)
    assert store.get(second).owner == "sched-b" and store.get(first).state == "succeeded"
    assert store.get(third).state == "queued" and [e.job_id for e in b.waiting] == [third]


def test_fifty_jobs_under_a_cap_of_two_all_finish_first_in_first_out(store, make):
    """Load: 50 jobs on a 2-CPU cluster with at most 2 running; each runs for a few passes. Never
    more than 2 are active, they start in the order they were submitted, and all 50 succeed."""
    ray = FakeRay(nodes=[{"CPU": 2.0}])
    sched = make(ray, max_running_jobs=2)
    ids = [store.create(FAST_SPEC, name=f"load{i}")[0] for i in range(50)]
    started: list[str] = []
    passes: dict[str, int] = {}
    peak = 0
    for _ in range(200):
        sched.tick()
        active = store.active_ids()
        peak = max(peak, len(active))
        for sid, job in ray.jobs.items():
            job_id = job["metadata"]["distillery_job_id"]
            if job_id not in started:
                started.append(job_id)
            passes[sid] = passes.get(sid, 0) + 1
            if passes[sid] == 3 and job["status"] == "RUNNING":
                ray.set(sid, "SUCCEEDED")
        if len(started) == 50 and not active:
            break
    assert peak == 2 and started == ids
    assert {store.get(i).state for i in ids} == {"succeeded"} and store.active_ids() == []
    assert all(store.get(i).attempt == 1 for i in ids)


def test_resume_requeues_a_failed_or_cancelled_job_for_a_new_attempt(store, make):
    ray = FakeRay()
    sched = make(ray)
    job_id, _ = store.create(FAST_SPEC, name="fast")
    sched.tick()
    ray.set(submission_id(job_id, 1), "FAILED", logs=f"job {job_id} failed: TeacherUnavailable: gone\n")
    sched.tick()
    assert store.get(job_id).state == "failed"
    assert store.resume(job_id) == "failed"
    job = store.get(job_id)
    assert (job.state, job.error, job.reason, job.resumes) == ("queued", "", "", 1)
    sched.tick()
    job = store.get(job_id)
    assert (job.state, job.attempt, job.submission_id) == ("running", 2, submission_id(job_id, 2))
    with pytest.raises(TransitionRefused, match="only a failed or cancelled job resumes"):
        store.resume(job_id)
    assert store.request_cancel(job_id) == "cancelling"
    sched.tick()
    ray.settle()
    sched.tick()
    assert store.get(job_id).state == "cancelled" and store.resume(job_id) == "cancelled"
    assert [(e["state"], e.get("reason")) for e in state_events(store, job_id) if e["state"] == "queued"] == [
        ("queued", "resumed"), ("queued", "resumed")]


def test_r22_fifty_clients_race_to_claim_ten_jobs(redis_url, redis_prefix):
    """Each job is claimed once per attempt: 50 threads, each with its own connection, race for 10
    queued jobs; then all leases lapse, every thread reclaims at once and they race again."""
    ids = [JobStore(redis_url, redis_prefix).create(FAST_SPEC, name=f"race{i}")[0] for i in range(10)]

    def race() -> list[tuple[str, int, str]]:
        claims: list[tuple[str, int, str]] = []
        lock, go = threading.Lock(), threading.Barrier(50)

        def client(n: int) -> None:
            store = JobStore(redis_url, redis_prefix)
            go.wait()
            store.reclaim_expired()
            for _ in range(20):
                for job, attempt in store.claim_next(f"client-{n}", lease_s=60, block_ms=None):
                    with lock:
                        claims.append((job.id, attempt, f"client-{n}"))
                time.sleep(0.005)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return claims

    store = JobStore(redis_url, redis_prefix)
    for attempt in (1, 2):
        claims = race()
        assert sorted(c[0] for c in claims) == sorted(ids), claims  # every job, once
        assert {c[1] for c in claims} == {attempt}
        for job_id, _, owner in claims:
            assert (store.get(job_id).attempt, store.get(job_id).owner) == (attempt, owner)
        store.r.delete(*[store.k.lease(i) for i in ids])  # every lease lapses
    assert sum(e["state"] == "queued" for i in ids for e in state_events(store, i)) == 10


def test_leases_are_renewed_while_running_and_lapse_once_stopped(store, make):
    ray = FakeRay()
    a, b = make(ray, "sched-a", lease_s=0.9), make(ray, "sched-b")
    job_id, _ = store.create(FAST_SPEC, name="fast")
    stop = threading.Event()
    runner = threading.Thread(target=a.run_forever, args=(stop,))
    runner.start()
    try:
        drive([], lambda: store.get(job_id).state == "running", 10)
        t_end = time.monotonic() + 2.5  # almost three leases: A's renewals keep B away
        while time.monotonic() < t_end:
            b.tick()
            time.sleep(0.1)
        job = store.get(job_id)
        assert (job.state, job.attempt, job.owner) == ("running", 1, "sched-a")
    finally:
        stop.set()
        runner.join(timeout=10)
    assert not runner.is_alive()
    drive([b], lambda: store.get(job_id).owner == "sched-b", 5, every_s=0.05)  # adopted once it lapsed
    job = store.get(job_id)
    assert (job.state, job.attempt) == ("running", 1) and list(ray.jobs) == [submission_id(job_id, 1)]


def test_events_url_adds_the_prefix():
    assert events_url("redis://h:6379/2", "p") == "redis://h:6379/2?prefix=p"
    assert events_url("rediss://h:6380/0?ssl_cert_reqs=none&prefix=x", "p") == \
        "rediss://h:6380/0?ssl_cert_reqs=none&prefix=p"
    assert events_url("redis://h:6379/2?max_events=1", "p", 50) == "redis://h:6379/2?prefix=p&max_events=50"


def test_the_worker_sink_keeps_the_services_event_bound(redis_url, tmp_path):
    """DISTILLERY_EVENTS_MAX reaches the worker: its sink trims the job's stream to that many.
    The sink's URL comes from the file the scheduler writes (`redis-file:`), as in a real job."""
    import uuid

    from student_worker.events import open_sink

    prefix = f"test-bound-{uuid.uuid4().hex[:8]}"
    store = JobStore(redis_url, prefix, max_events=5)
    job_id, _ = store.create({"name": "bound"}, name="bound")
    url_file = tmp_path / ".events-url"
    url_file.write_text(events_url(redis_url, prefix, 5))
    sink = open_sink([f"redis-file:{url_file}"], job_id=job_id, attempt=0)
    assert sink.sinks[0].max_events == 5
    for step in range(1, 301):
        sink.emit({"kind": "metrics", "stage": "distill", "step": step, "rank": 0, "loss": 1.0})
    sink.close()
    kept = [e["step"] for _, e in store.events(job_id, count=1000) if e.get("kind") == "metrics"]
    # XADD MAXLEN ~ trims whole stream nodes (100 entries each by default): at least 5 are kept,
    # at most a node more, always the newest.
    assert 5 <= len(kept) <= 105 and kept == list(range(301 - len(kept), 301))
    store.r.delete(*store.r.keys(f"{prefix}*"))


# ====================================================================== slow: a real local Ray
def ray_client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def worker_events(store: JobStore, job_id: str, kind: str) -> list[dict]:
    return [e for _, e in store.events(job_id, count=100_000) if e.get("kind") == kind]


def start_scheduler(redis_url: str, prefix: str, ray_address: str, runs: Path, name: str, lease_s: float,
                    log_path: Path) -> subprocess.Popen:
    """`python -m services.scheduler` configured through the environment, as `distillery scheduler` is."""
    env = {**os.environ, "REDIS_URL": redis_url, "DISTILLERY_REDIS_PREFIX": prefix,
           "DISTILLERY_RAY_ADDRESS": ray_address, "DISTILLERY_RUNS_DIR": str(runs),
           "DISTILLERY_LEASE_S": str(lease_s), "DISTILLERY_SCHEDULER_ID": name, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        return subprocess.Popen([sys.executable, "-m", "services.scheduler"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)


@pytest.fixture
def processes():
    """Scheduler processes a test started; any still alive at the end is killed (by pid)."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


def trained_past(store: JobStore, job_id: str, step: int) -> bool:
    return any(e.get("stage") == "distill" and e.get("step", 0) >= step and e.get("rank") == 0
               for e in worker_events(store, job_id, "metrics"))


def assert_ray_cpus_free() -> None:
    import ray

    wait_for(lambda: ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"], 30,
             "every CPU free")


# Long enough to be interrupted: the faults land after the step-10 checkpoint, and a stopped attempt
# takes a few seconds (lease, stop) to end. Ray Train gets a report every 5th step (each one is a
# ~2 s round trip through its controller), so a step takes ~0.5 s on two cores.
STEPS = 60
LONG = {"distill": {"steps": STEPS}, "checkpoint": {"every_steps": 10}, "log_every": 5}


@pytest.fixture(scope="module")
def end_to_end(ray_jobs_address, redis_url, job_spec_doc, tmp_path_factory):
    """One scheduler, two jobs: a corrupt payload first, then a good job with eval (R-24)."""
    import uuid

    prefix = f"test-sched-{uuid.uuid4().hex[:10]}"
    store = JobStore(redis_url, prefix)
    runs = tmp_path_factory.mktemp("runs")
    sched = Scheduler(settings(redis_url, prefix, runs, ray_address=ray_jobs_address))
    corrupt, _ = store.create(job_spec_doc(), name="corrupt")
    store.r.hset(store.k.job(corrupt), "spec", "{{{ garbage")
    good, _ = store.create(job_spec_doc(eval={"enabled": True}), name="good")
    try:
        drive([sched], lambda: store.get(good).state in TERMINAL, 240, every_s=0.5)
        yield store, corrupt, good, runs
    finally:
        keys = list(store.r.scan_iter(match=f"{prefix}:*"))
        if keys:
            store.r.delete(*keys)


@pytest.mark.slow
def test_a_job_runs_end_to_end_through_the_scheduler(end_to_end, ray_jobs_address):
    store, _, good, runs = end_to_end
    job = store.get(good)
    assert (job.state, job.attempt, job.owner) == ("succeeded", 1, "sched-a"), job.error
    assert job.summary["stage"] == "done" and job.checkpoint == "done-00000000"
    assert job.summary["eval"]["student"]["n"] == 4 and "rouge_l" in job.summary["eval"]["teacher"]
    steps = [e["step"] for e in worker_events(store, good, "metrics") if e["rank"] == 0]
    assert steps == [1, 2, 3, 4] and all("loss" in e for e in worker_events(store, good, "metrics"))
    assert job.progress["step"] == 4
    assert [e["state"] for e in state_events(store, good)] == ["running", "succeeded"]
    assert ray_client(ray_jobs_address).get_job_status(job.submission_id).value == "SUCCEEDED"
    assert (runs / good / "spec.json").exists() and (runs / good / "events.jsonl").exists()
    assert not store.r.exists(store.k.lease(good)) and store.active_ids() == []


@pytest.mark.slow
def test_r24_a_corrupt_payload_fails_and_the_scheduler_keeps_going(end_to_end):
    store, corrupt, good, _ = end_to_end
    job = store.get(corrupt)
    assert (job.state, job.reason) == ("failed", "invalid_spec") and "student" in job.error
    assert store.get(good).state == "succeeded"


@pytest.mark.slow
def test_cancel_stops_the_running_ray_job_and_resume_carries_on_from_its_checkpoint(
        ray_jobs_address, redis_url, redis_prefix, store, job_spec_doc, tmp_path):
    sched = Scheduler(settings(redis_url, redis_prefix, tmp_path / "runs", ray_address=ray_jobs_address))
    job_id, _ = store.create(job_spec_doc(**LONG), name="cancel")
    client = ray_client(ray_jobs_address)
    sid = submission_id(job_id, 1)
    drive([sched], lambda: trained_past(store, job_id, 11), 120, every_s=0.3)
    assert store.request_cancel(job_id) == "cancelling"
    drive([sched], lambda: store.get(job_id).state == "cancelled", 60)
    assert client.get_job_status(sid).value == "STOPPED"
    assert [e["state"] for e in state_events(store, job_id)] == ["running", "cancelling", "cancelled"]
    assert sched.held == {} and not store.r.exists(store.k.lease(job_id))

    assert store.resume(job_id) == "cancelled"
    drive([sched], lambda: store.get(job_id).state in TERMINAL, 180, every_s=0.3)
    job = store.get(job_id)
    assert (job.state, job.attempt, job.resumes) == ("succeeded", 2, 1), job.error
    assert [e["state"] for e in state_events(store, job_id)][3:] == ["queued", "running", "succeeded"]
    assert_resumed(store, job_id)
    assert_ray_cpus_free()


@pytest.mark.slow
def test_r20_r21_a_lapsed_scheduler_is_replaced_and_the_running_job_adopted(
        ray_jobs_address, redis_url, redis_prefix, store, job_spec_doc, tmp_path, processes):
    """R-21: scheduler A (a process) is paused past its lease; B adopts the running Ray job (same
    attempt, no restart); A, resumed, finds its lease gone, writes nothing and stops nothing, and its
    writes meet the fence. R-20: then B dies and C adopts in turn. The job ends as attempt 1 with
    every step trained exactly once."""
    runs = tmp_path / "runs"
    log_a = tmp_path / "a.log"
    job_id, _ = store.create(job_spec_doc(**LONG), name="r20")
    processes.append(start_scheduler(redis_url, redis_prefix, ray_jobs_address, runs, "sched-a", 3.0, log_a))
    a = processes[0]
    wait_for(lambda: trained_past(store, job_id, 5), 120, "attempt 1 training")
    os.kill(a.pid, signal.SIGSTOP)

    b = Scheduler(settings(redis_url, redis_prefix, runs, "sched-b", lease_s=3.0, ray_address=ray_jobs_address))
    drive([b], lambda: store.get(job_id).owner == "sched-b", 30, every_s=0.3)
    os.kill(a.pid, signal.SIGCONT)
    wait_for(lambda: "letting go" in log_a.read_text(), 30, "the zombie to notice")
    assert "sched-b carries on with its Ray job" in log_a.read_text()
    with pytest.raises(TransitionRefused):  # the fence A's writes meet
        store.transition(job_id, allowed=("running",), to="failed", attempt=1, owner="sched-a")
    a.send_signal(signal.SIGTERM)  # `distillery scheduler` exits cleanly on SIGTERM
    assert a.wait(timeout=15) == 0 and "SIGTERM" in log_a.read_text()

    # B dies: it never ticks again, and its lease lapses.
    c = Scheduler(settings(redis_url, redis_prefix, runs, "sched-c", lease_s=3.0, ray_address=ray_jobs_address))
    drive([c], lambda: store.get(job_id).state in TERMINAL, 180, every_s=0.3)

    job = store.get(job_id)
    assert (job.state, job.attempt, job.owner) == ("succeeded", 1, "sched-c"), job.error
    events = [e for _, e in store.events(job_id, count=100_000)]
    assert [(e["owner"], e["previous_owner"]) for e in events if e.get("kind") == "adopted"] == [
        ("sched-b", "sched-a"), ("sched-c", "sched-b")]
    assert [(e["state"], e["attempt"]) for e in state_events(store, job_id)] == [("running", 1), ("succeeded", 1)]
    assert [e["step"] for e in worker_events(store, job_id, "metrics") if e["rank"] == 0 and
            e.get("stage") == "distill"] == list(range(1, STEPS + 1))
    assert len([e for e in worker_events(store, job_id, "worker_start") if e["rank"] == 0]) == 1
    assert ray_client(ray_jobs_address).get_job_status(submission_id(job_id, 1)).value == "SUCCEEDED"
    assert not store.r.exists(store.k.lease(job_id)) and store.active_ids() == []
    assert_ray_cpus_free()


def assert_resumed(store: JobStore, job_id: str) -> None:
    """The last attempt's worker started from a checkpoint and carried on after its step."""
    events = [e for _, e in store.events(job_id, count=100_000)]
    second = max(i for i, e in enumerate(events) if e.get("kind") == "state" and e["state"] == "running")
    starts = [e for e in events[second:] if e.get("kind") == "worker_start" and e["rank"] == 0]
    assert len(starts) == 1 and starts[0]["restored"], starts
    stage, _, step = starts[0]["restored"].rpartition("-")
    steps = [e["step"] for e in events[second:] if e.get("kind") == "metrics" and e["rank"] == 0]
    assert stage == "distill" and steps == list(range(int(step) + 1, STEPS + 1))
