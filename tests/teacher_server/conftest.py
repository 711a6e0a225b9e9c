"""Real teacher server processes on 127.0.0.1 with ephemeral ports, for transport tests."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from teacher_server.process import TeacherProcess, start_teacher


def start_server(model: Path, tmp: Path, *extra: str, port: int = 0, wait: bool = True,
                 env: dict | None = None) -> TeacherProcess:
    """Start `distillery teacher serve` (log under `tmp`); wait for SERVING unless told not to."""
    tmp.mkdir(parents=True, exist_ok=True)
    return start_teacher(model, *extra, port=port, wait=wait, env=env, timeout_s=60,
                         log_path=tmp / f"server-{time.monotonic_ns()}.log")


@pytest.fixture(scope="module")
def served_llama(tiny_llama, tmp_path_factory):
    """One server on the tiny Llama for a whole test module (batching on, short max wait)."""
    server = start_server(tiny_llama, tmp_path_factory.mktemp("served"), "--max-wait-ms", "10")
    yield server
    server.stop()


@pytest.fixture
def server_factory(tmp_path):
    """Start servers with custom flags; every one started is stopped (by pid) at the end."""
    started: list[TeacherProcess] = []

    def make(model: Path, *extra: str, **kw) -> TeacherProcess:
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
