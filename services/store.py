"""Redis job store: records, the queue, leases and events, with one Lua script per transition.

States: queued -> starting -> running -> succeeded | failed | cancelled, with cancelling between
a cancel request and the end. Every transition is one script that checks the current state and
the attempt number (a fence), so a stale scheduler or worker can never overwrite a newer attempt.

Keys (student_worker.events.RedisKeys): a hash per job, a sorted-set index by creation time, a set
of active jobs, a stream queue read through a consumer group, a bounded events stream per job, a
lease per active job (value "owner:attempt", with a TTL the owning scheduler renews).

Attempt numbers: a job is created with attempt 0; each claim makes attempt + 1. A claim needs the
attempt the queue entry was written for, so two schedulers reading the same entry (or a stale
entry) cannot both claim it (R-22).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from student_worker.events import RedisKeys

STATES = ("queued", "starting", "running", "cancelling", "succeeded", "failed", "cancelled")
ACTIVE = ("starting", "running", "cancelling")
TERMINAL = ("succeeded", "failed", "cancelled")
GROUP = "schedulers"


class StoreUnavailable(RuntimeError):
    """Redis did not answer; the API maps this to 503."""


class JobNotFound(KeyError):
    pass


class TransitionRefused(RuntimeError):
    """The job is not in a state (or attempt) that allows this transition."""


@dataclass
class Job:
    id: str
    state: str
    attempt: int
    spec: dict[str, Any]
    name: str
    created_at: float
    updated_at: float
    owner: str = ""
    submission_id: str = ""
    error: str = ""
    reason: str = ""
    failures: int = 0
    progress: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    checkpoint: str = ""
    waiting: str = ""  # why a queued job is not running yet (admission), empty otherwise
    resumes: int = 0  # times a user resumed it after it failed or was cancelled

    @classmethod
    def from_hash(cls, h: dict[bytes, bytes]) -> "Job":
        # A corrupt field must not make the whole record unreadable: bad bytes become U+FFFD
        # and the spec then fails validation with a reason.
        g = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in h.items()}

        def obj(key: str) -> dict[str, Any]:
            try:
                value = json.loads(g.get(key) or "{}")
            except ValueError:
                return {"unreadable": g.get(key, "")[:200]}
            return value if isinstance(value, dict) else {"value": value}

        return cls(id=g["id"], state=g["state"], attempt=int(g.get("attempt", 0)), spec=obj("spec"),
                   name=g.get("name", ""), created_at=float(g.get("created_at", 0)),
                   updated_at=float(g.get("updated_at", 0)), owner=g.get("owner", ""),
                   submission_id=g.get("submission_id", ""), error=g.get("error", ""),
                   reason=g.get("reason", ""), failures=int(g.get("failures", 0)),
                   progress=obj("progress"), summary=obj("summary"), checkpoint=g.get("checkpoint", ""),
                   waiting=g.get("waiting", ""), resumes=int(g.get("resumes", 0)))


# KEYS: job, index, queue, idem | ARGV: id, fields JSON, now, idem ttl
_CREATE = """
if KEYS[4] ~= '' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return existing end
end
local fields = cjson.decode(ARGV[2])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('XADD', KEYS[3], '*', 'id', ARGV[1], 'attempt', '0')
if KEYS[4] ~= '' then redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[4]) end
return ARGV[1]
"""

# KEYS: job, lease, active | ARGV: expected attempt, owner, lease ms, now
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' then return {0, state or 'missing'} end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt'))
if attempt ~= tonumber(ARGV[1]) then return {0, 'attempt'} end
attempt = attempt + 1
redis.call('HSET', KEYS[1], 'state', 'starting', 'attempt', attempt, 'owner', ARGV[2], 'updated_at', ARGV[4],
           'waiting', '')
redis.call('SET', KEYS[2], ARGV[2] .. ':' .. attempt, 'PX', ARGV[3])
redis.call('SADD', KEYS[3], redis.call('HGET', KEYS[1], 'id'))
return {1, attempt}
"""

