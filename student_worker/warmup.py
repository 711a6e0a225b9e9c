"""Warmup-Distill: preference pairs from the student's low-probability knowledge, then DPO.

Sun et al., "Warmup-Distill: Bridge the Distribution Mismatch between Teacher and Student before
Knowledge Distillation" (arXiv 2502.11766); docs/training.md. One warmup stage on one rank:

    pairs, stats = build_pairs(student, teacher, prompts, spec, eos_id=eos, seed=seed)
    reference = frozen_copy(student)
    for batch in batches_of(pairs, spec.batch_size):
        loss, metrics = preference_loss(student, reference, batch, spec, pad_id=pad)
        loss.backward(); optimizer.step(); optimizer.zero_grad()

The reference is the student before warmup. For a LoRA student that is its base, so it is the
student itself with the adapters off (`reference=student`, `reference_context=
adapters.disable_adapter`; pairs are built inside that context too): no second copy in memory.

`build_pairs`, per prompt x:
  1. the student samples n = spec.samples_per_prompt responses y (temperature
     spec.sample_temperature, at most spec.max_new_tokens, stopping at EOS);
  2. the teacher scores y with its top-K, K = max(spec.rank_k, 2), giving P_t, and the student
     scores y, giving Q_t; both at temperature 1, i.e. the models' own distributions, whatever the
     sampling temperature was;
  3. `flag_tokens` marks the tokens past the threshold η of spec.rule (the student's
     low-probability knowledge);
  4. at the first flagged token t* the teacher puts its own token (`replacement_token`) and
     continues with Generate: chosen y+ = y[:t*] + [replacement] + continuation, rejected y- = y.
     A sample with no flagged token gives no pair.

Everything random is seeded from `seed` per row (see `_stream_seed`), so a stage is reproducible;
give each rank and each stage its own seed.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from teacher_server.contract import SamplingParams, ScoredSequence, Teacher
from teacher_server.sampling import derive_seed, generate

from .config import WarmupSpec
from .losses import dpo_loss, hinge_loss, simpo_loss

# Sequences per student forward / sampling batch and per teacher request. Bounds memory and stays
# far below the server's max_sequences; per-row seeds make results independent of it.
ROWS_PER_CALL = 64


@dataclass
class PreferencePair:
    """One Warmup-Distill pair; token ids int64 [len], on CPU."""

    prompt: Tensor
    chosen: Tensor  # y+ = rejected[:flagged_at] + [teacher token] + teacher continuation
    rejected: Tensor  # y-, the student's own sample
    flagged_at: int  # t*, response index of the first flagged token


@dataclass
class PairStats:
    samples: int  # student samples drawn
    pairs: int  # samples with a flagged token
    dropped: int  # samples without one
    flagged_fraction: float  # flagged tokens / all response tokens (every flag, not only t*)
    mean_flagged_position: float  # mean t* over pairs; 0.0 without pairs (JSON has no NaN)

    def as_dict(self) -> dict[str, float]:
        return {"samples": float(self.samples), "pairs": float(self.pairs),
                "dropped": float(self.dropped), "flagged_fraction": self.flagged_fraction,
                "mean_flagged_position": self.mean_flagged_position}


# ---- the pure part: which token is flagged, what replaces it ------------------------------------


def flag_tokens(
    teacher_token_logprobs: Tensor,
    student_token_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    token_ids: Tensor,
    spec: WarmupSpec,
) -> Tensor:
    """bool [n]: response tokens that are the student's low-probability knowledge.

    Inputs for the n tokens of one response: log P_t [n] and log Q_t [n] of the token actually
    there, the teacher's top-K ids [n, K] (K >= spec.rank_k for `teacher_rank`), the tokens [n].
    With η = spec.threshold:
        prob_diff     M_t = Q_t - P_t          flag M_t > η
        log_ratio     M_t = log Q_t - log P_t  flag M_t > η  (P_t = 0 < Q_t gives +inf: flagged)
        teacher_prob  flag P_t < η
        teacher_rank  flag y_t outside the teacher's top spec.rank_k (η unused)
    NaN margins (both probabilities 0) are not flagged.
    """
    n = token_ids.shape[0]
    if (teacher_token_logprobs.shape != (n,) or student_token_logprobs.shape != (n,)
            or teacher_topk_ids.dim() != 2 or teacher_topk_ids.shape[0] != n):
        raise ValueError(f"expected [n] log-probs and [n, K] top-k ids for n = {n}, got "
                         f"{tuple(teacher_token_logprobs.shape)}, {tuple(student_token_logprobs.shape)}, "
                         f"{tuple(teacher_topk_ids.shape)}")
    log_p, log_q = teacher_token_logprobs.double(), student_token_logprobs.double()
    eta = spec.threshold
    if spec.rule == "prob_diff":
        return (log_q.exp() - log_p.exp()) > eta
    if spec.rule == "log_ratio":
        return (log_q - log_p) > eta
    if spec.rule == "teacher_prob":
        return log_p.exp() < eta
    if spec.rule == "teacher_rank":
        if teacher_topk_ids.shape[1] < spec.rank_k:
            raise ValueError(f"teacher_rank with rank_k {spec.rank_k} needs the teacher's top "
                             f"{spec.rank_k}, got {teacher_topk_ids.shape[1]} ids")
        top = teacher_topk_ids[:, :spec.rank_k]
        return ~(top == token_ids[:, None].to(top.dtype)).any(-1)
    raise ValueError(f"unknown warmup rule {spec.rule!r}")


def first_flag(flags: Tensor) -> int | None:
    """Index of the first True in bool [n], or None."""
    hits = flags.nonzero()
    return int(hits[0, 0]) if len(hits) else None


def replacement_token(
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    student_token: int,
    mode: str,
    generator: torch.Generator | None,
) -> int:
    """The teacher's token for a flagged position, never the student's token.

    topk_ids int64 [K], topk_logprobs float [K]: the teacher's top-K there. `argmax`: the most
    likely of them other than `student_token`. `sample`: a draw, with `generator`, from the
    teacher's distribution restricted to the top-K without `student_token`, renormalized; the
    support is the top-K only because that is all a Score returns (K = max(rank_k, 2)).
    Candidates of probability 0 (-inf) are never returned.
    """
    if topk_ids.shape != topk_logprobs.shape or topk_ids.dim() != 1:
        raise ValueError(f"topk_ids and topk_logprobs must both be [K], got {tuple(topk_ids.shape)} "
                         f"and {tuple(topk_logprobs.shape)}")
    logp = topk_logprobs.double().masked_fill(topk_ids == student_token, float("-inf"))
    if not torch.isfinite(logp).any():
        raise ValueError(f"the teacher's top-{len(topk_ids)} holds no token other than the "
                         f"student's ({student_token}) with positive probability")
    if mode == "argmax":
        return int(topk_ids[logp.argmax()])
    if mode == "sample":
        probs = torch.softmax(logp, dim=0)
        return int(topk_ids[torch.multinomial(probs, 1, generator=generator)[0]])
    raise ValueError(f"unknown replacement mode {mode!r}; use 'argmax' or 'sample'")


# ---- building pairs ---------------------------------------------------------------------------


def build_pairs(
    student: nn.Module,
    teacher: Teacher,
    prompts: list[Tensor],
    spec: WarmupSpec,
    *,
    eos_id: int,
    seed: int,
    compute: Callable[[], AbstractContextManager] = nullcontext,
    vocab_size: int | None = None,
) -> tuple[list[PreferencePair], PairStats]:
    """Warmup-Distill pairs for `prompts` (int64 [len] each, non-empty); see the module docstring.

    Pairs come in prompt order, then sample order. Seeds: sample row i (= prompt index × n +
    sample index) draws from `_stream_seed(seed, "sample", i)`, its replacement (mode `sample`)
    from `_stream_seed(seed, "replace", i)`. The teacher's continuations use
    spec.sample_temperature and stop at EOS; their budget is what is left of spec.max_new_tokens
    (also capped by the teacher's max sequence length), none when the replacement is EOS.
    `compute` wraps the student's own forwards (the trainer's autocast under mixed precision).
    `vocab_size`: the student's vocabulary; a teacher id past it (padding rows the teacher's engine
    kept) is never a replacement.
    """
    prompts = [_as_ids(p, f"prompt {i}") for i, p in enumerate(prompts)]
    info = teacher.info()
    k = max(spec.rank_k, 2)  # >= 2: a candidate besides the student's token always exists
    if k > min(info.top_k_limit, info.vocab_size):
        raise ValueError(f"warmup needs the teacher's top {k} (rank_k {spec.rank_k}), but teacher "
                         f"{info.model_name!r} returns at most {min(info.top_k_limit, info.vocab_size)}")
    n = spec.samples_per_prompt
    row_prompts = [p for p in prompts for _ in range(n)]
    rows = range(len(row_prompts))

    with _eval_mode(student), compute():
        responses = _sample(student, row_prompts, spec, eos_id,
                            [_stream_seed(seed, "sample", i) for i in rows])
        student_lp = _student_token_logprobs(student, row_prompts, responses, pad_id=eos_id)
    scored = _teacher_scores(teacher, row_prompts, responses, top_k=k)

    heads: dict[int, tuple[int, Tensor]] = {}  # row -> (t*, y[:t*] + [replacement])
    flagged_tokens = total_tokens = 0
    for i in rows:
        y, s = responses[i], scored[i]
        flags = flag_tokens(s.token_logprobs, student_lp[i], s.topk_ids, y, spec)
        flagged_tokens += int(flags.sum())
        total_tokens += len(y)
        t = first_flag(flags)
        if t is None:
            continue
        gen = torch.Generator().manual_seed(_stream_seed(seed, "replace", i))
        top_lp = s.topk_logprobs[t]
        if vocab_size is not None:
            top_lp = top_lp.masked_fill(s.topk_ids[t] >= vocab_size, float("-inf"))
        token = replacement_token(s.topk_ids[t], top_lp, int(y[t]), spec.replacement, gen)
        heads[i] = (t, torch.cat([y[:t], torch.tensor([token])]))

    budgets = {i: 0 if int(head[-1]) == eos_id else
               max(0, min(spec.max_new_tokens, info.max_sequence_length - len(row_prompts[i])) - len(head))
               for i, (_, head) in heads.items()}
    tails = _teacher_continuations(teacher, {i: torch.cat([row_prompts[i], heads[i][1]]) for i in heads},
                                   budgets, temperature=spec.sample_temperature, eos_id=eos_id,
                                   max_sequence_length=info.max_sequence_length, seed=seed)
    pairs = [PreferencePair(prompt=row_prompts[i], chosen=torch.cat([head, tails[i]]),
                            rejected=responses[i], flagged_at=t)
             for i, (t, head) in heads.items()]
    stats = PairStats(
        samples=len(row_prompts), pairs=len(pairs), dropped=len(row_prompts) - len(pairs),
        flagged_fraction=flagged_tokens / max(total_tokens, 1),
        mean_flagged_position=sum(p.flagged_at for p in pairs) / max(len(pairs), 1),
    )
    return pairs, stats


def _as_ids(x: Tensor, what: str) -> Tensor:
    ids = torch.as_tensor(x).detach().to("cpu", torch.int64)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"{what} must be a non-empty 1-D tensor of token ids, got shape {tuple(ids.shape)}")
    return ids


def _stream_seed(seed: int, stream: str, index: int) -> int:
    """The seed of one row of one random stream ("sample", "replace", "continue"). One part, in
    the text earlier versions hashed, so runs keep their draws."""
    return derive_seed(f"warmup/{stream}/{seed}/{index}")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, ROWS_PER_CALL):
        yield slice(start, min(start + ROWS_PER_CALL, n))


def _sample(model: nn.Module, prompts: list[Tensor], spec: WarmupSpec, eos_id: int,
            seeds: list[int]) -> list[Tensor]:
    params = SamplingParams(max_new_tokens=spec.max_new_tokens, temperature=spec.sample_temperature,
                            stop_ids=(eos_id,))
    out: list[Tensor] = []
    for part in _chunks(len(prompts)):
        gens = generate(model, prompts[part], params, seeds=seeds[part])
        out += [g.token_ids.cpu() for g in gens]  # type: ignore[union-attr]  # never cancelled
    return out


@torch.no_grad()
def _student_token_logprobs(model: nn.Module, prompts: list[Tensor], responses: list[Tensor], *,
                            pad_id: int) -> list[Tensor]:
    """log Q_t of every response token, float32 [len(response)] per row."""
    out: list[Tensor] = []
    for part in _chunks(len(prompts)):
        logps, mask = response_token_logprobs(model, prompts[part], responses[part], pad_id=pad_id)
        out += [row[m].float().cpu() for row, m in zip(logps, mask)]
    return out


def _teacher_scores(teacher: Teacher, prompts: list[Tensor], responses: list[Tensor], *,
                    top_k: int) -> list[ScoredSequence]:
    out: list[ScoredSequence] = []
    for part in _chunks(len(prompts)):
        seqs = [torch.cat([p, r]) for p, r in zip(prompts[part], responses[part])]
        out += teacher.score(seqs, [len(p) for p in prompts[part]], top_k=top_k)
    return out


def _teacher_continuations(teacher: Teacher, prefixes: dict[int, Tensor], budgets: dict[int, int], *,
                           temperature: float, eos_id: int, max_sequence_length: int,
                           seed: int) -> dict[int, Tensor]:
    """The teacher's continuation of each prefix, at most budgets[i] tokens (empty when 0).

    The contract's Generate takes one max_new_tokens per request, so rows share a call with the
    largest budget among them and are cut to their own: an autoregressive sample cut at b tokens
    is a sample with budget b. A row joins a call only when its prefix + that budget fits the
    teacher's max sequence length; the longest-budget row always fits, so each call makes
    progress. Call c is seeded with `_stream_seed(seed, "continue", c)`.
    """
    out = {i: torch.empty(0, dtype=torch.long) for i in prefixes}
    todo = sorted((i for i in prefixes if budgets[i] > 0), key=lambda i: (-budgets[i], i))
    call = 0
    while todo:
        budget = budgets[todo[0]]
        group = [i for i in todo if len(prefixes[i]) + budget <= max_sequence_length][:ROWS_PER_CALL]
        params = SamplingParams(max_new_tokens=budget, temperature=temperature, stop_ids=(eos_id,),
                                seed=_stream_seed(seed, "continue", call))
        for i, g in zip(group, teacher.generate([prefixes[i] for i in group], params)):
            out[i] = g.token_ids.to("cpu", torch.long)[:budgets[i]]
        taken = set(group)
        todo = [i for i in todo if i not in taken]
        call += 1
    return out


# ---- preference training ----------------------------------------------------------------------


def frozen_copy(model: nn.Module) -> nn.Module:
    """The DPO reference: a deep copy in eval mode with no gradients (pass the unwrapped module)."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def response_token_logprobs(model: nn.Module, prompts: Sequence[Tensor], responses: Sequence[Tensor],
                            *, pad_id: int) -> tuple[Tensor, Tensor]:
    """Per-token response log-probs under `model` in one right-padded batch.

    Returns log p(y_j | x, y_<j) float [B, R] (0 past each response's end) and the response mask
    bool [B, R]; position j of a response is predicted from the hidden state at prompt_len + j - 1.
    Gradients flow when enabled by the caller. Padding uses `pad_id` under a 0 attention mask
    (right padding: real tokens never attend to it).
    """
    device = next(model.parameters()).device
    b = len(prompts)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width, rmax = max(lengths), max(len(r) for r in responses)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros(b, width, dtype=torch.long)
    labels = torch.full((b, rmax), pad_id, dtype=torch.long)
    mask = torch.zeros(b, rmax, dtype=torch.bool)
    pos = torch.zeros(b, rmax, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :lengths[i]] = torch.cat([p, r])
        attention[i, :lengths[i]] = 1
        labels[i, :len(r)] = r
        mask[i, :len(r)] = True
        pos[i] = (len(p) - 1 + torch.arange(rmax)).clamp_max(width - 1)
    ids, attention, labels, mask, pos = (t.to(device) for t in (ids, attention, labels, mask, pos))
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits  # [B, L, V]
    x = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))  # [B, R, V]
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    picked = x.gather(-1, labels[..., None])[..., 0]
    return torch.where(mask, picked - x.logsumexp(-1), 0.0), mask


