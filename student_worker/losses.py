"""Distillation and preference losses: pure functions, tensors in, scalar out.

Distillation compares, at each response position, the teacher's next-token distribution p with the
student's q = softmax(student_logits / temperature), by one of the divergences in
`student_worker.divergences` (fkl, rkl, skew_fkl, skew_rkl, jsd, tvd, akl). The teacher arrives as

  - `DenseTeacher`: full log-prob rows [B, T, V], or
  - `SparseTeacher`: its top-k log-probs, the log-prob of the token actually at each position, and
    the log of its mass on every other token (computed by the teacher, see `SparseTeacher`).

A sparse teacher is compared on a coarsened outcome space: the support S = top-k ∪ {actual token}
plus ONE tail bucket holding the rest of the mass on each side (`coarsen_sparse`). With k = V the
bucket is empty and the sparse loss equals the dense one; for any k it equals the dense loss
between the two distributions coarsened to the same buckets.

Temperature: the teacher's log-probs are taken as given, i.e. already at the teacher temperature
(the teacher server divides its logits before its softmax). `temperature` here divides the student
logits only; pass the same value the teacher used. No tau^2 factor is applied.

Preference losses (DPO, SimPO, hinge) work on per-sequence summed log-probs, see
`sequence_logprobs`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .divergences import (
    DIVERGENCES,
    TEACHER_LOGPROB_FLOOR,
    Divergence,
    adaptive_kl,
    akl_weights,
    forward_kl,
    generalized_jsd,
    get_divergence,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)

__all__ = [
    "DIVERGENCES", "TEACHER_LOGPROB_FLOOR", "DenseTeacher", "SparseTeacher", "TeacherTargets", "adaptive_kl",
    "akl_weights", "coarsen_sparse", "distill_loss", "dpo_loss", "forward_kl", "generalized_jsd",
    "get_divergence", "hinge_loss", "reverse_kl", "sequence_logprobs", "simpo_loss",
    "skew_forward_kl", "skew_reverse_kl", "token_divergence", "total_variation",
]

REDUCTIONS = ("token_mean", "seq_mean")


@dataclass(frozen=True)
class DenseTeacher:
    """Full teacher log-prob rows at the teacher temperature. `logprobs`: float [B, T, V], used as
    given (not renormalized); -inf marks tokens the teacher rules out."""

    logprobs: Tensor


@dataclass(frozen=True)
class SparseTeacher:
    """Teacher top-k log-probs, the actual token's log-prob and the tail, at the teacher temperature.

    topk_ids int64 [B, T, k] (k >= 0), topk_logprobs float [B, T, k], token_ids int64 [B, T] (the
    token at each position), token_logprobs float [B, T], tail_logprobs float [B, T]: log of the
    teacher's mass on every token outside S = top-k ∪ {actual token}, as the teacher computed it
    (a log-sum-exp over those tokens; -inf when S is the whole vocabulary). It is never rebuilt as
    1 - sum_S p: for a confident teacher that sum rounds to 1 and the tail to 0. An id repeated
    within a position (the actual token inside the top-k, typically) is counted once.
    """

    topk_ids: Tensor
    topk_logprobs: Tensor
    token_ids: Tensor
    token_logprobs: Tensor
    tail_logprobs: Tensor

    @classmethod
    def from_dense(cls, logprobs: Tensor, token_ids: Tensor, k: int) -> "SparseTeacher":
        """The sparse view a teacher server sends of full log-prob rows [B, T, V] (tests, benches,
        in-process teachers): top-k, the actual tokens' log-probs, the exact log tail."""
        from teacher_server.sampling import outside_logmass

        vals, ids = logprobs.topk(k, dim=-1)
        token_lp = logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
        return cls(ids, vals, token_ids, token_lp, outside_logmass(logprobs, ids, token_ids))


# What a loss compares the student with: the teacher's answer as tensors (not the service
# interface `teacher_server.contract.Teacher`, which produces it).
TeacherTargets = DenseTeacher | SparseTeacher