# KEYS: job, lease, active, events | ARGV: allowed states JSON, attempt ('' = any), new state,
#   fields JSON, now, owner ('' = unchecked), max events, quiet ('1': no state event, for a write
#   that keeps the state)
_TRANSITION = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, 'missing'} end
local allowed = cjson.decode(ARGV[1])
local ok = false
for _, s in ipairs(allowed) do if s == state then ok = true end end
if not ok then return {0, 'state:' .. state} end
local attempt = redis.call('HGET', KEYS[1], 'attempt')
if ARGV[2] ~= '' and tonumber(attempt) ~= tonumber(ARGV[2]) then return {0, 'attempt:' .. attempt} end
if ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[6] then return {0, 'owner'} end
local fields = cjson.decode(ARGV[4])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'updated_at', ARGV[5])
if ARGV[3] == 'succeeded' or ARGV[3] == 'failed' or ARGV[3] == 'cancelled' or ARGV[3] == 'queued' then
  redis.call('SREM', KEYS[3], redis.call('HGET', KEYS[1], 'id'))
  redis.call('DEL', KEYS[2])
end
if ARGV[8] ~= '1' then
  local ev = cjson.encode({kind='state', state=ARGV[3], previous=state, attempt=tonumber(attempt), time=tonumber(ARGV[5])})
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'event', ev)
end
return {1, state}
"""

# KEYS: lease | ARGV: owner:attempt, lease ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: job, lease, active, queue, events | ARGV: now, max events
# A job whose lease is gone: back to the queue (same attempt; the next claim increments it), or
# cancelled if it was being cancelled.
_RECLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
local id = redis.call('HGET', KEYS[1], 'id')
if not state then return 0 end
if state ~= 'starting' and state ~= 'running' and state ~= 'cancelling' then
  redis.call('SREM', KEYS[3], id)
  return 0
end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local attempt = redis.call('HGET', KEYS[1], 'attempt')
local new = 'queued'
if state == 'cancelling' then new = 'cancelled' end
redis.call('HSET', KEYS[1], 'state', new, 'owner', '', 'updated_at', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('SREM', KEYS[3], id)
if new == 'queued' then redis.call('XADD', KEYS[4], '*', 'id', id, 'attempt', attempt) end
local ev = cjson.encode({kind='state', state=new, previous=state, attempt=tonumber(attempt), reason='lease_lapsed', time=tonumber(ARGV[1])})
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[2], '*', 'event', ev)
return 1
"""


# KEYS: job, lease, active, events | ARGV: attempt, submission id, owner, lease ms, now, max events
# A running job whose lease lapsed while its Ray job lives on: the new owner takes the lease for
# the same attempt (the workers' fence is unchanged) instead of stopping and requeueing it.
_ADOPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {0, 'leased'} end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, 'missing'} end
if state ~= 'starting' and state ~= 'running' and state ~= 'cancelling' then return {0, 'state:' .. state} end
local attempt = redis.call('HGET', KEYS[1], 'attempt')
if tonumber(attempt) ~= tonumber(ARGV[1]) then return {0, 'attempt:' .. attempt} end
if redis.call('HGET', KEYS[1], 'submission_id') ~= ARGV[2] then return {0, 'submission'} end
local previous = redis.call('HGET', KEYS[1], 'owner') or ''
redis.call('HSET', KEYS[1], 'owner', ARGV[3], 'updated_at', ARGV[5])
redis.call('SET', KEYS[2], ARGV[3] .. ':' .. attempt, 'PX', ARGV[4])
redis.call('SADD', KEYS[3], redis.call('HGET', KEYS[1], 'id'))
local ev = cjson.encode({kind='adopted', state=state, owner=ARGV[3], previous_owner=previous,
                        attempt=tonumber(attempt), submission_id=ARGV[2], time=tonumber(ARGV[5])})
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'event', ev)
return {1, state}
"""

# KEYS: job, queue, events | ARGV: now, max events
# A failed or cancelled job back to the queue with its run directory: the next attempt resumes
# from the last checkpoint the earlier ones wrote.
_RESUME = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, 'missing'} end
if state ~= 'failed' and state ~= 'cancelled' then return {0, state} end
local attempt = redis.call('HGET', KEYS[1], 'attempt')
redis.call('HSET', KEYS[1], 'state', 'queued', 'owner', '', 'error', '', 'reason', '', 'waiting', '',
           'updated_at', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'resumes', 1)
redis.call('XADD', KEYS[2], '*', 'id', redis.call('HGET', KEYS[1], 'id'), 'attempt', attempt)
local ev = cjson.encode({kind='state', state='queued', previous=state, attempt=tonumber(attempt),
                        reason='resumed', time=tonumber(ARGV[1])})
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'event', ev)
return {1, state}
"""

