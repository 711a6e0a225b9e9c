"""One on-policy rollout: responses from the student (or data, or teacher), judged by the teacher.

`sample_responses` samples with the same loop the teacher server uses (teacher_server.sampling);
`score_batch` asks the teacher for its top-k on exactly the response positions and lays the
answer out as padded [B, R, ...] tensors aligned with the student's logits from `student_logits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from teacher_server.contract import Generation, SamplingParams, ScoredSequence, Teacher, TeacherMismatch
from teacher_server.sampling import generate

from .losses import DenseTeacher, SparseTeacher, TeacherTargets


@dataclass
class KDBatch:
    """Prompt + response token batches with the teacher's judgement of every response position."""

    input_ids: torch.Tensor  # int64 [B, L], right-padded prompt + response
    attention_mask: torch.Tensor  # int64 [B, L]
    prompt_lens: torch.Tensor  # int64 [B]
    response_ids: torch.Tensor  # int64 [B, R], right-padded responses
    response_mask: torch.Tensor  # bool [B, R]
    teacher: TeacherTargets  # [B, R, ...] aligned with response_ids

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())


def sample_responses(model: torch.nn.Module, prompts: Sequence[torch.Tensor], *, max_new_tokens: int,
                     temperature: float, top_p: float, stop_ids: Sequence[int], seed: int) -> list[torch.Tensor]:
    """On-policy responses from the student, one per prompt, reproducible from `seed`."""
    return sample_rollouts(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, stop_ids=stop_ids, seed=seed)[0]


def sample_rollouts(model: torch.nn.Module, prompts: Sequence[torch.Tensor], *, max_new_tokens: int,
                    temperature: float, top_p: float, stop_ids: Sequence[int], seed: int,
                    top_k_ids: int = 0, on_finished: Callable[[int, Generation], None] | None = None,
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """`sample_responses`, plus, with `top_k_ids` > 0, the student's top ids at each sampled
    position ([len(response), top_k_ids] each, before any sampling filter), which the sampler
    computes anyway: the same draws either way. `on_finished(i, generation)` hears each row as
    soon as it is done, while the others are still sampled."""
    was_training = model.training
    model.eval()
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                stop_ids=tuple(stop_ids), seed=seed, logprobs_top_k=top_k_ids)
        gens = generate(model, list(prompts), params, on_finished=on_finished)
    finally:
        model.train(was_training)
    responses = [g.token_ids for g in gens]  # type: ignore[union-attr]
    return responses, ([g.topk_ids for g in gens] if top_k_ids else None)  # type: ignore[union-attr,misc]


def student_candidates(top_ids: Sequence[torch.Tensor], responses: Sequence[torch.Tensor],
                       vocab: int) -> list[torch.Tensor]:
    """Candidate ids for the teacher, [len(r), C] per response: the student's top ids at each
    response position, where an id past the student's `vocab` tokens (a padded head's row) is
    replaced by the position's own token (which the support holds anyway)."""
    out = []
    for ids, r in zip(top_ids, responses):
        ids = ids[:len(r)].long().cpu()
        out.append(torch.where(ids < vocab, ids, r[:len(ids), None].expand_as(ids)))
    return out


@torch.no_grad()
def forward_top_ids(model: torch.nn.Module, prompts: Sequence[torch.Tensor], responses: Sequence[torch.Tensor],
                    k: int, *, vocab: int, pad_id: int) -> list[torch.Tensor]:
    """The student's top-k ids at each response position, [len(r), k] per response, from one
    forward pass without gradient (for responses it did not sample itself)."""
    ids, attention, prompt_lens, response_ids, _ = pad_rollouts(prompts, responses, pad_id)
    logits = response_logits(model, ids, attention, prompt_lens, response_ids.shape[1])
    top = logits[..., :vocab].topk(min(k, vocab), dim=-1).indices.cpu()
    return [top[i, :len(r)] for i, r in enumerate(responses)]


