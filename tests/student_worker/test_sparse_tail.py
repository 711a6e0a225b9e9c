"""A confident teacher's sparse rows give exact losses, in-process and served.

Real LLM teachers often put 1 - 1e-9 or more on their top token. The sparse losses then depend on
a tail of 1e-9 or 1e-12 that float32 cannot rebuild as 1 - sum(top-k) (the sum rounds to 1). The
teacher server computes the log tail itself; this checks, at V = 32000, that every divergence on
sparse rows equals the float64 divergence between the dense distributions coarsened to the same
buckets (top-k ∪ {actual token} ∪ the rest), within 1e-5 relative.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from student_worker.losses import token_divergence
from student_worker.rollout import collate
from teacher_server.client import TeacherClient
from teacher_server.engine import EngineConfig, TeacherEngine
from teacher_server.in_process import LocalTeacher
from teacher_server.serve import ServerConfig, TeacherServer

VOCAB = 32_000
TOP_K = 8
LOSSES = [("fkl", {}), ("rkl", {}), ("skew_fkl", {"alpha": 0.1}), ("skew_rkl", {"alpha": 0.1}),
          ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.9}), ("tvd", {}),
          ("akl", {"mu": 0.5})]


class ConfidentHead(nn.Linear):
    """An output head whose top token gets probability exactly 1 - eps at every position: the other
    logits are shifted so that their log-sum-exp is -L/2 and the top one is set to +L/2, with
    L = log((1 - eps) / eps). Logits stay small, so float32 rounding is that of a real head."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__(hidden, VOCAB, bias=False)
        self.half = 0.5 * math.log((1 - eps) / eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = 40.0 * super().forward(h)  # about N(0, 1) per logit
        hot = z.argmax(-1, keepdim=True)
        others = z.scatter(-1, hot, float("-inf")).logsumexp(-1, keepdim=True)
        return (z - others - self.half).scatter(-1, hot, self.half)


def confident_engine(eps: float) -> TeacherEngine:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.lm_head = ConfidentHead(16, eps)
    return TeacherEngine(model, EngineConfig(model_dir="confident"), name=f"confident-{eps:g}")


def reference_teacher(engine: TeacherEngine, seq: torch.Tensor, start: int) -> torch.Tensor:
    """Float64 teacher log-probs [n, V] at positions start..len-1, from the same hidden states."""
    with torch.no_grad():
        hidden = engine.model.get_decoder()(input_ids=seq[None]).last_hidden_state[0]
        head = engine.model.lm_head
        z = 40.0 * (hidden[start - 1:-1].double() @ head.weight.double().T)
        hot = z.argmax(-1, keepdim=True)
        others = z.scatter(-1, hot, float("-inf")).logsumexp(-1, keepdim=True)
        return (z - others - head.half).scatter(-1, hot, head.half).log_softmax(-1)


def coarsened(log_p: torch.Tensor, log_q: torch.Tensor, topk_ids: torch.Tensor,
              token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 probabilities of the buckets: each distinct id of top-k ∪ {token}, then the rest."""
    ids = topk_ids.tolist() + ([int(token)] if int(token) not in topk_ids.tolist() else [])
    idx = torch.tensor(ids)
    rest = torch.ones(VOCAB, dtype=torch.bool)
    rest[idx] = False
    p = torch.cat([log_p[idx].exp(), log_p[rest].logsumexp(-1, keepdim=True).exp()])
    q = torch.cat([log_q[idx].exp(), log_q[rest].logsumexp(-1, keepdim=True).exp()])
    return p, q


def kl(a: torch.Tensor, b: torch.Tensor) -> float:
    keep = a > 0
    return float((a[keep] * (a[keep].log() - b[keep].log())).sum())


def floored(p: torch.Tensor) -> torch.Tensor:
    """The teacher as reference measure of KL(q || p): probabilities below e^-100 raised to it
    (the documented floor; this head puts some actual tokens near e^-140)."""
    return p.clamp_min(math.exp(-100.0))


def reference_divergence(name: str, p: torch.Tensor, q: torch.Tensor, kw: dict) -> float:
    """Textbook float64 formulas (JSD in TRL's convention, AKL by the authors' head/tail rule)."""
    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, floored(p))
    if name == "skew_fkl":
        return kl(p, kw["alpha"] * p + (1 - kw["alpha"]) * q)
    if name == "skew_rkl":
        return kl(q, kw["alpha"] * q + (1 - kw["alpha"]) * p)
    if name == "jsd":
        beta = kw["beta"]
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "tvd":
        return 0.5 * float((p - q).abs().sum())
    assert name == "akl"
    order = sorted(range(len(p)), key=lambda i: -float(p[i]))
    head, cum = set(), 0.0
    for rank, i in enumerate(order):
        cum += float(p[i])
        if rank == 0 or cum <= kw["mu"]:
            head.add(i)
    g_head = sum(abs(float(p[i] - q[i])) for i in head)
    g_tail = sum(abs(float(p[i] - q[i])) for i in range(len(p)) if i not in head)
    w_head = g_head / (g_head + g_tail)
    return w_head * kl(p, q) + (1 - w_head) * kl(q, floored(p))


def student_logits(reference: list[torch.Tensor], kind: str, seed: int) -> torch.Tensor:
    """float64 [B, R, V]: a random student, or one nearer the (confident) teacher. float64 so that
    the losses run in float64 and the comparison measures the teacher's rows alone (a float32
    log-softmax over 32000 logits is itself only good to about 1e-6)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for ref in reference:
        noise = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        rows.append(2.0 * noise if kind == "random" else 0.3 * ref.clamp_min(-40) + noise)
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


@pytest.fixture(scope="module", params=[1e-9, 1e-12], ids=["eps=1e-9", "eps=1e-12"])
def confident(request):
    """(eps, engine, served client) for one confidence level; the server runs in this process on
    an ephemeral loopback port and is stopped at the end."""
    engine = confident_engine(request.param)
    server = TeacherServer(ServerConfig(engine=engine.config, port=0, grace_s=2.0,
                                        drain_delay_s=0.0))
    port = server.start()
    server.load(engine)
    client = TeacherClient(f"127.0.0.1:{port}", timeout_s=60)
    yield request.param, engine, client
    client.close()
    server.stop()


@pytest.mark.parametrize("path", ["in-process", "served"])
@pytest.mark.parametrize("student", ["random", "near"])
def test_sparse_losses_equal_float64_dense_on_the_same_buckets(confident, path, student):
    eps, engine, client = confident
    teacher = LocalTeacher(engine) if path == "in-process" else client
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (3, 5)]
    responses = [torch.randint(0, VOCAB, (n,), generator=g) for n in (9, 6)]
    seqs = [torch.cat([p, r]) for p, r in zip(prompts, responses)]
    scored = teacher.score(seqs, [len(p) for p in prompts], top_k=TOP_K)
    batch = collate(prompts, responses, scored, pad_id=0)
    sparse = batch.teacher

    reference = [reference_teacher(engine, s, len(p)) for s, p in zip(seqs, prompts)]
    top1 = torch.cat([r.max(-1).values for r in reference]).exp()
    torch.testing.assert_close(1 - top1, torch.full_like(top1, eps), rtol=1e-3, atol=0)
    # What the old client did is hopeless here: 1 - sum(top-k) in float32 leaves no tail at all.
    rebuilt = 1 - sparse.topk_logprobs[batch.response_mask].exp().sum(-1)
    assert bool((rebuilt <= eps / 10).all())

    logits = student_logits(reference, student, seed=11)
    for name, kw in LOSSES:
        got = token_divergence(logits, sparse, batch.response_mask, loss=name, **kw)
        for b, (ref, resp) in enumerate(zip(reference, responses)):
            log_q = logits[b, :len(resp)].double().log_softmax(-1)
            for t in range(len(resp)):
                p, q = coarsened(ref[t], log_q[t], sparse.topk_ids[b, t], resp[t])
                want = reference_divergence(name, p, q, kw)
                assert float(got[b, t]) == pytest.approx(want, rel=1e-5), (name, kw, b, t)
