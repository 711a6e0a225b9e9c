"""The workers' Redis event sink never stops training: it buffers, retries, and drops (counted)
only past its bound."""

from __future__ import annotations

import threading
import time

import redis

from student_worker.events import RedisSink


class FlakyScript:
    """Stands in for the sink's Redis script: fails while `down` is set, records what it got."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.got: list[str] = []

    def __call__(self, keys, args) -> int:
        if self.down.is_set():
            raise redis.ConnectionError("Redis is paused")
        self.got.append(args[1])
        return 1


def sink_with(script: FlakyScript, **kw) -> RedisSink:
    sink = RedisSink("redis://127.0.0.1:1/0", "job-1", 1, **kw)  # never dialled: the script is faked
    sink._emit = script
    return sink


def test_emit_returns_at_once_while_redis_is_down_and_everything_arrives_after():
    script = FlakyScript()
    script.down.set()
    sink = sink_with(script)
    start = time.monotonic()
    for step in range(50):
        sink.emit({"kind": "metrics", "step": step})
    assert time.monotonic() - start < 0.5  # training did not wait for Redis
    time.sleep(0.3)
    assert script.got == []
    script.down.clear()  # Redis is back
    sink.close()
    assert [int(e.split('"step": ')[1].rstrip("}")) for e in script.got] == list(range(50))
    assert sink.dropped == 0


def test_past_its_bound_the_oldest_events_are_dropped_and_counted():
    script = FlakyScript()
    script.down.set()
    sink = sink_with(script, max_buffer=10)
    for step in range(25):
        sink.emit({"kind": "metrics", "step": step})
    assert sink.dropped == 15
    script.down.clear()
    sink.close()
    assert '"kind": "events_dropped"' in script.got[0] and '"count": 15' in script.got[0]
    assert [int(e.split('"step": ')[1].rstrip("}")) for e in script.got[1:]] == list(range(15, 25))


def test_close_gives_up_after_its_timeout_when_redis_never_returns():
    script = FlakyScript()
    script.down.set()
    sink = sink_with(script, close_timeout_s=0.5)
    sink.emit({"kind": "metrics", "step": 1})
    start = time.monotonic()
    sink.close()
    assert time.monotonic() - start < 3.0 and script.got == []


def test_flush_waits_until_everything_emitted_is_written():
    script = FlakyScript()
    sink = sink_with(script)
    for step in range(20):
        sink.emit({"kind": "metrics", "step": step})
    assert sink.flush(5.0) and len(script.got) == 20
    script.down.set()
    sink.emit({"kind": "metrics", "step": 20})
    assert not sink.flush(0.3)  # Redis down: it says so instead of waiting forever
    script.down.clear()
    sink.close()
    assert len(script.got) == 21