# KEYS: job | ARGV: text, now
_NOTE_WAITING = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
if redis.call('HGET', KEYS[1], 'waiting') == ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'waiting', ARGV[1])
return 1
"""


@dataclass(frozen=True)
class QueueEntry:
    """One queue entry read by a scheduler: the job and the attempt it was queued for."""

    entry_id: bytes
    job_id: str
    attempt: int


class JobStore:
    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "distillery",
                 max_events: int = 10_000, client: redis.Redis | None = None) -> None:
        self.r = client or redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self.k = RedisKeys(prefix)
        self.max_events = max_events
        self._create = self.r.register_script(_CREATE)
        self._claim = self.r.register_script(_CLAIM)
        self._transition = self.r.register_script(_TRANSITION)
        self._renew = self.r.register_script(_RENEW)
        self._reclaim = self.r.register_script(_RECLAIM)
        self._adopt = self.r.register_script(_ADOPT)
        self._resume = self.r.register_script(_RESUME)
        self._note_waiting = self.r.register_script(_NOTE_WAITING)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"Redis unavailable: {exc}") from None

    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except (redis.ConnectionError, redis.TimeoutError):
            return False

    # ------------------------------------------------------------------ records
    def create(self, spec: dict[str, Any], *, name: str, idempotency_key: str | None = None) -> tuple[str, bool]:
        """Store a validated spec as a queued job; returns (job id, created). An idempotency key
        seen in the last 24 h returns the job it created instead of a new one."""
        job_id = f"{name[:40]}-{uuid.uuid4().hex[:12]}"
        now = time.time()
        fields = {"id": job_id, "state": "queued", "attempt": 0, "name": name, "spec": json.dumps(spec),
                  "created_at": now, "updated_at": now, "failures": 0}
        idem = self.k.idempotency(idempotency_key) if idempotency_key else ""
        got = self._call(self._create, keys=[self.k.job(job_id), self.k.index, self.k.queue, idem],
                         args=[job_id, json.dumps(fields), now, 24 * 3600]).decode()
        return got, got == job_id

    def get(self, job_id: str) -> Job:
        h = self._call(self.r.hgetall, self.k.job(job_id))
        if not h:
            raise JobNotFound(job_id)
        return Job.from_hash(h)

    def list(self, *, state: str | None = None, offset: int = 0, limit: int = 50) -> list[Job]:
        """Newest first. With a state filter the index is walked until `limit` matches."""
        out: list[Job] = []
        start, page = 0, 200
        skipped = 0
        while len(out) < limit:
            ids = self._call(self.r.zrevrange, self.k.index, start, start + page - 1)
            if not ids:
                break
            pipe = self.r.pipeline()
            for i in ids:
                pipe.hgetall(self.k.job(i.decode()))
            for h in self._call(pipe.execute):
                if not h:
                    continue
                job = Job.from_hash(h)
                if state and job.state != state:
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                out.append(job)
                if len(out) >= limit:
                    break
            start += page
        return out

    def count_by_state(self, cap: int = 100_000) -> dict[str, int]:
        """Jobs per state (reads only each job's state field, not its spec)."""
        counts, page = dict.fromkeys(STATES, 0), 1000
        for start in range(0, cap, page):
            ids = self._call(self.r.zrange, self.k.index, start, start + page - 1)
            if not ids:
                break
            pipe = self.r.pipeline(transaction=False)
            for i in ids:
                pipe.hget(self.k.job(i.decode()), "state")
            for state in self._call(pipe.execute):
                if state is not None and state.decode() in counts:
                    counts[state.decode()] += 1
        return counts

    # ------------------------------------------------------------------ scheduler side
    def ensure_group(self) -> None:
        try:
            self._call(self.r.xgroup_create, self.k.queue, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def claim_next(self, owner: str, lease_s: float, block_ms: int | None = 1000) -> list[tuple[Job, int]]:
        """Read queue entries as `owner` and claim every job they name; (job, attempt) per claim."""
        claimed = []
        for entry in self.read_queue(owner, lease_s, block_ms=block_ms):
            got = self.claim_entry(entry, owner, lease_s)
            if got is not None:
                claimed.append(got)
        return claimed

    def read_queue(self, owner: str, lease_s: float, *, count: int = 10, block_ms: int | None = None,
                   in_order: bool = False) -> list[QueueEntry]:
        """Queue entries for `owner`, oldest first: first those another reader took but never
        settled (it died between read and claim) once they have been idle longer than a lease,
        then new ones. An entry stays pending on `owner` until `claim_entry` settles it; `keep`
        tells the others it is still being looked at. Malformed entries are dropped here.

        `in_order`: no new entry is read while an older one is pending on another reader (a job
        waiting for room, or one its dead reader left, taken over once idle for a lease), so jobs
        start first in, first out across schedulers and across a scheduler's restart."""
        self.ensure_group()
        lease_ms = int(lease_s * 1000)
        _, stale, *_ = self._call(self.r.xautoclaim, self.k.queue, GROUP, owner, lease_ms, "0-0", count=count)
        got = []
        behind = in_order and self._call(self.r.xpending, self.k.queue, GROUP)["pending"] > len(stale or [])
        if len(stale or []) < count and not behind:
            got = self._call(self.r.xreadgroup, GROUP, owner, {self.k.queue: ">"}, count=count - len(stale or []),
                             block=block_ms)
        out = []
        for entry_id, fields in list(stale or []) + [e for _, es in (got or []) for e in es]:
            try:
                out.append(QueueEntry(entry_id, fields[b"id"].decode(), int(fields[b"attempt"])))
            except (KeyError, TypeError, ValueError, UnicodeDecodeError):
                self._drop_entry(entry_id)
        return out

    def claim_entry(self, entry: QueueEntry, owner: str, lease_s: float) -> tuple[Job, int] | None:
        """Claim the job an entry names and settle the entry: (job, new attempt), or None when the
        entry no longer matches its job (claimed, cancelled, stale)."""
        try:
            ok, value = self._call(self._claim, keys=[self.k.job(entry.job_id), self.k.lease(entry.job_id),
                                                      self.k.active],
                                   args=[entry.attempt, owner, int(lease_s * 1000), time.time()])
        except redis.ResponseError:
            ok = 0
        self._drop_entry(entry.entry_id)
        return (self.get(entry.job_id), int(value)) if ok else None

    def keep(self, entry: QueueEntry, owner: str) -> None:
        """Mark a pending entry as still looked at by `owner` (resets its idle time), so no other
        scheduler takes it over while it waits for room."""
        self._call(self.r.xclaim, self.k.queue, GROUP, owner, 0, [entry.entry_id], justid=True)

    def note_waiting(self, job_id: str, text: str) -> bool:
        """Say why a queued job waits (shown in its record); True when the text changed."""
        return bool(self._call(self._note_waiting, keys=[self.k.job(job_id)], args=[text[:500], time.time()]))

    def _drop_entry(self, entry_id: bytes) -> None:
        self._call(self.r.xack, self.k.queue, GROUP, entry_id)
        self._call(self.r.xdel, self.k.queue, entry_id)

    def renew_lease(self, job_id: str, owner: str, attempt: int, lease_s: float) -> bool:
        return bool(self._call(self._renew, keys=[self.k.lease(job_id)],
                               args=[f"{owner}:{attempt}", int(lease_s * 1000)]))

    def transition(self, job_id: str, *, allowed: tuple[str, ...], to: str, attempt: int | None = None,
                   owner: str | None = None, quiet: bool = False, **fields: Any) -> str:
        """Move `job_id` to `to` if its state is in `allowed` (and attempt / owner match when
        given); returns the previous state or raises TransitionRefused. `quiet` writes no state
        event (for a write that keeps the state)."""
        encoded = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in fields.items()}
        ok, value = self._call(self._transition,
                               keys=[self.k.job(job_id), self.k.lease(job_id), self.k.active, self.k.events(job_id)],
                               args=[json.dumps(list(allowed)), "" if attempt is None else attempt, to,
                                     json.dumps(encoded), time.time(), owner or "", self.max_events,
                                     "1" if quiet else ""])
        if not ok:
            if value == b"missing":
                raise JobNotFound(job_id)
            raise TransitionRefused(f"job {job_id}: cannot go to {to} ({value.decode()})")
        return value.decode()

    def request_cancel(self, job_id: str) -> str:
        """queued -> cancelled at once; starting/running -> cancelling (the scheduler finishes it).
        Returns the new state; a job already ended is left as it is."""
        job = self.get(job_id)
        if job.state == "queued":
            try:
                self.transition(job_id, allowed=("queued",), to="cancelled", reason="cancelled_by_user")
                return "cancelled"
            except TransitionRefused:
                job = self.get(job_id)
        if job.state in ("starting", "running"):
            try:
                self.transition(job_id, allowed=("starting", "running"), to="cancelling")
                return "cancelling"
            except TransitionRefused:
                pass
        return self.get(job_id).state

    def active_ids(self) -> list[str]:
        return [i.decode() for i in self._call(self.r.smembers, self.k.active)]

    def lapsed_ids(self) -> list[str]:
        """Active jobs whose lease has lapsed: their owner is gone (or paused past its lease)."""
        ids = self.active_ids()
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(self.k.lease(job_id))
        return [job_id for job_id, leased in zip(ids, self._call(pipe.execute)) if not leased]

    def reclaim(self, job_id: str) -> bool:
        """Requeue (or finish cancelling) `job_id` if its lease has lapsed; True if it did."""
        return bool(self._call(self._reclaim, keys=[self.k.job(job_id), self.k.lease(job_id), self.k.active,
                                                    self.k.queue, self.k.events(job_id)],
                               args=[time.time(), self.max_events]))

    def reclaim_expired(self) -> list[str]:
        """Requeue (or finish cancelling) every active job whose lease has lapsed."""
        return [job_id for job_id in self.active_ids() if self.reclaim(job_id)]

    def adopt(self, job_id: str, *, attempt: int, submission_id: str, owner: str, lease_s: float) -> bool:
        """Take over the lease of a job whose lease lapsed while its Ray job `submission_id` (of
        `attempt`) lives on; False when someone else got there first or the record moved on."""
        ok, _ = self._call(self._adopt, keys=[self.k.job(job_id), self.k.lease(job_id), self.k.active,
                                              self.k.events(job_id)],
                           args=[attempt, submission_id, owner, int(lease_s * 1000), time.time(), self.max_events])
        return bool(ok)

    def resume(self, job_id: str) -> str:
        """A failed or cancelled job back to the queue; returns the state it left. Raises
        JobNotFound, or TransitionRefused when the job is in any other state."""
        ok, value = self._call(self._resume, keys=[self.k.job(job_id), self.k.queue, self.k.events(job_id)],
                               args=[time.time(), self.max_events])
        if not ok:
            if value == b"missing":
                raise JobNotFound(job_id)
            raise TransitionRefused(f"job {job_id} is {value.decode()}: only a failed or cancelled job resumes")
        return value.decode()

    # ------------------------------------------------------------------ events
    def events(self, job_id: str, after: str = "0", block_ms: int | None = None,
               count: int = 500) -> list[tuple[str, dict[str, Any]]]:
        """Events after stream id `after` ("0" = from the start); waits up to block_ms if none."""
        got = self._call(self.r.xread, {self.k.events(job_id): after}, count=count, block=block_ms)
        out = []
        for _, entries in got or []:
            for entry_id, fields in entries:
                try:
                    out.append((entry_id.decode(), json.loads(fields[b"event"])))
                except (KeyError, ValueError):
                    continue
        return out