def preference_loss(
    policy: nn.Module,
    reference: nn.Module,
    pairs: list[PreferencePair],
    spec: WarmupSpec,
    *,
    pad_id: int,
    reference_context: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[Tensor, dict[str, float]]:
    """Preference loss of one batch of pairs, plus spec.sft_weight × the chosen NLL per token.

    Chosen and rejected go through the policy (with grad) as one right-padded batch of 2B
    sequences, and through the frozen reference (no grad, inside `reference_context()`) likewise;
    π and π_ref are summed response log-probs. spec.loss:
        dpo    -(1-ε) log σ(β h) - ε log σ(-β h),  h = (π_c - ref_c) - (π_r - ref_r)
        simpo  -log σ(β π_c/|y_c| - β π_r/|y_r| - γ)   (no reference; not evaluated)
        hinge  max(0, 1 - β h)
    (equations and defaults in student_worker.losses). SFT term: -Σ π_c / Σ|y_c| over the batch.
    Metrics: loss, preference_loss, sft_nll (unweighted), accuracy, reward_margin, chosen_reward,
    rejected_reward (rewards as the chosen loss defines them), chosen_logps and rejected_logps
    (mean summed policy log-probs).
    """
    if not pairs:
        raise ValueError("preference_loss needs at least one pair")
    b = len(pairs)
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]

    logps, mask = response_token_logprobs(policy, prompts, responses, pad_id=pad_id)
    seq, lengths = logps.sum(-1), mask.sum(-1)
    chosen, rejected = seq[:b], seq[b:]
    if spec.loss == "simpo":
        pref, rewards = simpo_loss(chosen, rejected, lengths[:b], lengths[b:], beta=spec.beta,
                                   gamma=spec.simpo_gamma)
    else:
        with torch.no_grad(), reference_context():
            ref_logps, _ = response_token_logprobs(reference, prompts, responses, pad_id=pad_id)
        ref = ref_logps.sum(-1).to(seq.device)
        if spec.loss == "dpo":
            pref, rewards = dpo_loss(chosen, rejected, ref[:b], ref[b:], beta=spec.beta,
                                     label_smoothing=spec.label_smoothing)
        elif spec.loss == "hinge":
            pref, rewards = hinge_loss(chosen, rejected, ref[:b], ref[b:], beta=spec.beta)
        else:
            raise ValueError(f"unknown preference loss {spec.loss!r}")
    sft = -chosen.sum() / lengths[:b].sum().clamp_min(1)
    loss = pref + spec.sft_weight * sft if spec.sft_weight else pref
    metrics = {"loss": loss.item(), "preference_loss": pref.item(), "sft_nll": sft.item(),
               **{name: float(v) for name, v in rewards.items()},
               "chosen_logps": chosen.mean().item(), "rejected_logps": rejected.mean().item()}
    return loss, metrics
