"""Dynamic cross-request batching in front of a `TeacherEngine`, without head-of-line blocking.

One worker thread owns the engine. Requests wait in one bounded queue (`_q.items`); the worker
repeatedly runs one *step*, a unit of engine work bounded in tokens and therefore in time:

- A Score step takes at most `max_batch_tokens` tokens (sum of sequence lengths) of Score work
  from at most `max_batch_requests` requests. A Score request bigger than that is served in
  slices of whole sequences over several steps, and stays in the queue until its last sequence
  has been handed out; its answer is put together in its own order when the last slice is done.
  (A single sequence longer than `max_batch_tokens` is one slice on its own.)
- Fairness between Score requests is round-robin. The requests of a step are the (at most
  `max_batch_requests`) served least recently, a new request counting as served just before it
  arrived, ties in arrival order; the step is filled one sequence per request per round. So a
  newly arrived small request is in the very next step, beside a slice of the big one, and a
  stream of small requests cannot starve a big one: its turn comes back before that of anything
  that arrived after it was last served, and it gets a sequence in every round of its step.
- A Generate batch is formed as before (oldest Generate first, merged with waiting Generates of
  equal sampling parameters, seeds aside, up to the token / request limits) and run as one
  engine call; its decoding loop cannot be sliced across calls, so Score work runs *inside* it:
  the generate loop polls `cancelled(i)` at every decoding step, and the batcher's poll runs
  one pending Score step there, on the worker thread, between two forward passes (the engine's
  lock is re-entrant for exactly this). The Generate's KV cache and its per-row generators are
  not touched, so seeded generations are the same with or without Score work in between. Score
  gets at most `score_share` of the time while a Generate runs: after an interleaved step of d
  seconds the next one waits for d * (1 - share) / share seconds of decoding.
- When both kinds wait, the worker alternates between a Score step and a Generate batch.
- A fresh request waits at most `max_wait_ms` from its arrival for company, as before; a Score
  step that continues a request already started does not wait.

Bounds (T = the engine time of one step of `max_batch_tokens` tokens): a small Score that arrives
while a big Score runs waits for the step in flight and is in the next one: about 2T, however big
the big request is. During a Generate it waits for the decoding step in flight, at most
T * (1 - share) / share of decoding after the previous interleaved Score step, then its own step:
about 2T + one decoding step at the default share of 0.5. A Generate that arrives during a big
Score waits for one Score step. Generates still wait for the Generate batch before them.

Other guarantees:
- A full queue refuses new work at once (`Overloaded` -> RESOURCE_EXHAUSTED); it never grows.
  A Score request being served in slices counts as waiting until its last slice is handed out.
- A request whose caller cancelled it or whose deadline passed is dropped before its next step;
  its rows are skipped by the engine at the next forward pass (`TeacherEngine.score(cancelled=)`),
  and a Generate cancelled while running leaves the batch at the next decoding step.
- Each request's answer equals an unbatched run's (slices and neighbours change only which rows
  share a forward pass).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import torch

from . import defaults
from .contract import Cancelled, Overloaded, SamplingParams, ScoreArgs, TeacherError
from .engine import TeacherEngine
from .sampling import derive_seed
from .metrics import TeacherMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatcherConfig:
    # tokens in one engine call (prompt + new tokens); bigger Score requests are served in slices of this size
    max_batch_tokens: int = defaults.MAX_BATCH_TOKENS
    max_batch_requests: int = defaults.MAX_BATCH_REQUESTS  # 1 turns batching off
    max_wait_ms: float = defaults.MAX_WAIT_MS  # longest a request waits for company
    max_queue: int = defaults.MAX_QUEUE  # requests waiting; more are refused
    score_share: float = 0.5  # most of the time Score steps take while a Generate runs
    # requests one job may have waiting; more from that job are refused (0: only max_queue bounds it)
    max_queue_per_job: int = defaults.MAX_QUEUE_PER_JOB
    job_weights: tuple[tuple[str, float], ...] = ()  # (job, weight): the operator's, over the client's


class Ticket:
    """One queued request: wait for it with `result()`, or `cancel()` it."""

    def __init__(self, kind: str, payload: Any, tokens: int, deadline: float | None,
                 job: str = "", weight: float = 1.0) -> None:
        self.kind = kind  # "score" | "generate"
        self.job = job  # the job that sent it ("" when the client named none)
        self.weight = weight  # its job's share relative to other jobs'
        self.payload = payload
        self.tokens = tokens
        self.deadline = deadline  # time.monotonic() seconds, or None
        self.enqueued = time.monotonic()
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        self._cancelled = False
        # Score progress, kept by the worker thread only.
        self.next_seq = 0  # sequences handed to the engine so far
        self.finished_seqs = 0  # sequences whose results are in
        self.parts: list[Any] = []
        self.last_served = -1  # the Score step that last took work from this request
        self.first_token: float | None = None  # Generate: when its first token was sampled

    @property
    def key(self) -> tuple:
        return ("score",) if self.kind == "score" else ("generate", self.payload[1].batch_key())

    @property
    def started(self) -> bool:
        return self.next_seq > 0

    @property
    def num_seqs(self) -> int:
        return len(self.payload.sequences)

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


# One Score step: (ticket, indices of its sequences) per request taking part.
_Step = list[tuple[Ticket, list[int]]]


class Batcher:
    def __init__(self, engine: TeacherEngine, config: BatcherConfig = BatcherConfig(),
                 metrics: TeacherMetrics | None = None) -> None:
        if not 0.0 < config.score_share < 1.0:
            raise ValueError(f"score_share must be in (0, 1), got {config.score_share}")
        self.engine = engine
        self.config = config
        self.metrics = metrics or TeacherMetrics()
        self._q = _Queue()
        self._stopping = False
        self._steps = 0  # Score steps taken, for round-robin
        self._last_kind: str | None = None
        self._scores_waiting = 0  # Score tickets in the queue (a cheap check for the generate poll)
        self._interleave_after = 0.0  # no interleaved Score step before this time.monotonic()
        self._interleaved_s = 0.0  # seconds of Score run inside the current Generate
        # Weighted fair queueing across jobs: each job's virtual time is the tokens it was served
        # divided by its weight; the job furthest behind goes first (see `_take_score_step`).
        self._job_weights = dict(config.job_weights)
        self._vt: dict[str, float] = {}
        self._vclock = 0.0  # virtual time of the latest service: a job that was idle starts here
        self._waiting: Counter[str] = Counter()  # requests waiting, per job
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
    def submit_score(self, args: ScoreArgs, deadline: float | None = None, *, job: str = "",
                     weight: float | None = None) -> Ticket:
        """Queue a Score for `job` (its weight: the server's `job_weights`, else `weight`, else 1)."""
        ticket = Ticket("score", args, sum(len(s) for s in args.sequences), deadline, job,
                        self.weight_of(job, weight))
        ticket.parts = [None] * len(args.sequences)
        ticket.last_served = self._steps - 1  # round-robin: its turn comes after those served since
        return self._enqueue(ticket)

    def submit_generate(self, prompts: list[torch.Tensor], params: SamplingParams,
                        deadline: float | None = None, *, job: str = "",
                        weight: float | None = None) -> Ticket:
        tokens = sum(len(p) + params.max_new_tokens for p in prompts)
        return self._enqueue(Ticket("generate", (prompts, params), tokens, deadline, job,
                                    self.weight_of(job, weight)))

    def weight_of(self, job: str, requested: float | None = None) -> float:
        """A job's weight: the operator's (`job_weights`) wins over the one its client asked for."""
        if job in self._job_weights:
            return self._job_weights[job]
        return 1.0 if requested is None else requested

    def _enqueue(self, ticket: Ticket) -> Ticket:
        job = ticket.job
        with self._q.cond:
            if self._stopping:
                raise Overloaded("the teacher is shutting down")
            cap = self.config.max_queue_per_job
            if len(self._q.items) >= self.config.max_queue or (cap and self._waiting[job] >= cap):
                self.metrics.rejected.inc()
                self.metrics.job(job).rejected.inc()
                if len(self._q.items) >= self.config.max_queue:
                    raise Overloaded(f"teacher queue is full ({self.config.max_queue} requests waiting)")
                raise Overloaded(f"job {job or '(unnamed)'} has {cap} requests waiting at this teacher, "
                                 f"its limit; other jobs are still served")
            if not self._waiting[job]:  # it was idle: it banks no credit for that time
                active = [self._vt[j] for j, n in self._waiting.items() if n]
                self._vt[job] = max(self._vt.get(job, 0.0), min(active, default=self._vclock))
            self._waiting[job] += 1
            self.metrics.job(job).requests.labels(ticket.kind).inc()
            self._q.items.append(ticket)
            self._scores_waiting += ticket.kind == "score"
            self.metrics.queue_depth.set(len(self._q.items))
            self._q.cond.notify_all()
        return ticket

    def _remove(self, ticket: Ticket) -> None:
        """Take `ticket` out of the queue if it is there (caller holds the condition)."""
        try:
            self._q.items.remove(ticket)
        except ValueError:
            return
        self._scores_waiting -= ticket.kind == "score"
        self._waiting[ticket.job] -= 1
        if not self._waiting[ticket.job]:
            del self._waiting[ticket.job]
            if self._vt.get(ticket.job, 0.0) <= self._vclock:  # it would restart at the clock anyway
                self._vt.pop(ticket.job, None)
        self.metrics.queue_depth.set(len(self._q.items))

    def _fail(self, ticket: Ticket, error: BaseException) -> None:
        with self._q.cond:
            self._remove(ticket)
        if not ticket._done.is_set():
            if isinstance(error, Cancelled):
                self.metrics.cancelled.inc()
            ticket.set_error(error)

    def _drop_cancelled(self) -> None:
        """Answer and drop every queued request that was cancelled (caller holds the condition)."""
        for t in [t for t in self._q.items if t.cancelled]:
            self._remove(t)
            if not t._done.is_set():
                self.metrics.cancelled.inc()
                t.set_error(Cancelled("cancelled while scoring" if t.started
                                      else "cancelled before it ran"))

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            kind, work = job
            self._last_kind = kind
            if kind == "score":
                self._run_score_step(work)
            else:
                self._run(work)

    def _next_job(self) -> tuple[str, Any] | None:
        """Block until a Score step or a Generate batch is ready; None when stopping with an empty
        queue."""
        with self._q.cond:
            while True:
                self._drop_cancelled()
                if not self._q.items:
                    if self._stopping:
                        return None
                    self._q.cond.wait()
                    continue
                now = time.monotonic()
                score_at = self._score_ready_at(now)
                generate_at = self._generate_ready_at(now)
                ready = [k for k, at in (("score", score_at), ("generate", generate_at))
                         if at is not None and at <= now]
                if len(ready) == 2:  # both kinds wait: alternate
                    ready = ["generate" if self._last_kind == "score" else "score"]
                if ready == ["score"]:
                    return "score", self._take_score_step()
                if ready == ["generate"]:
                    return "generate", self._take_generate_batch()
                self._q.cond.wait(min(at for at in (score_at, generate_at) if at is not None) - now)

    def _score_ready_at(self, now: float) -> float | None:
        """When the next Score step may run: now if one is under way or enough work waits, else
        when the oldest waiting Score has waited `max_wait_ms` for company; None: no Score work."""
        if not self._scores_waiting:
            return None
        scores = [t for t in self._q.items if t.kind == "score"]
        cfg = self.config
        if (self._stopping or any(t.started for t in scores)
                or len(scores) >= cfg.max_batch_requests
                or sum(t.tokens for t in scores) >= cfg.max_batch_tokens):
            return now
        return scores[0].enqueued + cfg.max_wait_ms / 1000.0

    def _generate_head(self) -> Ticket | None:
        """The Generate to run next: that of the job furthest behind in its share, oldest first."""
        gens = [t for t in self._q.items if t.kind == "generate"]
        return min(gens, key=lambda t: (self._vt.get(t.job, 0.0), t.enqueued)) if gens else None

    def _charge(self, vt: dict[str, float]) -> None:
        """Keep the virtual times a step or batch ran up, and move the clock to the least of the
        waiting jobs' (caller holds the condition)."""
        self._vt.update(vt)
        active = [self._vt.get(j, 0.0) for j, n in self._waiting.items() if n]
        self._vclock = max(self._vclock, min(active) if active else max(vt.values(), default=0.0))

    def _generate_ready_at(self, now: float) -> float | None:
        head = self._generate_head()
        if head is None:
            return None
        cfg = self.config
        same = [t for t in self._q.items if t.key == head.key]
        if (self._stopping or len(same) >= cfg.max_batch_requests
                or sum(t.tokens for t in same) >= cfg.max_batch_tokens):
            return now
        return head.enqueued + cfg.max_wait_ms / 1000.0

    def _take_score_step(self) -> _Step:
        """Hand out up to `max_batch_tokens` tokens of Score work, one sequence at a time: to the
        job furthest behind in its share (least virtual time: tokens served / weight), and within a
        job to its request served least this step, then least recently (caller holds the
        condition). With one job this is round-robin by sequence over the least recently served
        `max_batch_requests` requests."""
        cfg = self.config
        scores = [t for t in self._q.items if t.kind == "score"]
        vt = {t.job: self._vt.get(t.job, 0.0) for t in scores}
        taken: dict[Ticket, list[int]] = {}
        for t in sorted(scores, key=lambda t: (t.last_served, t.enqueued)):
            if t.num_seqs == 0 and len(taken) < cfg.max_batch_requests:
                taken[t] = []  # nothing to score: it is answered by this step, at no cost
        tokens, full = 0, set()
        while True:
            open_ = [t for t in scores if t.next_seq < t.num_seqs and t not in full
                     and (t in taken or len(taken) < cfg.max_batch_requests)]
            if not open_:
                break
            t = min(open_, key=lambda t: (vt[t.job], len(taken.get(t, ())), t.last_served, t.enqueued))
            n = len(t.payload.sequences[t.next_seq])
            if tokens and tokens + n > cfg.max_batch_tokens:
                full.add(t)  # full for this request (the first sequence always goes, however long)
                continue
            taken.setdefault(t, []).append(t.next_seq)
            t.next_seq += 1
            tokens += n
            vt[t.job] += n / t.weight
        now = time.monotonic()
        for t, idx in taken.items():
            if idx and t.next_seq == len(idx):  # its first slice: the wait ends here
                self.metrics.queue_wait.labels("score").observe(now - t.enqueued)
                self.metrics.job(t.job).queue_wait.labels("score").observe(now - t.enqueued)
            t.last_served = self._steps
            if t.next_seq >= t.num_seqs:
                self._remove(t)
        self._charge(vt)
        self._steps += 1
        return list(taken.items())

    def _take_generate_batch(self) -> list[Ticket]:
        """The head Generate (`_generate_head`) and waiting Generates of equal sampling parameters,
        each next one from the job furthest behind, up to the token and request limits."""
        cfg = self.config
        head = self._generate_head()
        assert head is not None
        rest = [t for t in self._q.items if t.key == head.key and t is not head]
        vt = {t.job: self._vt.get(t.job, 0.0) for t in rest + [head]}
        batch, tokens = [head], head.tokens
        vt[head.job] += head.tokens / head.weight
        while rest and len(batch) < cfg.max_batch_requests:
            t = min(rest, key=lambda t: (vt[t.job], t.enqueued))
            if tokens + t.tokens > cfg.max_batch_tokens:
                break
            rest.remove(t)
            batch.append(t)
            tokens += t.tokens
            vt[t.job] += t.tokens / t.weight
        now = time.monotonic()
        for t in batch:
            self._remove(t)
            self.metrics.queue_wait.labels("generate").observe(now - t.enqueued)
            self.metrics.job(t.job).queue_wait.labels("generate").observe(now - t.enqueued)
        self._charge(vt)
        return batch

    # ------------------------------------------------------------------ score
    def _run_score_step(self, step: _Step) -> None:
        start = time.monotonic()
        tokens = sum(len(t.payload.sequences[i]) for t, idx in step for i in idx)
        # Requests with different top_k / temperature / full-row flags / candidate widths share the
        # decoder pass only when equal; group them (in arrival order) so each engine call has one setting.
        groups: dict[tuple, list[tuple[Ticket, list[int]]]] = {}
        for t, idx in sorted(step, key=lambda p: p[0].enqueued):
            a: ScoreArgs = t.payload
            key = (a.top_k, a.temperature, a.full_logprobs, a.candidates is not None, a.num_candidates)
            groups.setdefault(key, []).append((t, idx))
        try:
            for (top_k, temperature, full, has_candidates, _), part in groups.items():
                owner = [t for t, idx in part for _ in idx]
                if not owner:
                    continue
                merged = ScoreArgs(
                    sequences=[t.payload.sequences[i] for t, idx in part for i in idx],
                    score_from=[t.payload.score_from[i] for t, idx in part for i in idx],
                    top_k=top_k, temperature=temperature, full_logprobs=full,
                    candidates=([t.payload.candidates[i] for t, idx in part for i in idx]
                                if has_candidates else None))
                results = self.engine.score(merged, cancelled=lambda r: owner[r].cancelled)
                pos = 0
                for t, idx in part:
                    for i in idx:
                        t.parts[i] = results[pos]
                        pos += 1
                    t.finished_seqs += len(idx)
        except Exception as exc:  # the engine failed: every request of the step hears why
            if not isinstance(exc, TeacherError):
                log.exception("teacher score step failed")
            for t, _ in step:
                self._fail(t, exc)
        finally:
            self.metrics.observe_batch("score", len(step), tokens, time.monotonic() - start)
            per_job: Counter[str] = Counter()
            for t, idx in step:
                per_job[t.job] += sum(len(t.payload.sequences[i]) for i in idx)
            for job, n in per_job.items():
                self.metrics.job(job).tokens.labels("score").inc(n)
                if tokens:
                    self.metrics.job(job).batch_share.observe(n / tokens)
        for t, _ in step:
            if t._done.is_set():
                continue
            if t.cancelled:
                self._fail(t, Cancelled("cancelled while scoring"))
            elif t.finished_seqs == t.num_seqs:
                t.set_result(t.parts)

    def _interleave_score(self) -> None:
        """Called at every decoding step of a Generate: run one pending Score step, within the
        Score share of the time."""
        if not self._scores_waiting or time.monotonic() < self._interleave_after:
            return
        with self._q.cond:
            self._drop_cancelled()
            at = self._score_ready_at(time.monotonic())
            if at is None or at > time.monotonic():
                return
            step = self._take_score_step()
        began = time.monotonic()
        self._run_score_step(step)
        took = time.monotonic() - began
        self._interleaved_s += took
        share = self.config.score_share
        self._interleave_after = time.monotonic() + took * (1 - share) / share

    # ------------------------------------------------------------------ generate
    def _run(self, batch: list[Ticket]) -> None:
        start = time.monotonic()
        self._interleaved_s = 0.0
        self._generated = 0
        try:
            self._run_generate(batch)
        except TeacherError as exc:
            for t in batch:
                t.set_error(exc)
        except Exception as exc:  # the engine failed: every request of the batch hears why
            log.exception("teacher batch failed")
            for t in batch:
                t.set_error(exc)
        finally:
            # Generate counts the tokens it generated (not the prompt + max_new_tokens budget).
            self.metrics.observe_batch(batch[0].kind, len(batch), self._generated,
                                       time.monotonic() - start - self._interleaved_s)

    def _run_generate(self, batch: list[Ticket]) -> None:
        prompts, seeds, budgets, owner = [], [], [], []
        for t in batch:
            ps, params = t.payload
            for i, p in enumerate(ps):
                prompts.append(p)
                seeds.append(None if params.seed is None else derive_seed(params.seed, i))
                budgets.append(params.max_new_tokens)
                owner.append(t)

        def poll(i: int) -> bool:  # called for each row right after each of its tokens
            t = owner[i]
            if t.first_token is None:
                t.first_token = time.monotonic()
                self.metrics.time_to_first_token.observe(t.first_token - t.enqueued)
            self._interleave_score()  # between two forward passes of the decoding loop
            return t.cancelled

        results = self.engine.generate(prompts, batch[0].payload[1], seeds=seeds,
                                       max_new_tokens=budgets, cancelled=poll)
        self._generated = sum(len(g.token_ids) for g in results if g is not None)
        pos = 0
        for t in batch:
            n = len(t.payload[0])
            mine = results[pos:pos + n]
            pos += n
            self.metrics.job(t.job).tokens.labels("generate").inc(
                sum(len(g.token_ids) for g in mine if g is not None))
            if t.cancelled or any(g is None for g in mine):
                self.metrics.cancelled.inc()
                t.set_error(Cancelled("cancelled while generating"))
            else:
                t.set_result(mine)
