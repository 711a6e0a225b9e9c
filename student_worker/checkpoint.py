"""Checkpoints that are never read torn and never unpickled.

Layout under `<run dir>/checkpoints/`:

    <stage>-<step:08d>/            a model directory AutoModelForCausalLM and AutoTokenizer load
        config.json, model.safetensors, generation_config.json   weights (safetensors), or for a
                                   LoRA student adapter_model.safetensors + adapter_config.json
                                   (the adapters only; `distillery export-merged` folds them in)
        tokenizer.json, tokenizer_config.json, ...               the student's tokenizer
        state.pt                   optimizer, scheduler, RNG, data position, counters
                                   (plain tensors and containers: loaded with weights_only=True)
        spec.json                  the job spec that produced it
        manifest.json              sha256 of every file above, and the (stage, step) it holds
    latest                         name of the newest complete checkpoint

A checkpoint is written into a temporary directory, every file fsynced, the directory renamed
into place, the parent fsynced, and only then does `latest` move (temp file + rename), so a crash
at any point leaves the previous checkpoint intact and pointed to (R-41). Loading verifies the
manifest and falls back to the previous checkpoint on a mismatch (R-42).

Files are 0644 and directories 0755 whatever the process umask: a teacher server or an eval job
running as another user of a shared volume must be able to read them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
STAGE_ORDER = {"warmup": 0, "distill": 1, "done": 2}


@dataclass(frozen=True)
class CheckpointRef:
    path: Path
    stage: str
    step: int

    @property
    def order(self) -> tuple[int, int]:
        return STAGE_ORDER.get(self.stage, -1), self.step


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FILE_MODE, DIR_MODE = 0o644, 0o755


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename (never seen half written), mode 0644."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.chmod(FILE_MODE)
    tmp.replace(path)
    _fsync_dir(path.parent)


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, model: torch.nn.Module, state: dict[str, Any], spec_json: str, *, stage: str,
             step: int, tokenizer: Any = None) -> CheckpointRef:
        """Write one checkpoint atomically and move `latest` to it; prune old ones. With
        `tokenizer`, its files are saved beside the weights. A peft wrapper (a LoRA student)
        saves its adapters only."""
        self.root.mkdir(parents=True, exist_ok=True)
        for d in (self.root.parent, self.root):
            d.chmod(DIR_MODE)
        name = f"{stage}-{step:08d}"
        final = self.root / name
        tmp = self.root / f".{name}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()
        from .lora import is_adapted, save_adapters

        if is_adapted(model):
            save_adapters(model, tmp)
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        torch.save(state, tmp / "state.pt")
        (tmp / "spec.json").write_text(spec_json)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        manifest = {"stage": stage, "step": step, "files": {f: _sha256(tmp / f) for f in files}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        for p in tmp.iterdir():
            p.chmod(FILE_MODE)
            with p.open("rb") as f:
                os.fsync(f.fileno())
        tmp.chmod(DIR_MODE)
        _fsync_dir(tmp)
        if final.exists():  # a re-run of the same step after a crash: replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(self.root)
        write_text_atomic(self.root / "latest", name)
        self._prune()
        return CheckpointRef(final, stage, step)

    def list(self) -> list[CheckpointRef]:
        """Complete checkpoints (temporary directories excluded), oldest first."""
        if not self.root.is_dir():
            return []
        refs = []
        for p in self.root.iterdir():
            if p.is_dir() and not p.name.startswith(".") and (p / "manifest.json").exists():
                stage, _, step = p.name.rpartition("-")
                if stage in STAGE_ORDER and step.isdigit():
                    refs.append(CheckpointRef(p, stage, int(step)))
        return sorted(refs, key=lambda r: r.order)

    def verify(self, ref: CheckpointRef) -> bool:
        try:
            manifest = json.loads((ref.path / "manifest.json").read_text())
            return all((ref.path / f).is_file() and _sha256(ref.path / f) == digest
                       for f, digest in manifest["files"].items())
        except (OSError, ValueError, KeyError):
            return False

    def latest_valid(self) -> CheckpointRef | None:
        """The newest intact checkpoint: `latest` if it verifies, else the newest older one."""
        refs = self.list()
        pointer = self.root / "latest"
        if pointer.exists():
            named = pointer.read_text().strip()
            # Never trust anything newer than the pointer: it was not finished.
            refs = [r for r in refs if r.order <= next((x.order for x in refs if x.path.name == named),
                                                       (99, 0))]
        for ref in reversed(refs):
            if self.verify(ref):
                return ref
            log.warning("checkpoint %s failed its checksum; trying the previous one", ref.path.name)
        return None

    @staticmethod
    def load_state(ref: CheckpointRef) -> dict[str, Any]:
        return torch.load(ref.path / "state.pt", map_location="cpu", weights_only=True)

    def _prune(self) -> None:
        refs = self.list()
        for ref in refs[:-self.keep_last]:
            shutil.rmtree(ref.path, ignore_errors=True)
        for p in self.root.iterdir():  # temporary directories of crashed writes
            if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
