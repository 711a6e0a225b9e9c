"""Scheduler: claims queued jobs, runs each as a Ray Job, holds its lease and records how it ended.

    DISTILLERY_RAY_ADDRESS=http://127.0.0.1:8265 DISTILLERY_RUNS_DIR=runs python -m services.scheduler
    # or: distillery scheduler

One pass (`tick`): renew the leases that are due -> take over jobs whose lease lapsed (their owner is
gone): adopt the ones whose Ray job Ray still knows, requeue the rest -> claim queued jobs while the
next one fits the cluster (services/admission.py) -> for each held job: fail it if its spec is
invalid (R-24), stop a cancelled one, submit a new one, or copy its Ray job's state into the store. `run_forever` repeats
the pass every `poll_s` and renews leases from a thread of its own every lease_s / 3, so a slow
pass never lets a lease lapse.

Takeover (R-20): a job whose lease lapsed while Ray still runs (or knows the end of) its submission
is adopted: the new scheduler takes the lease for the same attempt and carries on mirroring, so the
training is not interrupted. Only when Ray does not know the submission (a restarted Ray head) is
the job requeued, and its next attempt resumes from the last checkpoint.

Fencing (R-20, R-21): every write names the attempt and this scheduler's id, and the store's Lua
script refuses it when either has moved on. A scheduler that finds its lease renewal refused, or
the job hash naming another attempt or owner, writes nothing more for that job and forgets it; it
stops the Ray job of its attempt unless another scheduler adopted that very submission.

Ray Jobs: the submission id is `<job id>-a<attempt>` (Ray never accepts a submission id twice); the
plain job id is in the Ray job's metadata and names the Ray Train run. The run directory
`<runs_dir>/<job id>` is the same for every attempt, so attempt N resumes from the checkpoints of
attempt N - 1. Two drivers must not share a run directory, so before submitting attempt N the
scheduler stops every earlier attempt still alive and waits for it to end. The run directory is
read by the scheduler and the Ray workers alike: on many machines it is a shared volume.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import ValidationError

from student_worker.config import JobSpec
from teacher_server.model_dirs import ALLOW_DOWNLOADS_ENV

from .admission import wait_reason
from .leases import LeaseKeeper
from .rayapi import RayJobs
from .settings import Settings
from .store import ACTIVE, Job, JobNotFound, JobStore, QueueEntry, StoreUnavailable, TransitionRefused

log = logging.getLogger("distillery.scheduler")

LIVE = ("PENDING", "RUNNING")  # Ray job statuses that are not an end
EVENTS_URL_FILE = ".events-url"  # in the run directory, mode 0600: the workers' Redis event sink
JOB_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
MISSING_LIMIT = 3  # polls in a row Ray does not know a submitted job before it is given up
SUBMIT_TRIES = 60  # passes a submission Ray refuses for now (5xx) is retried before the job fails
ERROR_CHARS = 2000
# A failed job's reason, from the type of its root cause (the start of the driver's error line).
FAILURE_REASONS = {"NonFiniteLoss": "non_finite_loss", "TeacherUnavailable": "teacher_unavailable"}
PROGRESS_EVERY_S = 30.0  # a running job's progress line in the log at most this often


@dataclass
class Held:
    """A job this scheduler claimed: enough to fence its writes and find its Ray job."""

    job_id: str
    attempt: int
    run_dir: Path
    submission_id: str = ""  # set once Ray has the job
    stop_sent: bool = False
    missing: int = 0
    submit_errors: int = 0
    logged_at: float = 0.0  # monotonic s of the last progress line

    @property
    def ray_id(self) -> str:
        return submission_id(self.job_id, self.attempt)


def submission_id(job_id: str, attempt: int) -> str:
    return f"{job_id}-a{attempt}"


class Scheduler:
    def __init__(self, settings: Settings, store: JobStore | None = None, ray: RayJobs | None = None,
                 *, poll_s: float = 0.5, python: str = "python") -> None:
        self.settings = settings
        self.id = settings.scheduler_id
        self.store = store or JobStore(settings.redis_url, settings.redis_prefix, settings.events_max)
        self.ray = ray or RayJobs(settings.ray_address)
        self.runs_dir = Path(settings.runs_dir).resolve()
        self.leases = LeaseKeeper(self.store, self.id, settings.lease_s)
        self.held: dict[str, Held] = {}
        self.waiting: list[QueueEntry] = []  # read from the queue, not admitted yet (oldest first)
        self.poll_s = poll_s
        self.python = python  # the interpreter the Ray job's entrypoint runs, found on the cluster's PATH

    # ------------------------------------------------------------------ loop
    def run_forever(self, stop: threading.Event) -> None:
        """Tick until `stop` is set, then return without touching the held jobs: their leases
        lapse within lease_s and another scheduler reclaims them."""
        renewer = threading.Thread(target=self._renew_until, args=(stop,), name="lease-renewal", daemon=True)
        renewer.start()
        log.info("scheduler %s: Ray at %s, runs in %s, lease %.1f s", self.id, self.settings.ray_address,
                 self.runs_dir, self.settings.lease_s)
        while not stop.is_set():
            try:
                self.tick(stop)
            except (StoreUnavailable, OSError) as exc:
                log.warning("pass skipped: %s", exc)
            except Exception:  # noqa: BLE001 - one bad pass must not end the scheduler
                log.exception("pass failed")
            stop.wait(self.poll_s)
        renewer.join()
        log.info("scheduler %s stopped; %d held job(s) left to lapse", self.id, len(self.held))

    def _renew_until(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.lease_s / 6):
            self.leases.renew_due()

    def _job_env(self) -> dict[str, str]:
        """The Ray job's environment: the downloads switch follows the service's (off by default),
        whatever the Ray nodes' own environment says."""
        return {**JOB_ENV, ALLOW_DOWNLOADS_ENV: "1" if self.settings.allow_downloads else "0"}

    def tick(self, stop: threading.Event | None = None) -> None:
        """One pass; `stop` set means no new claims. Held jobs are stepped before claiming, so an
        end recorded in this pass frees its resources for the next job in the same pass."""
        self.leases.renew_due()
        self._reclaim()
        for job_id, attempt in self.leases.take_lost():
            held = self.held.get(job_id)
            if held is not None and held.attempt == attempt:
                self._abandon(held, "its lease was lost")
        for held in list(self.held.values()):
            self._step_safely(held)
        if stop is None or not stop.is_set():
            for held in self._claim():
                self._step_safely(held)

    def _step_safely(self, held: Held) -> None:
        try:
            self._step(held)
        except (StoreUnavailable, OSError, RuntimeError) as exc:
            log.warning("job %s: %s; trying again next pass", held.job_id, exc)
        except Exception:  # noqa: BLE001 - one job's surprise must not stall the others
            log.exception("job %s: pass failed", held.job_id)

    def _reclaim(self) -> None:
        for job_id in self.store.lapsed_ids():
            try:
                job = self.store.get(job_id)
            except JobNotFound:
                continue
            if job.submission_id and job.state in ACTIVE:
                got = self.ray.status(job.submission_id)  # an unreachable Ray: decided next pass
                if got is not None:
                    self._adopt(job, got[0])
                    continue
            if self.store.reclaim(job_id):
                job = self.store.get(job_id)
                log.warning("job %s: lease of attempt %d lapsed; now %s", job_id, job.attempt, job.state)

    def _adopt(self, job: Job, ray_status: str) -> None:
        if job.id in self.held or not self.store.adopt(job.id, attempt=job.attempt, submission_id=job.submission_id,
                                                       owner=self.id, lease_s=self.settings.lease_s):
            return
        self.held[job.id] = Held(job.id, job.attempt, (self.runs_dir / job.id).resolve(),
                                 submission_id=job.submission_id)
        self.leases.hold(job.id, job.attempt)
        log.warning("job %s: lease of attempt %d (owner %s) lapsed; adopted its Ray job %s (%s)", job.id,
                    job.attempt, job.owner or "nobody", job.submission_id, ray_status)

    def _claim(self) -> list[Held]:
        """Claim queued jobs, oldest first, while the next one fits (admission). The first that
        does not fit stays pending on this scheduler, its record saying why, and the ones after it
        wait too. Reads never block: a scheduler paused inside a blocking read would be handed
        entries it cannot claim until it resumes (R-21)."""
        active = None
        cluster = None
        claimed: list[Held] = []
        while True:
            if not self.waiting:
                self.waiting = self.store.read_queue(self.id, self.settings.lease_s, count=1, in_order=True)
                if not self.waiting:
                    return claimed
            entry = self.waiting[0]
            spec = self._queued_spec(entry)
            if spec is not None:
                if active is None:
                    active, cluster = self._active_specs(), self.ray.cluster()
                why = wait_reason(spec, active, cluster, self.settings.max_running_jobs)
                if why is not None:
                    self.store.keep(entry, self.id)
                    if self.store.note_waiting(entry.job_id, why):
                        log.info("job %s: waits: %s", entry.job_id, why)
                    return claimed
            self.waiting.pop(0)
            got = self.store.claim_entry(entry, self.id, self.settings.lease_s)
            if got is None:
                continue
            job, attempt = got
            self.held[job.id] = Held(job.id, attempt, (self.runs_dir / job.id).resolve())
            self.leases.hold(job.id, attempt)
            claimed.append(self.held[job.id])
            log.info("job %s: claimed, attempt %d", job.id, attempt)
            if active is not None and spec is not None:
                active.append(spec)

    def _queued_spec(self, entry: QueueEntry) -> JobSpec | None:
        """The spec of the queued job an entry names; None when the claim settles the entry
        without admission: a stale entry (refused by the claim) or an invalid spec (claimed, then
        failed with its reason, R-24)."""
        try:
            job = self.store.get(entry.job_id)
        except JobNotFound:
            return None
        if job.state != "queued" or job.attempt != entry.attempt:
            return None
        try:
            return JobSpec.model_validate(job.spec)
        except (ValidationError, ValueError):
            return None

    def _active_specs(self) -> list[JobSpec]:
        specs = []
        for job_id in self.store.active_ids():
            try:
                specs.append(JobSpec.model_validate(self.store.get(job_id).spec))
            except (JobNotFound, ValidationError, ValueError):
                continue
        return specs

    # ------------------------------------------------------------------ one held job
    def _step(self, held: Held) -> None:
        try:
            job = self.store.get(held.job_id)
        except JobNotFound:
            self._abandon(held, "its record is gone")
            return
        if not self._ours(job, held):
            self._abandon(held, f"the record shows attempt {job.attempt} of {job.owner or 'nobody'}, {job.state}")
        elif job.state == "cancelling":
            self._cancel(held)
        elif not held.submission_id:
            self._submit(held, job)
        else:
            self._mirror(held, job)

    def _ours(self, job: Job, held: Held) -> bool:
        return job.attempt == held.attempt and job.owner == self.id and job.state in ACTIVE

    def _submit(self, held: Held, job: Job) -> None:
        try:
            spec = self._run_spec(job, held.run_dir)
        except (ValidationError, ValueError) as exc:
            self._finish(held, "failed", reason="invalid_spec", error=_describe(exc))
            return
        if self._earlier_attempts_alive(held):
            return
        try:
            held.run_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(held.run_dir / "spec.json", spec.to_json())
            # The Redis URL (and any password in it) goes to the workers in a file only its owner
            # reads, never on the Ray job's command line, which the Ray dashboard shows.
            _write_atomic(held.run_dir / EVENTS_URL_FILE, events_url(
                self.settings.redis_url, self.settings.redis_prefix, self.settings.events_max), mode=0o600)
        except OSError as exc:
            self._finish(held, "failed", reason="run_dir_error", error=str(exc))
            return
        # Last look before Ray starts a driver: a scheduler paused since its claim must not start
        # a second driver on a run directory a newer attempt already uses.
        if not self.store.renew_lease(held.job_id, self.id, held.attempt, self.settings.lease_s):
            self._abandon(held, "its lease lapsed before submission")
            return
        if self.ray.status(held.ray_id) is None:  # a retried submission Ray already took is kept
            try:
                self.ray.submit(held.ray_id, self._entrypoint(held), env_vars=self._job_env(),
                                metadata={"distillery_job_id": held.job_id, "distillery_attempt": str(held.attempt)})
            except RuntimeError as exc:
                held.submit_errors += 1
                if _transient(exc) and held.submit_errors < SUBMIT_TRIES:  # e.g. Ray's job agent still starting
                    log.warning("job %s: Ray refused the submission for now (%s); trying again next pass",
                                held.job_id, exc)
                    return
                self._finish(held, "failed", reason="submit_failed", error=str(exc))
                return
        held.submission_id = held.ray_id
        log.info("job %s: submitted as Ray job %s", held.job_id, held.ray_id)
        got = self.ray.status(held.ray_id)
        if got is not None and got[0] != "PENDING":
            self._mark_running(held)
        else:  # Ray has not started the driver yet: `starting` until it has (see _mirror)
            self._mark_submitted(held)

    def _run_spec(self, job: Job, run_dir: Path) -> JobSpec:
        """The stored spec, validated, with the scheduler's run directory."""
        if run_dir.parent != self.runs_dir:
            raise ValueError(f"job id {job.id!r} does not name a directory inside {self.runs_dir}")
        spec = JobSpec.model_validate(job.spec)
        return spec.model_copy(update={"checkpoint": spec.checkpoint.model_copy(update={"dir": str(run_dir)})})

    def _earlier_attempts_alive(self, held: Held) -> bool:
        alive = []
        for n in range(1, held.attempt):
            got = self.ray.status(submission_id(held.job_id, n))
            if got is not None and got[0] in LIVE:
                self.ray.stop(submission_id(held.job_id, n))
                alive.append(submission_id(held.job_id, n))
        if alive:
            log.info("job %s: attempt %d waits for %s to stop", held.job_id, held.attempt, ", ".join(alive))
        return bool(alive)

    def _entrypoint(self, held: Held) -> str:
        """The Ray job's command line: every value as `--flag=value`, so none can be read as a
        flag, and no secret in it (the Redis URL is read from a 0600 file in the run directory)."""
        run = held.run_dir
        return shlex.join([
            self.python, "-m", "student_worker.run", f"--spec={run / 'spec.json'}", f"--job-id={held.job_id}",
            f"--attempt={held.attempt}", f"--events=file:{run / 'events.jsonl'}",
            f"--events=redis-file:{run / EVENTS_URL_FILE}",
        ])

    def _mark_submitted(self, held: Held) -> None:
        """Record the submission; the job stays `starting` while Ray has it PENDING."""
        try:
            self.store.transition(held.job_id, allowed=("starting",), to="starting", attempt=held.attempt,
                                  owner=self.id, submission_id=held.submission_id, quiet=True)
        except TransitionRefused as exc:
            self._refused(held, exc)

    def _mark_running(self, held: Held) -> None:
        try:
            self.store.transition(held.job_id, allowed=("starting",), to="running", attempt=held.attempt,
                                  owner=self.id, submission_id=held.submission_id)
        except TransitionRefused as exc:
            self._refused(held, exc)  # cancelling meanwhile: still ours, the next pass stops it

    def _mirror(self, held: Held, job: Job) -> None:
        got = self.ray.status(held.submission_id)
        if got is None:
            held.missing += 1
            if held.missing >= MISSING_LIMIT:  # e.g. a restarted Ray head: requeued once the lease lapses
                self._abandon(held, f"Ray does not know {held.submission_id}")
            return
        held.missing = 0
        if job.state == "starting" and got[0] != "PENDING":  # Ray started the driver (or it already ended)
            self._mark_running(held)
        if got[0] not in LIVE:
            self._record_end(held, *got, cancelling=False)
        elif job.progress and time.monotonic() - held.logged_at >= PROGRESS_EVERY_S:
            held.logged_at = time.monotonic()
            log.info("job %s: %s, %s step %s, loss %s", held.job_id, got[0], job.progress.get("stage"),
                     job.progress.get("step"), job.progress.get("loss"))

    def _cancel(self, held: Held) -> None:
        if not held.submission_id:
            self._finish(held, "cancelled", reason="cancelled_by_user")
            return
        got = self.ray.status(held.submission_id)
        if got is None or got[0] not in LIVE:
            self._record_end(held, *(got or ("STOPPED", "")), cancelling=True)
        elif not held.stop_sent:
            self.ray.stop(held.submission_id)
            held.stop_sent = True
            log.info("job %s: cancelling; asked Ray to stop %s", held.job_id, held.submission_id)

    def _record_end(self, held: Held, status: str, message: str, *, cancelling: bool) -> None:
        if status == "SUCCEEDED":  # finished before a cancel could stop it: the result stands
            self._finish(held, "succeeded", summary=self._summary(held), checkpoint=self._latest_checkpoint(held))
        elif cancelling:
            self._finish(held, "cancelled", reason="cancelled_by_user")
        elif status == "STOPPED":
            self._finish(held, "cancelled", reason="ray_job_stopped", error=message[:ERROR_CHARS])
        else:
            self._finish(held, "failed", **self._failure(held, message))

    def _failure(self, held: Held, message: str) -> dict[str, str]:
        """The entrypoint's one-line error (`job <id> failed: <Type>: <message>`) when it printed
        one, else Ray's message (the process died: killed, out of memory, ...)."""
        marker = f"job {held.job_id} failed: "
        text = message if marker in message else self._logs(held.submission_id)
        line = next((ln for ln in reversed(text.splitlines()) if marker in ln), "")
        if not line:
            return {"reason": "ray_job_failed", "error": message[-ERROR_CHARS:]}
        error = line.split(marker, 1)[1][:ERROR_CHARS]
        return {"reason": FAILURE_REASONS.get(error.split(":", 1)[0], "job_failed"), "error": error}

    def _logs(self, sid: str) -> str:
        try:
            return self.ray.logs(sid)
        except (RuntimeError, OSError) as exc:
            log.warning("logs of %s unavailable: %s", sid, exc)
            return ""

    def _summary(self, held: Held) -> dict[str, Any]:
        try:
            summary = json.loads((held.run_dir / "summary.json").read_text())
        except (OSError, ValueError) as exc:
            log.warning("job %s: no readable summary.json (%s)", held.job_id, exc)
            return {}
        return summary if isinstance(summary, dict) else {"value": summary}

    def _latest_checkpoint(self, held: Held) -> str:
        try:
            return (held.run_dir / "checkpoints" / "latest").read_text().strip()
        except OSError:
            return ""

    # ------------------------------------------------------------------ writes and letting go
    def _finish(self, held: Held, to: str, **fields: Any) -> None:
        try:
            self.store.transition(held.job_id, allowed=ACTIVE, to=to, attempt=held.attempt, owner=self.id,
                                  **fields)
        except TransitionRefused as exc:
            self._refused(held, exc)
            return
        log.info("job %s: %s (attempt %d)%s", held.job_id, to, held.attempt,
                 f": {fields['reason']}" if fields.get("reason") else "")
        self._drop(held)

    def _refused(self, held: Held, exc: TransitionRefused) -> None:
        log.warning("job %s attempt %d: write refused: %s", held.job_id, held.attempt, exc)
        try:
            job = self.store.get(held.job_id)
        except JobNotFound:
            job = None
        if job is None or not self._ours(job, held):
            self._abandon(held, "a newer attempt or owner has it")

    def _abandon(self, held: Held, why: str) -> None:
        """Let go of a job that is no longer ours: no writes, and its Ray job for this attempt stops
        unless another scheduler adopted that submission."""
        adopted = held.submission_id and self._adopted_elsewhere(held)
        log.warning("job %s attempt %d: letting go, %s%s", held.job_id, held.attempt, why,
                    f"; {adopted} carries on with its Ray job" if adopted else "")
        if held.submission_id and not adopted:
            self._stop_quietly(held.submission_id)
        self._drop(held)

    def _adopted_elsewhere(self, held: Held) -> str:
        """The owner that adopted this attempt's submission, or ""."""
        try:
            job = self.store.get(held.job_id)
        except (JobNotFound, StoreUnavailable):
            return ""
        same = (job.attempt, job.submission_id) == (held.attempt, held.submission_id)
        return job.owner if same and job.state in ACTIVE and job.owner not in ("", self.id) else ""

    def _drop(self, held: Held) -> None:
        self.held.pop(held.job_id, None)
        self.leases.release(held.job_id)

    def _stop_quietly(self, sid: str) -> None:
        try:
            if self.ray.stop(sid):
                log.info("stopped Ray job %s", sid)
        except (RuntimeError, OSError) as exc:
            log.warning("could not stop Ray job %s: %s", sid, exc)


# ---------------------------------------------------------------------- helpers
def events_url(redis_url: str, prefix: str, max_events: int | None = None) -> str:
    """The worker's Redis event sink: the service's Redis URL with `?prefix=` (and `max_events=`,
    the per-job bound of DISTILLERY_EVENTS_MAX, which the worker's sink trims to as well)."""
    parts = urlsplit(redis_url)
    ours = {"prefix": prefix} | ({"max_events": str(max_events)} if max_events is not None else {})
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ours] + list(ours.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _transient(exc: RuntimeError) -> bool:
    """A refusal worth retrying: Ray answered 5xx ("No available agent to submit job, please try
    again later" while its dashboard agent starts)."""
    text = str(exc)
    return "status code 5" in text or "try again later" in text


def _describe(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        text = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors())
    else:
        text = str(exc)
    return text[:ERROR_CHARS]


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)  # the mode from the start
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)  # whatever the umask
    tmp.replace(path)


def main(settings: Settings) -> int:
    """`distillery scheduler`: run until SIGTERM or SIGINT, then exit and let the leases lapse."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: no new claims; held leases will lapse", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    Scheduler(settings).run_forever(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(Settings.from_env()))
