"""Supervised fine-tuning from scratch: how the demo's teacher and SFT student are made.

    model = new_model(tokenizer, hidden=128, layers=4)
    losses = train_sft(model, examples, seconds=180, batch_size=64, lr=3e-3)

The loss is the mean negative log-likelihood of the response tokens given the prompt (the prompt
tokens are not trained on). Training stops after `steps` optimizer steps or `seconds` of wall
time, whichever comes first; the data order and initialisation come from `seed`.
"""

from __future__ import annotations

import math
import random
import time
from typing import Callable

import torch

from student_worker.data import Example
from student_worker.warmup import response_token_logprobs


def new_model(tokenizer, *, hidden: int, layers: int, heads: int = 4, max_positions: int = 128,
              seed: int = 0) -> torch.nn.Module:
    """A randomly initialised Llama sized for the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=4 * hidden,
                         max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def train_sft(model: torch.nn.Module, examples: list[Example], *, batch_size: int, lr: float,
              steps: int | None = None, seconds: float | None = None, seed: int = 0, pad_id: int = 0,
              warmup_steps: int = 50, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train on (prompt, response) examples; returns the loss of every step."""
    if steps is None and seconds is None:
        raise ValueError("give steps, seconds or both")
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    horizon = steps or 10_000

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / horizon)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses: list[float] = []
    start = time.monotonic()
    order: list[int] = []
    step = 0
    while (steps is None or step < steps) and (seconds is None or time.monotonic() - start < seconds):
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch = [examples[i] for i in order[:batch_size]]
        del order[:batch_size]
        logps, mask = response_token_logprobs(model, [e.prompt_ids for e in batch],
                                              [e.response_ids for e in batch], pad_id=pad_id)
        loss = -(logps * mask).sum() / mask.sum().clamp_min(1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
