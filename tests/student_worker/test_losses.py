"""Distillation divergences and preference losses: against plain float64 references, properties,
sparse == dense at k = V, chunking, extreme inputs, reductions. CPU, seeded, small shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from student_worker import losses
from student_worker.losses import (
    DIVERGENCES,
    TEACHER_LOGPROB_FLOOR,
    DenseTeacher,
    SparseTeacher,
    akl_weights,
    coarsen_sparse,
    distill_loss,
    dpo_loss,
    get_divergence,
    hinge_loss,
    sequence_logprobs,
    simpo_loss,
    token_divergence,
)

NAMES = sorted(DIVERGENCES)
KINDS = ["dense", "sparse"]
# Non-default values, so a hyperparameter that is not passed through shows up as a mismatch.
HP = dict(alpha=0.2, beta=0.3, mu=0.6)


# ---- independent references: numpy float64, plain loops, no module helpers -----------------------


def ref_kl(a: list[float], b: list[float]) -> float:
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b) if x > 0)


def ref_divergence(name: str, p: list[float], q: list[float], *, alpha: float, beta: float,
                   mu: float) -> float:
    """JSD as TRL's generalized_jsd_loss; the AKL split as the code released with Wu et al. 2024."""
    floored_p = [max(x, math.exp(TEACHER_LOGPROB_FLOOR)) for x in p]
    if name == "fkl":
        return ref_kl(p, q)
    if name == "rkl":
        return ref_kl(q, floored_p)
    if name == "skew_fkl":
        return ref_kl(p, [alpha * x + (1 - alpha) * y for x, y in zip(p, q)])
    if name == "skew_rkl":
        return ref_kl(q, [alpha * y + (1 - alpha) * x for x, y in zip(p, q)])
    if name == "jsd":
        if beta == 0:
            return ref_kl(p, q)
        if beta == 1:
            return ref_kl(q, floored_p)
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if name == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    assert name == "akl"
    # Head: the most likely outcome, then those whose inclusive cumulative mass is <= mu. Every
    # outcome (a sparse row's tail bucket too) is sorted by its own mass.
    order = sorted(range(len(p)), key=lambda i: -p[i])
    g_head = g_tail = cum = 0.0
    for rank, i in enumerate(order):
        cum += p[i]
        if rank == 0 or cum <= mu:
            g_head += abs(p[i] - q[i])
        else:
            g_tail += abs(p[i] - q[i])
    w = g_head / (g_head + g_tail)
    return w * ref_kl(p, q) + (1 - w) * ref_kl(q, floored_p)


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_coarsen(q_full: np.ndarray, topk_ids, topk_lp, tok: int, tok_lp: float, p_full: np.ndarray):
    """Explicit support set S = top-k ∪ {token} and one tail bucket per side, each tail summed
    over the tokens outside S (as the teacher server computes its own)."""
    support = [int(i) for i in topk_ids]
    p = [math.exp(x) for x in topk_lp]
    if tok not in support:
        support.append(tok)
        p.append(math.exp(tok_lp))
    q = [float(q_full[i]) for i in support]
    p_tail = sum(float(p_full[i]) for i in range(len(p_full)) if i not in support)
    q_tail = sum(float(q_full[i]) for i in range(len(q_full)) if i not in support)
    return p + [p_tail], q + [q_tail]


# ---- builders ----------------------------------------------------------------------------------


def make_case(b=2, t=3, v=9, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(b, t, v, generator=g)).to(dtype)
    # Normalised in `dtype`: the sparse tail is the teacher's mass outside the support as given,
    # so a float32 row cast to float64 (summing to 1 ± 2e-7) would show in the float64 checks.
    teacher_lp = torch.log_softmax((scale * torch.randn(b, t, v, generator=g)).to(dtype), -1)
    tokens = torch.randint(0, v, (b, t), generator=g)
    return student, teacher_lp, tokens


