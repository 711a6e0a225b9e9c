"""The conventions `student_worker.divergences` follows, each against an independent float64
reference written here: JSD_beta as TRL's generalized_jsd_loss (and against TRL itself when it is
installed), the AKL head/tail split as the code released with Wu et al. (2024), KL terms of an
underflowing probability, and skew KL refusing alpha = 1. CPU, seeded, small shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from student_worker.divergences import (
    DIVERGENCES,
    TEACHER_LOGPROB_FLOOR,
    adaptive_kl,
    akl_weights,
    forward_kl,
    generalized_jsd,
    get_divergence,
)

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
MUS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]


# ---- independent references: numpy float64 ----------------------------------------------------


def np_kl(a: np.ndarray, b: np.ndarray) -> float:
    on = a > 0
    return float(np.sum(a[on] * (np.log(a[on]) - np.log(b[on]))))


def np_jsd(p: np.ndarray, q: np.ndarray, beta: float) -> float:
    """TRL's convention: the ends are the plain KLs, the inside the weighted mixture KLs."""
    if beta == 0:
        return np_kl(p, q)
    if beta == 1:
        return np_kl(q, np.maximum(p, math.exp(TEACHER_LOGPROB_FLOOR)))
    m = beta * p + (1 - beta) * q
    return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)


def np_akl_weights(p: np.ndarray, q: np.ndarray, mu: float) -> tuple[float, float]:
    """The authors' split: sort by teacher mass (stable), tail = inclusive cumsum > mu, except the
    first outcome, which is always head."""
    order = np.argsort(-p, kind="stable")
    errors = np.abs(p[order] - q[order])
    tail = np.cumsum(p[order]) > mu
    tail[0] = False
    g_head, g_tail = errors[~tail].sum(), errors[tail].sum()
    if g_head + g_tail == 0:
        return 0.5, 0.5
    return g_head / (g_head + g_tail), g_tail / (g_head + g_tail)


def np_akl(p: np.ndarray, q: np.ndarray, mu: float) -> float:
    w_head, w_tail = np_akl_weights(p, q, mu)
    return w_head * np_kl(p, q) + w_tail * np_kl(q, np.maximum(p, math.exp(TEACHER_LOGPROB_FLOOR)))


