"""Where a job's progress events go: stdout, a JSONL file, (with the job service) Redis.

An event is a flat JSON object. Every sink is idempotent on the event's key (kind, stage, step,
rank): Ray retries actor calls and restarts worker groups, so the same step may be reported more
than once, and it must still appear once (RELIABILITY R-02).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Protocol


log = logging.getLogger(__name__)


def event_key(event: dict[str, Any]) -> str:
    """Identity of an event for de-duplication: its `id` if it has one, else kind/stage/step/rank."""
    if "id" in event:
        return str(event["id"])
    return f"{event.get('kind', 'metrics')}:{event.get('stage', '')}:{event.get('step', '')}:{event.get('rank', 0)}"


class EventSink(Protocol):
    def emit(self, event: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class StdoutSink:
    def emit(self, event: dict[str, Any]) -> None:
        print(json.dumps(event, default=str), flush=True)

    def close(self) -> None:
        pass


class FileSink:
    """Append-only JSONL; a key already in the file is not written again."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    self._seen.add(event_key(json.loads(line)))
                except ValueError:
                    continue  # a line torn by a crash: skipped, and its event may be written again

    def emit(self, event: dict[str, Any]) -> None:
        key = event_key(event)
        with self._lock:
            if key in self._seen:
                return
            with self.path.open("a") as f:
                f.write(json.dumps(event, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._seen.add(key)

    def close(self) -> None:
        pass


class MultiSink:
    def __init__(self, sinks: list[EventSink]) -> None:
        self.sinks = sinks

    def emit(self, event: dict[str, Any]) -> None:
        for s in self.sinks:
            s.emit(event)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def open_sink(targets: list[str], job_id: str = "", attempt: int = 0) -> EventSink:
    """`stdout`, `file:PATH` (or a bare path), `redis://...?prefix=P&max_events=N` (the job
    service's stream, its key prefix and how many events it keeps per job), or `redis-file:PATH`:
    that URL read from a file (the scheduler's way, so no password is on a command line)."""
    sinks: list[EventSink] = []
    for t in targets:
        if t.startswith("redis-file:"):
            t = Path(t[len("redis-file:"):]).read_text().strip()
        if t.startswith(("redis://", "rediss://", "unix://")):
            from urllib.parse import parse_qs, urlsplit, urlunsplit

            parts = urlsplit(t)
            query = parse_qs(parts.query)
            prefix = query.pop("prefix", ["distillery"])[0]
            max_events = int(query.pop("max_events", ["10000"])[0])
            url = urlunsplit(parts._replace(query="&".join(f"{a}={b[0]}" for a, b in query.items())))
            sinks.append(RedisSink(url, job_id, attempt, prefix=prefix, max_events=max_events))
        elif t == "stdout":
            sinks.append(StdoutSink())
        elif t.startswith("file:"):
            sinks.append(FileSink(t[len("file:"):]))
        elif "://" not in t:
            sinks.append(FileSink(t))
        else:
            raise ValueError(f"unknown event sink {t!r}; use stdout, file:PATH or redis://...")
    return MultiSink(sinks)


class RedisKeys:
    """The Redis key layout of the job service, shared by the store and the workers' sink."""

    def __init__(self, prefix: str = "distillery") -> None:
        self.prefix = prefix

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def seen(self, job_id: str) -> str:
        return f"{self.prefix}:seen:{job_id}"

    def lease(self, job_id: str) -> str:
        return f"{self.prefix}:lease:{job_id}"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}:idem:{key}"

    @property
    def index(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def active(self) -> str:
        return f"{self.prefix}:active"

    @property
    def queue(self) -> str:
        return f"{self.prefix}:queue"


# Append an event once: KEYS = seen set, events stream, job hash; ARGV = event key, event JSON,
# max events, progress JSON (or ""), attempt. Events from an older attempt are refused (fencing).
_EMIT_LUA = """
local attempt = redis.call('HGET', KEYS[3], 'attempt')
if not attempt or tonumber(attempt) ~= tonumber(ARGV[5]) then return -1 end
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[2])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], 'progress', ARGV[4]) end
return 1
"""


class RedisSink:
    """Worker events into the job's Redis stream, once each, and only for the current attempt.

    Training never waits for, or dies of, a slow or absent Redis: `emit` only queues the event
    (a bounded buffer of `max_buffer`); a sender thread writes them in order and, when Redis
    fails, retries with backoff (0.1 s doubling to 5 s). Only when the buffer is full is the
    oldest event dropped, and counted (`dropped`; logged, and sent as an `events_dropped` event
    once Redis answers again). `close` sends what is left, waiting at most `close_timeout_s`.
    """

    def __init__(self, url: str, job_id: str, attempt: int, prefix: str = "distillery",
                 max_events: int = 10_000, *, max_buffer: int = 5_000, close_timeout_s: float = 15.0) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
        self.keys, self.job_id, self.attempt, self.max_events = RedisKeys(prefix), job_id, attempt, max_events
        self._emit = self.client.register_script(_EMIT_LUA)
        self.max_buffer, self.close_timeout_s = max_buffer, close_timeout_s
        self.dropped = self._reported = 0
        self._buffer: collections.deque[dict[str, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._sender = threading.Thread(target=self._send_loop, name="redis-events", daemon=True)
        self._sender.start()

    def emit(self, event: dict[str, Any]) -> None:
        with self._cond:
            if len(self._buffer) >= self.max_buffer:
                self._buffer.popleft()
                self.dropped += 1
            self._buffer.append(event)
            self._cond.notify()

    def _write(self, event: dict[str, Any]) -> None:
        progress = ""
        if event.get("kind") == "metrics" and event.get("rank", 0) == 0 and "loss" in event:
            progress = json.dumps({k: event.get(k) for k in ("stage", "step", "loss", "tokens_per_s")})
        k = self.keys
        self._emit(keys=[k.seen(self.job_id), k.events(self.job_id), k.job(self.job_id)],
                   args=[f"{self.attempt}:{event_key(event)}", json.dumps(event, default=str),
                         self.max_events, progress, self.attempt])

    def _send_loop(self) -> None:
        backoff = 0.0
        while True:
            with self._cond:
                while not self._buffer and not self._closing:
                    self._cond.wait()
                if not self._buffer:
                    return
                event = self._buffer[0]
                if backoff:  # Redis failed: wait, unless closing asks to hurry
                    self._cond.wait(backoff)
            try:
                if self.dropped > self._reported:
                    count = self.dropped
                    self._write({"kind": "events_dropped", "id": f"dropped:{count}", "count": count})
                    self._reported = count
                self._write(event)
            except Exception as exc:  # noqa: BLE001 - Redis down, slow or refusing: retry later
                backoff = min(5.0, max(0.1, 2 * backoff))
                log.warning("event store unavailable (%s: %s); %d events buffered, retrying in %.1f s",
                            type(exc).__name__, exc, len(self._buffer), backoff)
                if self._closing and time.monotonic() > self._close_deadline:
                    return
                continue
            backoff = 0.0
            with self._cond:
                if self._buffer and self._buffer[0] is event:
                    self._buffer.popleft()
                self._cond.notify_all()  # a flush() may be waiting for the buffer to empty

    def flush(self, timeout_s: float = 15.0) -> bool:
        """Wait until every event emitted so far is written (True), or `timeout_s` passed."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._close_deadline = time.monotonic() + self.close_timeout_s
            self._cond.notify_all()
        self._sender.join(self.close_timeout_s + 1.0)
        left = len(self._buffer)
        if left or self.dropped:
            log.warning("event store: %d events dropped while it was unavailable, %d not sent at close",
                        self.dropped, left)
        self.client.close()