def sparse_from_dense(teacher_lp: torch.Tensor, k: int, tokens: torch.Tensor) -> SparseTeacher:
    return SparseTeacher.from_dense(teacher_lp, tokens, k)


def teacher_for(kind: str, teacher_lp: torch.Tensor, tokens: torch.Tensor, k: int = 3):
    return DenseTeacher(teacher_lp) if kind == "dense" else sparse_from_dense(teacher_lp, k, tokens)


# ---- agreement with the references -------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_dense_matches_reference(name):
    student, teacher_lp, _ = make_case(seed=1)
    tau = 1.5
    got = token_divergence(student, DenseTeacher(teacher_lp), loss=name, temperature=tau, **HP)
    for b in range(2):
        for t in range(3):
            p = np.exp(teacher_lp[b, t].numpy()).tolist()
            q = np_softmax(student[b, t].numpy() / tau).tolist()
            assert got[b, t].item() == pytest.approx(ref_divergence(name, p, q, **HP), rel=1e-9,
                                                     abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_sparse_matches_reference(name):
    student, teacher_lp, tokens = make_case(b=2, t=4, v=9, seed=2)
    teacher = sparse_from_dense(teacher_lp, 3, tokens)
    tokens[0, 0] = teacher.topk_ids[0, 0, 1]  # the actual token inside the top-k
    tokens[0, 1] = teacher.topk_ids[0, 1, 0]
    outside = [i for i in range(9) if i not in teacher.topk_ids[1, 0].tolist()]
    tokens[1, 0] = outside[0]  # and outside it
    teacher = sparse_from_dense(teacher_lp, 3, tokens)
    got = token_divergence(student, teacher, loss=name, **HP)
    for b in range(2):
        for t in range(4):
            p, q = ref_coarsen(np_softmax(student[b, t].numpy()), teacher.topk_ids[b, t].tolist(),
                               teacher.topk_logprobs[b, t].tolist(), int(tokens[b, t]),
                               float(teacher.token_logprobs[b, t]),
                               teacher_lp[b, t].exp().numpy())
            want = ref_divergence(name, p, q, **HP)
            assert got[b, t].item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_akl_sparse_bucket_is_sorted_by_its_mass():
    # A nearly flat teacher, top-1 (id 0) plus an actual token outside it: the bucket holds about
    # 0.69 of the mass, so it sorts first and is head (the most likely outcome always is); the two
    # tokens come after the cumulative mass has passed mu = 0.5 and are tail.
    teacher_lp = torch.log_softmax(torch.tensor([[[0.5, 0, 0, 0, 0, 0, 0, 0]]],
                                                dtype=torch.float64), -1)
    student = torch.tensor([[[3.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]]], dtype=torch.float64)
    tokens = torch.tensor([[5]])
    teacher = sparse_from_dense(teacher_lp, 1, tokens)
    got = token_divergence(student, teacher, loss="akl", mu=0.5)
    p_full, q_full = np.exp(teacher_lp[0, 0].numpy()), np_softmax(student[0, 0].numpy())
    pp = [float(p_full[0]), float(p_full[5]), 1.0 - float(p_full[0]) - float(p_full[5])]
    qq = [float(q_full[0]), float(q_full[5]), 1.0 - float(q_full[0]) - float(q_full[5])]
    assert pp[2] > 0.5 > pp[0] > pp[1]  # [top-1 (id 0), actual token (id 5), bucket]
    g_head = abs(pp[2] - qq[2])
    g_tail = abs(pp[0] - qq[0]) + abs(pp[1] - qq[1])
    w = g_head / (g_head + g_tail)
    want = w * ref_kl(pp, qq) + (1 - w) * ref_kl(qq, pp)
    assert got[0, 0].item() == pytest.approx(want, rel=1e-9)
    # the same through akl_weights on the coarsened row itself
    w_head, w_tail = akl_weights(_log(pp), _log(qq), mu=0.5)
    assert w_head.item() == pytest.approx(w, rel=1e-12)
    assert w_tail.item() == pytest.approx(1 - w, rel=1e-12)


# ---- properties --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_identical_distributions_give_zero(name, kind):
    student, _, tokens = make_case(seed=3, dtype=torch.float32)
    teacher_lp = torch.log_softmax(student, -1)
    got = token_divergence(student, teacher_for(kind, teacher_lp, tokens), loss=name, **HP)
    assert got.abs().max().item() < 1e-6


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), v=st.integers(2, 12), k_frac=st.floats(0.0, 1.0),
       scale=st.floats(0.1, 8.0), tau=st.floats(0.5, 2.0),
       alpha=st.floats(0.0, 1.0, exclude_max=True),
       beta=st.floats(0.0, 1.0), mu=st.floats(0.0, 1.0))