def coarsen_sparse(
    student_logprobs: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    token_ids: Tensor,
    token_logprobs: Tensor,
    tail_logprobs: Tensor,
) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probs over the coarsened outcomes, each [..., k + 2].

    Inputs: student_logprobs [..., V] (normalized, at the student temperature), topk_ids and
    topk_logprobs [..., k], token_ids, token_logprobs and tail_logprobs [...]. Outcomes, in order:

      slots 0..k-1  the teacher's top-k ids,
      slot k        the actual token; -inf on both sides when it is already in the top-k (an
                    outcome of probability 0 on both sides, which no divergence counts),
      slot k+1      the tail bucket: every token outside S = top-k ∪ {actual token}.

    Teacher tail: `tail_logprobs`, as the teacher computed it. Student tail: logsumexp of log q over
    the tokens outside S. Both are exact for a confident model, where 1 - sum_S would cancel
    catastrophically (a top-1 probability of 1 - 1e-9 leaves nothing of the tail in float32). When the student has no mass outside
    S (S is the whole vocabulary, or the rest is masked with -inf logits) both tails are -inf. The
    teacher side is detached.
    """
    dtype = student_logprobs.dtype
    ids = torch.cat([topk_ids, token_ids.unsqueeze(-1)], dim=-1)  # [..., k+1]
    teacher = torch.cat([topk_logprobs, token_logprobs.unsqueeze(-1)], dim=-1).detach().to(dtype)
    n = ids.shape[-1]
    # Slot j duplicates an earlier slot i < j; pairwise is cheap next to the [..., V] work.
    earlier = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril(-1)
    dup = ((ids.unsqueeze(-1) == ids.unsqueeze(-2)) & earlier).any(-1)  # [..., k+1]
    log_p_s = teacher.masked_fill(dup, float("-inf"))
    log_q_s = student_logprobs.gather(-1, ids).masked_fill(dup, float("-inf"))

    in_support = torch.zeros_like(student_logprobs, dtype=torch.bool).scatter_(-1, ids, True)
    outside = student_logprobs.masked_fill(in_support, float("-inf"))
    # An empty bucket: S is the whole vocabulary, or every token outside S has a -inf student
    # logit (a masked vocabulary). The teacher's remainder is then rounding, or mass on tokens the
    # student can never emit, which would only make the loss infinite; the bucket is dropped on
    # both sides. logsumexp over all -inf has a NaN gradient, hence the stand-in row.
    empty = torch.isneginf(outside).all(-1)  # [...]
    q_tail = torch.where(empty, float("-inf"),
                         outside.masked_fill(empty.unsqueeze(-1), 0.0).logsumexp(-1))
    p_tail = torch.where(empty, float("-inf"), tail_logprobs.detach().to(dtype))
    return (torch.cat([log_p_s, p_tail.unsqueeze(-1)], dim=-1),
            torch.cat([log_q_s, q_tail.unsqueeze(-1)], dim=-1))


def _bool_mask(mask: Tensor | None, shape: tuple[int, int], device: torch.device) -> Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {shape}")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 and 1 (weights are not supported)")
        mask = mask != 0
    return mask.to(device)


def _check_student(student_logits: Tensor) -> None:
    if student_logits.dim() != 3 or not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be a float [B, T, V] tensor, got "
                         f"{student_logits.dtype} {tuple(student_logits.shape)}")


def _check_teacher(teacher: TeacherTargets, shape: tuple[int, int, int]) -> None:
    b, t, v = shape
    if isinstance(teacher, DenseTeacher):
        if tuple(teacher.logprobs.shape) != shape:
            raise ValueError(f"dense teacher log-probs have shape {tuple(teacher.logprobs.shape)}, "
                             f"student logits {shape}")
    elif isinstance(teacher, SparseTeacher):
        ids = teacher.topk_ids
        # k may exceed V: the student's candidate ids join the top-k slots, repeats counted once.
        if ids.dim() != 3 or tuple(ids.shape[:2]) != (b, t):
            raise ValueError(f"topk_ids must be [{b}, {t}, k], got {tuple(ids.shape)}")
        if teacher.topk_logprobs.shape != ids.shape:
            raise ValueError("topk_logprobs must have the shape of topk_ids")
        for name in ("token_ids", "token_logprobs", "tail_logprobs"):
            got = tuple(getattr(teacher, name).shape)
            if got != (b, t):
                raise ValueError(f"{name} must be [{b}, {t}], got {got}")
    else:
        raise TypeError(f"teacher must be DenseTeacher or SparseTeacher, "
                        f"got {type(teacher).__name__}")


def _slice_teacher(teacher: TeacherTargets, start: int, stop: int, device: torch.device) -> TeacherTargets:
    """Positions start:stop of the teacher, on the student's device (a no-op when already there)."""
    if isinstance(teacher, DenseTeacher):
        return DenseTeacher(teacher.logprobs[:, start:stop].to(device))
    return SparseTeacher(*(x[:, start:stop].to(device) for x in (
        teacher.topk_ids, teacher.topk_logprobs, teacher.token_ids, teacher.token_logprobs,
        teacher.tail_logprobs)))


