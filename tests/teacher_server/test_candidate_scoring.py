"""Student-candidate scoring: Score returns the teacher's log-probs of ids the request names per
position, and the tail then excludes them; checked against full log-prob rows, in-process, through
the batcher and over gRPC, with the refusals."""

from __future__ import annotations

import pytest
import torch

from teacher_server.batcher import Batcher, BatcherConfig
from teacher_server.contract import InvalidRequest, Limits, ScoreArgs, validate_score
from teacher_server.engine import EngineConfig, TeacherEngine

ATOL = 1e-5


@pytest.fixture(scope="module")
def engine(tiny_llama) -> TeacherEngine:
    return TeacherEngine.load(EngineConfig(model_dir=str(tiny_llama)))


def request(engine: TeacherEngine, width: int, seed: int = 0, top_k: int = 4) -> ScoreArgs:
    g = torch.Generator().manual_seed(seed)
    v = engine.vocab_size
    seqs = [torch.randint(0, v, (n,), generator=g) for n in (9, 14, 3)]
    starts = [4, 1, 3]  # the last one scores nothing
    cands = [torch.randint(0, v, (len(s) - f, width), generator=g) for s, f in zip(seqs, starts)]
    cands[1][:, 0] = seqs[1][1:]  # a candidate that is the actual token: counted once in the tail
    return ScoreArgs(seqs, starts, top_k=top_k, candidates=cands)


def check_against_full_rows(engine: TeacherEngine, args: ScoreArgs, got) -> None:
    full = engine.score(ScoreArgs(args.sequences, args.score_from, top_k=args.top_k, full_logprobs=True))
    for s, f, c, g, w in zip(args.sequences, args.score_from, args.candidates, got, full):
        assert g.candidate_logprobs.shape == c.shape
        torch.testing.assert_close(g.candidate_logprobs, w.full_logprobs.gather(-1, c), atol=ATOL, rtol=0)
        # The tail: a log-sum-exp over every id outside top-k ∪ {token} ∪ candidates.
        outside = torch.ones_like(w.full_logprobs, dtype=torch.bool)
        outside.scatter_(-1, torch.cat([w.topk_ids, s[f:, None], c], -1), False)
        want = w.full_logprobs.masked_fill(~outside, float("-inf")).logsumexp(-1)
        torch.testing.assert_close(g.tail_logprobs, want, atol=ATOL, rtol=1e-5)
        assert bool((g.tail_logprobs <= w.tail_logprobs + ATOL).all())  # never more than without them
        torch.testing.assert_close(g.topk_logprobs, w.topk_logprobs, atol=ATOL, rtol=0)


def test_engine_scores_candidates_and_leaves_them_out_of_the_tail(engine):
    args = request(engine, width=5)
    validate_score(args, engine.limits)
    check_against_full_rows(engine, args, engine.score(args))
    assert engine.info().max_candidates == engine.limits.max_candidates == engine.config.top_k_limit


def test_all_ids_as_candidates_leave_no_tail(engine):
    seq = torch.arange(2, 8)
    every = torch.arange(engine.vocab_size).repeat(5, 1)
    limits = Limits(vocab_size=engine.vocab_size, max_sequence_length=64, max_candidates=engine.vocab_size)
    args = ScoreArgs([seq], [1], top_k=0, candidates=[every])
    validate_score(args, limits)
    (got,) = engine.score(args)
    assert got.tail_logprobs.tolist() == [float("-inf")] * 5
    torch.testing.assert_close(got.candidate_logprobs.logsumexp(-1), torch.zeros(5), atol=1e-5, rtol=0)


def test_batcher_merges_requests_with_candidates_without_changing_answers(engine):
    batcher = Batcher(engine, BatcherConfig(max_wait_ms=200)).start()
    try:
        a, b = request(engine, width=3, seed=1), request(engine, width=3, seed=2)
        plain = ScoreArgs(a.sequences, a.score_from, top_k=4)
        tickets = [batcher.submit_score(x) for x in (a, b, plain)]
        got_a, got_b, got_plain = (t.result(30) for t in tickets)
    finally:
        batcher.stop()
    check_against_full_rows(engine, a, got_a)
    check_against_full_rows(engine, b, got_b)
    assert all(s.candidate_logprobs is None for s in got_plain)


@pytest.mark.parametrize("change, message", [
    (lambda a: ScoreArgs(a.sequences, a.score_from, a.top_k, candidates=a.candidates[:2]), "every sequence"),
    (lambda a: ScoreArgs(a.sequences, a.score_from, a.top_k,
                         candidates=[a.candidates[0][:-1], *a.candidates[1:]]), "shape"),
    (lambda a: ScoreArgs(a.sequences, a.score_from, a.top_k,
                         candidates=[a.candidates[0] + 10_000, *a.candidates[1:]]), "outside"),
    (lambda a: ScoreArgs(a.sequences, a.score_from, a.top_k,
                         candidates=[c.repeat(1, 40) for c in a.candidates]), "must be in"),
])
def test_bad_candidates_are_refused(engine, change, message):
    with pytest.raises(InvalidRequest, match=message):
        validate_score(change(request(engine, width=4)), engine.limits)


def test_an_engine_without_candidates_refuses_them(engine):
    limits = Limits(vocab_size=engine.vocab_size, max_sequence_length=64)  # max_candidates 0 (vLLM's)
    with pytest.raises(InvalidRequest, match="max_candidates = 0"):
        validate_score(request(engine, width=2), limits)


def test_candidates_over_grpc_equal_in_process(engine, tiny_llama):
    from teacher_server.client import TeacherClient
    from teacher_server.serve import ServerConfig, TeacherServer
    from teacher_server.wire import score_request_from_pb, score_request_to_pb

    server = TeacherServer(ServerConfig(engine=EngineConfig(model_dir=str(tiny_llama)), port=0, grace_s=1.0,
                                        drain_delay_s=0.0))
    port = server.start()
    server.load(TeacherEngine.load(server.config.engine))
    try:
        args = request(engine, width=6, seed=3)
        with TeacherClient(f"127.0.0.1:{port}", timeout_s=30) as client:
            assert client.info().max_candidates == engine.config.top_k_limit
            got = client.score(args.sequences, args.score_from, top_k=args.top_k, candidates=args.candidates)
            check_against_full_rows(engine, args, got)
            with pytest.raises(InvalidRequest, match="outside"):
                client.score(args.sequences, args.score_from, top_k=2,
                             candidates=[c + engine.vocab_size for c in args.candidates])
    finally:
        server.stop()
    # On the wire: candidates for only some sequences are refused as a whole.
    msg = score_request_to_pb(args)
    msg.sequences[1].ClearField("candidate_ids")
    with pytest.raises(InvalidRequest, match="every sequence"):
        score_request_from_pb(msg)