def test_nonnegative_and_bounded(seed, v, k_frac, scale, tau, alpha, beta, mu):
    student, teacher_lp, tokens = make_case(b=2, t=2, v=v, seed=seed, scale=scale)
    k = round(k_frac * v)
    for kind in KINDS:
        teacher = teacher_for(kind, teacher_lp, tokens, k=k)
        for name in NAMES:
            got = token_divergence(student, teacher, loss=name, alpha=alpha, beta=beta, mu=mu,
                                   temperature=tau)
            assert torch.isfinite(got).all(), (kind, name)
            assert got.min().item() >= -1e-12, (kind, name)
            if name == "tvd":
                assert got.max().item() <= 1.0 + 1e-12


def test_jsd_and_skew_endpoints_and_limits():
    student, teacher_lp, _ = make_case(seed=4)
    log_p, log_q = teacher_lp, torch.log_softmax(student, -1)
    fkl, rkl = DIVERGENCES["fkl"](log_p, log_q), DIVERGENCES["rkl"](log_p, log_q)
    jsd = DIVERGENCES["jsd"]
    # TRL's convention: the ends are FKL and RKL by definition, but not limits. Inside (0, 1) the
    # value vanishes at both ends, JSD / beta -> FKL and JSD / (1 - beta) -> RKL.
    assert torch.equal(jsd(log_p, log_q, beta=0.0), fkl)
    assert torch.equal(jsd(log_p, log_q, beta=1.0), rkl)
    eps = 1e-6
    torch.testing.assert_close(jsd(log_p, log_q, beta=eps) / eps, fkl, rtol=1e-4, atol=0)
    torch.testing.assert_close(jsd(log_p, log_q, beta=1 - eps) / eps, rkl, rtol=1e-4, atol=0)
    assert (jsd(log_p, log_q, beta=eps) < 1e-3 * fkl).all()
    assert (jsd(log_p, log_q, beta=1 - eps) < 1e-3 * rkl).all()
    # beta = 1/2 is the ordinary Jensen-Shannon divergence.
    m = torch.log((log_p.exp() + log_q.exp()) / 2)
    plain = 0.5 * (log_p.exp() * (log_p - m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - m)).sum(-1)
    torch.testing.assert_close(jsd(log_p, log_q, beta=0.5), plain)
    assert torch.equal(DIVERGENCES["skew_fkl"](log_p, log_q, alpha=0.0), fkl)
    assert torch.equal(DIVERGENCES["skew_rkl"](log_p, log_q, alpha=0.0), rkl)
    near = DIVERGENCES["skew_fkl"](log_p, log_q, alpha=1e-7)
    torch.testing.assert_close(near, fkl, rtol=1e-5, atol=0)
    for skew in ("skew_fkl", "skew_rkl"):  # the bare functions give 0; get_divergence refuses it
        assert DIVERGENCES[skew](log_p, log_q, alpha=1.0).abs().max().item() < 1e-12
        with pytest.raises(ValueError, match="alpha"):
            get_divergence(skew, alpha=1.0)


