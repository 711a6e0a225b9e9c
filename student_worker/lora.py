"""LoRA students: low-rank adapters on a frozen base, built with peft (the `peft` extra).

    adapters = add_adapters(base_model, spec.student.lora, seed=spec.seed, base="org/name")  # peft's
    model = adapters.get_base_model()       # the same modules, adapters inside: forwards run here
    with adapters.disable_adapter():        # the base alone: Warmup-Distill's DPO reference
        ...
    save_adapters(adapters, checkpoint_dir)
    load_adapters(adapters, checkpoint_dir)
    export_merged(run_dir, out_dir)         # base + adapters folded into one plain model directory

Hyperparameters mean what PEFT's do: each adapted linear layer W x becomes
W x + (alpha / r) · B A dropout(x), A [r, in] random, B [out, r] zero, so the student starts
as its base. Only A and B train: the optimizer holds them alone, and a checkpoint holds them
(adapter_model.safetensors, adapter_config.json) beside the tokenizer, state and spec, never the
base. A resumed run loads the base from `student.model` (pin `student.revision` for a hub id) and
the adapters from the checkpoint.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import JobSpec, LoraSpec

if TYPE_CHECKING:
    from .checkpoint import CheckpointRef

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What a full-weight checkpoint holds besides a model directory's files.
RUN_FILES = ("state.pt", "spec.json", "manifest.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("student.lora needs the peft package: pip install 'distillery[peft]'") from None
    return peft


def is_adapted(model: nn.Module) -> bool:
    """A peft wrapper (what `add_adapters` returns), told apart without importing peft."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def add_adapters(model: nn.Module, spec: LoraSpec, *, seed: int, base: str | None = None,
                 revision: str | None = None) -> nn.Module:
    """Wrap `model` (frozen from now on) with fresh adapters; their random init comes from `seed`
    alone and leaves the global RNG as it was. `base` / `revision` name the model they adapt in
    the adapter config saved with them."""
    peft = _peft()
    targets = "all-linear" if spec.target_modules == ["all-linear"] else list(spec.target_modules)
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                             target_modules=targets, bias="none", task_type="CAUSAL_LM")
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            adapters = peft.get_peft_model(model, config)
        except ValueError as exc:  # e.g. no module of the model has one of these names
            raise ValueError(f"student.lora.target_modules {spec.target_modules}: {exc}") from None
    saved = adapters.peft_config["default"]  # peft fills in the directory the base was loaded from
    saved.base_model_name_or_path, saved.revision = base, revision
    return adapters


def save_adapters(adapters: nn.Module, out_dir: Path) -> None:
    """The adapters' weights and config (which names their base) into `out_dir`."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(adapters)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out_dir / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    adapters.peft_config["default"].save_pretrained(str(out_dir))


def load_adapters(adapters: nn.Module, checkpoint: Path) -> None:
    """Adapter weights from a checkpoint directory into `adapters` (built with the same LoraSpec)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(checkpoint) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} holds no LoRA adapters ({ADAPTER_WEIGHTS}); it was not written "
                                "by a run with student.lora")
    device = next(adapters.parameters()).device
    result = set_peft_model_state_dict(adapters, load_file(str(path), device=str(device)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path} does not fit student.lora: missing {missing[:3]}, unexpected "
                         f"{list(result.unexpected_keys)[:3]}")


def _stored_dtype(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return dtype if dtype in DTYPES else "float32"


def export_merged(run_dir: str | Path, out_dir: str | Path, *, checkpoint: str | None = None,
                  dtype: str | None = None) -> Path:
    """A plain model directory (config, safetensors weights, tokenizer) from a run's checkpoint.

    `checkpoint`: its name under <run_dir>/checkpoints (default the latest intact one). A LoRA
    checkpoint is merged: its base (the spec's `student.model` at its revision, found as the run
    found it) loaded in float32, the adapters added and folded into the weights, the result saved
    in `dtype` (default: the base's own). A full-weight checkpoint is already a model directory:
    its files are copied. `out_dir` must not exist yet; it appears whole or not at all."""
    from .checkpoint import CheckpointManager

    mgr = CheckpointManager(run_dir)
    if checkpoint is None:
        ref = mgr.latest_valid()
    else:
        ref = next((r for r in mgr.list() if r.path.name == checkpoint), None)
        ref = ref if ref is not None and mgr.verify(ref) else None
    if ref is None:
        raise FileNotFoundError(f"{run_dir}: no intact checkpoint {checkpoint or ''}".rstrip())
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; export-merged writes a new directory")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    try:
        spec = JobSpec.model_validate_json((ref.path / "spec.json").read_text())
        if spec.student.lora is None:
            for f in ref.path.iterdir():
                if f.is_file() and f.name not in RUN_FILES:
                    shutil.copy2(f, tmp / f.name)
        else:
            _merge(ref, spec, tmp, dtype)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _merge(ref: CheckpointRef, spec: JobSpec, out: Path, dtype: str | None) -> None:
    from transformers import AutoTokenizer

    from teacher_server.model_dirs import resolve_model

    merged = merged_student(ref.path, spec)
    base = resolve_model(spec.student.model, spec.student.revision).path
    merged.to(DTYPES[dtype or _stored_dtype(base)]).save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(ref.path), local_files_only=True).save_pretrained(str(out))


def merged_student(checkpoint: Path, spec: JobSpec | None = None) -> nn.Module:
    """The student of a LoRA checkpoint with its adapters folded into the weights (float32, CPU):
    its base (the spec's `student.model` at its revision) with the checkpoint's adapters."""
    from teacher_server.model_dirs import resolve_model

    from .models import load_student

    spec = spec or JobSpec.model_validate_json((Path(checkpoint) / "spec.json").read_text())
    if spec.student.lora is None:
        raise ValueError(f"{checkpoint} is a full-weight checkpoint, not a LoRA one")
    base = resolve_model(spec.student.model, spec.student.revision).path
    adapters = add_adapters(load_student(base, "fp32", "cpu"), spec.student.lora, seed=spec.seed)
    load_adapters(adapters, Path(checkpoint))
    return adapters.merge_and_unload()
