"""Token-level divergences between a teacher p and a student q over the same outcomes.

Every function takes aligned log-probabilities `log_p` (teacher) and `log_q` (student) of shape
[..., N] and returns the divergence over the last dimension, shape [...]. The N outcomes are the
vocabulary for a dense teacher, or the coarsened support of a sparse teacher (see
`losses.coarsen_sparse`). Log-probs may be -inf: an outcome that is impossible under both sides
counts for nothing (0 log 0 = 0), so callers can switch slots off by setting both sides to -inf.
In every KL(a || b) term, an outcome whose a_i = exp(log a_i) is 0 in the working dtype (log a_i
= -inf, or finite but underflowing, such as -200 in float32) contributes exactly 0, whatever b_i.
Nothing here upcasts; callers pass float32 or float64.

Conventions (see each docstring for the equation):
  - RKL-type terms KL(q || p) are +inf where the teacher gives zero probability to an outcome the
    student can emit (one-hot or filtered teacher rows). There, and only in the teacher's role of
    reference measure, teacher log-probs are raised to `TEACHER_LOGPROB_FLOOR`.
  - JSD_beta follows TRL's `generalized_jsd_loss` (and GKD, Agarwal et al. 2024, eq. 1):
    beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q. It is discontinuous at
    the ends: beta = 0 is defined as forward KL and beta = 1 as reverse KL, but for 0 < beta < 1
    the value tends to 0 as beta -> 0 or beta -> 1 (it is about beta * FKL for small beta, not
    about FKL).
  - AKL splits head and tail as the code released with Wu et al. (2024) does (see `akl_weights`).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import Tensor

# p = e^-100 ~ 4e-44, under float32's smallest normal number: teacher probabilities this small
# carry no signal to distil. Raising log p to it (finite values below it too) turns the otherwise
# infinite KL(q || p) at p = 0 into a large finite penalty q (log q + 100).
TEACHER_LOGPROB_FLOOR = -100.0

Divergence = Callable[[Tensor, Tensor], Tensor]


def _check_unit(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_i a_i (log a_i - log b_i) over the last dim; a_i = 0 contributes 0.

    "a_i = 0" means exp(log a_i) == 0 in the working dtype, so a finite log a_i that underflows
    (-200 in float32) counts for nothing too, even against log b_i = -inf (else 0 * inf = NaN).
    """
    # Double where: masked entries get finite stand-ins so that neither the forward (-inf - -inf,
    # 0 * inf) nor the backward (0 * nan) of the discarded branch can produce NaN.
    support = log_a.detach().exp() != 0  # a NaN input stays in, and shows
    la = torch.where(support, log_a, 0.0)
    lb = torch.where(support, log_b, 0.0)
    return torch.where(support, la.exp() * (la - lb), 0.0).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w a + (1 - w) b) elementwise, as logsumexp(log w + log a, log(1 - w) + log b)."""
    if w == 1.0:
        return log_a
    if w == 0.0:
        return log_b
    # Where both are -inf the logaddexp gradient is NaN; compute on zeros and put -inf back.
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)
    la = torch.where(both_zero, 0.0, log_a)
    lb = torch.where(both_zero, 0.0, log_b)
    mixed = torch.logaddexp(la + math.log(w), lb + math.log1p(-w))
    return torch.where(both_zero, float("-inf"), mixed)


def forward_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Forward KL, mass-covering: KL(p || q) = sum_v p_v (log p_v - log q_v).

    Shapes: log_p, log_q [..., N] -> [...]. Outcomes with p_v = 0 contribute 0.
    """
    return _kl(log_p, log_q)


def reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Reverse KL, mode-seeking: KL(q || p) = sum_v q_v (log q_v - max(log p_v, floor)).

    Shapes: log_p, log_q [..., N] -> [...]. `floor` is `TEACHER_LOGPROB_FLOOR` (-100): without it
    the value is +inf wherever p_v = 0 < q_v (a one-hot teacher row, say). Outcomes with q_v = 0
    contribute 0.
    """
    return _kl(log_q, log_p.clamp_min(TEACHER_LOGPROB_FLOOR))


def skew_forward_kl(log_p: Tensor, log_q: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew forward KL (DistiLLM, Ko et al. 2024, eq. 4): KL(p || alpha p + (1 - alpha) q).

    Shapes: [..., N] -> [...]. alpha = 0 is exactly `forward_kl`; alpha = 1 is 0. The mixture keeps
    the ratio bounded, log(p / m) <= -log(alpha), so gradients stay tame where q << p.
    """
    _check_unit("alpha", alpha)
    if alpha == 0.0:
        return forward_kl(log_p, log_q)
    return _kl(log_p, _log_mix(log_p, log_q, alpha))


