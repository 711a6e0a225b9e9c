"""Redis for the services tests: the server at REDIS_URL when it answers, else a private
redis-server on an ephemeral port; each test gets its own key prefix, deleted afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
