"""Batched autoregressive sampling with a KV cache, for any transformers causal LM.

Used by the teacher engine (Generate) and by student workers (on-policy rollouts), so both sample
the same way. Prompts are left-padded; each row has its own torch.Generator on the model's device,
seeded from (seed, index), so a seeded answer does not depend on how rows were batched together.
Rows that finish or are cancelled leave the batch and the cache.

Costs: the prefill computes logits only at each row's last prompt position (the one sampled
from), not [B, T, V]. Draws happen on the model's device, batched (inverse CDF; each row's
uniforms come from its own generator, a block of UNIFORM_BLOCK at a time), with one
device-to-host copy of the B chosen ids per step. The KV cache is the transformers DynamicCache
the model creates at the prefill, kept across steps; rows leave it with `batch_select_indices`.
"""

from __future__ import annotations

import hashlib
import inspect
import secrets
import weakref
from typing import Callable, Sequence

import torch

from .contract import Generation, SamplingParams

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# Uniforms drawn per row and generator call in `generate`: one launch per row every this many steps.
UNIFORM_BLOCK = 64


def derive_seed(*parts: object) -> int:
    """A 63-bit generator seed from `parts`: sha256 of their text joined by ":". Every derived seed
    in Distillery comes from here, e.g. row i of a request seeded s (`derive_seed(s, i)`), or a
    trainer's step stream (`derive_seed(job_seed, stage, step, micro, rank)`)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def temper(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature, shifted so each row's maximum is 0 (the same distribution): a tiny
    temperature would otherwise overflow to inf and turn the softmax into NaN."""
    return (logits - logits.amax(-1, keepdim=True)) / temperature


# The float32 copy of each low-precision output head, with the weight version it was taken at.
_FP32_HEADS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, torch.Tensor]]" = weakref.WeakKeyDictionary()


