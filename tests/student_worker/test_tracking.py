"""Trackers (student_worker/tracking.py): the TensorBoard event files of a worker's run hold exactly
its metrics events (read back from the files), only rank 0 logs, the MLflow and W&B adapters
(against small fake modules, then the real packages offline when installed), a resumed run logs
into the same tracker runs, and a failing or slow tracker never stops or slows training."""

from __future__ import annotations

import json
import logging
import struct
import sys
import time
import types
from collections import defaultdict, namedtuple
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from student_worker import run as run_mod
from student_worker.events import FileSink
from student_worker.tracking import Tracker, open_tracker

# What labels a metrics event rather than measures it (never a scalar).
LABEL_KEYS = {"stage", "step", "event", "point", "distill_step"}


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of TensorBoard event files (TFRecord framing: u64 length, u32 crc, the Event
    bytes, u32 crc), as {tag: [(step, value), ...]} in the order written."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.WhichOneof("value") == "simple_value":
                    out[v.tag].append((event.step, v.simple_value))
    return dict(out)


def expected_scalars(events: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for e in events:
        prefix = f"{e['stage']}/{e['event']}/" if e.get("event") else f"{e['stage']}/"
        for key, value in e.items():
            if key not in LABEL_KEYS and isinstance(value, (int, float)):
                out[prefix + key].append((e["step"], float(value)))
    return dict(out)


@pytest.fixture(scope="module")
def worker_run(make_spec_module):
    """One rank-0 worker run as the Ray job's worker runs it (train_worker, without Ray):
    Warmup-Distill, 2 KD steps, eval before, after the warmup and at every KD step."""
    spec = make_spec_module(warmup={"enabled": True, "steps": 1, "prompts": 2, "samples_per_prompt": 1,
                                    "max_new_tokens": 4, "batch_size": 2},
                            distill={"steps": 2, "batch_size": 2, "max_new_tokens": 4},
                            eval={"enabled": True, "teacher": False, "before": True, "after_warmup": True,
                                  "every_steps": 1, "max_samples": 2, "max_new_tokens": 4})
    events: list[dict[str, Any]] = []
    run_dir = Path(spec.checkpoint.dir)
    summary = run_mod.train_worker(spec, FileSink(run_dir / "events.jsonl"), job_id="track-1",
                                   on_metrics=events.append)
    return SimpleNamespace(spec=spec, events=events, summary=summary, run_dir=run_dir)


def test_tensorboard_holds_exactly_the_metrics_events(worker_run):
    got = read_scalars(worker_run.run_dir / "tensorboard")
    final = {tag: points for tag, points in got.items() if tag.startswith("final/")}
    steps = {tag: points for tag, points in got.items() if not tag.startswith("final/")}
    want = expected_scalars(worker_run.events)
    assert steps.keys() == want.keys()
    for tag, points in want.items():
        assert [s for s, _ in steps[tag]] == [s for s, _ in points], tag
        assert [v for _, v in steps[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-30), tag
    for tag in ("distill/loss", "distill/tokens_per_s", "distill/teacher_latency_s", "distill/fkl", "distill/rkl",
                "distill/topk_overlap", "distill/tail_mass", "distill/lr", "warmup/loss", "warmup/pairs/pairs",
                "eval/exact_match", "eval/rouge_l"):
        assert tag in steps, tag
    assert [s for s, _ in steps["distill/loss"]] == [1, 2]
    assert [s for s, _ in steps["eval/exact_match"]] == [0, 1, 2]  # before, after the warmup, after KD step 1
    student = worker_run.summary["eval"]["student"]
    kd = worker_run.summary["timing"]["distill"]
    assert final["final/eval/student/exact_match"] == [(3, pytest.approx(student["exact_match"]))]
    assert final["final/timing/distill/tokens_per_s"] == [(3, pytest.approx(kd["tokens_per_s"], rel=1e-6))]


def test_other_ranks_and_runs_found_finished_log_nothing(make_spec):
    spec = make_spec(tracking={"mlflow": {"experiment": "x"}})
    tracker = open_tracker(spec, rank=1)
    tracker.log({"stage": "distill", "step": 1, "loss": 1.0})
    tracker.log_summary({"timing": {"eval_wall_s": 1.0}})
    tracker.close()
    assert tracker.backends == [] and not Path(spec.checkpoint.dir).exists()
    tracker = open_tracker(spec)  # rank 0, re-running a finished run: no event, so nothing opens
    tracker.log_summary({"already_finished": True, "timing": {"eval_wall_s": 1.0}})
    tracker.close()
    assert not Path(spec.checkpoint.dir).exists()


# ---------------------------------------------------------------------------------- fakes
EVENTS = [
    {"stage": "warmup", "step": 0, "event": "pairs", "samples": 8.0, "pairs": 3.0},
    {"stage": "warmup", "step": 1, "loss": 0.69, "skipped": False, "lr": 1e-3},
    {"stage": "eval", "point": "warmup", "distill_step": 0, "step": 1, "n": 2, "exact_match": 0.5, "rouge_l": 0.7},
    {"stage": "distill", "step": 1, "loss": 2.5, "tokens_per_s": 100.0, "teacher_latency_s": 0.01, "fkl": 2.5},
    {"stage": "distill", "step": 2, "loss": 2.25, "tokens_per_s": 110.0, "teacher_latency_s": 0.02, "fkl": 2.25},
]
SUMMARY = {"stage": "done", "eval": {"student": {"n": 2, "exact_match": 0.5, "rouge_l": 0.75}},
           "timing": {"eval_wall_s": 0.5, "warmup": {"wall_s": 1.0, "steps": 1},
                      "distill": {"wall_s": 2.0, "steps": 2, "tokens": 20, "tokens_per_s": 10.0}}}


def play(tracker: Tracker, failed: bool = False) -> None:
    for e in EVENTS:
        tracker.log(e)
    tracker.log_summary(SUMMARY)
    tracker.close(failed=failed)


Metric = namedtuple("Metric", "key value timestamp step")
Param = namedtuple("Param", "key value")


class FakeMlflow:
    """The part of MLflow's client API the adapter uses, keeping what it is told."""

    def __init__(self, fail_metrics: bool = False, delay_s: float = 0.0) -> None:
        self.fail_metrics, self.delay_s = fail_metrics, delay_s
        self.experiments: dict[str, str] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.uris: list[str | None] = []
        fake = self

        class Client:
            def __init__(self, tracking_uri: str | None = None) -> None:
                fake.uris.append(tracking_uri)

            def get_experiment_by_name(self, name):
                return SimpleNamespace(experiment_id=fake.experiments[name]) if name in fake.experiments else None

            def create_experiment(self, name):
                fake.experiments[name] = str(len(fake.experiments) + 1)
                return fake.experiments[name]

            def create_run(self, experiment_id, run_name=None, tags=None):
                run_id = f"run{len(fake.runs) + 1}"
                fake.runs[run_id] = {"experiment": experiment_id, "name": run_name, "tags": tags, "params": [],
                                     "metrics": [], "status": ["RUNNING"]}
                return SimpleNamespace(info=SimpleNamespace(run_id=run_id))

            def log_batch(self, run_id, metrics=(), params=(), tags=()):
                time.sleep(fake.delay_s)
                if metrics and fake.fail_metrics:
                    raise ConnectionError("tracking server went away")
                assert len(params) <= 100
                fake.runs[run_id]["metrics"] += list(metrics)
                fake.runs[run_id]["params"] += list(params)

            def update_run(self, run_id, status=None):
                fake.runs[run_id]["status"].append(status)  # KeyError for an unknown run, as MLflow raises

            def set_terminated(self, run_id, status=None):
                fake.runs[run_id]["status"].append(status)

        self.module = types.ModuleType("mlflow")
        self.module.MlflowClient = Client
        self.module.entities = types.ModuleType("mlflow.entities")
        self.module.entities.Metric, self.module.entities.Param = Metric, Param

    def install(self, monkeypatch) -> "FakeMlflow":
        monkeypatch.setitem(sys.modules, "mlflow", self.module)
        monkeypatch.setitem(sys.modules, "mlflow.entities", self.module.entities)
        return self


class FakeWandb:
    def __init__(self) -> None:
        self.inits: list[dict[str, Any]] = []
        self.runs: list[SimpleNamespace] = []
        fake = self

        def init(**kwargs):
            fake.inits.append(kwargs)
            run = SimpleNamespace(id=kwargs["id"] or "wb1", logged=[], defined=[], summary={}, finished=[])
            run.log = run.logged.append
            run.define_metric = lambda name, step_metric=None: run.defined.append((name, step_metric))
            run.finish = lambda exit_code=None: run.finished.append(exit_code)
            fake.runs.append(run)
            return run

        self.module = types.ModuleType("wandb")
        self.module.init = init


def test_mlflow_adapter_logs_params_metrics_and_resumes_its_run(make_spec, monkeypatch):
    fake = FakeMlflow().install(monkeypatch)
    spec = make_spec(tracking={"tensorboard": False,
                               "mlflow": {"tracking_uri": "http://127.0.0.1:5000", "experiment": "kd"}})
    play(open_tracker(spec, job_id="job-1"))
    run = fake.runs["run1"]
    assert fake.uris == ["http://127.0.0.1:5000"] and fake.experiments == {"kd": "1"}
    assert run["name"] == "job-1" and run["tags"]["distillery.job_id"] == "job-1"
    params = dict(run["params"])
    assert params["distill.loss"] == "fkl" and params["student.model"] == spec.student.model
    assert params["tracking.mlflow.experiment"] == "kd" and len(params) > 50
    metrics = {(m.key, m.step): m.value for m in run["metrics"]}
    assert metrics[("distill/loss", 2)] == 2.25 and metrics[("distill/teacher_latency_s", 1)] == 0.01
    assert metrics[("warmup/pairs/pairs", 0)] == 3.0 and metrics[("eval/exact_match", 1)] == 0.5
    assert metrics[("warmup/skipped", 1)] == 0.0
    assert metrics[("final/eval/student/rouge_l", 3)] == 0.75
    assert run["status"] == ["RUNNING", "FINISHED"]
    state = json.loads((Path(spec.checkpoint.dir) / "tracking.json").read_text())
    assert state == {"mlflow_run_id": "run1"}

    tracker = open_tracker(spec, job_id="job-1")  # the job resumed: the same run goes on
    tracker.log({"stage": "distill", "step": 3, "loss": float("nan"), "skipped": True})
    play(tracker, failed=True)
    assert list(fake.runs) == ["run1"] and run["status"] == ["RUNNING", "FINISHED", "RUNNING", "FAILED"]
    assert len(run["metrics"]) == 2 * len(metrics) + 1  # a non-finite loss is left out, its step shows
    assert [(m.key, m.value) for m in run["metrics"] if m.step == 3 and m.key.startswith("distill/")] == [
        ("distill/skipped", 1.0)]


def test_wandb_adapter_plots_each_stage_against_its_own_step(make_spec, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module)
    spec = make_spec(tracking={"tensorboard": False, "wandb": {"project": "kd", "mode": "offline"}})
    run_dir = Path(spec.checkpoint.dir)
    play(open_tracker(spec, job_id="job-2"))
    (init,) = fake.inits
    assert {k: init[k] for k in ("project", "entity", "mode", "name", "id", "resume", "dir")} == {
        "project": "kd", "entity": None, "mode": "offline", "name": "job-2", "id": None, "resume": "allow",
        "dir": str(run_dir)}
    assert init["config"]["distill"]["loss"] == "fkl"
    run = fake.runs[0]
    assert ("distill/*", "distill/step") in run.defined and ("eval/*", "eval/step") in run.defined
    assert run.logged[3] == {"distill/loss": 2.5, "distill/tokens_per_s": 100.0, "distill/teacher_latency_s": 0.01,
                             "distill/fkl": 2.5, "distill/step": 1}
    assert run.logged[0] == {"warmup/pairs/samples": 8.0, "warmup/pairs/pairs": 3.0, "warmup/step": 0}
    assert run.summary["final/eval/student/exact_match"] == 0.5 and run.finished == [0]
    play(open_tracker(spec, job_id="job-2"))
    assert fake.inits[1]["id"] == "wb1"  # resumed into the same W&B run


def test_a_failing_or_slow_tracker_never_stops_or_slows_training(make_spec, monkeypatch, caplog):
    fake = FakeMlflow(fail_metrics=True, delay_s=0.2).install(monkeypatch)
    monkeypatch.setitem(sys.modules, "wandb", None)  # configured but not installed
    spec = make_spec(tracking={"mlflow": {}, "wandb": {"mode": "offline"}})
    tracker = open_tracker(spec)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="student_worker.tracking"):
        for e in EVENTS:
            tracker.log(e)
        queued_s = time.perf_counter() - start
        tracker.log_summary(SUMMARY)
        tracker.close()
    assert queued_s < 0.1  # the server's 0.2 s per call is the tracker thread's, not the loop's
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert any("wandb" in w and "not installed" in w for w in warnings)
    assert any("mlflow failed to log" in w and "tracking server went away" in w for w in warnings)
    assert fake.runs["run1"]["metrics"] == []
    got = read_scalars(Path(spec.checkpoint.dir) / "tensorboard")  # the others carried on
    assert got["distill/loss"] == [(1, 2.5), (2, 2.25)] and "final/eval/student/exact_match" in got


# ---------------------------------------------------------------------------------- the real packages
def test_real_mlflow_file_store(make_spec, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this flag
    uri = (tmp_path / "mlruns").as_uri()
    spec = make_spec(tracking={"tensorboard": False, "mlflow": {"tracking_uri": uri, "experiment": "kd"}})
    play(open_tracker(spec, job_id="job-3"))
    run_id = json.loads((Path(spec.checkpoint.dir) / "tracking.json").read_text())["mlflow_run_id"]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "job-3"
    assert run.data.params["distill.loss"] == "fkl"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "distill/loss")] == [(1, 2.5), (2, 2.25)]
    assert run.data.metrics["final/timing/distill/tokens_per_s"] == 10.0


def test_real_wandb_offline(make_spec, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = make_spec(tracking={"tensorboard": False, "wandb": {"project": "kd", "mode": "offline"}})
    run_dir = Path(spec.checkpoint.dir)
    play(open_tracker(spec, job_id="job-4"))
    run_id = json.loads((run_dir / "tracking.json").read_text())["wandb_run_id"]
    (data,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    keys = (b"distill/loss", b"distill/step", b"warmup/pairs/pairs", b"final/eval/student/exact_match")
    deadline = time.monotonic() + 15  # W&B's own service process writes the file; give it time to land
    while not all(k in data.read_bytes() for k in keys) and time.monotonic() < deadline:
        time.sleep(0.2)
    raw = data.read_bytes()  # W&B's own record format; the history keys are stored as text
    for key in keys:
        assert key in raw, key
