"""Many jobs, one teacher: weighted fair queueing by job, per-job queue limits, per-job metrics.

The step-level tests use the batcher's `Gated` engine double (tests/teacher_server/test_batcher.py):
the first engine call blocks, everything submitted meanwhile waits, and the composition of each
later step is read from the recorded calls. The served test runs a real gRPC server on loopback.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from teacher_server.batcher import BatcherConfig
from teacher_server.contract import InvalidRequest, Overloaded, SamplingParams, ScoreArgs
from teacher_server.engine import EngineConfig, TeacherEngine

from test_batcher import Gated, occupy, start, wait_queued


@pytest.fixture(scope="module")
def engine(tiny_llama) -> TeacherEngine:
    return TeacherEngine.load(EngineConfig(model_dir=str(tiny_llama)))


def request(n: int, first_token: int, length: int = 8) -> ScoreArgs:
    """n sequences of `length` tokens; every token of sequence i is first_token + i (to tell them apart)."""
    return ScoreArgs([torch.full((length,), first_token + i) for i in range(n)], [1] * n, top_k=2)


def steps_of(gated: Gated, light_tokens: set[int]) -> list[tuple[int, int]]:
    """(light sequences, other sequences) of each Score call after the blocker."""
    out = []
    for kind, seqs in gated.calls[1:]:
        if kind == "score":
            light = sum(s[0] in light_tokens for s in seqs)
            out.append((light, len(seqs) - light))
    return out


def metric(batcher, name: str, **labels) -> float:
    return batcher.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("light_weight, expected", [(1.0, [(4, 4), (4, 4)]), (3.0, [(6, 2), (2, 6)])])
def test_a_flooding_job_cannot_starve_a_light_one(engine, light_weight, expected):
    # Steps of 8 sequences. The heavy job queues 10 requests of 8 sequences, then the light job one.
    # By request (round-robin over 11 requests) the light one would get 1 sequence a step, 8 steps;
    # by job it gets its weight's share of every step: 4 + 4 at weight 1, 6 + 2 at weight 3.
    batcher, gated = start(engine, max_wait_ms=0, max_batch_tokens=64,
                           job_weights=(("light", light_weight),))
    blocker = occupy(batcher, gated)
    heavy = [batcher.submit_score(request(8, 100 + 10 * i), job="heavy") for i in range(10)]
    light = batcher.submit_score(request(8, 300), job="light", weight=50.0)  # the server's weight wins
    wait_queued(batcher, 11)
    gated.gate.set()
    for t in [blocker, light, *heavy]:
        t.result(30)
    batcher.stop()
    steps = steps_of(gated, set(range(300, 308)))
    assert steps[:2] == expected, steps
    assert sum(light for light, _ in steps) == 8 and sum(other for _, other in steps) == 80
    # Counts per job are exact: 8 tokens a sequence.
    assert metric(batcher, "distillery_teacher_job_tokens_total", job="light", kind="score") == 64
    assert metric(batcher, "distillery_teacher_job_tokens_total", job="heavy", kind="score") == 640
    assert metric(batcher, "distillery_teacher_job_requests_total", job="heavy", kind="score") == 10
    assert metric(batcher, "distillery_teacher_job_requests_total", job="light", kind="score") == 1
    assert metric(batcher, "distillery_teacher_job_requests_total", job="-", kind="score") == 1  # the blocker


def test_one_job_alone_is_still_round_robin_by_request(engine):
    batcher, gated = start(engine, max_wait_ms=0, max_batch_tokens=32)
    blocker = occupy(batcher, gated)
    tickets = [batcher.submit_score(request(4, 100 + 10 * i), job="solo") for i in range(4)]
    wait_queued(batcher, 4)
    gated.gate.set()
    for t in [blocker, *tickets]:
        t.result(30)
    batcher.stop()
    first = [sorted({(s[0] - 100) // 10 for s in seqs}) for kind, seqs in gated.calls[1:3]]
    assert first == [[0, 1, 2, 3], [0, 1, 2, 3]]  # one sequence of each request per round


def test_an_idle_job_banks_no_credit(engine):
    # A job served long ago comes back: it gets its share from now on, not all steps until it has
    # caught up with the tokens the busy job took meanwhile.
    batcher, gated = start(engine, max_wait_ms=0, max_batch_tokens=64)
    gated.gate.set()
    batcher.submit_score(request(2, 300), job="light").result(30)
    for i in range(4):
        batcher.submit_score(request(8, 100 + 10 * i), job="heavy").result(30)
    gated.gate.clear()
    gated.entered.clear()
    blocker = occupy(batcher, gated)
    heavy = [batcher.submit_score(request(8, 100 + 10 * i), job="heavy") for i in range(3)]
    light = [batcher.submit_score(request(8, 300 + 10 * i), job="light") for i in range(3)]
    wait_queued(batcher, 6)
    gated.gate.set()
    for t in [blocker, *heavy, *light]:
        t.result(30)
    batcher.stop()
    calls = [c for c in gated.calls if c[0] == "score"]
    after = calls[calls.index(next(c for c in calls if c[1] == [[1, 2]])) + 1:]
    shares = [sum(s[0] >= 300 for s in seqs) for _, seqs in after[:3]]
    assert shares == [4, 4, 4], shares


def test_generate_batches_are_shared_by_job_too(engine):
    batcher, gated = start(engine, max_wait_ms=0, max_batch_requests=4)
    blocker = occupy(batcher, gated)
    params = SamplingParams(max_new_tokens=2, temperature=0.0)
    heavy = [batcher.submit_generate([torch.tensor([100 + i])], params, job="heavy") for i in range(6)]
    light = [batcher.submit_generate([torch.tensor([300 + i])], params, job="light") for i in range(2)]
    wait_queued(batcher, 8)
    gated.gate.set()
    for t in [blocker, *heavy, *light]:
        t.result(30)
    batcher.stop()
    batches = [sorted(p[0] for p in prompts) for kind, prompts in gated.calls if kind == "generate"]
    assert batches[0] == [100, 101, 300, 301]  # by arrival it would be heavy's first four
    assert metric(batcher, "distillery_teacher_job_tokens_total", job="light", kind="generate") == 4


def test_a_job_over_its_queue_limit_is_refused_alone(engine):
    batcher, gated = start(engine, max_wait_ms=0, max_queue=8, max_queue_per_job=3)
    blocker = occupy(batcher, gated)
    held = [batcher.submit_score(request(1, 100 + i), job="heavy") for i in range(3)]
    with pytest.raises(Overloaded, match="job heavy has 3 requests waiting"):
        batcher.submit_score(request(1, 110), job="heavy")
    light = batcher.submit_score(request(1, 300), job="light")  # other jobs are still served
    assert metric(batcher, "distillery_teacher_job_rejected_total", job="heavy") == 1
    assert metric(batcher, "distillery_teacher_job_rejected_total", job="light") == 0
    gated.gate.set()
    for t in [blocker, *held, light]:
        t.result(30)
    batcher.stop()
    assert batcher._waiting == {}  # nothing is left counted once the queue is empty


def test_job_weights_config_is_checked():
    assert BatcherConfig(job_weights=(("a", 2.0),)).job_weights == (("a", 2.0),)


# ---------------------------------------------------------------------------- served, two clients
def test_served_jobs_are_counted_exactly_beside_a_flood(tiny_llama):
    """A light client and a 10-thread flood of another job on one server: every answer right, and
    the per-job series count each job's requests and tokens exactly. (The latencies this gives
    the light job are measured by bench/fair_queue_bench.py, not asserted here.)"""
    from teacher_server.client import TeacherClient
    from teacher_server.serve import ServerConfig, TeacherServer

    server = TeacherServer(ServerConfig(
        engine=EngineConfig(model_dir=str(tiny_llama), max_batch_tokens=256),
        batcher=BatcherConfig(max_batch_tokens=256, max_wait_ms=1.0), port=0, grace_s=1.0,
        drain_delay_s=0.0))
    port = server.start()
    engine = TeacherEngine.load(server.config.engine)
    server.load(engine)
    endpoint = f"127.0.0.1:{port}"
    light_args, heavy_args = request(4, 300, length=16), request(8, 100, length=16)
    want = engine.score(light_args)
    stop = threading.Event()
    heavy_calls = [0]

    def flood() -> None:
        with TeacherClient(endpoint, timeout_s=60, job_id="heavy", job_weight=1.0) as c:
            while not stop.is_set():
                c.score(heavy_args.sequences, heavy_args.score_from, top_k=2)
                heavy_calls[0] += 1

    threads = [threading.Thread(target=flood) for _ in range(10)]
    try:
        with TeacherClient(endpoint, timeout_s=60, job_id="light") as light:
            for t in threads:
                t.start()
            while heavy_calls[0] < 10:
                time.sleep(0.01)
            for _ in range(10):
                got = light.score(light_args.sequences, light_args.score_from, top_k=2)
                for g, w in zip(got, want):
                    assert torch.equal(g.topk_ids, w.topk_ids)
                    torch.testing.assert_close(g.topk_logprobs, w.topk_logprobs, atol=1e-5, rtol=1e-5)
        stop.set()
        for t in threads:
            t.join(30)
        sample = server.metrics.registry.get_sample_value
        assert sample("distillery_teacher_job_requests_total", {"job": "light", "kind": "score"}) == 10
        assert sample("distillery_teacher_job_tokens_total", {"job": "light", "kind": "score"}) == 10 * 4 * 16
        assert sample("distillery_teacher_job_requests_total", {"job": "heavy", "kind": "score"}) == heavy_calls[0]
        assert sample("distillery_teacher_job_tokens_total", {"job": "heavy", "kind": "score"}) == \
            heavy_calls[0] * 8 * 16
    finally:
        stop.set()
        server.stop()


def test_malformed_job_metadata_is_invalid_argument(tiny_llama):
    from teacher_server.client import TeacherClient
    from teacher_server.serve import ServerConfig, TeacherServer

    server = TeacherServer(ServerConfig(engine=EngineConfig(model_dir=str(tiny_llama)), port=0,
                                        grace_s=1.0, drain_delay_s=0.0))
    port = server.start()
    server.load(TeacherEngine.load(server.config.engine))
    try:
        for bad in (dict(job_id="has space"), dict(job_id="x" * 200), dict(job_id="j", job_weight=0.0)):
            with TeacherClient(f"127.0.0.1:{port}", timeout_s=10, **bad) as c:
                with pytest.raises(InvalidRequest, match="distillery-job"):
                    c.score([torch.tensor([1, 2, 3])], [1], top_k=1)
    finally:
        server.stop()
