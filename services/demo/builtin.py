"""The built-in teacher and student: made from scratch on the built-in task, once, then cached.

    assets = prepare(Recipe())            # trains what is missing under ~/.cache/distillery/builtin
    assets.teacher, assets.student        # model directories (safetensors + tokenizer)
    assets.train, assets.eval             # JSONL splits in the format jobs read
    assets.scores                         # {"teacher": {"exact_match": ..}, "student": {..}}

The recipe (task difficulty, model sizes, SFT steps) is chosen so that the teacher is near the
top of the eval split and the SFT student far below it, which leaves distillation room to show;
docs/quality.md records the measured figures. The cache key is a hash of the recipe, so a
changed recipe never reuses stale models, and a half-written cache is never used: everything is
built in a temporary directory renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from student_worker.config import DataSpec
from student_worker.data import encode, read_jsonl
from student_worker.eval import evaluate, student_generator

from . import task
from .sft import new_model, train_sft

RECIPE_VERSION = 1
ANSWER_TOKENS = 8  # new tokens for an answer (at most 4 digits, a space and EOS): eval and sampling
Progress = Callable[[str, int, int, float], None]  # (what, step, total, loss)


@dataclass(frozen=True)
class ModelRecipe:
    hidden: int
    layers: int
    heads: int
    steps: int
    lr: float
    batch_size: int = 64


@dataclass(frozen=True)
class Recipe:
    digits: int = 2  # operands of up to this many digits
    terms: int = 2  # operands per problem
    n_train: int = 8_000
    n_eval: int = 200
    seed: int = 0
    # 1.06M parameters, ~3.5 min on 2 cores.
    teacher: ModelRecipe = field(default_factory=lambda: ModelRecipe(hidden=128, layers=4, heads=4, steps=3000, lr=3e-3))
    # 20k parameters, a short SFT (~10 s): far below the teacher, with room to learn from it.
    student: ModelRecipe = field(default_factory=lambda: ModelRecipe(hidden=32, layers=1, heads=4, steps=500, lr=3e-3))
    threads: int = 0  # torch threads while training; 0 = torch's default

    def key(self) -> str:
        doc = json.dumps({"version": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()[:16]


def quick_recipe() -> Recipe:
    """Barely trained models on a small split, in seconds: for checking the machinery (tests,
    `distillery demo --quick`), not the quality."""
    return Recipe(n_train=400, n_eval=16, teacher=ModelRecipe(hidden=32, layers=1, heads=4, steps=30, lr=3e-3),
                  student=ModelRecipe(hidden=16, layers=1, heads=4, steps=10, lr=3e-3))


@dataclass(frozen=True)
class Assets:
    root: Path
    teacher: Path
    student: Path
    train: Path
    eval: Path
    scores: dict[str, Any]
    recipe: dict[str, Any]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distillery" / "builtin"


def data_spec(train: Path, eval_path: Path) -> DataSpec:
    """How jobs read the built-in task: short prompts, answers of a few characters."""
    return DataSpec(path=str(train), eval_path=str(eval_path), max_prompt_tokens=32, max_response_tokens=16)


def examples(path: Path, tokenizer) -> list:
    """A split of the built-in task, encoded as jobs encode it."""
    spec = data_spec(path, path)
    return [encode(tokenizer, p, r, spec) for p, r in read_jsonl(path, "prompt", "response")]


def score(model: torch.nn.Module, tokenizer, evals: list, max_samples: int | None = None):
    """Greedy exact match / ROUGE-L of `model` on `evals`, as the jobs' evaluation computes them."""
    return evaluate(student_generator(model, max_new_tokens=ANSWER_TOKENS, eos_id=tokenizer.eos_token_id),
                    evals, tokenizer, batch_size=100, max_samples=max_samples or len(evals))


def load(root: Path) -> Assets | None:
    """The cached assets in `root`, or None when they are missing or incomplete."""
    meta = root / "assets.json"
    if not meta.is_file():
        return None
    doc = json.loads(meta.read_text())
    assets = Assets(root=root, teacher=root / "teacher", student=root / "student", train=root / "train.jsonl",
                    eval=root / "eval.jsonl", scores=doc["scores"], recipe=doc["recipe"])
    needed = [assets.teacher / "model.safetensors", assets.student / "model.safetensors", assets.train, assets.eval]
    return assets if all(p.is_file() for p in needed) else None


def prepare(recipe: Recipe = Recipe(), cache_dir: Path | None = None, progress: Progress | None = None) -> Assets:
    """The teacher, the SFT student and the data of `recipe`, trained now unless cached."""
    root = (cache_dir or default_cache_dir()) / recipe.key()
    cached = load(root)
    if cached is not None:
        return cached
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        _build(recipe, work, progress)
        if root.exists():  # an incomplete earlier attempt
            shutil.rmtree(root)
        work.rename(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assets = load(root)
    assert assets is not None
    return assets


def _build(recipe: Recipe, out: Path, progress: Progress | None) -> None:
    threads = torch.get_num_threads()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    try:
        train_path, eval_path = task.write_splits(out, n_train=recipe.n_train, n_eval=recipe.n_eval, seed=recipe.seed,
                                                  digits=recipe.digits, terms=recipe.terms)
        tokenizer = task.build_char_tokenizer(out / "tokenizer")
        train, evals = examples(train_path, tokenizer), examples(eval_path, tokenizer)
        scores: dict[str, Any] = {}
        for name, m in (("teacher", recipe.teacher), ("student", recipe.student)):
            model = new_model(tokenizer, hidden=m.hidden, layers=m.layers, heads=m.heads, seed=recipe.seed)
            started = time.monotonic()
            losses = train_sft(model, train, batch_size=m.batch_size, lr=m.lr, steps=m.steps, seed=recipe.seed,
                               pad_id=tokenizer.pad_token_id,
                               on_step=(lambda step, loss, name=name, total=m.steps:
                                        progress(name, step, total, loss)) if progress else None)
            took = time.monotonic() - started
            result = score(model, tokenizer, evals)
            model.save_pretrained(out / name, safe_serialization=True)
            tokenizer.save_pretrained(out / name)
            scores[name] = {"exact_match": result.exact_match, "rouge_l": result.rouge_l, "n": result.n,
                            "parameters": sum(p.numel() for p in model.parameters()),
                            "train_seconds": round(took, 1), "final_loss": losses[-1]}
        shutil.rmtree(out / "tokenizer")
        (out / "assets.json").write_text(json.dumps({"recipe": asdict(recipe), "scores": scores}, indent=2))
    finally:
        torch.set_num_threads(threads)