def random_rows(n: int = 24, v: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (log_p, log_q) [n, v] of varied sharpness: some teachers put more than any mu < 1
    on their top outcome, some are nearly flat."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, n, dtype=torch.float64).unsqueeze(-1)
    log_p = torch.log_softmax(scale * torch.randn(n, v, generator=g, dtype=torch.float64), -1)
    log_q = torch.log_softmax(2 * torch.randn(n, v, generator=g, dtype=torch.float64), -1)
    return log_p, log_q


# ---- JSD: TRL's convention ----------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
def test_jsd_matches_the_trl_convention(beta):
    log_p, log_q = random_rows(seed=1)
    got = generalized_jsd(log_p, log_q, beta=beta)
    assert got.shape == (log_p.shape[0],)
    for i in range(log_p.shape[0]):
        want = np_jsd(log_p[i].exp().numpy(), log_q[i].exp().numpy(), beta)
        assert got[i].item() == pytest.approx(want, rel=1e-10, abs=1e-14), i
    assert torch.equal(get_divergence("jsd", beta=beta)(log_p, log_q), got)


def test_jsd_is_discontinuous_at_the_ends():
    log_p, log_q = random_rows(seed=2)
    log_p, log_q = log_p[:12], log_q[:12]  # the softer teachers: p / q, q / p < 1e3, eps << 1e-3
    fkl, rkl = DIVERGENCES["fkl"](log_p, log_q), DIVERGENCES["rkl"](log_p, log_q)
    assert torch.equal(generalized_jsd(log_p, log_q, beta=0.0), fkl)
    assert torch.equal(generalized_jsd(log_p, log_q, beta=1.0), rkl)
    # just inside the ends the value is small, about beta * FKL (resp. (1 - beta) * RKL)
    eps = 1e-8
    small = generalized_jsd(log_p, log_q, beta=eps)
    torch.testing.assert_close(small / eps, fkl, rtol=1e-3, atol=0)
    large = generalized_jsd(log_p, log_q, beta=1 - eps)
    torch.testing.assert_close(large / eps, rkl, rtol=1e-3, atol=0)


def _trl_generalized_jsd_loss():
    pytest.importorskip("trl")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError as err:  # an older trl, or one missing its optional dependencies
        pytest.skip(f"trl.experimental.gkd.GKDTrainer not importable: {err}")
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", BETAS)
def test_jsd_matches_trl_generalized_jsd_loss(beta):
    trl_loss = _trl_generalized_jsd_loss()
    g = torch.Generator().manual_seed(3)
    n, v = 16, 13
    student_logits = 2 * torch.randn(1, n, v, generator=g, dtype=torch.float64)
    teacher_logits = 2 * torch.randn(1, n, v, generator=g, dtype=torch.float64)
    # TRL: logits in, per-outcome terms [B, T, V] out with reduction="none".
    theirs = trl_loss(student_logits, teacher_logits, beta=beta, temperature=1.0,
                      reduction="none").sum(-1)
    ours = generalized_jsd(torch.log_softmax(teacher_logits, -1),
                           torch.log_softmax(student_logits, -1), beta=beta)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


# ---- AKL: the authors' head/tail split ----------------------------------------------------------


@pytest.mark.parametrize("mu", MUS)
def test_akl_matches_the_authors_rule(mu):
    log_p, log_q = random_rows(n=32, seed=4)
    w_head, w_tail = akl_weights(log_p, log_q, mu=mu)
    got = adaptive_kl(log_p, log_q, mu=mu)
    assert torch.equal(get_divergence("akl", mu=mu)(log_p, log_q), got)
    heads = set()
    for i in range(log_p.shape[0]):
        p, q = log_p[i].exp().numpy(), log_q[i].exp().numpy()
        want_head, want_tail = np_akl_weights(p, q, mu)
        assert w_head[i].item() == pytest.approx(want_head, rel=1e-12, abs=1e-15), i
        assert w_tail[i].item() == pytest.approx(want_tail, rel=1e-12, abs=1e-15), i
        assert got[i].item() == pytest.approx(np_akl(p, q, mu), rel=1e-10, abs=1e-14), i
        heads.add(int((np.cumsum(np.sort(p)[::-1]) <= mu).sum()))
    if 0.3 <= mu < 1:  # the rows exercise both a lone head and a longer one
        assert 0 in heads and max(heads) >= 1


def test_akl_ties_keep_their_order():
    # Equal teacher masses: the stable sort keeps positions 0, 1 first, so they are the head.
    log_p = torch.log(torch.full((5,), 0.2, dtype=torch.float64))
    log_q = torch.log(torch.tensor([0.3, 0.1, 0.2, 0.2, 0.2], dtype=torch.float64))
    w_head, w_tail = akl_weights(log_p, log_q, mu=0.5)
    assert (w_head.item(), w_tail.item()) == (1.0, 0.0)
    assert np_akl_weights(log_p.exp().numpy(), log_q.exp().numpy(), 0.5) == (1.0, 0.0)


def test_akl_sparse_bucket_is_an_ordinary_outcome():
    # A coarsened row [top-k..., actual token, bucket]: whatever its slot, the bucket is sorted by
    # its mass. Moving it from last to first changes nothing.
    log_p, log_q = random_rows(n=8, v=6, seed=5)
    log_p[:, -1] += 2.0  # the bucket is heavy on some rows
    log_p = torch.log_softmax(log_p, -1)
    moved_p, moved_q = log_p.roll(1, -1), log_q.roll(1, -1)
    for mu in (0.2, 0.5, 0.8):
        w, _ = akl_weights(log_p, log_q, mu=mu)
        torch.testing.assert_close(akl_weights(moved_p, moved_q, mu=mu)[0], w, rtol=0, atol=0)
        for i in range(8):
            want, _ = np_akl_weights(log_p[i].exp().numpy(), log_q[i].exp().numpy(), mu)
            assert w[i].item() == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_get_divergence_takes_no_tail_bucket():
    with pytest.raises(TypeError):
        get_divergence("akl", mu=0.5, tail_bucket=True)
    with pytest.raises(TypeError):
        akl_weights(*random_rows(n=1), mu=0.5, tail_bucket=True)


# ---- KL terms whose probability underflows -------------------------------------------------------


def test_underflowing_teacher_mass_against_a_masked_student_logit():
    # float32: the teacher's log-prob -200 is finite but exp(-200) rounds to 0; the student has a
    # -inf logit there. Formerly 0 * inf = NaN; now the term is 0, as p = 0 in this dtype.
    kept = [0, 1, 3, 4]
    rest = torch.log_softmax(torch.tensor([1.0, 0.5, -0.3, 2.0], dtype=torch.float64), -1)
    log_p64 = torch.full((5,), -200.0, dtype=torch.float64)
    log_p64[kept] = rest
    log_p = log_p64.float()
    assert log_p[2].exp().item() == 0.0 and math.isfinite(log_p[2].item())
    logits = torch.tensor([0.2, 1.5, float("-inf"), 0.7, -1.0], requires_grad=True)
    logits64 = logits.detach().double()[kept].requires_grad_(True)
    p64, q64 = rest.exp().numpy(), torch.softmax(logits64.detach(), -1).numpy()
    for name, div, want in (
        ("fkl", forward_kl, np_kl(p64, q64)),
        ("akl", adaptive_kl, np_akl(p64, q64, 0.5)),
    ):
        value = div(log_p, torch.log_softmax(logits, -1))
        assert torch.isfinite(value), name
        assert value.item() == pytest.approx(want, rel=1e-5), name
        (grad,) = torch.autograd.grad(value, logits)
        assert torch.isfinite(grad).all(), name
        assert grad[2].item() == 0.0
        (grad64,) = torch.autograd.grad(div(rest, torch.log_softmax(logits64, -1)), logits64)
        torch.testing.assert_close(grad[kept].double(), grad64, rtol=1e-4, atol=1e-6)
    for name, div in DIVERGENCES.items():  # and every other divergence stays finite
        value = div(log_p, torch.log_softmax(logits, -1))
        (grad,) = torch.autograd.grad(value, logits)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), name


def test_nan_inputs_still_show():
    log_p = torch.tensor([float("nan"), 0.0, float("-inf")])
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    assert torch.isnan(forward_kl(log_p, log_q))


# ---- skew KL at alpha = 1 -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["skew_fkl", "skew_rkl"])
def test_skew_alpha_one_is_refused_by_get_divergence(name):
    log_p, log_q = random_rows(n=4, seed=6)
    assert DIVERGENCES[name](log_p, log_q, alpha=1.0).abs().max().item() < 1e-12  # bare: 0
    with pytest.raises(ValueError, match=r"alpha.*identically 0"):
        get_divergence(name, alpha=1.0)
    get_divergence(name, alpha=0.999)  # just below is fine
    get_divergence("jsd", alpha=1.0, beta=0.5)  # alpha is not jsd's hyperparameter
