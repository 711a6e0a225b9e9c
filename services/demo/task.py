"""The built-in task: multi-digit arithmetic with a checkable numeric answer, made from a seed.

    rows = make_rows(1000, seed=0)     # [{"prompt": "Q: 482+39-17=?\\nA:", "response": " 504"}, ...]

Numbers are written digit by digit and the demo's tokenizer (`build_char_tokenizer`) has one token
per character, so a model must learn the carrying itself; a bigger model learns it much faster
than a small one, which leaves the gap distillation is meant to close. Train and eval splits come
from different seeds and never share a prompt.

The same rows are the small data sets of the examples and the tests; this module writes them:

    python -m services.demo.task runs/tiny/train.jsonl --n 256      # also *.parquet, a directory
                                                                    # (save_to_disk), --chat, --prompts-only
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

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


def build_char_tokenizer(out_dir: str | Path):
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


def as_chat(row: dict[str, str], system: str = "Answer with the result.") -> dict[str, Any]:
    """A row as a conversation: a system prompt, one worked exchange, the question and (when the
    row has one) its answer."""
    turns = [{"role": "system", "content": system}, {"role": "user", "content": "Q: 1+1=?\nA:"},
             {"role": "assistant", "content": "2"}, {"role": "user", "content": row["prompt"]}]
    if row.get("response") is not None:
        turns.append({"role": "assistant", "content": row["response"].strip()})
    return {"messages": turns}


def write_rows(out: Path, rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> None:
    """rows to OUT by its form: *.jsonl, *.parquet, else a save_to_disk directory whose splits are
    train (rows) and test (eval_rows)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), out)
    else:
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                              "test": datasets.Dataset.from_list(eval_rows)}).save_to_disk(str(out))


def main() -> None:
    p = argparse.ArgumentParser(description="Write a small arithmetic data set (JSONL, Parquet or save_to_disk).")
    p.add_argument("out", type=Path, help="*.jsonl, *.parquet, or a directory for save_to_disk (train + test)")
    p.add_argument("--n", type=int, default=256, help="training rows (the test split gets n / 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--digits", type=int, default=2, help="operands of up to this many digits")
    p.add_argument("--chat", action="store_true", help="conversational rows (messages) with a system prompt")
    p.add_argument("--prompts-only", action="store_true", help="no reference responses")
    a = p.parse_args()
    rows = make_rows(a.n + max(1, a.n // 8), a.seed, digits=a.digits)
    if a.prompts_only:
        rows = [{"prompt": r["prompt"]} for r in rows]
    if a.chat:
        rows = [as_chat(r) for r in rows]
    write_rows(a.out, rows[:a.n], rows[a.n:])
    print(a.out)


if __name__ == "__main__":
    main()
