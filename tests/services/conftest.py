"""Redis for the services tests: the server at REDIS_URL when it answers, else a private
redis-server on an ephemeral port; each test gets its own key prefix, deleted afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
import redis

from teacher_server.process import free_port


def wait_for_redis(url: str, timeout_s: float = 10.0) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return True
            except redis.RedisError:
                time.sleep(0.05)
        return False
    finally:
        client.close()


class RedisProcess:
    """A redis-server of our own on a fixed ephemeral port and directory, so it can be stopped
    (by its pid) and started again on the same data."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("redis-server is not installed")
        self.directory, self.args, self.port = directory, args, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisProcess":
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--dir", str(self.directory), "--save", "", *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_for_redis(self.url):
            self.stop()
            pytest.fail("redis-server did not start")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if wait_for_redis(url, timeout_s=1.0):
        yield url
        return
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_process(tmp_path) -> Iterator[Callable[..., RedisProcess]]:
    """Factory of private redis-servers (extra args, e.g. "--appendonly", "yes"); all stopped after."""
    made: list[RedisProcess] = []

    def make(*args: str) -> RedisProcess:
        made.append(RedisProcess(tmp_path / f"redis-{len(made)}", *args))
        made[-1].directory.mkdir()
        return made[-1]

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def redis_prefix(redis_url) -> Iterator[str]:
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# ---------------------------------------------------------------- jobs on a local Ray (scheduler tests)
@pytest.fixture(scope="session")
def job_data(tmp_path_factory) -> Path:
    import json

    from services.demo.task import make_rows

    path = tmp_path_factory.mktemp("job-data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(80, seed=0, digits=2)))
    return path


@pytest.fixture(scope="session")
def job_spec_doc(tiny_llama, tiny_student, job_data):
    """A maker of small valid job specs as the store keeps them (JSON documents): the tiny teacher
    in-process, a smaller student, 80 sums. Keyword sections are merged into the defaults."""
    from student_worker.config import JobSpec

    def make(**sections) -> dict:
        doc = {
            "name": "sched", "seed": 0,
            "student": {"model": str(tiny_student)},
            "teacher": {"local_model": str(tiny_llama)},
            "data": {"path": str(job_data), "eval_fraction": 0.1, "max_prompt_tokens": 16,
                     "max_response_tokens": 8},
            "distill": {"loss": "fkl", "steps": 4, "batch_size": 4, "top_k": 8, "max_new_tokens": 6,
                        "lr": 1e-3, "warmup_steps": 1},
            "checkpoint": {"every_steps": 2, "keep_last": 2},
            "eval": {"enabled": False, "max_samples": 4, "max_new_tokens": 6, "batch_size": 4},
        }
        for key, value in sections.items():
            doc[key] = {**doc[key], **value} if isinstance(value, dict) and isinstance(doc.get(key), dict) else value
        return JobSpec.model_validate(doc).model_dump(mode="json")

    return make


@pytest.fixture(scope="module")
def ray_jobs_address() -> Iterator[str]:
    """A local Ray (4 CPUs) with its dashboard and Jobs API on a free loopback port. Job
    entrypoints run `python` from the PATH, so this interpreter's directory goes first. Every job
    still alive at the end is stopped before Ray shuts down."""
    import sys

    ray = pytest.importorskip("ray")
    from ray.job_submission import JobSubmissionClient

    saved_path = os.environ["PATH"]
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{saved_path}"
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client = JobSubmissionClient(address)
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield address
        live = [j.submission_id for j in client.list_jobs() if j.submission_id and not j.status.is_terminal()]
        for sid in live:
            client.stop_job(sid)
        deadline = time.monotonic() + 30
        while live and time.monotonic() < deadline:
            live = [sid for sid in live if not client.get_job_status(sid).is_terminal()]
            time.sleep(0.5)
    finally:
        ray.shutdown()
        os.environ["PATH"] = saved_path
