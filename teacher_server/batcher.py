"""Dynamic cross-request batching in front of a `TeacherEngine`.

One worker thread owns the engine. Requests wait in one bounded FIFO queue; the worker takes the
oldest request, waits at most `max_wait_ms` from its arrival for compatible company (every Score
is compatible with every other; Generates are compatible when their sampling parameters match,
seeds aside), merges up to `max_batch_tokens` / `max_batch_requests`, runs one engine call and
hands each request its slice.

- A full queue refuses new work at once (`Overloaded` -> RESOURCE_EXHAUSTED); it never grows.
- A request whose caller cancelled it or whose deadline passed is dropped before its batch runs;
  a Generate cancelled while running leaves the batch at the next decoding step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from .contract import Cancelled, Overloaded, SamplingParams, ScoreArgs, TeacherError
from .engine import TeacherEngine
from .sampling import row_seed
from .metrics import TeacherMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_tokens: int = 16384  # tokens merged into one engine call (prompt + new tokens)
    max_batch_requests: int = 64  # 1 turns batching off
    max_wait_ms: float = 5.0  # longest a request waits for company
    max_queue: int = 256  # requests waiting; more are refused


class Ticket:
    """One queued request: wait for it with `result()`, or `cancel()` it."""

    def __init__(self, kind: str, payload: Any, tokens: int, deadline: float | None) -> None:
        self.kind = kind  # "score" | "generate"
        self.payload = payload
        self.tokens = tokens
        self.deadline = deadline  # time.monotonic() seconds, or None
        self.enqueued = time.monotonic()
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        self._cancelled = False

    @property
    def key(self) -> tuple:
        return ("score",) if self.kind == "score" else ("generate", self.payload[1].batch_key())

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled or (self.deadline is not None and time.monotonic() > self.deadline)

    def set_result(self, value: Any) -> None:
        self._result = value
        self._done.set()

    def set_error(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def result(self, timeout: float | None = None) -> Any:
        if not self._done.wait(timeout):
            self.cancel()
            raise Cancelled("deadline passed while waiting for the teacher")
        if self._error is not None:
            raise self._error
        return self._result


@dataclass
class _Queue:
    items: deque[Ticket] = field(default_factory=deque)
    cond: threading.Condition = field(default_factory=threading.Condition)


class Batcher:
    def __init__(self, engine: TeacherEngine, config: BatcherConfig = BatcherConfig(),
                 metrics: TeacherMetrics | None = None) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics or TeacherMetrics()
        self._q = _Queue()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="teacher-batcher", daemon=True)

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the worker thread."""
        with self._q.cond:
            self._stopping = True
            self._q.cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ submit
    def submit_score(self, args: ScoreArgs, deadline: float | None = None) -> Ticket:
        return self._enqueue(Ticket("score", args, sum(len(s) for s in args.sequences), deadline))

    def submit_generate(self, prompts: list[torch.Tensor], params: SamplingParams,
                        deadline: float | None = None) -> Ticket:
        tokens = sum(len(p) + params.max_new_tokens for p in prompts)
        return self._enqueue(Ticket("generate", (prompts, params), tokens, deadline))

    def _enqueue(self, ticket: Ticket) -> Ticket:
        with self._q.cond:
            if self._stopping:
                raise Overloaded("the teacher is shutting down")
            if len(self._q.items) >= self.config.max_queue:
                self.metrics.rejected.inc()
                raise Overloaded(f"teacher queue is full ({self.config.max_queue} requests waiting)")
            self._q.items.append(ticket)
            self.metrics.queue_depth.set(len(self._q.items))
            self._q.cond.notify_all()
        return ticket

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _next_batch(self) -> list[Ticket] | None:
        """Block until a batch is ready; None when stopping with an empty queue."""
        cfg = self.config
        with self._q.cond:
            while not self._q.items:
                if self._stopping:
                    return None
                self._q.cond.wait()
            head = self._q.items[0]
            flush_at = head.enqueued + cfg.max_wait_ms / 1000.0
            while not self._stopping:
                same = [t for t in self._q.items if t.key == head.key]
                if (len(same) >= cfg.max_batch_requests
                        or sum(t.tokens for t in same) >= cfg.max_batch_tokens):
                    break
                remaining = flush_at - time.monotonic()
                if remaining <= 0:
                    break
                self._q.cond.wait(remaining)
            batch, tokens = [], 0
            for t in list(self._q.items):
                if t.key != head.key:
                    continue
                if batch and (len(batch) >= cfg.max_batch_requests
                              or tokens + t.tokens > cfg.max_batch_tokens):
                    break
                self._q.items.remove(t)
                batch.append(t)
                tokens += t.tokens
            self.metrics.queue_depth.set(len(self._q.items))
        live = []
        for t in batch:
            if t.cancelled:
                t.set_error(Cancelled("cancelled before it ran"))
                self.metrics.cancelled.inc()
            else:
                live.append(t)
        return live

    def _run(self, batch: list[Ticket]) -> None:
        start = time.monotonic()
        try:
            if batch[0].kind == "score":
                self._run_score(batch)
            else:
                self._run_generate(batch)
        except TeacherError as exc:
            for t in batch:
                t.set_error(exc)
        except Exception as exc:  # the engine failed: every request of the batch hears why
            log.exception("teacher batch failed")
            for t in batch:
                t.set_error(exc)
        finally:
            self.metrics.observe_batch(batch[0].kind, len(batch), sum(t.tokens for t in batch),
                                       time.monotonic() - start)

    def _run_score(self, batch: list[Ticket]) -> None:
        # Requests with different top_k / temperature / full-row flags share the decoder pass only
        # when equal; group them so each engine call has one setting.
        groups: dict[tuple, list[Ticket]] = {}
        for t in batch:
            a: ScoreArgs = t.payload
            groups.setdefault((a.top_k, a.temperature, a.full_logprobs), []).append(t)
        for (top_k, temperature, full), tickets in groups.items():
            merged = ScoreArgs(
                sequences=[s for t in tickets for s in t.payload.sequences],
                score_from=[f for t in tickets for f in t.payload.score_from],
                top_k=top_k, temperature=temperature, full_logprobs=full)
            results = self.engine.score(merged)
            pos = 0
            for t in tickets:
                n = len(t.payload.sequences)
                t.set_result(results[pos:pos + n])
                pos += n

    def _run_generate(self, batch: list[Ticket]) -> None:
        prompts, seeds, budgets, owner = [], [], [], []
        for t in batch:
            ps, params = t.payload
            for i, p in enumerate(ps):
                prompts.append(p)
                seeds.append(None if params.seed is None else row_seed(params.seed, i))
                budgets.append(params.max_new_tokens)
                owner.append(t)
        results = self.engine.generate(prompts, batch[0].payload[1], seeds=seeds,
                                       max_new_tokens=budgets,
                                       cancelled=lambda i: owner[i].cancelled)
        pos = 0
        for t in batch:
            n = len(t.payload[0])
            mine = results[pos:pos + n]
            pos += n
            if t.cancelled or any(g is None for g in mine):
                self.metrics.cancelled.inc()
                t.set_error(Cancelled("cancelled while generating"))
            else:
                t.set_result(mine)
