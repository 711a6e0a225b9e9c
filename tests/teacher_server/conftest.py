"""A real teacher server process on 127.0.0.1 with an ephemeral port, for transport tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from teacher_server.client import wait_until_serving


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def start_server(model: Path, tmp: Path, *extra: str, port: int = 0, wait: bool = True,
                 env: dict | None = None) -> ServerProcess:
    """Start `distillery teacher serve` as a subprocess; wait for SERVING unless told not to."""
    tmp.mkdir(parents=True, exist_ok=True)
    port_file = tmp / f"port-{time.monotonic_ns()}"
    log_path = tmp / f"server-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "services.cli", "teacher", "serve", "--model", str(model),
           "--port", str(port), "--port-file", str(port_file), *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"teacher server did not bind:\n{log_path.read_text()}")
        time.sleep(0.02)
    server = ServerProcess(proc, int(port_file.read_text()), log_path)
    if wait:
        wait_until_serving(server.endpoint, timeout_s=60)
    return server


@pytest.fixture(scope="module")
def served_llama(tiny_llama, tmp_path_factory):
    """One server on the tiny Llama for a whole test module (batching on, short max wait)."""
    server = start_server(tiny_llama, tmp_path_factory.mktemp("served"), "--max-wait-ms", "10")
    yield server
    server.stop()


@pytest.fixture
def server_factory(tmp_path):
    """Start servers with custom flags; every one started is stopped (by pid) at the end."""
    started: list[ServerProcess] = []

    def make(model: Path, *extra: str, **kw) -> ServerProcess:
        server = start_server(model, tmp_path, *extra, **kw)
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def start_server_fn():
    """`start_server` itself, for module-scoped servers with custom flags (test modules cannot
    import this conftest by name)."""
    return start_server