def outside_logmass(logprobs: torch.Tensor, topk_ids: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log of the mass outside top-k ∪ {actual token}: logprobs [..., V], topk_ids [..., k],
    token_ids [...] -> [...]; a log-sum-exp over the other tokens (exact for a confident row,
    where 1 - sum would round to 0); -inf when nothing is left."""
    outside = logprobs.scatter(-1, topk_ids, float("-inf"))
    return outside.scatter_(-1, token_ids.unsqueeze(-1), float("-inf")).logsumexp(-1)


def head_logits(head: torch.nn.Module, states: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """float32 logits of the output head at `states` [N, H], softcapped when the model says so.

    With bf16 / fp16 weights the product is computed in float32 (states and weight upcast), so the
    logits are not rounded to the weights' dtype (a bf16 logit keeps 8 significant bits: one near
    20 moves by up to 0.06). The bf16 decoder's own error stays. The float32 copy of the weight is
    made once per head and kept (V·H·4 bytes beside the model: 2.2 GB for a 152k × 3584 head),
    not remade on every call; it is remade if the weight is changed in place.
    """
    weight = getattr(head, "weight", None)
    if isinstance(head, torch.nn.Linear) and weight is not None and weight.dtype in _LOW_PRECISION:
        cached = _FP32_HEADS.get(head)
        if cached is None or cached[0] != weight._version or cached[1].device != weight.device:
            cached = (weight._version, weight.detach().float())
            _FP32_HEADS[head] = cached
        logits = states.float() @ cached[1].t()
        if head.bias is not None:
            logits = logits + head.bias.float()
    else:
        logits = head(states).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


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


def draw(scaled: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor) -> torch.Tensor:
    """One draw per row from the filtered softmax of `scaled` [B, V], by inverse CDF: row r takes
    the first token whose float64 cumulative probability reaches uniforms[r] × the row's total.

    `uniforms` [B] lie in (0, 1], so a token of probability 0 (filtered out) is never taken.
    Batched on `scaled`'s device; a row's token depends only on its logits and its uniform.
    """
    cdf = filter_logits(scaled, params.top_k, params.top_p).softmax(-1, dtype=torch.float64).cumsum_(-1)
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target)[:, 0].clamp_max_(cdf.shape[-1] - 1)


def uniforms(gens: Sequence[torch.Generator], count: int, device: torch.device | str) -> torch.Tensor:
    """[len(gens), count] float64 in (0, 1]: the next `count` draws of each row's generator (which
    must live on `device`). A fixed `count` per call keeps each row's stream independent of how
    many rows or tokens a call has."""
    out = torch.empty(len(gens), count, dtype=torch.float64, device=device)
    for r, g in enumerate(gens):
        out[r].uniform_(generator=g)
    return out.neg_().add_(1.0)  # [0, 1) -> (0, 1]


def next_tokens(scaled: torch.Tensor, params: SamplingParams, gens: list[torch.Generator]) -> torch.Tensor:
    """Next token per row: argmax when greedy, else one draw per row from its own generator."""
    if params.temperature == 0:
        return scaled.argmax(-1)
    return draw(scaled, params, uniforms(gens, 1, scaled.device)[:, 0])


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[torch.Tensor],
    params: SamplingParams,
    *,
    seeds: Sequence[int | None] | None = None,
    max_new_tokens: Sequence[int] | None = None,
    cancelled: Callable[[int], bool] | None = None,
    fp32_head: bool = False,
    on_finished: Callable[[int, Generation], None] | None = None,
) -> list[Generation | None]:
    """Continue each prompt; per-row `seeds` / `max_new_tokens` default to params' (seed, i).

    Log-probs are under the temperature-scaled distribution before top-k / top-p filtering
    (temperature 1 when greedy), so they equal a Score at the same temperature.
    `cancelled(i)` is polled every step; a cancelled row leaves the batch and returns None.
    `on_finished(i, generation)` hears each row as soon as it is done (stop id or budget), while
    the others go on; its generation is the one returned for row i.
    `fp32_head`: run the decoder and apply the output head with `head_logits` (float32 even for
    bf16 / fp16 weights, as the teacher's Score does); otherwise the model's own forward, asked
    for the last position's logits only (`logits_to_keep=1` where the forward takes it).
    """
    n = len(prompts)
    device = next(model.parameters()).device
    if seeds is None:
        seeds = [None if params.seed is None else derive_seed(params.seed, i) for i in range(n)]
    budget = list(max_new_tokens) if max_new_tokens is not None else [params.max_new_tokens] * n
    gens = [torch.Generator(device=device).manual_seed(s if s is not None else secrets.randbits(63))
            for s in seeds]
    forward = _last_logits_fn(model, fp32_head)
    stop = set(params.stop_ids)
    out_ids: list[list[int]] = [[] for _ in range(n)]
    out_lp: list[list[torch.Tensor]] = [[] for _ in range(n)]
    out_topk: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    done: dict[int, Generation] = {}  # rows already handed to on_finished
    active = list(range(n))  # batch row r holds prompt active[r]

    ids, mask = left_pad(prompts, device)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    # Left padding: column -1 is every row's last prompt token, the only position sampled from.
    cache, logits = forward(input_ids=ids, attention_mask=attention_mask_4d(mask, ids.shape[1]),
                            position_ids=position_ids, cache=None)
    last_pos = position_ids[:, -1]
    step = 0
    while True:
        if params.temperature > 0:
            if step % UNIFORM_BLOCK == 0:  # each active row's next block of uniforms, on the device
                block = uniforms([gens[i] for i in active], UNIFORM_BLOCK, device)
            scaled = temper(logits, params.temperature)
            tokens = draw(scaled, params, block[:, step % UNIFORM_BLOCK])
        else:
            scaled = logits
            tokens = scaled.argmax(-1)
        step += 1
        if params.return_logprobs or params.logprobs_top_k:
            logprobs = torch.log_softmax(scaled, dim=-1)
            chosen_lp = logprobs.gather(-1, tokens[:, None])[:, 0]
        if params.logprobs_top_k:
            top_v, top_i = logprobs.topk(params.logprobs_top_k, dim=-1)
        token_list = tokens.tolist()  # the step's one device-to-host copy
        keep = []
        for r, i in enumerate(active):
            if cancelled is not None and cancelled(i):
                finish[i] = "cancelled"
                continue
            tok = token_list[r]
            out_ids[i].append(tok)
            if params.return_logprobs:
                out_lp[i].append(chosen_lp[r])
            if params.logprobs_top_k:
                out_topk[i].append((top_i[r], top_v[r]))
            if tok in stop:
                finish[i] = "stop"
            elif len(out_ids[i]) >= budget[i]:
                finish[i] = "length"
            else:
                keep.append(r)
                continue
            if on_finished is not None:
                done[i] = _generation(out_ids[i], out_lp[i], out_topk[i], finish[i], params)
                on_finished(i, done[i])
        if not keep:
            break
        if len(keep) < len(active):
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, last_pos, tokens = mask[sel], last_pos[sel], tokens[sel]
            if params.temperature > 0:
                block = block[sel]
            active = [active[r] for r in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        last_pos = last_pos + 1
        cache, logits = forward(input_ids=tokens[:, None], attention_mask=attention_mask_4d(mask, 1),
                                position_ids=last_pos[:, None], cache=cache)
    return [None if finish[i] == "cancelled" else done[i] if i in done else
            _generation(out_ids[i], out_lp[i], out_topk[i], finish[i] or "length", params)
            for i in range(n)]


def cache_arg(module: torch.nn.Module) -> str:
    """The name `module.forward` takes the KV cache under: `cache` from transformers 5.2x on,
    `past_key_values` before (and in wrappers that only pass **kwargs through)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache of a model output, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _last_logits_fn(model: torch.nn.Module, fp32_head: bool):
    """forward(cache=..., **inputs) -> (cache, float32 logits [B, V] at the last input position)."""
    if fp32_head:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        softcap = getattr(model.config, "final_logit_softcapping", None)
        name = cache_arg(decoder)

        def forward(cache=None, **inputs):
            out = decoder(**inputs, **{name: cache}, use_cache=True)
            return output_cache(out), head_logits(head, out.last_hidden_state[:, -1], softcap)
        return forward

    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    name = cache_arg(model)

    def forward(cache=None, **inputs):
        out = model(**inputs, **{name: cache}, use_cache=True, **keep_last)
        return output_cache(out), out.logits[:, -1].float()
    return forward


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
