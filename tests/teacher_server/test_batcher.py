"""The batcher in front of a real tiny engine: merging, queue limit, cancellation, draining.

To make batches deterministic the engine is wrapped in `Gated`: the first engine call blocks until
the test opens the gate, so everything submitted meanwhile waits in the queue and is batched when
the worker comes back.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from teacher_server.batcher import Batcher, BatcherConfig
from teacher_server.contract import Cancelled, Overloaded, SamplingParams, ScoreArgs
from teacher_server.engine import EngineConfig, TeacherEngine

ATOL = 1e-5


@pytest.fixture(scope="module")
def engine(tiny_llama) -> TeacherEngine:
    return TeacherEngine.load(EngineConfig(model_dir=str(tiny_llama)))


class Gated:
    """Engine double: records every call; calls block while the gate is closed."""

    def __init__(self, engine: TeacherEngine) -> None:
        self.engine = engine
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[tuple[str, list[list[int]]]] = []
        self.on_poll = None  # called on every cancellation poll of a generate call

    def score(self, args: ScoreArgs, *, cancelled=None):
        self.calls.append(("score", [s.tolist() for s in args.sequences]))
        self.entered.set()
        assert self.gate.wait(30), "test never opened the gate"
        return self.engine.score(args, cancelled=cancelled)

    def generate(self, prompts, params, *, seeds=None, max_new_tokens=None, cancelled=None):
        self.calls.append(("generate", [p.tolist() for p in prompts]))
        self.entered.set()
        assert self.gate.wait(30), "test never opened the gate"

        def poll(i: int) -> bool:
            if self.on_poll is not None:
                self.on_poll(i)
            return cancelled(i) if cancelled is not None else False

        return self.engine.generate(prompts, params, seeds=seeds, max_new_tokens=max_new_tokens,
                                    cancelled=poll)


def start(engine, **config) -> tuple[Batcher, Gated]:
    gated = Gated(engine)
    batcher = Batcher(gated, BatcherConfig(**config)).start()  # type: ignore[arg-type]
    return batcher, gated


def occupy(batcher: Batcher, gated: Gated):
    """Submit a request the worker picks up and blocks in; return its ticket."""
    ticket = batcher.submit_score(ScoreArgs([torch.tensor([1, 2])], [1], top_k=1))
    assert gated.entered.wait(10)
    return ticket


def wait_queued(batcher: Batcher, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(batcher._q.items) < n:
        assert time.monotonic() < deadline, f"only {len(batcher._q.items)} of {n} requests queued"
        time.sleep(0.005)


def batch_stats(batcher: Batcher, kind: str) -> tuple[float, float]:
    """(number of engine batches, requests in them) from the metrics histogram."""
    reg = batcher.metrics.registry
    count = reg.get_sample_value("distillery_teacher_batch_requests_count", {"kind": kind}) or 0.0
    total = reg.get_sample_value("distillery_teacher_batch_requests_sum", {"kind": kind}) or 0.0
    return count, total


def seqs(n: int, seed: int, vocab: int = 512) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g)
            for _ in range(n)]


def assert_same_scores(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a.topk_ids, b.topk_ids)
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=ATOL, rtol=1e-5)
        if b.full_logprobs is None:
            assert a.full_logprobs is None
        else:
            torch.testing.assert_close(a.full_logprobs, b.full_logprobs, atol=ATOL, rtol=1e-5)


def test_concurrent_scores_from_threads_are_merged(engine):
    batcher, gated = start(engine, max_wait_ms=300)
    gated.gate.set()
    requests = [ScoreArgs(seqs(1 + i % 3, seed=i), [1] * (1 + i % 3), top_k=4) for i in range(6)]
    answers: dict[int, list] = {}
    barrier = threading.Barrier(len(requests))

    def worker(i: int) -> None:
        barrier.wait()
        answers[i] = batcher.submit_score(requests[i]).result(30)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    batcher.stop()
    count, total = batch_stats(batcher, "score")
    assert total == len(requests) and count < total  # some engine call served several requests
    assert len(gated.calls) == count
    for i, args in enumerate(requests):
        assert_same_scores(answers[i], engine.score(args))


def test_queued_scores_merge_into_one_call_with_their_own_settings(engine):
    batcher, gated = start(engine, max_wait_ms=0)
    blocker = occupy(batcher, gated)
    settings = [dict(top_k=4), dict(top_k=4), dict(top_k=2, temperature=0.5),
                dict(top_k=4, full_logprobs=True), dict(top_k=4)]
    requests = [ScoreArgs(seqs(2, seed=10 + i), [1, 3], **kw) for i, kw in enumerate(settings)]
    tickets = [batcher.submit_score(a) for a in requests]
    gated.gate.set()
    results = [t.result(30) for t in tickets]
    blocker.result(30)
    assert batch_stats(batcher, "score") == (2.0, 6.0)  # the blocker, then all five at once
    # One engine call per distinct (top_k, temperature, full rows) setting, in arrival order.
    assert [len(c[1]) for c in gated.calls] == [1, 6, 2, 2]
    for args, got in zip(requests, results):
        assert got[0].topk_ids.shape[1] == args.top_k
        assert_same_scores(got, engine.score(args))
    batcher.stop()


def test_max_batch_requests_1_never_merges(engine):
    batcher, gated = start(engine, max_wait_ms=50, max_batch_requests=1)
    blocker = occupy(batcher, gated)
    requests = [ScoreArgs(seqs(2, seed=20 + i), [1, 1], top_k=3) for i in range(4)]
    tickets = [batcher.submit_score(a) for a in requests]
    gated.gate.set()
    for args, t in zip(requests, tickets):
        assert_same_scores(t.result(30), engine.score(args))
    blocker.result(30)
    assert batch_stats(batcher, "score") == (5.0, 5.0)
    assert [c[1] for c in gated.calls[1:]] == [[s.tolist() for s in a.sequences] for a in requests]
    batcher.stop()


def test_max_batch_tokens_splits_batches(engine):
    batcher, gated = start(engine, max_wait_ms=0, max_batch_tokens=20)
    blocker = occupy(batcher, gated)
    tickets = [batcher.submit_score(ScoreArgs([torch.arange(3, 11)], [1], top_k=1)) for _ in range(5)]
    gated.gate.set()
    for t in tickets:
        t.result(30)
    blocker.result(30)
    # 8 tokens each: two fit under 20, a third would not.
    assert [len(c[1]) for c in gated.calls[1:]] == [2, 2, 1]
    batcher.stop()


def test_full_queue_is_refused_at_once(engine):
    batcher, gated = start(engine, max_wait_ms=0, max_queue=2)
    blocker = occupy(batcher, gated)
    queued = [batcher.submit_score(ScoreArgs([torch.tensor([5, 6, 7])], [1], top_k=2)) for _ in range(2)]
    began = time.monotonic()
    with pytest.raises(Overloaded, match="queue is full"):
        batcher.submit_score(ScoreArgs([torch.tensor([5, 6, 7])], [1], top_k=2))
    with pytest.raises(Overloaded):
        batcher.submit_generate([torch.tensor([5])], SamplingParams(max_new_tokens=2))
    assert time.monotonic() - began < 0.5
    assert batcher.metrics.registry.get_sample_value("distillery_teacher_rejected_total") == 2
    assert batcher.metrics.registry.get_sample_value("distillery_teacher_queue_depth") == 2
    gated.gate.set()
    for t in [blocker, *queued]:
        assert len(t.result(30)) == 1
    # With room again, new work is accepted.
    assert len(batcher.submit_score(ScoreArgs([torch.tensor([5, 6])], [1], top_k=2)).result(30)) == 1
    batcher.stop()


def test_cancelled_or_expired_tickets_never_reach_the_engine(engine):
    batcher, gated = start(engine, max_wait_ms=0)
    blocker = occupy(batcher, gated)
    cancelled = batcher.submit_score(ScoreArgs([torch.tensor([100, 101, 102])], [1], top_k=1))
    cancelled.cancel()
    expired = batcher.submit_score(ScoreArgs([torch.tensor([200, 201])], [1], top_k=1),
                                   deadline=time.monotonic() - 1)
    expiring = batcher.submit_generate([torch.tensor([300, 301])], SamplingParams(max_new_tokens=3),
                                       deadline=time.monotonic() + 0.05)
    alive = batcher.submit_score(ScoreArgs([torch.tensor([400, 401, 402])], [1], top_k=1),
                                 deadline=time.monotonic() + 60)
    time.sleep(0.1)  # `expiring` passes its deadline while it waits
    gated.gate.set()
    for t in (cancelled, expired, expiring):
        with pytest.raises(Cancelled):
            t.result(30)
    assert alive.result(30)[0].token_logprobs.shape == (2,)
    blocker.result(30)
    seen = [ids for _, call in gated.calls for ids in call]
    assert [400, 401, 402] in seen
    assert not any(ids[0] in (100, 200, 300) for ids in seen)
    assert all(kind == "score" for kind, _ in gated.calls)
    assert batcher.metrics.registry.get_sample_value("distillery_teacher_cancelled_total") == 3
    batcher.stop()


def test_result_timeout_cancels_the_ticket(engine):
    batcher, gated = start(engine, max_wait_ms=0)
    blocker = occupy(batcher, gated)
    ticket = batcher.submit_score(ScoreArgs([torch.tensor([500, 501])], [1], top_k=1))
    with pytest.raises(Cancelled):
        ticket.result(0.05)  # the caller stops waiting
    gated.gate.set()
    blocker.result(30)
    batcher.stop()
    assert ticket.cancelled
    assert not any(ids[0] == 500 for _, call in gated.calls for ids in call)


def test_generate_batches_by_sampling_params(engine):
    batcher, gated = start(engine, max_wait_ms=0)
    blocker = occupy(batcher, gated)
    p = seqs(5, seed=40)
    hot = SamplingParams(max_new_tokens=5, temperature=1.0, seed=1, return_logprobs=True)
    cold = SamplingParams(max_new_tokens=5, temperature=0.5, seed=1, return_logprobs=True)
    hot_other_seed = SamplingParams(max_new_tokens=3, temperature=1.0, seed=2, return_logprobs=True)
    requests = [([p[0], p[1]], hot), ([p[2]], cold), ([p[3], p[4]], hot_other_seed)]
    tickets = [batcher.submit_generate(ps, params) for ps, params in requests]
    gated.gate.set()
    results = [t.result(60) for t in tickets]
    blocker.result(30)
    # Equal parameters (seeds and lengths aside) share one call; different ones do not.
    assert [c[1] for c in gated.calls[1:]] == [
        [x.tolist() for x in (p[0], p[1], p[3], p[4])], [p[2].tolist()]]
    assert batch_stats(batcher, "generate") == (2.0, 3.0)
    for (ps, params), got in zip(requests, results):
        alone = engine.generate(ps, params)  # seeded from (seed, index within the request)
        assert [g.token_ids.tolist() for g in got] == [g.token_ids.tolist() for g in alone]
        assert all(len(g.token_ids) == params.max_new_tokens for g in got)
        for a, b in zip(got, alone):
            torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=1e-4, rtol=1e-5)
    batcher.stop()


def test_generate_cancelled_while_running_leaves_the_batch(engine):
    batcher, gated = start(engine, max_wait_ms=0)
    blocker = occupy(batcher, gated)
    p = seqs(3, seed=50)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5)
    leaving = batcher.submit_generate([p[0]], params)
    staying = batcher.submit_generate([p[1], p[2]], params)
    polls = []

    def on_poll(i: int) -> None:
        polls.append(i)
        if len(polls) == 7:  # a couple of decoding steps in
            leaving.cancel()

    gated.on_poll = on_poll
    gated.gate.set()
    with pytest.raises(Cancelled):
        leaving.result(60)
    got = staying.result(60)
    blocker.result(30)
    assert polls.count(0) < 8  # row 0 stopped being decoded
    alone = engine.generate([p[1], p[2]], params)
    assert [g.token_ids.tolist() for g in got] == [g.token_ids.tolist() for g in alone]
    batcher.stop()


def test_stop_drains_queued_work(engine):
    batcher, gated = start(engine, max_wait_ms=0)
    blocker = occupy(batcher, gated)
    scores = [batcher.submit_score(ScoreArgs(seqs(1, seed=60 + i), [1], top_k=2)) for i in range(3)]
    gen = batcher.submit_generate([torch.tensor([7, 8])], SamplingParams(max_new_tokens=2, seed=0))
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    deadline = time.monotonic() + 5
    while not batcher._stopping:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    with pytest.raises(Overloaded, match="shutting down"):
        batcher.submit_score(ScoreArgs([torch.tensor([1, 2])], [1], top_k=1))
    gated.gate.set()
    stopper.join(30)
    assert not stopper.is_alive() and not batcher._thread.is_alive()
    for t in [blocker, *scores, gen]:
        assert t._done.is_set()
        assert len(t.result(0)) == 1  # an answer, not an error
    assert len(gen.result(0)[0].token_ids) == 2