@pytest.mark.parametrize("name", NAMES)
def test_sparse_with_full_topk_equals_dense(name):
    v = 10
    student, teacher_lp, tokens = make_case(b=2, t=3, v=v, seed=5)
    student.requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    dense = distill_loss(student, DenseTeacher(teacher_lp), mask, loss=name, **HP)
    (g_dense,) = torch.autograd.grad(dense, student)
    sparse = distill_loss(student, sparse_from_dense(teacher_lp, v, tokens), mask, loss=name, **HP)
    (g_sparse,) = torch.autograd.grad(sparse, student)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_unchunked(name, kind):
    student, teacher_lp, tokens = make_case(b=2, t=5, v=9, seed=6, dtype=torch.float32)
    student.requires_grad_(True)
    teacher = teacher_for(kind, teacher_lp, tokens)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 0, 1, 1]])
    whole = distill_loss(student, teacher, mask, loss=name, reduction="seq_mean", **HP)
    (g_whole,) = torch.autograd.grad(whole, student)
    for chunk in (1, 2, 7):
        part = distill_loss(student, teacher, mask, loss=name, reduction="seq_mean",
                            chunk_size=chunk, **HP)
        (g_part,) = torch.autograd.grad(part, student)
        torch.testing.assert_close(part, whole, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g_part, g_whole, rtol=1e-6, atol=1e-7)


# ---- extreme and degenerate inputs -------------------------------------------------------------


def extreme_case():
    g = torch.Generator().manual_seed(7)
    b, t, v = 2, 3, 8
    student = (1e4 * torch.sign(torch.randn(b, t, v, generator=g))).requires_grad_(True)
    hot = torch.randint(0, v, (b, t), generator=g)
    teacher_lp = torch.full((b, t, v), float("-inf"))
    teacher_lp.scatter_(-1, hot.unsqueeze(-1), 0.0)  # one-hot teacher rows
    teacher_lp[1, 2] = torch.log_softmax(torch.tensor([0.0, 1, 2, -1e4, -1e4, 3, 0, 0]), -1)
    teacher_lp[1, 2, 3:5] = float("-inf")
    tokens = torch.randint(0, v, (b, t), generator=g)
    tokens[0, 0] = hot[0, 0]
    return student, teacher_lp, tokens


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_extreme_logits_and_zero_teacher_probs_stay_finite(name, kind):
    student, teacher_lp, tokens = extreme_case()
    for k in (3, 8):
        teacher = teacher_for(kind, teacher_lp, tokens, k=k)
        loss = distill_loss(student, teacher, torch.ones(2, 3), loss=name, **HP)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss), (name, kind, k, loss)
        assert torch.isfinite(grad).all(), (name, kind, k)


def test_reverse_kl_uses_the_teacher_floor_where_p_is_zero():
    log_p = torch.tensor([0.0, float("-inf"), float("-inf")], dtype=torch.float64)
    log_q = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    q = [0.5, 0.3, 0.2]
    want = q[0] * math.log(q[0]) + sum(x * (math.log(x) - TEACHER_LOGPROB_FLOOR) for x in q[1:])
    assert DIVERGENCES["rkl"](log_p, log_q).item() == pytest.approx(want, rel=1e-12)
    assert DIVERGENCES["fkl"](log_p, log_q).item() == pytest.approx(-math.log(0.5), rel=1e-12)


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_all_masked_gives_attached_zero(name, kind, reduction):
    student, teacher_lp, tokens = make_case(dtype=torch.float32, seed=8)
    student.requires_grad_(True)
    loss = distill_loss(student, teacher_for(kind, teacher_lp, tokens), torch.zeros(2, 3),
                        loss=name, reduction=reduction, chunk_size=2)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("kind", KINDS)
