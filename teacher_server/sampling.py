"""Batched autoregressive sampling with a KV cache, for any transformers causal LM.

Used by the teacher engine (Generate) and by student workers (on-policy rollouts), so both sample
the same way. Prompts are left-padded; each row has its own torch.Generator, seeded from
(seed, index), so a seeded answer does not depend on how rows were batched together. Rows that
finish or are cancelled leave the batch and the cache.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Callable, Sequence

import torch

from .contract import Generation, SamplingParams


def row_seed(seed: int, index: int) -> int:
    """The generator seed of prompt `index` of a request seeded with `seed`."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def temper(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature, shifted so each row's maximum is 0 (the same distribution): a tiny
    temperature would otherwise overflow to inf and turn the softmax into NaN."""
    return (logits - logits.amax(-1, keepdim=True)) / temperature


def pad(seqs: Sequence[torch.Tensor], side: str, device: torch.device | str, pad_id: int = 0):
    """[B, T] ids and attention mask with rows flush left ("right" padding) or flush right
    ("left" padding), and each row's offset of its first real token."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    offsets = []
    for r, s in enumerate(seqs):
        off = width - len(s) if side == "left" else 0
        ids[r, off:off + len(s)] = s
        mask[r, off:off + len(s)] = 1
        offsets.append(off)
    return ids.to(device), mask.to(device), offsets


def left_pad(seqs: Sequence[torch.Tensor], device: torch.device | str, pad_id: int = 0):
    """[B, T] ids and attention mask with every row's tokens flush right."""
    ids, mask, _ = pad(seqs, "left", device, pad_id)
    return ids, mask


def attention_mask_4d(mask: torch.Tensor, queries: int) -> torch.Tensor:
    """bool [B, 1, q, kv]: query i (of the last q positions) sees key j when j is real and not in
    its future. A padding query sees only itself, so no attention row is empty (NaN-free).

    transformers builds this from a 2-D mask on every call, and for left-padded rows of mixed
    lengths it does so with torch.vmap at each decoding step (4.57): 4x the cost of the step
    itself on small models. Passing it ready-made gives the same tokens, much faster.
    """
    kv = mask.shape[1]
    causal = torch.ones(queries, kv, dtype=torch.bool, device=mask.device).tril(kv - queries)
    full = causal[None, None] & mask.bool()[:, None, None, :]
    idx = torch.arange(queries, device=mask.device)
    full[..., idx, idx + kv - queries] = True
    return full


def filter_logits(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top_k and outside the top_p nucleus (0 / 1 disable)."""
    if top_k:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        sorted_p = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return scaled


def next_tokens(scaled: torch.Tensor, params: SamplingParams, gens: list[torch.Generator]) -> torch.Tensor:
    """Next token per row: argmax when greedy, else one draw per row from its own generator."""
    if params.temperature == 0:
        return scaled.argmax(-1)
    probs = filter_logits(scaled, params.top_k, params.top_p).softmax(-1).cpu()
    return torch.stack([torch.multinomial(probs[r], 1, generator=g)[0]
                        for r, g in enumerate(gens)]).to(scaled.device)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[torch.Tensor],
    params: SamplingParams,
    *,
    seeds: Sequence[int | None] | None = None,
    max_new_tokens: Sequence[int] | None = None,
    cancelled: Callable[[int], bool] | None = None,
) -> list[Generation | None]:
    """Continue each prompt; per-row `seeds` / `max_new_tokens` default to params' (seed, i).

    Log-probs are under the temperature-scaled distribution before top-k / top-p filtering
    (temperature 1 when greedy), so they equal a Score at the same temperature.
    `cancelled(i)` is polled every step; a cancelled row leaves the batch and returns None.
    """
    n = len(prompts)
    device = next(model.parameters()).device
    if seeds is None:
        seeds = [None if params.seed is None else row_seed(params.seed, i) for i in range(n)]
    budget = list(max_new_tokens) if max_new_tokens is not None else [params.max_new_tokens] * n
    gens = [torch.Generator().manual_seed(s if s is not None else secrets.randbits(63)) for s in seeds]
    stop = set(params.stop_ids)
    out_ids: list[list[int]] = [[] for _ in range(n)]
    out_lp: list[list[torch.Tensor]] = [[] for _ in range(n)]
    out_topk: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    active = list(range(n))  # batch row r holds prompt active[r]

    ids, mask = left_pad(prompts, device)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=attention_mask_4d(mask, ids.shape[1]), position_ids=position_ids,
                use_cache=True)
    cache, last_pos, logits = out.past_key_values, position_ids[:, -1], out.logits[:, -1].float()
    while True:
        scaled = temper(logits, params.temperature) if params.temperature > 0 else logits
        logprobs = torch.log_softmax(scaled, dim=-1)
        tokens = next_tokens(scaled, params, [gens[i] for i in active])
        if params.logprobs_top_k:
            top_v, top_i = logprobs.topk(params.logprobs_top_k, dim=-1)
        keep = []
        for r, i in enumerate(active):
            if cancelled is not None and cancelled(i):
                finish[i] = "cancelled"
                continue
            tok = int(tokens[r])
            out_ids[i].append(tok)
            if params.return_logprobs:
                out_lp[i].append(logprobs[r, tok])
            if params.logprobs_top_k:
                out_topk[i].append((top_i[r], top_v[r]))
            if tok in stop:
                finish[i] = "stop"
            elif len(out_ids[i]) >= budget[i]:
                finish[i] = "length"
            else:
                keep.append(r)
        if not keep:
            break
        if len(keep) < len(active):
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, last_pos, tokens = mask[sel], last_pos[sel], tokens[sel]
            active = [active[r] for r in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        last_pos = last_pos + 1
        out = model(input_ids=tokens[:, None], attention_mask=attention_mask_4d(mask, 1),
                    position_ids=last_pos[:, None], past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
    return [None if finish[i] == "cancelled" else _generation(out_ids[i], out_lp[i], out_topk[i],
                                                               finish[i] or "length", params)
            for i in range(n)]


def _generation(ids: list[int], lps: list[torch.Tensor], topk: list[tuple[torch.Tensor, torch.Tensor]],
                finish: str, params: SamplingParams) -> Generation:
    k = params.logprobs_top_k
    return Generation(
        token_ids=torch.tensor(ids, dtype=torch.long),
        finish_reason=finish,
        token_logprobs=(torch.stack(lps).cpu() if lps else torch.empty(0)) if params.return_logprobs else None,
        topk_ids=(torch.stack([t[0] for t in topk]).cpu() if topk else torch.empty(0, k, dtype=torch.long))
        if k else None,
        topk_logprobs=(torch.stack([t[1] for t in topk]).cpu() if topk else torch.empty(0, k)) if k else None,
    )
