"""Lease renewal for the jobs a scheduler holds, from a thread of its own (services/scheduler.py)."""

from __future__ import annotations

import logging
import threading
import time

from .store import JobStore, StoreUnavailable

log = logging.getLogger("distillery.scheduler")


class LeaseKeeper:
    """Renews the leases of held jobs every lease_s / 3. A refused renewal means the lease lapsed
    and someone else may own the job now: it is reported once by `take_lost` and never renewed."""

    def __init__(self, store: JobStore, owner: str, lease_s: float) -> None:
        self.store, self.owner, self.lease_s = store, owner, lease_s
        self._lock = threading.Lock()
        self._held: dict[str, tuple[int, float]] = {}  # job id -> (attempt, last renewal, monotonic s)
        self._lost: list[tuple[str, int]] = []

    def hold(self, job_id: str, attempt: int) -> None:
        with self._lock:
            self._held[job_id] = (attempt, time.monotonic())

    def release(self, job_id: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)
            self._lost = [lost for lost in self._lost if lost[0] != job_id]

    def take_lost(self) -> list[tuple[str, int]]:
        with self._lock:
            lost, self._lost = self._lost, []
        return lost

    def renew_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [(j, a) for j, (a, at) in self._held.items() if now - at >= self.lease_s / 3]
        for job_id, attempt in due:
            try:
                ok = self.store.renew_lease(job_id, self.owner, attempt, self.lease_s)
            except StoreUnavailable as exc:
                log.warning("job %s: lease not renewed (%s)", job_id, exc)
                continue
            with self._lock:
                if self._held.get(job_id, (None,))[0] != attempt:
                    continue  # released while the renewal was in flight
                if ok:
                    self._held[job_id] = (attempt, time.monotonic())
                else:
                    del self._held[job_id]
                    self._lost.append((job_id, attempt))
