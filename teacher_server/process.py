"""Start `distillery teacher serve` as a child process and wait until it is SERVING.

Used by the demo, the benchmarks and the tests; the one-machine stack runs `teacher_command` on a
port of its choosing (`free_port`, the one free-port helper of the code base), so that it can restart the server on the same one. The server binds first and
writes its port to a file (so port 0 works), then loads the model; `start_teacher` waits for
grpc.health SERVING. `stop()` sends SIGTERM to exactly the pid it started and waits for the
drain; SIGKILL only if the grace period runs out.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` right now, picked by the OS (another process may still
    take it before the caller binds it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TeacherProcess:
    def __init__(self, proc: subprocess.Popen, port: int, host: str, log_path: Path | None) -> None:
        self.proc, self.port, self.host, self.log_path = proc, port, host, log_path

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for the drain; SIGKILL after `timeout`. Returns the exit code."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def teacher_command(model: str | Path, *flags: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """The `distillery teacher serve` command line, run with this interpreter."""
    return [sys.executable, "-m", "services.cli", "teacher", "serve", "--model", str(model),
            "--host", host, "--port", str(port), *flags]


def start_teacher(model: str | Path, *flags: str, port: int = 0, host: str = "127.0.0.1",
                  log_path: Path | None = None, wait: bool = True, timeout_s: float = 300.0,
                  env: dict[str, str] | None = None) -> TeacherProcess:
    """Launch a teacher server on `host:port` (0 = any free port) with extra CLI `flags`."""
    from .client import wait_until_serving  # gRPC, imported only here: free_port stays light

    port_file = Path(tempfile.mkdtemp(prefix="distillery-teacher-")) / "port"
    cmd = teacher_command(model, "--port-file", str(port_file), *flags, port=port, host=host)
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    finally:
        if log_path:
            out.close()
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            tail = log_path.read_text(errors="replace")[-2000:] if log_path else ""
            raise RuntimeError(f"teacher server did not start (exit {proc.returncode}):\n{tail}")
        time.sleep(0.02)
    server = TeacherProcess(proc, int(port_file.read_text()), host, log_path)
    port_file.unlink()
    port_file.parent.rmdir()
    if wait:
        try:
            wait_until_serving(server.endpoint, timeout_s=max(1.0, deadline - time.monotonic()))
        except Exception:
            server.stop()
            raise
    return server