def teacher_responses(teacher: Teacher, prompts: Sequence[torch.Tensor], *, max_new_tokens: int,
                      temperature: float, top_p: float, stop_ids: Sequence[int], seed: int) -> list[torch.Tensor]:
    """SeqKD responses: the teacher's own continuations."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            stop_ids=tuple(stop_ids), seed=seed)
    return [g.token_ids for g in teacher.generate(list(prompts), params)]


def score_batch(teacher: Teacher, prompts: Sequence[torch.Tensor], responses: Sequence[torch.Tensor], *,
                top_k: int, temperature: float, full_logprobs: bool, pad_id: int,
                candidates: Sequence[torch.Tensor] | None = None) -> KDBatch:
    """Ask the teacher about every response token and pad everything into one KDBatch.

    `candidates` ([len(r), C] per response, e.g. `student_candidates`): ids the teacher also
    scores at each position; they join the support as extra slots beside its top-k, and its tail
    then excludes them."""
    seqs = [torch.cat([p, r]) for p, r in zip(prompts, responses)]
    extra = {} if candidates is None else {"candidates": list(candidates)}
    scored = teacher.score(seqs, [len(p) for p in prompts], top_k=top_k, temperature=temperature,
                           full_logprobs=full_logprobs, **extra)
    return collate(prompts, responses, scored, pad_id=pad_id, full_logprobs=full_logprobs,
                   candidates=candidates)


def pad_rollouts(prompts: Sequence[torch.Tensor], responses: Sequence[torch.Tensor], pad_id: int):
    """Right-padded (input_ids [B, L], attention_mask [B, L], prompt_lens [B], response_ids [B, R],
    response_mask [B, R]) of prompt + response pairs."""
    b = len(prompts)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width, rmax = max(lengths), max(max(len(r) for r in responses), 1)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros(b, width, dtype=torch.long)
    response_ids = torch.full((b, rmax), pad_id, dtype=torch.long)
    response_mask = torch.zeros(b, rmax, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, :lengths[i]] = torch.cat([p, r])
        attention[i, :lengths[i]] = 1
        response_ids[i, :len(r)] = r
        response_mask[i, :len(r)] = True
    return input_ids, attention, torch.tensor([len(p) for p in prompts]), response_ids, response_mask


def collate(prompts: Sequence[torch.Tensor], responses: Sequence[torch.Tensor],
            scored: Sequence[ScoredSequence], *, pad_id: int, full_logprobs: bool = False,
            candidates: Sequence[torch.Tensor] | None = None) -> KDBatch:
    """A KDBatch of the rollouts and the teacher's answers; candidate ids (with the teacher's
    `candidate_logprobs`) become extra support slots after its top-k."""
    input_ids, attention, prompt_lens, response_ids, response_mask = pad_rollouts(prompts, responses, pad_id)
    b, rmax = response_ids.shape
    c = 0 if candidates is None else int(candidates[0].shape[-1])
    k = scored[0].topk_ids.shape[-1] + c
    topk_ids = torch.zeros(b, rmax, k, dtype=torch.long)
    topk_lp = torch.zeros(b, rmax, k)
    token_lp = torch.zeros(b, rmax)
    tail_lp = torch.full((b, rmax), float("-inf"))
    full = torch.zeros(b, rmax, scored[0].full_logprobs.shape[-1]) if full_logprobs else None
    for i, (r, s) in enumerate(zip(responses, scored)):
        n = len(r)
        ids, lps = s.topk_ids, s.topk_logprobs
        if c:
            if s.candidate_logprobs is None:
                raise TeacherMismatch("the teacher answered without the candidate log-probs it was asked for")
            ids = torch.cat([ids, candidates[i].long()], dim=-1)
            lps = torch.cat([lps, s.candidate_logprobs], dim=-1)
        topk_ids[i, :n], topk_lp[i, :n], token_lp[i, :n] = ids, lps, s.token_logprobs
        tail_lp[i, :n] = s.tail_logprobs
        if full is not None:
            full[i, :n] = s.full_logprobs
    teacher = (DenseTeacher(full) if full is not None else
               SparseTeacher(topk_ids=topk_ids, topk_logprobs=topk_lp, token_ids=response_ids,
                             token_logprobs=token_lp, tail_logprobs=tail_lp))
    return KDBatch(input_ids, attention, prompt_lens, response_ids, response_mask, teacher)


def student_logits(model: torch.nn.Module, batch: KDBatch) -> torch.Tensor:
    """Student logits [B, R, V] at the response positions (position j of the response is predicted
    from the hidden state at prompt_len + j - 1)."""
    return response_logits(model, batch.input_ids, batch.attention_mask, batch.prompt_lens,
                           batch.response_ids.shape[1])


def response_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    prompt_lens: torch.Tensor, r: int) -> torch.Tensor:
    """Logits [B, r, V] at the first r response positions of right-padded prompt + response rows."""
    device = next(model.parameters()).device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, L, V]; no KV cache kept
    pos = (prompt_lens[:, None] - 1 + torch.arange(r)[None, :]).clamp_max(ids.shape[1] - 1)
    return logits.gather(1, pos.to(device)[..., None].expand(-1, -1, logits.shape[-1]))


@torch.no_grad()
def mismatch_metrics(logits: torch.Tensor, batch: KDBatch, temperature: float = 1.0) -> dict[str, float]:
    """How far apart the two models are on this batch's response tokens (no gradient).

    teacher_logprob: mean teacher log-prob of the response tokens (for on-policy batches, of the
    student's own samples); topk_overlap: share of the student's top-k ids found in the teacher's
    top-k; tail_mass: mean teacher mass outside its top-k and the response token; fkl / rkl:
    token-level estimates of KL(p||q) and KL(q||p) on the same support the loss uses.
    """
    from .losses import token_divergence

    mask = batch.response_mask.to(logits.device)
    n = mask.sum().clamp_min(1)
    t = batch.teacher
    if isinstance(t, DenseTeacher):
        t = SparseTeacher.from_dense(t.logprobs, batch.response_ids, min(16, t.logprobs.shape[-1]))
    token_lp, topk_ids, k = t.token_logprobs, t.topk_ids, t.topk_ids.shape[-1]
    mean = lambda x: float((x.to(logits.device) * mask).sum() / n)  # noqa: E731
    student_top = logits.topk(k, dim=-1).indices.cpu()
    overlap = (student_top[..., :, None] == topk_ids[..., None, :]).any(-1).float().mean(-1)
    return {
        "teacher_logprob": mean(token_lp),
        "topk_overlap": mean(overlap),
        "tail_mass": mean(t.tail_logprobs.exp()),
        "fkl": mean(token_divergence(logits, batch.teacher, mask, loss="fkl", temperature=temperature)),
        "rkl": mean(token_divergence(logits, batch.teacher, mask, loss="rkl", temperature=temperature)),
    }
