"""A job's failure told by its cause (R-14): the worker's events when its teacher goes away, and the
driver's one line naming the worker's own exception, not Ray Train's wrapper. No Ray cluster: the
worker body runs in this process against an in-process teacher server, and Ray Train's exceptions
are built the way its controller builds them."""

from __future__ import annotations

import json
import pickle
import re

import pytest

from student_worker import run as run_mod
from student_worker.events import FileSink
from student_worker.trainer import NonFiniteLoss
from teacher_server.contract import TeacherUnavailable
from teacher_server.engine import EngineConfig
from teacher_server.serve import ServerConfig, TeacherServer

SINCE = "2026-03-01T12:00:00.000+00:00"
GONE = f"teacher unavailable at 127.0.0.1:50051 since {SINCE}: no answer after 9 attempt(s) in 300.0s " \
       "(last: UNAVAILABLE: failed to connect to all addresses)"


def worker_group_error(**errors: BaseException | None):
    """Ray Train's WorkerGroupError as its controller makes it from polled workers (`r0=...`: rank
    0's exception, None for a rank still running), after the trip to the driver."""
    from ray.train.v2._internal.execution.worker_group.poll import WorkerGroupPollStatus, WorkerStatus
    from ray.train.v2._internal.util import construct_user_exception_with_traceback

    statuses = {}
    for name, exc in errors.items():
        error = None
        if exc is not None:
            try:
                raise exc
            except BaseException as caught:  # noqa: BLE001 - wrapped the way Ray's thread runner does
                error = construct_user_exception_with_traceback(caught)
        statuses[int(name[1:])] = WorkerStatus(running=exc is None, error=error)
    return pickle.loads(pickle.dumps(WorkerGroupPollStatus(statuses).get_worker_group_error()))


def test_the_failure_names_the_workers_exception_not_ray_trains_wrapper():
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    err = worker_group_error(r0=TeacherUnavailable(GONE), r1=None)
    assert str(err).splitlines()[0] == "Training failed due to worker errors:"  # all the job said before
    assert run_mod.describe_failure(err) == f"TeacherUnavailable: {GONE}"
    # A rank that died (Ray's own error) is a consequence; the other rank's exception is the cause.
    dead = WorkerHealthCheckFailedError("worker 0 died", RuntimeError("actor died"))
    err = worker_group_error(r0=dead, r1=NonFiniteLoss("3 non-finite losses in a row\nat distill step 3"))
    assert run_mod.describe_failure(err) == "NonFiniteLoss: 3 non-finite losses in a row at distill step 3"
    assert run_mod.describe_failure(ControllerError(ValueError("no placement"))) == "ValueError: no placement"
    assert run_mod.describe_failure(KeyError("x")) == "KeyError: 'x'"


def test_the_drivers_failure_line_names_the_cause(make_spec, tmp_path, monkeypatch, capsys):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(make_spec().to_json())

    def fails(*args, **kwargs):
        raise worker_group_error(r0=TeacherUnavailable(GONE))

    monkeypatch.setattr(run_mod, "run", fails)
    assert run_mod.main(["--spec", str(spec_path), "--job-id", "j-1"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"job j-1 failed: TeacherUnavailable: {GONE}"


def test_r14_a_teacher_gone_mid_run_fails_the_worker_after_its_budget_with_wait_and_error_events(
        make_spec, tiny_llama, tmp_path):
    server = TeacherServer(ServerConfig(engine=EngineConfig(model_dir=str(tiny_llama)), port=0, grace_s=1.0,
                                        drain_delay_s=0.0))
    endpoint = f"127.0.0.1:{server.start()}"
    server.load()
    spec = make_spec(teacher={"endpoints": [endpoint], "local_model": None, "timeout_s": 5.0,
                              "unavailable_timeout_s": 1.5}, distill={"steps": 4})

    def stop_after_step_1(m: dict) -> None:
        if m["stage"] == "distill" and m["step"] == 1:
            server.stop()

    sink = FileSink(tmp_path / "events.jsonl")
    try:
        with pytest.raises(TeacherUnavailable) as exc:
            run_mod.train_worker(spec, sink, job_id="j-1", on_metrics=stop_after_step_1)
    finally:
        server.stop()
    message = str(exc.value)
    got = re.fullmatch(rf"teacher unavailable at {endpoint} since (\S+): no answer after \d+ attempt\(s\) "
                       rf"in 1\.\ds \(last: UNAVAILABLE: .*\)", message)
    assert got, message
    events = [json.loads(line) for line in sink.path.read_text().splitlines()]
    assert [e["kind"] for e in events] == ["teacher_wait", "error"], events
    wait, error = events
    assert (wait["stage"], wait["step"], error["step"]) == ("distill", 1, 1)  # step 2 never came
    assert wait["message"].startswith(f"teacher unavailable at {endpoint} since ")
    assert f" since {got[1]} " in wait["message"]  # the same first failed attempt
    assert error["error"] == f"TeacherUnavailable: {message}"


def test_workers_check_templated_prompts_against_the_ray_replicas_template(chat_models, tiny_llama):
    from student_worker.config import TeacherSpec
    from student_worker.run import served_replicas

    with_template = served_replicas(TeacherSpec(ray_actor={"model": str(chat_models[0])}), ["127.0.0.1:5001"])
    assert (with_template.endpoints, with_template.ray_actor) == (["127.0.0.1:5001"], None)
    assert with_template.chat_template == str(chat_models[0])
    plain = served_replicas(TeacherSpec(ray_actor={"model": str(tiny_llama)}), ["127.0.0.1:5001"])
    assert plain.chat_template is None  # no template there: the prompts are scored as rendered
    named = served_replicas(TeacherSpec(ray_actor={"model": str(chat_models[0])}, chat_template="/t.jinja"),
                            ["127.0.0.1:5001"])
    assert named.chat_template == "/t.jinja"


def test_a_worker_resumes_from_the_newer_of_rays_checkpoint_and_the_run_directorys(tmp_path, tiny_student):
    """A stopped driver leaves checkpoints in the run directory that Ray never registered: a new
    driver's workers start from whichever is newer (Ray's copy is removed at the end)."""
    import contextlib

    from transformers import AutoModelForCausalLM

    from student_worker.checkpoint import CheckpointManager

    run_dir = tmp_path / "run"
    mgr = CheckpointManager(run_dir, keep_last=5)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_student))
    older = mgr.save(model, {"step": 4}, "{}", stage="distill", step=4)
    newer = mgr.save(model, {"step": 6}, "{}", stage="distill", step=6)

    class RayCheckpoint:  # what ray.train.get_checkpoint() hands a worker
        def __init__(self, path):
            self.path = str(path)

        @contextlib.contextmanager
        def as_directory(self):
            yield self.path

    assert run_mod._resume_point(None, run_dir, 0) == (newer, None)
    ref, copy = run_mod._resume_point(RayCheckpoint(older.path), run_dir, 0)
    assert ref == newer and copy is None  # the copy of Ray's older one is gone already
    assert not list(tmp_path.glob("distillery-restore-*"))
    ahead = CheckpointManager(tmp_path / "elsewhere").save(model, {"step": 8}, "{}", stage="distill", step=8)
    ref, copy = run_mod._resume_point(RayCheckpoint(ahead.path), run_dir, 0)
    assert (ref.stage, ref.step) == ("distill", 8) and copy is not None and ref.path.is_relative_to(copy)
    assert run_mod._resume_point(None, tmp_path / "new-run", 0) == (None, None)
