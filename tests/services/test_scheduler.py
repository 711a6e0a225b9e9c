"""Scheduler: decisions against a fake Ray (fast), then whole jobs on a real local Ray with its Jobs
API and the faults R-20..R-24 (slow). Redis is real throughout; every test has its own prefix."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.scheduler import LIVE, Scheduler, events_url, submission_id
from services.settings import Settings
from services.store import TERMINAL, JobStore, TransitionRefused

FAST_SPEC = {"name": "fast", "student": {"model": "/models/student"}, "teacher": {"local_model": "/models/teacher"},
             "data": {"path": "/data/train.jsonl"}}


class FakeRay:
    """Ray Jobs as the scheduler sees them. Statuses are set by the test; a stop takes effect at
    `settle()`, as Ray's does a moment later. `before_status` runs once, at the next status call."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}
        self.stops: list[str] = []
        self.before_status = None

    def submit(self, sid: str, entrypoint: str, *, metadata: dict, env_vars: dict) -> None:
        assert sid not in self.jobs, f"{sid} submitted twice"
        self.jobs[sid] = {"status": "PENDING", "message": "", "logs": "", "entrypoint": entrypoint,
                          "metadata": metadata, "env": env_vars, "stopping": False}

    def status(self, sid: str):
        hook, self.before_status = self.before_status, None
        if hook is not None:
            hook(sid)
        job = self.jobs.get(sid)
        return None if job is None else (job["status"], job["message"])

    def stop(self, sid: str) -> bool:
        self.stops.append(sid)
        job = self.jobs.get(sid)
        if job is None or job["status"] not in LIVE:
            return False
        job["stopping"] = True
        return True

    def settle(self) -> None:
        for job in self.jobs.values():
            if job["stopping"] and job["status"] in LIVE:
                job["status"] = "STOPPED"

    def logs(self, sid: str) -> str:
        return self.jobs[sid]["logs"]

    def set(self, sid: str, status: str, message: str = "", logs: str = "") -> None:
        self.jobs[sid].update(status=status, message=message, logs=logs)


def settings(redis_url: str, prefix: str, runs: Path, name: str = "sched-a", lease_s: float = 30.0,
             ray_address: str = "http://127.0.0.1:1") -> Settings:
    return Settings(redis_url=redis_url, redis_prefix=prefix, runs_dir=str(runs), lease_s=lease_s,
                    scheduler_id=name, ray_address=ray_address)


def state_events(store: JobStore, job_id: str) -> list[dict]:
    return [e for _, e in store.events(job_id, count=100_000) if e.get("kind") == "state"]


