"""The built-in task: multi-digit arithmetic with a checkable numeric answer, made from a seed.

    rows = make_rows(1000, seed=0)     # [{"prompt": "Q: 482+39-17=?\\nA:", "response": " 504"}, ...]

Numbers are written digit by digit and the tokenizer (`build_tokenizer`) has one token per
character, so a model must learn the carrying itself; a bigger model learns it much faster than a
small one, which leaves the gap distillation is meant to close. Train and eval splits come from
different seeds and never share a prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ALPHABET = list("0123456789+-*=?:QA \n")
SPECIAL = ["<pad>", "<s>", "</s>"]


def make_rows(n: int, seed: int, *, digits: int = 3, terms: int = 2, exclude: set[str] | None = None) -> list[dict[str, str]]:
    """n distinct problems `a ± b (± c)` with operands of up to `digits` digits (no negatives)."""
    rng = random.Random(seed)
    rows, seen = [], set(exclude or ())
    hi = 10**digits - 1
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 20 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems with {digits}-digit operands and {terms} terms")
        values = [rng.randint(0, hi) for _ in range(terms)]
        ops = [rng.choice("+-") for _ in range(terms - 1)]
        total, text = values[0], str(values[0])
        for op, v in zip(ops, values[1:]):
            if op == "-" and v > total:
                op = "+"
            total = total + v if op == "+" else total - v
            text += f"{op}{v}"
        prompt = f"Q: {text}=?\nA:"
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "response": f" {total}"})
    return rows


def write_splits(out_dir: str | Path, *, n_train: int, n_eval: int, seed: int = 0, digits: int = 3,
                 terms: int = 2) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eval_rows = make_rows(n_eval, seed + 1_000_003, digits=digits, terms=terms)
    train_rows = make_rows(n_train, seed, digits=digits, terms=terms, exclude={r["prompt"] for r in eval_rows})
    paths = out / "train.jsonl", out / "eval.jsonl"
    for path, rows in zip(paths, (train_rows, eval_rows)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def build_tokenizer(out_dir: str | Path):
    """A character-level fast tokenizer over the task's alphabet, saved for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(out_dir))
    return fast
