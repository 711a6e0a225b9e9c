"""The one-machine stack end to end: `distillery up` (with a teacher server), submit over REST,
follow, cancel, the API and the teacher killed and restarted, `down`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from services.local import descendants, read_state
from teacher_server.process import free_port
from teacher_server.health import serving

pytestmark = pytest.mark.slow


def cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("stack")
    env = {**os.environ, "DISTILLERY_MODEL_ROOTS": str(tiny_llama.parent.parent),
           "DISTILLERY_DATA_ROOTS": str(root), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PYTHONUNBUFFERED": "1"}
    env.pop("REDIS_URL", None)  # the embedded Redis, as on a machine without one
    state_dir = root / "state"
    api_port, dash_port = free_port(), free_port()
    up = cli("up", "--state-dir", str(state_dir), "--api-port", str(api_port), "--dashboard-port",
             str(dash_port), "--runs-dir", str(root / "runs"), "--teacher-model", str(tiny_llama), env=env)
    assert up.returncode == 0, up.stderr + up.stdout
    state = read_state(state_dir)
    assert up.stdout.strip() == state.describe()
    env["DISTILLERY_API_URL"] = state.api_url
    yield root, state_dir, state, env
    children = read_state(state_dir).children.values()  # the latest pids, restarts included
    down = cli("down", "--state-dir", str(state_dir), env=env)
    assert down.returncode == 0, down.stderr
    assert not [p for p in children if running(p)], "down left a child running"


def running(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text().lower()
    except OSError:
        return False


def job_spec(root: Path, teacher: Path, student: Path, steps: int) -> Path:
    data = root / "train.jsonl"
    from services.demo.task import make_rows

    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(64, seed=0, digits=2)))
    spec = {
        "name": "e2e", "student": {"model": str(student)}, "teacher": {"local_model": str(teacher)},
        "data": {"path": str(data), "eval_fraction": 0.1, "max_prompt_tokens": 16, "max_response_tokens": 8},
        "distill": {"loss": "akl", "steps": steps, "batch_size": 4, "top_k": 8, "max_new_tokens": 6},
        "checkpoint": {"every_steps": 2},
        "eval": {"enabled": True, "max_samples": 4, "max_new_tokens": 6},
        "resources": {"workers": 1},
    }
    path = root / f"job-{steps}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_up_prints_where_everything_listens_and_the_api_is_ready(stack):
    _, _, state, _ = stack
    assert state.embedded_redis
    r = httpx.get(f"{state.api_url}/readyz", timeout=10)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ready", "redis": True, "ray": True, "teacher": True}
    # The dashboard answers, and only with Ray's token (readyz above reached it with one), which
    # only its owner can read; `up` said where it is and how to send it.
    assert httpx.get(f"{state.ray_dashboard}/api/version", timeout=10).status_code == 401
    token = Path(state.ray_token)
    assert token.stat().st_mode & 0o777 == 0o600
    headers = {"Authorization": f"Bearer {token.read_text().strip()}"}
    assert httpx.get(f"{state.ray_dashboard}/api/version", headers=headers, timeout=10).status_code == 200
    assert str(token) in state.describe() and "Authorization: Bearer" in state.describe()


def test_a_killed_teacher_comes_back_on_its_endpoint_and_readyz_follows(stack):
    """SIGKILL to the stack's teacher: /readyz turns 503 (teacher false), a client holding the
    endpoint rides through, and the supervisor restarts it on the same port under a new pid."""
    from teacher_server.client import TeacherClient

    _, state_dir, state, _ = stack
    old = read_state(state_dir).children["teacher"]
    with TeacherClient(state.teacher_endpoint, timeout_s=120) as client:
        client.info()  # connected before the kill
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (r := httpx.get(f"{state.api_url}/readyz", timeout=10)).status_code != 503:
            assert time.monotonic() < deadline, "readyz never noticed the teacher was gone"
            time.sleep(0.1)
        assert r.json()["teacher"] is False and r.json()["redis"] and r.json()["ray"]
        scored = client.score([[1, 2, 3, 4]], [1], top_k=4)  # waits out the restart
    assert scored[0].topk_ids.shape == (3, 4)
    after = read_state(state_dir)
    assert after.teacher_endpoint == state.teacher_endpoint and after.children["teacher"] not in (old, None)
    assert serving(state.teacher_endpoint)
    r = httpx.get(f"{state.api_url}/readyz", timeout=10)
    assert r.status_code == 200 and r.json()["teacher"] is True


def test_submit_follow_succeeds_with_events_and_eval(stack, tiny_llama, tiny_student):
    root, _, state, env = stack
    spec = job_spec(root, tiny_llama, tiny_student, steps=3)
    result = cli("submit", str(spec), "--follow", env=env, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout
    job_id = result.stdout.split()[0]
    job = json.loads(cli("status", job_id, env=env).stdout)
    assert job["state"] == "succeeded"
    assert set(job["summary"]["eval"]) == {"student", "teacher"}
    logs = cli("logs", job_id, env=env).stdout.splitlines()
    kinds = [json.loads(line).get("kind") for line in logs if line.strip()]
    assert "metrics" in kinds and "state" in kinds


def test_cancel_a_running_job(stack, tiny_llama, tiny_student):
    root, _, state, env = stack
    spec = job_spec(root, tiny_llama, tiny_student, steps=500)
    job_id = cli("submit", str(spec), env=env).stdout.split()[0]
    deadline = time.monotonic() + 240
    while json.loads(cli("status", job_id, env=env).stdout)["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(1)
    assert cli("cancel", job_id, env=env).returncode == 0
    while json.loads(cli("status", job_id, env=env).stdout)["state"] != "cancelled":
        assert time.monotonic() < deadline, "job was not cancelled"
        time.sleep(1)


def test_the_api_restarted_mid_job_still_shows_the_job(stack, tiny_llama, tiny_student):
    root, state_dir, state, env = stack
    spec = job_spec(root, tiny_llama, tiny_student, steps=6)
    job_id = cli("submit", str(spec), env=env).stdout.split()[0]
    old_api = read_state(state_dir).children["api"]
    os.kill(old_api, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:  # the supervisor starts the API again; the job lives in Redis meanwhile
        current = read_state(state_dir).children.get("api")
        if current != old_api:
            try:
                if httpx.get(f"{state.api_url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        assert time.monotonic() < deadline, "the API did not come back"
        time.sleep(0.5)
    while json.loads(cli("status", job_id, env=env).stdout)["state"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline + 240
        time.sleep(1)
    assert json.loads(cli("status", job_id, env=env).stdout)["state"] == "succeeded"


def test_down_stops_everything_up_started(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("REDIS_URL", None)
    state_dir = tmp_path / "state"
    up = cli("up", "--state-dir", str(state_dir), "--api-port", str(free_port()), "--dashboard-port",
             str(free_port()), "--runs-dir", str(tmp_path / "runs"), env=env)
    assert up.returncode == 0, up.stderr
    state = read_state(state_dir)
    started = descendants(state.supervisor_pid) | {state.supervisor_pid}
    assert set(state.children.values()) <= started
    assert cli("down", "--state-dir", str(state_dir), env=env).returncode == 0
    deadline = time.monotonic() + 30
    alive = started
    while alive and time.monotonic() < deadline:
        alive = {p for p in started if Path(f"/proc/{p}").exists()
                 and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()}
        time.sleep(0.5)
    assert not alive, f"still running after down: {alive}"
    assert read_state(state_dir) is None