def drive(schedulers: list[Scheduler], until, timeout_s: float, every_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, "timed out"
        for s in schedulers:
            s.tick()
        time.sleep(every_s)


@pytest.fixture
def store(redis_url, redis_prefix) -> JobStore:
    return JobStore(redis_url, redis_prefix)


@pytest.fixture
def make(redis_url, redis_prefix, tmp_path):
    """make(ray, name=..., lease_s=...) -> a Scheduler on this test's prefix and runs directory."""
    def build(ray, name: str = "sched-a", lease_s: float = 30.0, ray_address: str = "http://127.0.0.1:1"):
        return Scheduler(settings(redis_url, redis_prefix, tmp_path / "runs", name, lease_s, ray_address),
                         ray=ray, poll_s=0.1)

    return build


# ====================================================================== fast: a fake Ray
def test_a_claimed_job_runs_as_a_ray_job_and_its_success_is_recorded(store, make, tmp_path, redis_url,
                                                                      redis_prefix):
    ray = FakeRay()
    sched = make(ray)
    job_id, _ = store.create(FAST_SPEC, name="fast")
    sched.tick()

    sid = submission_id(job_id, 1)
    assert sid == f"{job_id}-a1" and list(ray.jobs) == [sid]
    run_dir = (tmp_path / "runs" / job_id).resolve()
    submitted = ray.jobs[sid]
    assert submitted["metadata"]["distillery_job_id"] == job_id
    assert submitted["env"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert shlex.split(submitted["entrypoint"]) == [
        "python", "-m", "student_worker.run", f"--spec={run_dir}/spec.json", f"--job-id={job_id}",
        "--attempt=1", f"--events=file:{run_dir}/events.jsonl",
        f"--events=redis-file:{run_dir}/.events-url"]
    # The Redis URL is never on the command line (the Ray dashboard shows it): a 0600 file.
    assert redis_url not in submitted["entrypoint"]
    url_file = run_dir / ".events-url"
    assert url_file.read_text() == f"{redis_url}?prefix={redis_prefix}&max_events=10000"
    assert url_file.stat().st_mode & 0o777 == 0o600
    from student_worker.config import JobSpec

    written = JobSpec.from_file(run_dir / "spec.json")
    assert written.checkpoint.dir == str(run_dir) and written.student.model == "/models/student"
    job = store.get(job_id)
    assert (job.state, job.attempt, job.owner, job.submission_id) == ("running", 1, "sched-a", sid)
    assert store.r.pttl(store.k.lease(job_id)) > 0

    sched.tick()  # still running: nothing changes
    assert store.get(job_id).state == "running"
    (run_dir / "summary.json").write_text('{"stage": "done", "eval": {"student": {"n": 4}}}')
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest").write_text("done-00000000")
    ray.set(sid, "SUCCEEDED", "Job finished successfully.")
    sched.tick()

    job = store.get(job_id)
    assert job.state == "succeeded" and job.summary["eval"]["student"]["n"] == 4
    assert job.checkpoint == "done-00000000"
    assert not store.r.exists(store.k.lease(job_id)) and store.active_ids() == [] and sched.held == {}
    assert [(e["previous"], e["state"]) for e in state_events(store, job_id)] == [
        ("starting", "running"), ("running", "succeeded")]


@pytest.mark.parametrize("logs, reason, error", [
    ("step 3\njob {id} failed: NonFiniteLoss: 3 non-finite losses in a row at distill step 3\n",
     "non_finite_loss", "NonFiniteLoss: 3 non-finite losses in a row at distill step 3"),
    ("job {id} failed: ValueError: prompts of 16 tokens exceed the teacher's limit\n",
     "job_failed", "ValueError: prompts of 16 tokens exceed the teacher's limit"),
    ("Killed\n", "ray_job_failed", "Job entrypoint command failed with exit code 137"),
])
def test_a_failed_ray_job_is_failed_with_its_error_and_reason(store, make, logs, reason, error):
    ray = FakeRay()
    sched = make(ray)
    job_id, _ = store.create(FAST_SPEC, name="fast")
    sched.tick()
    ray.set(submission_id(job_id, 1), "FAILED", "Job entrypoint command failed with exit code 137",
            logs=logs.format(id=job_id))
    sched.tick()
    job = store.get(job_id)
    assert (job.state, job.reason, job.error) == ("failed", reason, error)


def test_r24_corrupt_payloads_fail_with_a_reason_and_the_scheduler_keeps_going(store, make):
    ray = FakeRay()
    sched = make(ray)
    garbage, _ = store.create(FAST_SPEC, name="garbage")
    store.r.hset(store.k.job(garbage), "spec", "{not json at all")  # binary garbage: the next test
    wrong, _ = store.create({**FAST_SPEC, "distill": {"steps": -3}, "extra": 1}, name="wrong")
    good, _ = store.create(FAST_SPEC, name="good")
    sched.tick()

    for job_id in (garbage, wrong):
        job = store.get(job_id)
        assert (job.state, job.reason) == ("failed", "invalid_spec"), job
    assert "student: Field required" in store.get(garbage).error
    assert "distill.steps" in store.get(wrong).error and "extra" in store.get(wrong).error
    assert store.get(good).state == "running" and list(ray.jobs) == [submission_id(good, 1)]


def test_r24_a_payload_that_is_not_even_text_fails_with_a_reason(store, make):
    ray = FakeRay()
    sched = make(ray)
    garbage, _ = store.create(FAST_SPEC, name="garbage")
    store.r.hset(store.k.job(garbage), "spec", b"\x00{\xff\xfe")
    good, _ = store.create(FAST_SPEC, name="good")
    for _ in range(3):
        sched.tick()
    assert (store.get(garbage).state, store.get(garbage).reason) == ("failed", "invalid_spec")
    assert store.get(good).state == "running"


def test_cancel_stops_the_ray_job_and_ends_cancelled(store, make):
    ray = FakeRay()
    sched = make(ray)
    job_id, _ = store.create(FAST_SPEC, name="fast")
    sched.tick()
    sid = submission_id(job_id, 1)
    ray.set(sid, "RUNNING")
    assert store.request_cancel(job_id) == "cancelling"
    sched.tick()
    assert ray.stops == [sid] and store.get(job_id).state == "cancelling"  # until Ray says it stopped
    sched.tick()
    assert ray.stops == [sid]  # asked once
    ray.settle()
    sched.tick()
    job = store.get(job_id)
    assert (job.state, job.reason) == ("cancelled", "cancelled_by_user") and sched.held == {}


def test_a_cancel_that_lands_during_submission_still_stops_the_ray_job(store, make):
    ray = FakeRay()
    sched = make(ray)
    job_id, _ = store.create(FAST_SPEC, name="fast")
    ray.before_status = lambda _sid: store.request_cancel(job_id)  # between claim and submission
    sched.tick()
    sid = submission_id(job_id, 1)
    assert sid in ray.jobs and store.get(job_id).state == "cancelling"
    sched.tick()
    ray.settle()
    sched.tick()
    assert ray.stops == [sid] and store.get(job_id).state == "cancelled"


def test_an_unreachable_ray_keeps_the_job_claimed_not_failed(store, redis_url, redis_prefix, tmp_path):
    from services.scheduler import RayJobs

    sched = Scheduler(settings(redis_url, redis_prefix, tmp_path / "runs"), ray=RayJobs("http://127.0.0.1:1"))
    job_id, _ = store.create(FAST_SPEC, name="fast")
    sched.tick()
    sched.tick()
    job = store.get(job_id)
    assert (job.state, job.owner, job.error) == ("starting", "sched-a", "") and job_id in sched.held
    assert store.r.pttl(store.k.lease(job_id)) > 0


def test_a_reclaimed_job_waits_for_the_earlier_attempt_and_the_stale_owner_lets_go(store, make):
    """R-20 in small: A's lease lapses; B requeues and claims the job with attempt 2, stops A's Ray
    job and submits attempt 2 only once it ended; A then finds its lease gone and writes nothing."""
    ray = FakeRay()
    a, b = make(ray, "sched-a", lease_s=0.6), make(ray, "sched-b")
    job_id, _ = store.create(FAST_SPEC, name="fast")
    a.tick()
    a1, a2 = submission_id(job_id, 1), submission_id(job_id, 2)
    ray.set(a1, "RUNNING")
    time.sleep(0.7)  # A does not tick: its lease lapses

    b.tick()
    job = store.get(job_id)
    assert (job.state, job.attempt, job.owner) == ("starting", 2, "sched-b")
    assert a1 in ray.stops and a2 not in ray.jobs  # attempt 1 still running: no second driver yet
    ray.settle()
    b.tick()
    assert a2 in ray.jobs and store.get(job_id).state == "running"

    events_before, stops_before = state_events(store, job_id), ray.stops.count(a1)
    a.tick()
    assert a.held == {} and ray.stops.count(a1) == stops_before + 1  # A stopped its own attempt too
    assert state_events(store, job_id) == events_before  # and wrote nothing
    job = store.get(job_id)
    assert (job.state, job.attempt, job.owner) == ("running", 2, "sched-b")
    states = [(e["state"], e["attempt"], e.get("reason")) for e in events_before]
    assert states == [("running", 1, None), ("queued", 1, "lease_lapsed"), ("running", 2, None)]


def test_r21_a_stale_schedulers_write_is_refused_by_the_fence(store, make, caplog):
    """A reads its job, pauses, and by the time it writes the result B owns attempt 2: A's write is
    refused, A stops its Ray job and lets go; the record stays B's."""
    ray = FakeRay()
    a, b = make(ray, "sched-a"), make(ray, "sched-b")
    job_id, _ = store.create(FAST_SPEC, name="fast")
    a.tick()
    a1 = submission_id(job_id, 1)

    def takeover(_sid: str) -> None:  # what happens elsewhere while A is paused
        store.r.delete(store.k.lease(job_id))
        b.tick()

    ray.set(a1, "SUCCEEDED")
    ray.before_status = takeover
    a.tick()

    assert "write refused" in caplog.text and "attempt:2" in caplog.text
    assert a.held == {} and a1 in ray.stops
    job = store.get(job_id)
    assert (job.state, job.attempt, job.owner) == ("running", 2, "sched-b")
    assert not any(e["state"] in TERMINAL for e in state_events(store, job_id))


def test_r22_fifty_clients_race_to_claim_ten_jobs(redis_url, redis_prefix):
    """Each job is claimed once per attempt: 50 threads, each with its own connection, race for 10
    queued jobs; then all leases lapse, every thread reclaims at once and they race again."""
    ids = [JobStore(redis_url, redis_prefix).create(FAST_SPEC, name=f"race{i}")[0] for i in range(10)]

    def race() -> list[tuple[str, int, str]]:
        claims: list[tuple[str, int, str]] = []
        lock, go = threading.Lock(), threading.Barrier(50)

        def client(n: int) -> None:
            store = JobStore(redis_url, redis_prefix)
            go.wait()
            store.reclaim_expired()
            for _ in range(20):
                for job, attempt in store.claim_next(f"client-{n}", lease_s=60, block_ms=None):
                    with lock:
                        claims.append((job.id, attempt, f"client-{n}"))
                time.sleep(0.005)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return claims

    store = JobStore(redis_url, redis_prefix)
    for attempt in (1, 2):
        claims = race()
        assert sorted(c[0] for c in claims) == sorted(ids), claims  # every job, once
        assert {c[1] for c in claims} == {attempt}
        for job_id, _, owner in claims:
            assert (store.get(job_id).attempt, store.get(job_id).owner) == (attempt, owner)
        store.r.delete(*[store.k.lease(i) for i in ids])  # every lease lapses
    assert sum(e["state"] == "queued" for i in ids for e in state_events(store, i)) == 10


def test_leases_are_renewed_while_running_and_lapse_once_stopped(store, make):
    ray = FakeRay()
    a, b = make(ray, "sched-a", lease_s=0.9), make(ray, "sched-b")
    job_id, _ = store.create(FAST_SPEC, name="fast")
    stop = threading.Event()
    runner = threading.Thread(target=a.run_forever, args=(stop,))
    runner.start()
    try:
        drive([], lambda: store.get(job_id).state == "running", 10)
        t_end = time.monotonic() + 2.5  # almost three leases: A's renewals keep B away
        while time.monotonic() < t_end:
            b.tick()
            time.sleep(0.1)
        job = store.get(job_id)
        assert (job.state, job.attempt, job.owner) == ("running", 1, "sched-a")
    finally:
        stop.set()
        runner.join(timeout=10)
    assert not runner.is_alive()
    drive([b], lambda: store.get(job_id).attempt == 2, 5, every_s=0.05)
    ray.settle()
    drive([b], lambda: store.get(job_id).state == "running", 5, every_s=0.05)
    assert store.get(job_id).owner == "sched-b" and submission_id(job_id, 2) in ray.jobs


def test_events_url_adds_the_prefix():
    assert events_url("redis://h:6379/2", "p") == "redis://h:6379/2?prefix=p"
    assert events_url("rediss://h:6380/0?ssl_cert_reqs=none&prefix=x", "p") == \
        "rediss://h:6380/0?ssl_cert_reqs=none&prefix=p"
    assert events_url("redis://h:6379/2?max_events=1", "p", 50) == "redis://h:6379/2?prefix=p&max_events=50"


def test_the_worker_sink_keeps_the_services_event_bound(redis_url, tmp_path):
    """DISTILLERY_EVENTS_MAX reaches the worker: its sink trims the job's stream to that many.
    The sink's URL comes from the file the scheduler writes (`redis-file:`), as in a real job."""
    import uuid

    from student_worker.events import open_sink

    prefix = f"test-bound-{uuid.uuid4().hex[:8]}"
    store = JobStore(redis_url, prefix, max_events=5)
    job_id, _ = store.create({"name": "bound"}, name="bound")
    url_file = tmp_path / ".events-url"
    url_file.write_text(events_url(redis_url, prefix, 5))
    sink = open_sink([f"redis-file:{url_file}"], job_id=job_id, attempt=0)
    assert sink.sinks[0].max_events == 5
    for step in range(1, 301):
        sink.emit({"kind": "metrics", "stage": "distill", "step": step, "rank": 0, "loss": 1.0})
    sink.close()
    kept = [e["step"] for _, e in store.events(job_id, count=1000) if e.get("kind") == "metrics"]
    # XADD MAXLEN ~ trims whole stream nodes (100 entries each by default): at least 5 are kept,
    # at most a node more, always the newest.
    assert 5 <= len(kept) <= 105 and kept == list(range(301 - len(kept), 301))
    store.r.delete(*store.r.keys(f"{prefix}*"))


# ====================================================================== slow: a real local Ray
def ray_client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def worker_events(store: JobStore, job_id: str, kind: str) -> list[dict]:
    return [e for _, e in store.events(job_id, count=100_000) if e.get("kind") == kind]


def start_scheduler(redis_url: str, prefix: str, ray_address: str, runs: Path, name: str, lease_s: float,
                    log_path: Path) -> subprocess.Popen:
    """`python -m services.scheduler` configured through the environment, as `distillery scheduler` is."""
    env = {**os.environ, "REDIS_URL": redis_url, "DISTILLERY_REDIS_PREFIX": prefix,
           "DISTILLERY_RAY_ADDRESS": ray_address, "DISTILLERY_RUNS_DIR": str(runs),
           "DISTILLERY_LEASE_S": str(lease_s), "DISTILLERY_SCHEDULER_ID": name, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        return subprocess.Popen([sys.executable, "-m", "services.scheduler"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)


@pytest.fixture
def processes():
    """Scheduler processes a test started; any still alive at the end is killed (by pid)."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


def trained_past(store: JobStore, job_id: str, step: int) -> bool:
    return any(e.get("stage") == "distill" and e.get("step", 0) >= step and e.get("rank") == 0
               for e in worker_events(store, job_id, "metrics"))


def assert_ray_cpus_free() -> None:
    import ray

    wait_for(lambda: ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"], 30,
             "every CPU free")


# Long enough to be interrupted: the faults land after the step-10 checkpoint, and a stopped attempt
# takes a few seconds (lease, stop) to end. Ray Train gets a report every 5th step (each one is a
# ~2 s round trip through its controller), so a step takes ~0.5 s on two cores.
STEPS = 60
LONG = {"distill": {"steps": STEPS}, "checkpoint": {"every_steps": 10}, "log_every": 5}


@pytest.fixture(scope="module")
def end_to_end(ray_jobs_address, redis_url, job_spec_doc, tmp_path_factory):
    """One scheduler, two jobs: a corrupt payload first, then a good job with eval (R-24)."""
    import uuid

    prefix = f"test-sched-{uuid.uuid4().hex[:10]}"
    store = JobStore(redis_url, prefix)
    runs = tmp_path_factory.mktemp("runs")
    sched = Scheduler(settings(redis_url, prefix, runs, ray_address=ray_jobs_address))
    corrupt, _ = store.create(job_spec_doc(), name="corrupt")
    store.r.hset(store.k.job(corrupt), "spec", "{{{ garbage")
    good, _ = store.create(job_spec_doc(eval={"enabled": True}), name="good")
    try:
        drive([sched], lambda: store.get(good).state in TERMINAL, 240, every_s=0.5)
        yield store, corrupt, good, runs
    finally:
        keys = list(store.r.scan_iter(match=f"{prefix}:*"))
        if keys:
            store.r.delete(*keys)


@pytest.mark.slow
def test_a_job_runs_end_to_end_through_the_scheduler(end_to_end, ray_jobs_address):
    store, _, good, runs = end_to_end
    job = store.get(good)
    assert (job.state, job.attempt, job.owner) == ("succeeded", 1, "sched-a"), job.error
    assert job.summary["stage"] == "done" and job.checkpoint == "done-00000000"
    assert job.summary["eval"]["student"]["n"] == 4 and "rouge_l" in job.summary["eval"]["teacher"]
    steps = [e["step"] for e in worker_events(store, good, "metrics") if e["rank"] == 0]
    assert steps == [1, 2, 3, 4] and all("loss" in e for e in worker_events(store, good, "metrics"))
    assert job.progress["step"] == 4
    assert [e["state"] for e in state_events(store, good)] == ["running", "succeeded"]
    assert ray_client(ray_jobs_address).get_job_status(job.submission_id).value == "SUCCEEDED"
    assert (runs / good / "spec.json").exists() and (runs / good / "events.jsonl").exists()
    assert not store.r.exists(store.k.lease(good)) and store.active_ids() == []


@pytest.mark.slow
def test_r24_a_corrupt_payload_fails_and_the_scheduler_keeps_going(end_to_end):
    store, corrupt, good, _ = end_to_end
    job = store.get(corrupt)
    assert (job.state, job.reason) == ("failed", "invalid_spec") and "student" in job.error
    assert store.get(good).state == "succeeded"


@pytest.mark.slow
def test_cancel_stops_the_running_ray_job(ray_jobs_address, redis_url, redis_prefix, store, job_spec_doc,
                                          tmp_path):
    sched = Scheduler(settings(redis_url, redis_prefix, tmp_path / "runs", ray_address=ray_jobs_address))
    job_id, _ = store.create(job_spec_doc(**LONG), name="cancel")
    client = ray_client(ray_jobs_address)
    sid = submission_id(job_id, 1)
    drive([sched], lambda: store.get(job_id).state == "running" and client.get_job_status(sid).value == "RUNNING",
          60)
    assert store.request_cancel(job_id) == "cancelling"
    drive([sched], lambda: store.get(job_id).state == "cancelled", 60)
    assert client.get_job_status(sid).value == "STOPPED"
    assert [e["state"] for e in state_events(store, job_id)] == ["running", "cancelling", "cancelled"]
    assert sched.held == {} and not store.r.exists(store.k.lease(job_id))
    assert_ray_cpus_free()


@pytest.mark.slow
def test_r20_a_killed_scheduler_is_replaced_and_the_job_resumes(ray_jobs_address, redis_url, redis_prefix,
                                                                 store, job_spec_doc, tmp_path, processes):
    runs = tmp_path / "runs"
    job_id, _ = store.create(job_spec_doc(**LONG), name="r20")
    processes.append(start_scheduler(redis_url, redis_prefix, ray_jobs_address, runs, "sched-a", 3.0,
                                     tmp_path / "a.log"))
    wait_for(lambda: trained_past(store, job_id, 11), 120, "attempt 1 past its first checkpoint")
    os.kill(processes[0].pid, signal.SIGKILL)
    processes[0].wait()

    b = Scheduler(settings(redis_url, redis_prefix, runs, "sched-b", ray_address=ray_jobs_address))
    drive([b], lambda: store.get(job_id).state in TERMINAL, 180, every_s=0.3)

    job = store.get(job_id)
    assert (job.state, job.attempt, job.owner) == ("succeeded", 2, "sched-b"), job.error
    client = ray_client(ray_jobs_address)
    assert client.get_job_status(submission_id(job_id, 1)).value in ("STOPPED", "SUCCEEDED")
    assert client.get_job_status(submission_id(job_id, 2)).value == "SUCCEEDED"
    states = [(e["state"], e["attempt"]) for e in state_events(store, job_id)]
    assert states == [("running", 1), ("queued", 1), ("running", 2), ("succeeded", 2)]
    assert_resumed(store, job_id)
    assert not store.r.exists(store.k.lease(job_id)) and store.active_ids() == []
    assert_ray_cpus_free()


def assert_resumed(store: JobStore, job_id: str) -> None:
    """Attempt 2's worker started from a checkpoint and carried on after its step."""
    events = [e for _, e in store.events(job_id, count=100_000)]
    second = max(i for i, e in enumerate(events) if e.get("kind") == "state" and e["state"] == "running")
    starts = [e for e in events[second:] if e.get("kind") == "worker_start" and e["rank"] == 0]
    assert len(starts) == 1 and starts[0]["restored"], starts
    stage, _, step = starts[0]["restored"].rpartition("-")
    steps = [e["step"] for e in events[second:] if e.get("kind") == "metrics" and e["rank"] == 0]
    if stage == "distill":
        assert steps == list(range(int(step) + 1, STEPS + 1))
    else:  # attempt 1 had finished before it could be stopped
        assert stage == "done" and steps == []


@pytest.mark.slow
def test_r21_a_paused_scheduler_resumes_as_a_zombie_and_its_writes_are_refused(
        ray_jobs_address, redis_url, redis_prefix, store, job_spec_doc, tmp_path, processes):
    runs = tmp_path / "runs"
    log_a = tmp_path / "a.log"
    job_id, _ = store.create(job_spec_doc(**LONG), name="r21")
    processes.append(start_scheduler(redis_url, redis_prefix, ray_jobs_address, runs, "sched-a", 3.0, log_a))
    a = processes[0]
    wait_for(lambda: trained_past(store, job_id, 11), 120, "attempt 1 past its first checkpoint")
    os.kill(a.pid, signal.SIGSTOP)

    b = Scheduler(settings(redis_url, redis_prefix, runs, "sched-b", ray_address=ray_jobs_address))
    drive([b], lambda: store.get(job_id).attempt == 2 and store.get(job_id).state == "running", 60, every_s=0.3)
    os.kill(a.pid, signal.SIGCONT)
    wait_for(lambda: "letting go" in log_a.read_text(), 30, "the zombie to notice")
    with pytest.raises(TransitionRefused):  # the fence A's writes meet
        store.transition(job_id, allowed=("running",), to="failed", attempt=1, owner="sched-a")
    drive([b], lambda: store.get(job_id).state in TERMINAL, 180, every_s=0.3)

    job = store.get(job_id)
    assert (job.state, job.attempt, job.owner) == ("succeeded", 2, "sched-b"), job.error
    states = [(e["state"], e["attempt"]) for e in state_events(store, job_id)]
    assert states == [("running", 1), ("queued", 1), ("running", 2), ("succeeded", 2)]
    assert_resumed(store, job_id)
    a.send_signal(signal.SIGTERM)  # `distillery scheduler` exits cleanly on SIGTERM
    assert a.wait(timeout=15) == 0
    assert "SIGTERM" in log_a.read_text()
    assert ray_client(ray_jobs_address).get_job_status(submission_id(job_id, 1)).value in ("STOPPED", "SUCCEEDED")
    assert_ray_cpus_free()