def _chunk_divergence(
    logits: Tensor, teacher: TeacherTargets, mask: Tensor, div: Divergence, dtype: torch.dtype,
    temperature: float,
) -> Tensor:
    """[B, t] divergences of one slice of positions; only the masked rows are computed."""
    rows = logits[mask].to(dtype)  # [n, V]
    if temperature != 1.0:
        rows = rows / temperature
    log_q = torch.log_softmax(rows, dim=-1)
    if isinstance(teacher, DenseTeacher):
        log_p = teacher.logprobs[mask].detach().to(dtype)
    else:
        log_p, log_q = coarsen_sparse(log_q, teacher.topk_ids[mask], teacher.topk_logprobs[mask],
                                      teacher.token_ids[mask], teacher.token_logprobs[mask],
                                      teacher.tail_logprobs[mask])
    values = div(log_p, log_q)  # [n]
    return torch.zeros(mask.shape, dtype=dtype, device=logits.device).masked_scatter(mask, values)


def token_divergence(
    student_logits: Tensor,
    teacher: TeacherTargets,
    mask: Tensor | None = None,
    *,
    loss: str = "fkl",
    alpha: float = 0.1,
    beta: float = 0.5,
    mu: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-position divergence D(p_t, q_t), [B, T]; 0 where `mask` is 0 (those rows are skipped,
    so padding may hold any teacher values).

    student_logits [B, T, V] (any float dtype; computed in at least float32), aligned with the
    teacher's positions; q_t = softmax(student_logits[:, t] / temperature). `loss` names the
    divergence (see `DIVERGENCES`), alpha/beta/mu its hyperparameters. `chunk_size` processes
    that many positions (along T) at a time and, when a gradient is being recorded, recomputes
    each chunk in the backward pass (activation checkpointing), so only one chunk's [.., V]
    intermediates are ever alive; the result equals the unchunked one.
    """
    _check_student(student_logits)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    b, t, _ = student_logits.shape
    _check_teacher(teacher, tuple(student_logits.shape))
    mask = _bool_mask(mask, (b, t), student_logits.device)
    div = get_divergence(loss, alpha=alpha, beta=beta, mu=mu)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)

    step = max(t, 1) if chunk_size is None else chunk_size
    recompute = chunk_size is not None and torch.is_grad_enabled() and student_logits.requires_grad
    parts = []
    for start in range(0, max(t, 1), step):
        stop = start + step
        args = (student_logits[:, start:stop],
                _slice_teacher(teacher, start, stop, student_logits.device),
                mask[:, start:stop], div, dtype, temperature)
        if recompute:
            parts.append(checkpoint(_chunk_divergence, *args, use_reentrant=False))
        else:
            parts.append(_chunk_divergence(*args))
    return torch.cat(parts, dim=1)


def distill_loss(
    student_logits: Tensor,
    teacher: TeacherTargets,
    mask: Tensor,
    *,
    loss: str = "fkl",
    alpha: float = 0.1,
    beta: float = 0.5,
    mu: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "token_mean",
    chunk_size: int | None = None,
) -> Tensor:
    """Scalar distillation loss: the mean of `token_divergence` over the masked positions.

    student_logits [B, T, V]; mask bool or 0/1 [B, T], 1 on the response positions that count.
    reduction:
      "token_mean": sum_{b,t} m_bt D_bt / sum_{b,t} m_bt (every counted token weighs the same);
      "seq_mean":   mean over sequences with >= 1 counted token of sum_t m_bt D_bt / sum_t m_bt.
    With no counted token the result is 0.0, still attached to student_logits (zero gradients).
    Other arguments as in `token_divergence`; defaults alpha 0.1 (DistiLLM), beta 0.5, mu 0.5.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    _check_student(student_logits)
    mask = _bool_mask(mask, tuple(student_logits.shape[:2]), student_logits.device)
    per_token = token_divergence(student_logits, teacher, mask, loss=loss, alpha=alpha, beta=beta,
                                 mu=mu, temperature=temperature, chunk_size=chunk_size)
    counted = mask.to(per_token.dtype)
    if reduction == "token_mean":
        return per_token.sum() / counted.sum().clamp_min(1.0)
    tokens_per_seq = counted.sum(-1)
    seq_means = per_token.sum(-1) / tokens_per_seq.clamp_min(1.0)  # 0 for empty sequences
    return seq_means.sum() / (tokens_per_seq > 0).sum().clamp_min(1).to(per_token.dtype)


# ---- preference losses on sequence log-probs --------------------------------------------------


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed response log-probs and lengths: (sum_t m_t log softmax(logits_t)[y_t], sum_t m_t).

    logits [B, T, V] aligned with labels int64 [B, T] (logits at t score labels at t), mask bool or
    0/1 [B, T]. Returns float [B] (at least float32) and int64 [B]. Labels under a 0 mask are
    ignored and may be anything (e.g. -100).
    """
    if logits.dim() != 3 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"logits [B, T, V] and labels [B, T] expected, got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    m = _bool_mask(mask, tuple(labels.shape), logits.device)
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    picked = x.gather(-1, torch.where(m, labels, 0).unsqueeze(-1)).squeeze(-1)
    token_logps = torch.where(m, picked - x.logsumexp(-1), 0.0)
    return token_logps.sum(-1), m.sum(-1)


def _check_batch(*tensors: Tensor) -> None:
    shape = tensors[0].shape
    if len(shape) != 1 or any(x.shape != shape for x in tensors):
        raise ValueError(f"expected [B] tensors of one shape, "
                         f"got {[tuple(x.shape) for x in tensors]}")


def _reward_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "chosen_reward": chosen.mean(),
        "rejected_reward": rejected.mean(),
        "reward_margin": (chosen - rejected).mean(),
        "accuracy": (chosen > rejected).to(chosen.dtype).mean(),
    }


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO (Rafailov et al. 2023, eq. 7), with conservative label smoothing eps (cDPO):

        h = (pi_c - ref_c) - (pi_r - ref_r)
        loss = mean_b[ -(1 - eps) log sigma(beta h) - eps log sigma(-beta h) ]

    All inputs [B], summed response log-probs (`sequence_logprobs`); the reference is detached.
    Metrics (detached means): chosen_reward = beta (pi_c - ref_c), rejected_reward likewise,
    reward_margin = their difference, accuracy = fraction with chosen_reward > rejected_reward.
    """
    _check_batch(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    chosen = beta * (policy_chosen_logps - ref_chosen_logps.detach())
    rejected = beta * (policy_rejected_logps - ref_rejected_logps.detach())
    logits = chosen - rejected
    losses = (-(1.0 - label_smoothing) * F.logsigmoid(logits)
              - label_smoothing * F.logsigmoid(-logits))
    return losses.mean(), _reward_metrics(chosen, rejected)


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalized, with a target margin:

        loss = mean_b[ -log sigma(beta / |y_c| pi_c - beta / |y_r| pi_r - gamma) ]

    Inputs [B]: summed log-probs and response lengths |y| (counts; clamped to >= 1). gamma is the
    absolute reward margin (not the gamma/beta ratio some configs use); defaults beta 2.0,
    gamma 0.5. Metrics as in `dpo_loss`, with rewards beta pi / |y|.
    """
    _check_batch(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    dtype = policy_chosen_logps.dtype
    chosen = beta * policy_chosen_logps / chosen_lengths.to(dtype).clamp_min(1.0)
    rejected = beta * policy_rejected_logps / rejected_lengths.to(dtype).clamp_min(1.0)
    return (-F.logsigmoid(chosen - rejected - gamma)).mean(), _reward_metrics(chosen, rejected)


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Hinge / SLiC calibration loss (Zhao et al. 2023) on reference-normalized log-ratios:

        h = (pi_c - ref_c) - (pi_r - ref_r)
        loss = mean_b[ max(0, 1 - beta h) ] = beta * mean_b[ max(0, delta - h) ], delta = 1/beta

    i.e. SLiC's max(0, delta - log P(y+) + log P(y-)) with the reference subtracted (as in TRL's
    "hinge" DPO loss). Inputs [B]; reference detached; metrics as in `dpo_loss`.
    """
    _check_batch(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen = beta * (policy_chosen_logps - ref_chosen_logps.detach())
    rejected = beta * (policy_rejected_logps - ref_rejected_logps.detach())
    return torch.relu(1.0 - (chosen - rejected)).mean(), _reward_metrics(chosen, rejected)
