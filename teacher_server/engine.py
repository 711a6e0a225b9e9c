"""TeacherEngine: pure compute on token tensors (score and generate). No I/O beyond loading.

Both the gRPC server (through the batcher) and `LocalTeacher` call this class, so served and
in-process answers are the same numbers.

Score runs the decoder once over right- or left-padded micro-batches and applies the output head
only at the scored positions ([N, H] @ [H, V] instead of [B, T, V] logits), in chunks, so memory
grows with the positions asked for, not with the batch's padded length.

Generate delegates to `sampling.generate` (shared with student rollouts): a batched KV-cache loop
over left-padded prompts. Each prompt has its
own torch.Generator seeded from (seed, index), so a seeded answer does not depend on how requests
were batched together; rows that finish or are cancelled leave the batch and the cache.
"""

from __future__ import annotations

import logging
import threading
from importlib.metadata import version
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import defaults
from .model_dirs import check_model_dir, load_tokenizer_facts, resolve_model
from .sampling import generate, head_logits, outside_logmass, pad, temper
from .contract import (
    Generation,
    Limits,
    SamplingParams,
    ScoreArgs,
    ScoredSequence,
    TeacherInfo,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    """How to load and run the teacher. Server-side only: nothing here comes from a request."""

    model_dir: str  # a directory, or a hub id found in the hub cache (model_dirs.resolve_model)
    revision: str | None = None  # of a hub id: branch, tag or commit (default main)
    device: str = defaults.DEVICE  # "cpu", "cuda", "cuda:1"
    dtype: str = defaults.DTYPE  # "float32" | "bfloat16" | "float16"
    compile: bool = False  # torch.compile the decoder
    trust_remote_code: bool = False  # only ever set by the operator's command line
    max_sequence_length: int | None = None  # default: the model's max_position_embeddings
    padding_side: str = "right"  # padding of score micro-batches: "right" | "left"
    max_batch_tokens: int = defaults.MAX_BATCH_TOKENS  # padded tokens per score micro-batch
    head_chunk_positions: int = 2048  # positions per output-head chunk ([chunk, V] logits)
    top_k_limit: int = defaults.TOP_K_LIMIT
    max_full_row_positions: int = defaults.MAX_FULL_ROW_POSITIONS


def trim_vocab(model: torch.nn.Module, tokenizer_size: int | None) -> int:
    """Cut the embedding and output rows past the tokenizer's vocabulary, in place; returns the
    vocabulary the model now has. Checkpoints often pad these rows (a 151936- or 152064-row head for
    a tokenizer of 151665 tokens) and no token ever maps to them, so their logits are noise: scores
    and samples are over the tokenizer's tokens only. The teacher is never saved, so it is cut; the
    student keeps its shape and has its logits sliced instead (student_worker.vocab)."""
    rows = int(model.get_output_embeddings().weight.shape[0])
    if tokenizer_size is None or tokenizer_size >= rows:
        return rows
    log.info("output head has %d rows for a tokenizer of %d tokens: the padding rows are dropped",
             rows, tokenizer_size)
    model.resize_token_embeddings(tokenizer_size, mean_resizing=False)
    return tokenizer_size


class TeacherEngine:
    def __init__(self, model: torch.nn.Module, config: EngineConfig, fingerprint: str = "",
                 name: str = "model") -> None:
        self.model = model.eval()
        self.config = config
        self.device = next(model.parameters()).device
        self.name = name
        self.fingerprint = fingerprint
        self._decoder = model.get_decoder()
        self._head = model.get_output_embeddings()
        self._softcap = getattr(model.config, "final_logit_softcapping", None)
        if config.compile:
            self._decoder = torch.compile(self._decoder, dynamic=True)
        self.vocab_size = int(self._head.weight.shape[0])
        max_pos = int(getattr(model.config, "max_position_embeddings", 2048))
        self.max_sequence_length = min(config.max_sequence_length or max_pos, max_pos)
        # One computation at a time across threads. Re-entrant for one case only: the batcher's
        # worker runs a Score between two decoding steps of its own Generate (from the
        # generate loop's `cancelled` poll, outside any forward pass; the KV cache is not touched).
        self._lock = threading.RLock()

    @classmethod
    def load(cls, config: EngineConfig) -> "TeacherEngine":
        from transformers import AutoModelForCausalLM

        if config.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
        resolved = resolve_model(config.model_dir, config.revision)
        path = check_model_dir(resolved.path)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=DTYPES[config.dtype], use_safetensors=True,
            trust_remote_code=config.trust_remote_code, local_files_only=True,
        )
        fingerprint, tokenizer_size = load_tokenizer_facts(path)
        trim_vocab(model, tokenizer_size)
        return cls(model.to(config.device), config, fingerprint, name=resolved.hub_id or path.resolve().name)

    # ------------------------------------------------------------------ facts
    @property
    def limits(self) -> Limits:
        return Limits(vocab_size=self.vocab_size, max_sequence_length=self.max_sequence_length,
                      top_k_limit=self.config.top_k_limit,
                      max_full_row_positions=self.config.max_full_row_positions,
                      max_candidates=self.config.top_k_limit)

    def info(self) -> TeacherInfo:
        return TeacherInfo(model_name=self.name, vocab_size=self.vocab_size,
                           tokenizer_fingerprint=self.fingerprint,
                           max_sequence_length=self.max_sequence_length,
                           dtype=self.config.dtype, top_k_limit=self.config.top_k_limit,
                           max_full_row_positions=self.config.max_full_row_positions,
                           device=str(self.device), engine=f"transformers {version('transformers')}",
                           max_candidates=self.config.top_k_limit)

    # ------------------------------------------------------------------ score
    def score(self, args: ScoreArgs, *,
              cancelled: Callable[[int], bool] | None = None) -> list[ScoredSequence | None]:
        """Log-probs at positions score_from..len-1 of each sequence (inputs already validated).

        `cancelled(i)` is polled for each row before every micro-batch (forward pass): cancelled
        rows are left out of it and return None, and a micro-batch with no row left does not run.
        """
        results: list[ScoredSequence | None] = [None] * len(args.sequences)
        # A caller's autocast (an in-process teacher beside a mixed-precision student) must not
        # change the teacher's numbers: it computes in its own dtype, as when served.
        with self._lock, torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            for batch in self._micro_batches([len(s) for s in args.sequences]):
                if cancelled is not None:
                    batch = [i for i in batch if not cancelled(i)]
                    if not batch:
                        continue
                for i, res in zip(batch, self._score_batch(args, batch)):
                    results[i] = res
        return results

    def _micro_batches(self, lengths: list[int]) -> list[list[int]]:
        """Group indices by length so each group's padded size stays under max_batch_tokens."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
        batches: list[list[int]] = []
        for i in order:
            if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= self.config.max_batch_tokens:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    def _score_batch(self, args: ScoreArgs, batch: list[int]) -> list[ScoredSequence]:
        seqs = [args.sequences[i] for i in batch]
        ids, mask, offsets = pad(seqs, self.config.padding_side, self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self._decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        # Position t is predicted from the hidden state at t - 1.
        rows, cols, counts = [], [], []
        for r, (i, off) in enumerate(zip(batch, offsets)):
            start, end = args.score_from[i], len(args.sequences[i])
            cols.append(torch.arange(start - 1, end - 1) + off)
            rows.append(torch.full((end - start,), r))
            counts.append(end - start)
        row_idx, col_idx = torch.cat(rows).to(ids.device), torch.cat(cols).to(ids.device)
        states = hidden[row_idx, col_idx]  # [N, H]
        targets = ids[row_idx, col_idx + 1]  # [N]
        cands = (torch.cat([args.candidates[i] for i in batch]).to(ids.device)
                 if args.candidates is not None else None)  # [N, C]
        topk_ids, topk_lp, tok_lp, tail_lp, full, cand_lp = self._head_logprobs(
            states, targets, args.top_k, args.temperature, args.full_logprobs, cands)
        none = [None] * len(counts)
        out = []
        for chunk in zip(*(t.split(counts) for t in (topk_ids, topk_lp, tok_lp, tail_lp)),
                         full.split(counts) if full is not None else none,
                         cand_lp.split(counts) if cand_lp is not None else none):
            out.append(ScoredSequence(topk_ids=chunk[0], topk_logprobs=chunk[1],
                                      token_logprobs=chunk[2], tail_logprobs=chunk[3],
                                      full_logprobs=chunk[4], candidate_logprobs=chunk[5]))
        return out

    def _logprobs(self, states: torch.Tensor, temperature: float) -> torch.Tensor:
        """float32 log-probs; the head itself runs in float32 for bf16 / fp16 weights (head_logits)."""
        logits = head_logits(self._head, states, self._softcap)
        return torch.log_softmax(temper(logits, temperature), dim=-1)

    def _head_logprobs(self, states, targets, top_k, temperature, full_rows, cands=None):
        """Per position: top-k ids and log-probs, the actual token's log-prob, the log mass outside
        S = top-k ∪ {actual token} ∪ candidates (a float32 log-sum-exp over those tokens, so a
        confident row's tail of 1e-12 stays 1e-12 instead of 1 - sum rounding to 0), optionally the
        full row, and the log-probs of the candidate ids `cands` [N, C] when given."""
        chunk = self.config.head_chunk_positions
        parts: list[list[torch.Tensor]] = [[], [], [], [], [], []]
        for j, (s, t) in enumerate(zip(states.split(chunk), targets.split(chunk))):
            lp = self._logprobs(s, temperature)
            vals, idx = lp.topk(top_k, dim=-1) if top_k else (lp[:, :0], lp[:, :0].long())
            parts[0].append(idx.long().cpu())
            parts[1].append(vals.cpu())
            parts[2].append(lp.gather(-1, t[:, None])[:, 0].cpu())
            if full_rows:
                parts[4].append(lp.cpu())
            if cands is not None:
                c = cands[j * chunk:(j + 1) * chunk]
                parts[5].append(lp.gather(-1, c).cpu())
                idx = torch.cat([idx, c], dim=-1)
            parts[3].append(outside_logmass(lp, idx, t).cpu())
        k, width = top_k, 0 if cands is None else cands.shape[-1]
        cat = lambda xs, shape: torch.cat(xs) if xs else torch.empty(shape)  # noqa: E731
        return (cat(parts[0], (0, k)).long(), cat(parts[1], (0, k)), cat(parts[2], (0,)),
                cat(parts[3], (0,)), cat(parts[4], (0, self.vocab_size)) if full_rows else None,
                cat(parts[5], (0, width)) if cands is not None else None)

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        prompts: Sequence[torch.Tensor],
        params: SamplingParams,
        *,
        seeds: Sequence[int | None] | None = None,
        max_new_tokens: Sequence[int] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[Generation | None]:
        """Continue each prompt (see `sampling.generate`); rows cancelled mid-way return None."""
        with self._lock, torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            return generate(self.model, prompts, params, seeds=seeds, max_new_tokens=max_new_tokens,
                            cancelled=cancelled, fp32_head=True)
