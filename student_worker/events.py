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


def open_sink(targets: list[str]) -> EventSink:
    """`stdout`, `file:PATH` (or a bare path); unknown schemes are an error."""
    sinks: list[EventSink] = []
    for t in targets:
        if t == "stdout":
            sinks.append(StdoutSink())
        elif t.startswith("file:"):
            sinks.append(FileSink(t[len("file:"):]))
        elif "://" not in t:
            sinks.append(FileSink(t))
        else:
            raise ValueError(f"unknown event sink {t!r}; use stdout or file:PATH")
    return MultiSink(sinks)