def test_masked_positions_are_never_read(kind):
    student, teacher_lp, tokens = make_case(dtype=torch.float32, seed=9)
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    clean = distill_loss(student, teacher_for(kind, teacher_lp, tokens), mask, loss="jsd")
    garbage_lp = teacher_lp.masked_fill(~mask.unsqueeze(-1), float("nan"))
    garbage_tok = tokens.masked_fill(~mask, -100)  # padding ids that would break a gather
    if kind == "dense":
        teacher = DenseTeacher(garbage_lp)
    else:
        good = sparse_from_dense(teacher_lp, 3, tokens)
        teacher = SparseTeacher(good.topk_ids.masked_fill(~mask.unsqueeze(-1), -100),
                                good.topk_logprobs.masked_fill(~mask.unsqueeze(-1), float("nan")),
                                garbage_tok, good.token_logprobs.masked_fill(~mask, float("nan")),
                                good.tail_logprobs.masked_fill(~mask, float("nan")))
    student.requires_grad_(True)
    loss = distill_loss(student, teacher, mask, loss="jsd")
    assert torch.equal(loss, clean)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert torch.equal(student.grad[~mask], torch.zeros(3, 9))


@pytest.mark.parametrize("name", NAMES)
def test_sparse_with_masked_student_vocabulary_stays_finite(name):
    # Ids 6, 7 are masked: -inf student logits, zero teacher mass. The top-6 cover the rest, so the
    # student's bucket is empty while the teacher's is empty only up to float32 rounding (for some
    # seeds 1 - sum p is a positive crumb, which must not make FKL infinite).
    for seed in range(16):
        g = torch.Generator().manual_seed(seed)
        student = torch.randn(1, 2, 8, generator=g)
        student[..., 6:] = float("-inf")
        student.requires_grad_(True)
        teacher_lp = torch.log_softmax(torch.randn(1, 2, 8, generator=g).masked_fill(
            torch.arange(8) >= 6, float("-inf")), -1)
        tokens = torch.tensor([[0, 7]])  # inside the top-6, and a masked id
        teacher = sparse_from_dense(teacher_lp, 6, tokens)
        loss = distill_loss(student, teacher, torch.ones(1, 2), loss=name, **HP)
        (grad,) = torch.autograd.grad(loss, student)
        dense = distill_loss(student, DenseTeacher(teacher_lp), torch.ones(1, 2), loss=name, **HP)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), seed
        torch.testing.assert_close(loss, dense, rtol=1e-5, atol=1e-6)


def test_low_precision_student_is_upcast():
    student, teacher_lp, tokens = make_case(dtype=torch.float32, seed=10)
    teacher = DenseTeacher(teacher_lp.to(torch.bfloat16))
    low = distill_loss(student.to(torch.bfloat16), teacher, torch.ones(2, 3), loss="akl")
    assert low.dtype == torch.float32
    ref = distill_loss(student.to(torch.bfloat16).float(),
                       DenseTeacher(teacher_lp.to(torch.bfloat16).float()), torch.ones(2, 3),
                       loss="akl")
    assert torch.equal(low, ref)


def test_temperature_divides_student_logits_only():
    student, teacher_lp, tokens = make_case(seed=11)
    for kind in KINDS:
        teacher = teacher_for(kind, teacher_lp, tokens)
        hot = distill_loss(student, teacher, torch.ones(2, 3), loss="fkl", temperature=2.5)
        cold = distill_loss(student / 2.5, teacher, torch.ones(2, 3), loss="fkl")
        torch.testing.assert_close(hot, cold, rtol=1e-12, atol=0)


# ---- sparse coarsening -------------------------------------------------------------------------


