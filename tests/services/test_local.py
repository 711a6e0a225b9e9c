"""The one-machine stack's supervisor without the stack: restarts with backoff, the give-up rule,
the state file's pids, and what `up` prints about Ray's token. Children are `sleep` processes;
the real stack (a killed teacher back on its endpoint) is tests/e2e/test_stack.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from services.local import (
    MAX_RESTARTS,
    STABLE_S,
    StackState,
    Supervisor,
    descendants,
    ray_token_location,
    read_state,
)


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[Supervisor]:
    s = Supervisor(tmp_path, 0, 0, None, tmp_path / "runs", None)
    s.state = StackState(os.getpid(), "redis://127.0.0.1:1/0", "http://127.0.0.1:1", "http://127.0.0.1:2",
                         None, str(tmp_path / "runs"), False)
    yield s
    for child in s.children:  # only what this test started, by pid
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()


def kill(child) -> None:
    os.kill(child.proc.pid, signal.SIGKILL)
    child.proc.wait()


def test_a_dead_child_is_restarted_after_a_doubling_backoff_and_the_state_file_follows(sup, tmp_path):
    child = sup._spawn("worker", ["sleep", "60"], dict(os.environ))
    other = sup._spawn("other", ["sleep", "60"], dict(os.environ))
    t = child.started
    delays = []
    for _ in range(MAX_RESTARTS):
        old = child.proc.pid
        kill(child)
        assert sup.restart_dead(t)
        delay = child.restart_at - t
        assert sup.restart_dead(t + delay - 0.01) and child.proc.pid == old  # not before its time
        t += delay
        assert sup.restart_dead(t) and child.proc.poll() is None and child.proc.pid != old
        assert read_state(tmp_path).children == {"worker": child.proc.pid, "other": other.proc.pid}
        delays.append(delay)
    assert delays == pytest.approx([1, 2, 4, 8, 16])
    assert other.deaths == 0 and other.proc.poll() is None
    kill(child)
    assert not sup.restart_dead(t), "a child dying over and over stops the stack"


def test_a_child_that_stayed_up_starts_a_new_row(sup):
    child = sup._spawn("worker", ["sleep", "60"], dict(os.environ))
    t = child.started
    for _ in range(3):
        kill(child)
        sup.restart_dead(t)
        t = child.restart_at
        sup.restart_dead(t)
    kill(child)
    sup.restart_dead(t + STABLE_S - 1)  # died before it had been up a minute: the row goes on
    assert child.deaths == 4 and child.restart_at == pytest.approx(t + STABLE_S - 1 + 8)
    t = child.restart_at
    sup.restart_dead(t)
    kill(child)
    sup.restart_dead(t + STABLE_S)
    assert child.deaths == 1 and child.restart_at == pytest.approx(t + STABLE_S + 1)  # the first delay again


def test_where_the_ray_token_is_and_what_up_prints(monkeypatch, tmp_path):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert ray_token_location() == str(tmp_path / ".ray" / "auth_token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/etc/ray-token")
    assert ray_token_location() == "/etc/ray-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    assert ray_token_location() == "$RAY_AUTH_TOKEN"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_token_location() is None

    state = StackState(1, "redis://r", "http://api", "http://127.0.0.1:8265", None, "runs", True, {}, "/t/auth_token")
    text = state.describe()
    assert "http://127.0.0.1:8265" in text and "/t/auth_token" in text
    assert "ray get-auth-token" in text and "Authorization: Bearer <token>" in text and "secret" not in text
    state.ray_token = None
    assert "token authentication is off" in state.describe()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_descendants_are_children_and_grandchildren_only():
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, time; p = subprocess.Popen(['sleep', '30']); "
                              "print(p.pid, flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    grandchild = None
    try:
        grandchild = int(child.stdout.readline())
        assert descendants(child.pid) == {grandchild}
        assert {child.pid, grandchild} <= descendants(os.getpid())
        assert child.pid not in descendants(grandchild) and descendants(grandchild) == set()
    finally:
        for pid in (grandchild, child.pid):  # only what this test started, by pid
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        child.wait()
        child.stdout.close()
