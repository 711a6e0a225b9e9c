"""The Python API's service half (services/sdk.py) against the REST API with a real Redis: submit a
spec built in Python, follow its events while a worker runs it, wait for the final record and load
the student it trained. The worker is the Ray job's worker body (student_worker.run.train_worker)
run in a thread with the service's Redis event sink, so no Ray is needed; it also shows the spec's
`tracking` section passing the API and reaching the worker (TensorBoard files in the run dir), and
tracking URIs that would point the workers at their own disks or carry credentials refused."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import types
from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import uvicorn

from services import sdk
from services.api import create_app
from services.apiclient import ApiError
from services.settings import Settings
from services.store import JobStore
from student_worker.config import JobSpec
from services.demo.task import make_rows
from student_worker.events import RedisSink
from student_worker.run import train_worker

KEY = "sdk-test-key-0123456789abcdef"


@contextmanager
def live_api(settings: Settings, store: JobStore) -> Iterator[str]:
    """The API under uvicorn on 127.0.0.1:<ephemeral>, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(settings, store, ray_ping=lambda: True, sse_block_ms=100)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def service(redis_url, redis_prefix, tiny_llama, tiny_student, tmp_path) -> Iterator[tuple[str, Settings, JobStore]]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(40, seed=0, digits=2)))
    (tmp_path / "runs").mkdir()
    settings = Settings(redis_url=redis_url, redis_prefix=redis_prefix, api_keys=(KEY,),
                        model_roots=(str(tiny_llama), str(tiny_student)), data_roots=(str(data),),
                        runs_dir=str(tmp_path / "runs"), ray_address="http://127.0.0.1:1")
    store = JobStore(settings.redis_url, settings.redis_prefix, settings.events_max)
    with live_api(settings, store) as url:
        yield url, settings, store
    store.r.close()


def job_spec(teacher: Path, student: Path, **sections: Any) -> JobSpec:
    return sdk.make_spec(
        name="sdk", student={"model": str(student)}, teacher={"local_model": str(teacher)},
        data={"path": "train.jsonl", "max_prompt_tokens": 16, "max_response_tokens": 8},
        distill={"steps": 2, "batch_size": 2, "max_new_tokens": 4, "top_k": 8, "warmup_steps": 1},
        eval={"max_samples": 2, "max_new_tokens": 4, "teacher": False}, checkpoint={"dir": "sdk-job"},
        **sections)


def play_worker(settings: Settings, store: JobStore) -> None:
    """A scheduler and its one worker, in this process: claim the job, run it, finish it."""
    claimed: list = []
    deadline = time.monotonic() + 20
    while not claimed and time.monotonic() < deadline:
        claimed = store.claim_next("sdk-test", lease_s=60, block_ms=200)
    ((job, attempt),) = claimed
    store.transition(job.id, allowed=("starting",), to="running", attempt=attempt)
    spec = JobSpec.model_validate(job.spec)
    sink = RedisSink(settings.redis_url, job.id, attempt, prefix=settings.redis_prefix)
    try:
        summary = train_worker(spec, sink, job_id=job.id, on_metrics=lambda m: sink.emit(
            {"kind": "metrics", "rank": 0, "job_id": job.id, **m}))
    finally:
        sink.close()
    store.transition(job.id, allowed=("running",), to="succeeded", attempt=attempt, summary=summary,
                     checkpoint=str(Path(spec.checkpoint.dir) / "checkpoints" / "done-00000000"))


class FakeMlflow:
    """Where the worker's MLflow tracker logs (the client API it uses), in place of a server."""

    def __init__(self) -> None:
        self.uris: list[str | None] = []
        self.metrics: list[Any] = []
        fake = self

        class Client:
            def __init__(self, tracking_uri: str | None = None) -> None:
                fake.uris.append(tracking_uri)

            def get_experiment_by_name(self, name):
                return None

            def create_experiment(self, name):
                return "1"

            def create_run(self, experiment_id, run_name=None, tags=None):
                return SimpleNamespace(info=SimpleNamespace(run_id="r1"))

            def log_batch(self, run_id, metrics=(), params=(), tags=()):
                fake.metrics += metrics

            def set_terminated(self, run_id, status=None):
                pass

        self.module = types.ModuleType("mlflow")
        self.module.MlflowClient = Client
        self.module.entities = types.ModuleType("mlflow.entities")
        self.module.entities.Metric = namedtuple("Metric", "key value timestamp step")
        self.module.entities.Param = namedtuple("Param", "key value")


def test_submit_follow_wait_and_load_the_student(service, tiny_llama, tiny_student, monkeypatch):
    url, settings, store = service
    mlflow = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", mlflow.module)
    monkeypatch.setitem(sys.modules, "mlflow.entities", mlflow.module.entities)
    spec = job_spec(tiny_llama, tiny_student,
                    tracking={"mlflow": {"tracking_uri": "https://mlflow.internal:5000", "experiment": "kd"}})
    events: list[dict[str, Any]] = []
    with sdk.Service(url, KEY) as svc:
        job = svc.submit(spec)
        assert job.state == "queued" and not job.done
        assert job.spec["tracking"]["mlflow"]["tracking_uri"] == "https://mlflow.internal:5000"
        assert job.run_dir == Path(settings.runs_dir).resolve() / "sdk-job"  # resolved by the service
        worker = threading.Thread(target=play_worker, args=(settings, store))
        worker.start()
        final = svc.wait(job.id, on_event=events.append)
        assert [j.id for j in svc.jobs()] == [job.id]
    worker.join(30)
    assert final.state == "succeeded" and final.done and final.summary["stage"] == "done"
    states = [e["state"] for e in events if e.get("kind") == "state"]
    assert states[-2:] == ["running", "succeeded"]
    steps = [e["step"] for e in events if e.get("kind") == "metrics" and e.get("stage") == "distill"]
    assert steps == [1, 2] and events[-1]["kind"] == "end"
    # the tracking section reached the worker: TensorBoard in the run dir, MLflow at the spec's server
    assert list((final.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert mlflow.uris == ["https://mlflow.internal:5000"]
    assert [m.step for m in mlflow.metrics if m.key == "distill/loss"] == [1, 2]
    model, tokenizer = sdk.load_student(final)
    assert model.config.vocab_size == len(tokenizer)


@pytest.mark.parametrize("uri", ["file:///etc/mlruns", "/var/mlruns", "sqlite:///mlflow.db",
                                 "postgresql://user:secret@db/mlflow", "http://user:secret@mlflow:5000",
                                 "https://mlflow:5000/?token=secret"])
def test_tracking_uris_naming_local_stores_or_credentials_are_refused(service, tiny_llama, tiny_student, uri):
    url, _, store = service
    with sdk.Service(url, KEY) as svc, pytest.raises(ApiError) as exc:
        svc.submit(job_spec(tiny_llama, tiny_student, tracking={"mlflow": {"tracking_uri": uri}}))
    assert exc.value.status == 400 and "tracking.mlflow.tracking_uri" in str(exc.value)
    assert store.list() == []