def test_coarsened_distributions_are_normalized_and_dedup_the_actual_token():
    student, teacher_lp, tokens = make_case(b=1, t=2, v=9, seed=12)
    teacher = sparse_from_dense(teacher_lp, 4, tokens)
    tokens[0, 0] = teacher.topk_ids[0, 0, 2]  # inside the top-k
    tokens[0, 1] = teacher_lp[0, 1].argmin()  # certainly outside
    teacher = sparse_from_dense(teacher_lp, 4, tokens)
    log_p, log_q = coarsen_sparse(torch.log_softmax(student, -1), teacher.topk_ids,
                                  teacher.topk_logprobs, tokens, teacher.token_logprobs,
                          teacher.tail_logprobs)
    assert log_p.shape == log_q.shape == (1, 2, 6)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(1, 2, dtype=torch.float64))
    torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(1, 2, dtype=torch.float64))
    assert torch.isneginf(log_p[0, 0, 4]) and torch.isneginf(log_q[0, 0, 4])  # counted once
    assert torch.isfinite(log_p[0, 1]).all() and torch.isfinite(log_q[0, 1]).all()
    # the student's tail is the exact mass outside S, even when tiny
    confident = student.clone()
    confident[0, 0, teacher.topk_ids[0, 0, 0]] = 60.0
    _, log_q = coarsen_sparse(torch.log_softmax(confident, -1), teacher.topk_ids,
                              teacher.topk_logprobs, tokens, teacher.token_logprobs,
                          teacher.tail_logprobs)
    outside = [i for i in range(9) if i not in teacher.topk_ids[0, 0].tolist()]
    want = torch.logsumexp(torch.log_softmax(confident, -1)[0, 0, outside], -1)
    assert want.item() < -40
    torch.testing.assert_close(log_q[0, 0, -1], want)


# ---- AKL weights -------------------------------------------------------------------------------


def _log(values):
    return torch.log(torch.tensor(values, dtype=torch.float64))


def test_akl_weight_follows_the_larger_gap():
    # mu = 0.75: inclusive cumulative masses 0.4, 0.7, 0.85, 1.0, so head = the first two tokens.
    log_p = _log([0.4, 0.3, 0.15, 0.15])
    w_head, w_tail = akl_weights(log_p, _log([0.1, 0.6, 0.149, 0.151]), mu=0.75)
    assert w_head.item() == pytest.approx(0.6 / 0.602) and w_head.item() > 0.99
    w_head, w_tail = akl_weights(log_p, _log([0.4, 0.3, 0.05, 0.25]), mu=0.75)
    assert w_tail.item() == pytest.approx(1.0) and w_head.item() == pytest.approx(0.0)
    w_head, w_tail = akl_weights(log_p, log_p, mu=0.75)  # no gap at all
    assert (w_head.item(), w_tail.item()) == (0.5, 0.5)


def test_akl_token_crossing_mu_is_tail_and_the_top_one_is_always_head():
    # mu = 0.5, cumulative 0.4, 0.7, ...: the 2nd token crosses mu and goes to the tail.
    log_p = _log([0.4, 0.3, 0.2, 0.1])
    w_head, _ = akl_weights(log_p, _log([0.1, 0.6, 0.2, 0.1]), mu=0.5)  # gaps .3, .3, 0, 0
    assert w_head.item() == pytest.approx(0.5, rel=1e-12)
    w_head, _ = akl_weights(log_p, _log([0.4, 0.1, 0.4, 0.1]), mu=0.5)  # gap only past the top
    assert w_head.item() == 0.0
    # the top token alone holds more than mu: it is still head, the rest tail
    log_p = _log([0.6, 0.2, 0.15, 0.05])
    w_head, _ = akl_weights(log_p, _log([0.3, 0.5, 0.15, 0.05]), mu=0.5)  # gaps .3, .3, 0, 0
    assert w_head.item() == pytest.approx(0.5, rel=1e-12)
    w_head, _ = akl_weights(log_p, _log([0.3, 0.2, 0.15, 0.35]), mu=0.1)
    assert w_head.item() == pytest.approx(0.3 / 0.6, rel=1e-12)
    # order is by teacher mass, not by position
    w_head, _ = akl_weights(_log([0.1, 0.2, 0.7]), _log([0.4, 0.2, 0.4]), mu=0.5)
    assert w_head.item() == pytest.approx(0.3 / 0.6, rel=1e-12)


