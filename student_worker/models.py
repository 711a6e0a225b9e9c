"""The student model: found, loaded, cut to its tokenizer's vocabulary, optionally with LoRA
adapters and gradient checkpointing.

    ref = resolve_model(spec.student.model, spec.student.revision)   # a directory or a hub id
    student = build_student(spec.student, ref.path, tokenizer_size=len(tokenizer), seed=spec.seed,
                            device="cpu", checkpoint=None)
    logits = student.model(input_ids=ids).logits                      # [B, T, student.vocab_size]

Vocabulary: checkpoints often pad their embedding and output rows past the tokenizer (152064 or
151936 rows for a tokenizer of 151665 tokens). No token maps to those rows, so the student's
logits are cut to the tokenizer's tokens (a forward hook on the output head: the weights keep their
shape and checkpoints stay loadable as the original model), and whatever the teacher says about
ids past them is dropped before a loss sees it (`restrict_teacher`). Both sides then compare
distributions over the same tokens, however each model is padded.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from teacher_server.model_dirs import check_model_dir

from .config import StudentSpec
from .losses import DenseTeacher, SparseTeacher, TeacherTargets

log = logging.getLogger(__name__)


def load_student(path: str | Path, precision: str, device: str) -> nn.Module:
    """The student's weights from a model directory: float32 masters unless `precision` is bf16-true."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, use_safetensors=True, trust_remote_code=False, local_files_only=True)
    return model.to(device)


@dataclass
class Student:
    """`model` runs every forward (with its adapters on, if any); `adapters` is the PEFT wrapper of
    a LoRA student (what is saved, and what turns the adapters off), else None."""

    model: nn.Module
    adapters: nn.Module | None
    vocab_size: int

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def build_student(spec: StudentSpec, base: str | Path, *, tokenizer_size: int, seed: int, device: str,
                  checkpoint: Path | None = None) -> Student:
    """The student to train, from `base` (a model directory) or from `checkpoint` (a checkpoint
    directory of this run: full weights, or a LoRA student's adapters, which go onto `base`)."""
    if spec.lora is None:
        model = load_student(checkpoint or base, spec.precision, device)
        adapters = None
    else:
        from .lora import add_adapters, load_adapters

        adapters = add_adapters(load_student(base, spec.precision, device), spec.lora, seed=seed,
                                base=spec.model, revision=spec.revision)
        if checkpoint is not None:
            load_adapters(adapters, checkpoint)
        model = adapters.get_base_model()  # the same modules, adapters inside them
    vocab = slice_vocab(model, tokenizer_size)
    if spec.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return Student(model, adapters, vocab)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Keep only each decoder layer's input in the forward and recompute the rest in the backward.
    Non-reentrant, so it works with frozen embeddings (LoRA) and keeps the RNG of any dropout."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


_SLICED: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def slice_vocab(model: nn.Module, tokenizer_size: int) -> int:
    """Cut the model's logits to its first `tokenizer_size` ids (never more than it has rows);
    returns the vocabulary the student now has. The head's weight keeps its shape; the padding rows
    get no gradient."""
    head = model.get_output_embeddings()
    rows = int(head.weight.shape[0])
    vocab = min(rows, tokenizer_size)
    if vocab < rows and head not in _SLICED:
        log.info("student head has %d rows for a tokenizer of %d tokens: logits are cut to the tokenizer's",
                 rows, tokenizer_size)
        head.register_forward_hook(lambda _module, _args, out: out[..., :vocab])
        _SLICED[head] = vocab
    return _SLICED.get(head, vocab)


def restrict_teacher(teacher: TeacherTargets, vocab: int) -> TeacherTargets:
    """The teacher's judgement over ids [0, vocab) only, renormalized to them.

    Dense rows [..., V'] are cut to `vocab` and renormalized. A sparse teacher's top-k ids >= vocab
    (padding rows a teacher engine kept) leave the support: their slot becomes a copy of the
    position's actual token (counted once by the losses), and every remaining log-prob and the tail
    are divided by the mass that stays, as far as the top-k shows it (mass of padding ids inside the
    tail cannot be told apart and stays there)."""
    if isinstance(teacher, DenseTeacher):
        if teacher.logprobs.shape[-1] <= vocab:
            return teacher
        kept = teacher.logprobs[..., :vocab]
        return DenseTeacher(kept - kept.logsumexp(-1, keepdim=True))
    outside = teacher.topk_ids >= vocab
    if not bool(outside.any()):
        return teacher
    dropped = teacher.topk_logprobs.masked_fill(~outside, float("-inf")).logsumexp(-1)  # [B, T]
    # log of the mass that stays; a teacher with all its mass on padding is kept finite (1e-6).
    shift = -torch.log1p(-dropped.exp().clamp_max(1 - 1e-6))
    token = teacher.token_ids.unsqueeze(-1).expand_as(teacher.topk_ids)
    token_lp = teacher.token_logprobs.unsqueeze(-1).expand_as(teacher.topk_logprobs)
    ids = torch.where(outside, token, teacher.topk_ids)
    lps = torch.where(outside, token_lp, teacher.topk_logprobs)
    if ids.shape[-1] > vocab:  # k past the vocabulary: at least k - vocab slots were padding; drop them
        order = outside.to(torch.int8).argsort(dim=-1, stable=True)[..., :vocab]
        ids, lps = ids.gather(-1, order), lps.gather(-1, order)
    return SparseTeacher(
        topk_ids=ids,
        topk_logprobs=lps + shift.unsqueeze(-1),
        token_ids=teacher.token_ids,
        token_logprobs=teacher.token_logprobs + shift,
        tail_logprobs=teacher.tail_logprobs + shift,
    )
