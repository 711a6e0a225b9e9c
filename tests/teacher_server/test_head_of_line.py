"""Head-of-line blocking (issue 17): a small request must not wait for a big one to finish.

The engine runs in-process behind a real `Batcher` (no gRPC). Engine and batcher both work in
slices of 2048 tokens, so the big Score below (512 x 128 tokens) is 32 forward passes. Every
bound is relative to the big request's own duration, not a wall-clock number, so the tests hold
on a loaded machine; before the fix each ratio was close to 1 (the small request waited for all
of the big one).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from teacher_server.batcher import Batcher, BatcherConfig
from teacher_server.contract import Cancelled, SamplingParams, ScoreArgs
from teacher_server.engine import EngineConfig, TeacherEngine

SLICE = 2048  # tokens per forward pass (engine) and per engine call (batcher)
BOUND = 0.3  # the small request's wait, as a fraction of the big request's duration
ATOL = 1e-5


@pytest.fixture(scope="module")
def engine(tiny_llama) -> TeacherEngine:
    return TeacherEngine.load(EngineConfig(model_dir=str(tiny_llama), max_batch_tokens=SLICE))


@pytest.fixture
def forwards(engine, monkeypatch) -> list[list[int]]:
    """One entry per score forward pass: the lengths of the sequences in it."""
    calls: list[list[int]] = []
    real = engine._score_batch

    def counted(args, batch):
        calls.append([len(args.sequences[i]) for i in batch])
        return real(args, batch)

    monkeypatch.setattr(engine, "_score_batch", counted)
    return calls


@pytest.fixture
def batcher(engine):
    b = Batcher(engine, BatcherConfig(max_batch_tokens=SLICE, max_wait_ms=0)).start()
    yield b
    b.stop()


def big_score(n: int = 512, length: int = 128) -> ScoreArgs:
    g = torch.Generator().manual_seed(17)
    return ScoreArgs([torch.randint(3, 512, (length,), generator=g) for _ in range(n)], [1] * n,
                     top_k=8)


SMALL = ScoreArgs([torch.tensor([3, 4, 5, 6])], [1], top_k=8)


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def assert_same_scores(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a.topk_ids, b.topk_ids)
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(a.tail_logprobs, b.tail_logprobs, atol=ATOL, rtol=1e-5)


def test_engine_score_skips_cancelled_rows_between_micro_batches(engine, forwards):
    seqs = big_score(24, 128).sequences  # 16 rows of 128 per 2048-token forward: 2 forwards
    args = ScoreArgs(seqs, [5] * 24, top_k=4)
    got = engine.score(args, cancelled=lambda i: i % 2 == 1)
    assert [r is None for r in got] == [i % 2 == 1 for i in range(24)]
    assert sum(len(f) for f in forwards) == 12  # cancelled rows never ran
    want = engine.score(ScoreArgs(seqs[::2], [5] * 12, top_k=4))
    assert_same_scores(got[::2], want)
    # Everything cancelled after the first forward: the second never runs.
    forwards.clear()
    got = engine.score(args, cancelled=lambda i: len(forwards) >= 1)
    assert len(forwards) == 1 and sum(r is not None for r in got) == len(forwards[0])


def test_small_score_is_not_stuck_behind_a_big_one(engine, forwards, batcher):
    big_args = big_score()
    began = time.monotonic()
    big = batcher.submit_score(big_args)
    wait_until(lambda: len(forwards) >= 2)  # the big one is running
    sent = time.monotonic()
    small = batcher.submit_score(SMALL).result(60)
    small_wait = time.monotonic() - sent
    big_result = big.result(60)
    big_time = time.monotonic() - began
    print(f"small wait {small_wait:.3f}s, big request {big_time:.3f}s, "
          f"{len(forwards)} forwards")
    assert small_wait < BOUND * big_time
    assert_same_scores(small, engine.score(SMALL))
    some = [0, 200, 511]
    assert_same_scores([big_result[i] for i in some],
                       engine.score(ScoreArgs([big_args.sequences[i] for i in some], [1] * 3,
                                              top_k=8)))


def test_cancelled_big_score_leaves_the_engine_at_the_next_forward(engine, forwards, batcher):
    big = batcher.submit_score(big_score())
    wait_until(lambda: len(forwards) >= 2)
    big.cancel()
    at_cancel = len(forwards)
    with pytest.raises(Cancelled):
        big.result(60)
    batcher.submit_score(SMALL).result(60)  # the engine is free again
    after = [f for f in forwards[at_cancel:] if 128 in f]
    print(f"forwards of the big request: {at_cancel} before cancel, {len(after)} after (of 32)")
    assert len(after) <= 1  # at most the one that had already started
    reg = batcher.metrics.registry
    assert reg.get_sample_value("distillery_teacher_cancelled_total") == 1


def test_small_score_runs_during_a_long_generate(engine, batcher):
    prompts = [torch.arange(3, 10), torch.arange(20, 25)]
    params = SamplingParams(max_new_tokens=480, temperature=1.0, seed=3, return_logprobs=True)
    began = time.monotonic()
    gen = batcher.submit_generate(prompts, params)
    wait_until(lambda: not batcher._q.items)  # the worker has taken it
    time.sleep(0.01)
    sent = time.monotonic()
    small = batcher.submit_score(SMALL).result(60)
    small_wait = time.monotonic() - sent
    generate_still_running = not gen._done.is_set()
    got = gen.result(60)
    gen_time = time.monotonic() - began
    print(f"small wait {small_wait:.3f}s, generate {gen_time:.3f}s")
    assert generate_still_running  # the Score finished first
    assert small_wait < BOUND * gen_time
    assert_same_scores(small, engine.score(SMALL))
    # Score work run between decoding steps does not change a seeded generation.
    alone = engine.generate(prompts, params)
    for a, b in zip(got, alone):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=1e-4, rtol=1e-5)


def test_many_small_scores_still_let_the_big_one_progress(engine, forwards, batcher):
    """Fairness the other way: a stream of small requests does not starve a big one."""
    big = batcher.submit_score(big_score(64, 128))  # 4 forwards
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            batcher.submit_score(SMALL).result(60)

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        assert len(big.result(30)) == 64
    finally:
        stop.set()
        for t in threads:
            t.join(30)