def test_akl_weights_sum_to_one_and_carry_no_gradient():
    student, teacher_lp, _ = make_case(b=3, t=4, v=7, seed=13)
    student.requires_grad_(True)
    log_q = torch.log_softmax(student, -1)
    w_head, w_tail = akl_weights(teacher_lp, log_q, mu=0.5)
    assert not w_head.requires_grad and not w_tail.requires_grad
    torch.testing.assert_close(w_head + w_tail, torch.ones_like(w_head))
    assert ((w_head >= 0) & (w_head <= 1)).all()
    akl = DIVERGENCES["akl"](teacher_lp, log_q, mu=0.5)
    fkl, rkl = DIVERGENCES["fkl"](teacher_lp, log_q), DIVERGENCES["rkl"](teacher_lp, log_q)
    mix = w_head * fkl + w_tail * rkl
    torch.testing.assert_close(akl, mix)
    (g_akl,) = torch.autograd.grad(akl.sum(), student, retain_graph=True)
    (g_mix,) = torch.autograd.grad(mix.sum(), student)
    torch.testing.assert_close(g_akl, g_mix)


# ---- reductions and validation -----------------------------------------------------------------


def test_reductions_by_hand():
    student, teacher_lp, _ = make_case(b=3, t=3, v=5, seed=14)
    teacher = DenseTeacher(teacher_lp)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    d = token_divergence(student, teacher, loss="rkl").tolist()
    masked = token_divergence(student, teacher, mask, loss="rkl")
    assert masked[0, 2].item() == 0 and masked[2].abs().sum().item() == 0
    token_mean = distill_loss(student, teacher, mask, loss="rkl", reduction="token_mean")
    seq_mean = distill_loss(student, teacher, mask, loss="rkl", reduction="seq_mean")
    assert token_mean.item() == pytest.approx((d[0][0] + d[0][1] + d[1][0]) / 3, rel=1e-12)
    # the empty third sequence is skipped, not counted as 0
    assert seq_mean.item() == pytest.approx(((d[0][0] + d[0][1]) / 2 + d[1][0]) / 2, rel=1e-12)


def test_invalid_arguments_are_rejected():
    student, teacher_lp, tokens = make_case()
    teacher, mask = DenseTeacher(teacher_lp), torch.ones(2, 3)
    with pytest.raises(ValueError, match="unknown divergence"):
        distill_loss(student, teacher, mask, loss="kl")
    with pytest.raises(ValueError, match="beta"):
        distill_loss(student, teacher, mask, loss="jsd", beta=1.5)
    with pytest.raises(ValueError, match="reduction"):
        distill_loss(student, teacher, mask, reduction="sum")
    with pytest.raises(ValueError, match="0 and 1"):
        distill_loss(student, teacher, torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(student, teacher, mask, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        distill_loss(student, DenseTeacher(teacher_lp[:, :2]), mask)
    with pytest.raises(ValueError, match="topk_ids"):
        bad = SparseTeacher(tokens, teacher_lp[..., 0], tokens, teacher_lp[..., 0],
                            teacher_lp[..., 0])  # topk_ids 2-D
        distill_loss(student, bad, mask)
    with pytest.raises(TypeError):
        distill_loss(student, teacher_lp, mask)
    # hyperparameters of other divergences are ignored, not validated
    assert get_divergence("tvd", beta=7.0) is not None


# ---- preference losses -------------------------------------------------------------------------


def test_sequence_logprobs_by_hand():
    g = torch.Generator().manual_seed(15)
    logits = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1, 5, 0, -100], [2, 2, -100, -100]])
    mask = labels != -100
    sums, lengths = sequence_logprobs(logits, labels, mask)
    assert lengths.tolist() == [3, 2]
    for b in range(2):
        want = sum(math.log(np_softmax(logits[b, t].numpy())[labels[b, t]]) for t in range(4)
                   if mask[b, t])
        assert sums[b].item() == pytest.approx(want, rel=1e-12)


