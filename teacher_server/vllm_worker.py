"""Code that runs inside vLLM's worker processes (named by `worker_extension_cls`).

vLLM mixes `VocabMask` into its workers, so the engine can call its methods by name over
`collective_rpc`. It exists for checkpoints whose output head is padded past the tokenizer
(a 151936-row head for 151665 tokens): vLLM would score and sample those rows, whose logits are
noise. `TeacherEngine` cuts them; here a forward hook on the model's logits processor sets them
to -inf, so every log-prob vLLM returns (prompt log-probs included, which no sampling option
reaches) is normalised over the tokenizer's tokens only, and no padded id is ever sampled.
"""

from __future__ import annotations

import torch


def mask_padded_logits(logits: torch.Tensor | None, tokenizer_size: int, first_id: int = 0) -> None:
    """In place: -inf on every column whose token id (`first_id` + column) is past the tokenizer."""
    if logits is None:  # a tensor-parallel rank that does not hold the gathered logits
        return
    start = max(tokenizer_size - first_id, 0)
    if start < logits.shape[-1]:
        logits[..., start:] = float("-inf")


class VocabMask:
    """Worker extension: `mask_padded_vocab(tokenizer_size)` hooks the logits processor."""

    def mask_padded_vocab(self, tokenizer_size: int) -> int:
        """Install the hook on every logits processor of the model; returns how many were hooked."""
        from vllm.model_executor.layers.logits_processor import LogitsProcessor

        def hook(module, args, kwargs, output):
            if kwargs.get("skip_gather", args[3] if len(args) > 3 else False):
                # Local logits of one vocabulary shard: column j is token shard_start + j.
                lm_head = kwargs.get("lm_head", args[0] if args else None)
                first = int(lm_head.shard_indices.org_vocab_start_index)
            else:
                first = 0
            mask_padded_logits(output, tokenizer_size, first)
            return output

        model = self.get_model()  # type: ignore[attr-defined]  (the vLLM worker this is mixed into)
        hooked = 0
        for module in model.modules():
            if isinstance(module, LogitsProcessor):
                module.register_forward_hook(hook, with_kwargs=True)
                hooked += 1
        return hooked
