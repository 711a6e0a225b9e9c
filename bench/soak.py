"""The one-machine stack under load and faults, run by hand (not in CI): many small jobs through
`distillery up` with a cap on running jobs, optionally with random kills of its services.

    .venv/bin/python bench/soak.py load --jobs 50 --cap 2           # all finish, in order; peak memory
    .venv/bin/python bench/soak.py soak --minutes 20 --cap 2        # + a random SIGKILL every ~60 s

Both use the built-in teacher and student (trained once into ~/.cache/distillery/builtin, a few
minutes) and their own stack: an embedded Redis (REDIS_URL is ignored, so the kills never touch a
Redis this script did not start), a Ray head on 127.0.0.1, the teacher server, the scheduler and
the API. Kill targets are pids the stack reports: the scheduler, the API, Redis, the teacher (from
its state file) and the Train workers (from their `worker_start` events). A job that fails is
resumed once, as an operator would.

It prints a table: jobs submitted / succeeded / resumed / lost, faults injected by target, worker
restarts and the steps they trained again, peak memory of the stack's processes, and the order jobs
started in (FIFO is the documented order; two run at once, so a job's Ray driver may start a moment
before the one ahead of it). docs/reliability.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services import local  # noqa: E402
from services.apiclient import ApiClient  # noqa: E402
from services.demo import builtin  # noqa: E402
from teacher_server.process import free_port  # noqa: E402

TERMINAL = ("succeeded", "failed", "cancelled")
STAGES = {"warmup": 0, "distill": 1, "done": 2}


def job_spec(assets, endpoint: str, name: str, steps: int) -> dict:
    """A small on-policy KD job on the built-in task: no warmup, no eval, a checkpoint every 10 steps."""
    return {
        "name": name, "seed": 0,
        "student": {"model": str(assets.student)},
        "teacher": {"endpoints": [endpoint], "timeout_s": 30},
        "data": {"path": str(assets.train), "max_prompt_tokens": 32, "max_response_tokens": 16},
        "distill": {"loss": "fkl", "steps": steps, "batch_size": 8, "on_policy_fraction": 1.0,
                    "max_new_tokens": 8, "lr": 1e-3, "top_k": 8},
        "checkpoint": {"every_steps": 10},
        "log_every": 5,
    }


def rss_bytes(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class MemoryWatch(threading.Thread):
    """Peak resident memory of the supervisor and everything under it, sampled every second."""

    def __init__(self, root_pid: int) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.peak, self.stop = root_pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.peak = max(self.peak, rss_bytes({self.root_pid} | local.descendants(self.root_pid)))


def worker_pids(client: ApiClient, job_ids: list[str]) -> list[int]:
    """Pids of the Train workers of running jobs, from their worker_start events."""
    pids = []
    for job_id in job_ids:
        listing = client.http.get(f"/v1/jobs/{job_id}/events", params={"follow": "false"})
        for line in listing.iter_lines():
            if line.startswith("data:") and '"worker_start"' in line:
                pids.append(int(json.loads(line[5:])["pid"]))
    return [p for p in pids if Path(f"/proc/{p}").exists()]


def kill_one(state_dir: Path, client: ApiClient, running: list[str], rng: random.Random) -> str | None:
    state = local.read_state(state_dir)
    targets = {name: pid for name, pid in (state.children if state else {}).items()}
    workers = worker_pids(client, running)
    if workers:
        targets["worker"] = rng.choice(workers)
    if not targets:
        return None
    name = rng.choice(sorted(targets))
    try:
        os.kill(targets[name], signal.SIGKILL)
    except ProcessLookupError:
        return None
    print(f"  {time.strftime('%H:%M:%S')} SIGKILL {name} (pid {targets[name]})", flush=True)
    return name


def call(fn, *args, retries: int = 120):
    """An API call that rides out an API or Redis restart (both are faults this script injects)."""
    for _ in range(retries - 1):
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001 - the API is down or answering 503 for a moment
            time.sleep(1.0)
    return fn(*args)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("load", "soak"))
    p.add_argument("--jobs", type=int, default=50, help="load: jobs submitted at once")
    p.add_argument("--minutes", type=float, default=20.0, help="soak: how long faults are injected")
    p.add_argument("--cap", type=int, default=2, help="DISTILLERY_MAX_RUNNING_JOBS")
    p.add_argument("--steps", type=int, default=20, help="distill steps per job")
    p.add_argument("--kill-every", type=float, default=60.0, help="soak: mean seconds between kills")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    rng = random.Random(a.seed)
    assets = builtin.prepare()
    root = Path(tempfile.mkdtemp(prefix="distillery-soak-"))
    os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "DISTILLERY_MODEL_ROOTS": str(assets.root),
                       "DISTILLERY_DATA_ROOTS": str(assets.root), "DISTILLERY_MAX_RUNNING_JOBS": str(a.cap),
                       "DISTILLERY_LEASE_S": "10"})
    dead_port = free_port()  # nothing answers there: the stack starts its own Redis
    state = local.up(root / "state", api_port=free_port(), dashboard_port=free_port(),
                     teacher_model=str(assets.teacher), runs_dir=root / "runs",
                     redis_url=f"redis://127.0.0.1:{dead_port}/0")
    print(state.describe(), flush=True)
    client = ApiClient(state.api_url)
    watch = MemoryWatch(state.supervisor_pid)
    watch.start()
    started = time.monotonic()
    submitted: list[str] = []
    faults: Counter[str] = Counter()
    resumed: set[str] = set()
    try:
        if a.mode == "load":
            for i in range(a.jobs):
                submitted.append(call(client.submit, job_spec(assets, state.teacher_endpoint, f"load{i}", a.steps))["id"])
        deadline = started + a.minutes * 60 if a.mode == "soak" else None
        next_kill = started + rng.expovariate(1 / a.kill_every)
        while True:
            jobs = {j["id"]: j for j in call(lambda: client.jobs(limit=200)["jobs"])}
            running = [i for i in submitted if jobs.get(i, {}).get("state") in ("starting", "running")]
            for job_id in submitted:
                if jobs.get(job_id, {}).get("state") in ("failed", "cancelled") and job_id not in resumed:
                    print(f"  job {job_id} {jobs[job_id]['state']}: {jobs[job_id]['error'][:120]}; resuming", flush=True)
                    call(client.resume, job_id)
                    resumed.add(job_id)
            if deadline is not None:
                if time.monotonic() < deadline:
                    queued = sum(1 for i in submitted if jobs.get(i, {}).get("state") == "queued")
                    if queued < a.cap:  # keep the stack busy
                        name = f"soak{len(submitted)}"
                        submitted.append(call(client.submit, job_spec(assets, state.teacher_endpoint, name,
                                                                      a.steps))["id"])
                    if time.monotonic() >= next_kill:
                        hit = kill_one(root / "state", client, running, rng)
                        if hit:
                            faults[hit] += 1
                        next_kill = time.monotonic() + rng.expovariate(1 / a.kill_every)
                elif all(jobs.get(i, {}).get("state") in TERMINAL for i in submitted):
                    break
            elif all(jobs.get(i, {}).get("state") in TERMINAL for i in submitted):
                break
            time.sleep(2.0)
        elapsed = time.monotonic() - started
        report(client, submitted, resumed, faults, watch.peak, elapsed, a)
    finally:
        watch.stop.set()
        local.down(root / "state")
    return 0


def report(client: ApiClient, submitted: list[str], resumed: set[str], faults: Counter, peak: int,
           elapsed: float, a: argparse.Namespace) -> None:
    """Steps redone: events are recorded once per (stage, step, rank), so a replayed step leaves no
    second metrics event; instead, at every restart of rank 0 (a `worker_start` after the first,
    in the same or a new attempt) the steps between the checkpoint it restored and the furthest
    step reached before it are counted."""
    records = {i: call(client.job, i) for i in submitted}
    redone = restarts = 0
    starts: list[tuple[float, str]] = []
    for job_id in submitted:
        reached: tuple[int, int] = (-1, 0)  # (stage order, step) furthest trained so far
        first_start = None
        seen_start = False
        listing = client.http.get(f"/v1/jobs/{job_id}/events", params={"follow": "false"})
        for line in listing.iter_lines():
            if not line.startswith("data:"):
                continue
            ev = json.loads(line[5:])
            if ev.get("rank") == 0 and ev.get("kind") == "metrics" and "loss" in ev:
                reached = max(reached, (STAGES.get(ev.get("stage"), -1), ev["step"]))
            elif ev.get("rank") == 0 and ev.get("kind") == "worker_start":
                if seen_start:
                    restarts += 1
                    stage, _, step = (ev.get("restored") or "-0").rpartition("-")
                    start = (STAGES.get(stage, -1), int(step or 0))
                    if reached[0] == start[0]:
                        redone += max(reached[1] - start[1], 0)
                    elif reached[0] > start[0]:
                        redone += reached[1]  # a later stage's steps, at least
                seen_start = True
            elif ev.get("kind") == "state" and ev.get("state") == "running" and first_start is None:
                first_start = ev["time"]
        starts.append((first_start or float("inf"), job_id))
    order = [job_id for _, job_id in sorted(starts)]
    displacement = max((abs(i - submitted.index(j)) for i, j in enumerate(order)), default=0)
    states = Counter(r["state"] for r in records.values())
    lost = len(submitted) - len(records) + sum(1 for r in records.values() if r["state"] != "succeeded")
    rows = [("mode", a.mode), ("cap on running jobs", a.cap), ("jobs submitted", len(submitted)),
            ("jobs succeeded", states["succeeded"]), ("jobs resumed after a failure", len(resumed)),
            ("jobs not succeeded (lost)", lost), ("faults injected", sum(faults.values())),
            ("  by target", ", ".join(f"{k} {v}" for k, v in sorted(faults.items())) or "-"),
            ("worker restarts (rank 0)", restarts), ("steps redone (rank 0)", redone),
            ("started in submission order", order == submitted),
            ("  most places a job started early or late", displacement),
            ("peak memory of the stack", f"{peak / 2**30:.2f} GiB"), ("wall time", f"{elapsed / 60:.1f} min")]
    width = max(len(k) for k, _ in rows)
    print("\n| what | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")


if __name__ == "__main__":
    sys.exit(main())