def skew_reverse_kl(log_p: Tensor, log_q: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL (DistiLLM, Ko et al. 2024, eq. 5): KL(q || alpha q + (1 - alpha) p).

    Shapes: [..., N] -> [...]. alpha = 0 is exactly `reverse_kl` (with its teacher floor); for
    alpha > 0 the mixture is positive wherever q is, so no floor is needed.
    """
    _check_unit("alpha", alpha)
    if alpha == 0.0:
        return reverse_kl(log_p, log_q)
    return _kl(log_q, _log_mix(log_q, log_p, alpha))


def generalized_jsd(log_p: Tensor, log_q: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized JSD in the convention of TRL's `generalized_jsd_loss` (GKD, Agarwal et al.
    2024, eq. 1), with m = beta p + (1 - beta) q:

        JSD_beta(p, q) = beta KL(p || m) + (1 - beta) KL(q || m)      for 0 < beta < 1,
        JSD_0 = KL(p || q) (`forward_kl`),   JSD_1 = KL(q || p) (`reverse_kl`).

    Shapes: [..., N] -> [...]. The end points are special cases, not limits: as beta -> 0, m -> q
    and both terms vanish (JSD_beta / beta -> FKL), and likewise JSD_beta -> 0 as beta -> 1
    (JSD_beta / (1 - beta) -> RKL). So a small beta gives small values, not values near FKL.
    beta = 0.5 is the ordinary Jensen-Shannon divergence. Equivalently, sharing one mixture,
    JSD_beta = beta SKL_fwd(alpha=beta) + (1 - beta) SKL_rev(alpha=1-beta).

    At beta = 1, `reverse_kl` floors the teacher's log-probs at `TEACHER_LOGPROB_FLOOR`, so where
    p = 0 < q the value is large but finite (TRL's is +inf there); elsewhere the two agree.
    """
    _check_unit("beta", beta)
    if beta == 0.0:
        return forward_kl(log_p, log_q)
    if beta == 1.0:
        return reverse_kl(log_p, log_q)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def total_variation(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Total variation distance: TVD(p, q) = 1/2 sum_v |p_v - q_v|, in [0, 1].

    Shapes: [..., N] -> [...]. Where p_v = q_v the subgradient taken is 0.
    """
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


@torch.no_grad()
def akl_weights(log_p: Tensor, log_q: Tensor, mu: float = 0.5) -> tuple[Tensor, Tensor]:
    """The AKL mixing weights (w_head, w_tail), each [...], detached, summing to 1.

    The split of the code released with Wu et al. (2024): sort the outcomes by teacher probability,
    descending (stable, so ties keep their order); an outcome is head when the inclusive cumulative
    teacher mass up to and including it is <= mu, and the first (most likely) outcome is always
    head. Every other outcome is tail, including the one whose cumulative mass crosses mu. With
    gaps g_head = sum_head |p - q| and g_tail = sum_tail |p - q|:
    w_head = g_head / (g_head + g_tail), w_tail = 1 - w_head; 1/2 each where both gaps are 0 (then
    p = q and both KLs vanish anyway).

    Every outcome is sorted by its own mass, including the tail bucket of a coarsened sparse row
    (`losses.coarsen_sparse`): a bucket holding more mass than the top-k tokens comes first and is
    head.
    """
    _check_unit("mu", mu)
    p, q = log_p.exp(), log_q.exp()
    order = p.argsort(dim=-1, descending=True, stable=True)
    p_sorted = p.gather(-1, order)
    gap_sorted = (p - q).abs().gather(-1, order)
    head = p_sorted.cumsum(-1) <= mu
    head[..., :1] = True
    g_head = (gap_sorted * head).sum(-1)
    g_tail = (gap_sorted * ~head).sum(-1)
    total = g_head + g_tail
    positive = total > 0
    w_head = torch.where(positive, g_head / torch.where(positive, total, 1.0), 0.5)
    return w_head, 1.0 - w_head


def adaptive_kl(log_p: Tensor, log_q: Tensor, mu: float = 0.5) -> Tensor:
    """Adaptive KL (Wu et al. 2024, "Rethinking KL Divergence in KD for LLMs"):

        AKL = w_head KL(p || q) + w_tail KL(q || p)

    Shapes: [..., N] -> [...]. Weights from `akl_weights` (detached: no gradient flows through the
    head/tail split). FKL fits the head, RKL the tail, each in proportion to how far the student is
    off there. The RKL part uses the same teacher floor as `reverse_kl`.
    """
    w_head, w_tail = akl_weights(log_p, log_q, mu)
    return w_head * forward_kl(log_p, log_q) + w_tail * reverse_kl(log_p, log_q)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "skew_fkl": skew_forward_kl,
    "skew_rkl": skew_reverse_kl,
    "jsd": generalized_jsd,
    "tvd": total_variation,
    "akl": adaptive_kl,
}

# The hyperparameters each divergence takes, so `get_divergence` binds only those.
_PARAMS: dict[str, tuple[str, ...]] = {
    "skew_fkl": ("alpha",),
    "skew_rkl": ("alpha",),
    "jsd": ("beta",),
    "akl": ("mu",),
}


def get_divergence(
    name: str, *, alpha: float = 0.1, beta: float = 0.5, mu: float = 0.5
) -> Divergence:
    """The divergence `name` (a key of `DIVERGENCES`) as `f(log_p, log_q) -> [...]`, with its
    hyperparameters bound: alpha for skew_fkl / skew_rkl, beta for jsd, mu for akl. The others are
    ignored. Raises ValueError for an unknown name or an out-of-range value, and for alpha = 1 with
    skew_fkl / skew_rkl: there the mixture is p (resp. q) itself, so the loss is identically 0 and
    has no gradient (the bare functions still return that 0)."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}")
    given = {"alpha": alpha, "beta": beta, "mu": mu}
    for key in _PARAMS.get(name, ()):
        _check_unit(key, given[key])
    if "alpha" in _PARAMS.get(name, ()) and alpha == 1.0:
        raise ValueError(
            f"alpha must be in [0, 1) for {name}: at alpha = 1 the loss is identically 0, with no "
            "gradient"
        )
    kwargs = {key: given[key] for key in _PARAMS.get(name, ())}
    return functools.partial(DIVERGENCES[name], **kwargs)