def _pairs(**values):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}


def test_dpo_values_label_smoothing_and_metrics():
    x = _pairs(pc=[-5.0, -7.0], pr=[-6.0, -4.0], rc=[-5.0, -7.0], rr=[-6.0, -4.0])
    loss, metrics = dpo_loss(x["pc"], x["pr"], x["rc"], x["rr"], beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-12)  # policy == reference
    assert metrics["reward_margin"].item() == 0 and metrics["accuracy"].item() == 0
    x = _pairs(pc=[-4.0, -6.0], pr=[-7.0, -5.0], rc=[-5.0, -7.0], rr=[-6.0, -4.0])
    h = [(-4 + 5) - (-7 + 6), (-6 + 7) - (-5 + 4)]  # [2, 2]
    for eps in (0.0, 0.2):
        loss, metrics = dpo_loss(x["pc"], x["pr"], x["rc"], x["rr"], beta=0.5, label_smoothing=eps)
        want = np.mean([-(1 - eps) * math.log(1 / (1 + math.exp(-0.5 * v)))
                        - eps * math.log(1 / (1 + math.exp(0.5 * v))) for v in h])
        assert loss.item() == pytest.approx(want, rel=1e-12)
    assert loss.item() > dpo_loss(x["pc"], x["pr"], x["rc"], x["rr"], beta=0.5)[0].item()
    assert dpo_loss(x["pc"], x["pr"], x["rc"], x["rr"], beta=0.5)[0].item() < math.log(2)
    assert metrics["chosen_reward"].item() == pytest.approx(0.5 * np.mean([1.0, 1.0]))
    assert metrics["rejected_reward"].item() == pytest.approx(0.5 * np.mean([-1.0, -1.0]))
    assert metrics["reward_margin"].item() == pytest.approx(1.0)
    assert metrics["accuracy"].item() == 1.0
    assert not any(m.requires_grad for m in metrics.values())


@pytest.mark.parametrize("which", ["dpo", "simpo", "hinge"])
def test_raising_the_chosen_logprob_lowers_the_loss(which):
    pc = torch.tensor([-5.0, -6.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-5.5, -6.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-5.2, -6.1], dtype=torch.float64)
    if which == "dpo":
        loss, _ = dpo_loss(pc, pr, ref, ref)
    elif which == "simpo":
        loss, _ = simpo_loss(pc, pr, torch.tensor([3, 4]), torch.tensor([3, 4]))
    else:
        loss, _ = hinge_loss(pc, pr, ref, ref)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_simpo_and_hinge_by_hand():
    x = _pairs(pc=[-6.0, -3.0], pr=[-4.0, -9.0], rc=[-5.0, -4.0], rr=[-5.0, -8.0])
    lc, lr = torch.tensor([3, 2]), torch.tensor([2, 3])
    loss, metrics = simpo_loss(x["pc"], x["pr"], lc, lr, beta=2.0, gamma=0.5)
    z = [2.0 * -6 / 3 - 2.0 * -4 / 2 - 0.5, 2.0 * -3 / 2 - 2.0 * -9 / 3 - 0.5]
    assert loss.item() == pytest.approx(np.mean([math.log1p(math.exp(-v)) for v in z]), rel=1e-12)
    assert metrics["accuracy"].item() == 0.5
    loss, _ = hinge_loss(x["pc"], x["pr"], x["rc"], x["rr"], beta=0.5)
    h = [(-6 + 5) - (-4 + 5), (-3 + 4) - (-9 + 8)]  # [-2, 2]
    assert loss.item() == pytest.approx(np.mean([max(0.0, 1 - 0.5 * v) for v in h]), rel=1e-12)


def test_module_exports_are_importable():
    for name in losses.__all__:
        assert hasattr(losses, name), name
