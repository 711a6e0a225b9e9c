"""Where a job's progress events go: stdout, a JSONL file, (with the job service) Redis.

An event is a flat JSON object. Every sink is idempotent on the event's key (kind, stage, step,
rank): Ray retries actor calls and restarts worker groups, so the same step may be reported more
than once, and it must still appear once (RELIABILITY R-02).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Protocol


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
    """Worker events into the job's Redis stream, once each, and only for the current attempt."""

    def __init__(self, url: str, job_id: str, attempt: int, prefix: str = "distillery",
                 max_events: int = 10_000) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
        self.keys, self.job_id, self.attempt, self.max_events = RedisKeys(prefix), job_id, attempt, max_events
        self._emit = self.client.register_script(_EMIT_LUA)

    def emit(self, event: dict[str, Any]) -> None:
        progress = ""
        if event.get("kind") == "metrics" and event.get("rank", 0) == 0 and "loss" in event:
            progress = json.dumps({k: event.get(k) for k in ("stage", "step", "loss", "tokens_per_s")})
        k = self.keys
        self._emit(keys=[k.seen(self.job_id), k.events(self.job_id), k.job(self.job_id)],
                   args=[f"{self.attempt}:{event_key(event)}", json.dumps(event, default=str),
                         self.max_events, progress, self.attempt])

    def close(self) -> None:
        self.client.close()
