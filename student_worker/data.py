"""Training data: JSONL prompt/response pairs, tokenized once, served in a deterministic order.

Each line of a data file is a JSON object with the prompt and response fields named in the spec.
Prompts longer than `max_prompt_tokens` keep their last tokens (the question usually ends there);
responses keep their first `max_response_tokens`, then EOS when `append_eos` is set.

`ShardedOrder` gives every rank its own disjoint slice of a per-epoch permutation that depends
only on (seed, epoch), so the data order is the same after a resume and for any world size the
union of the shards is the whole epoch.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DataSpec


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    prompt_ids: torch.Tensor  # int64 [P]
    response_ids: torch.Tensor  # int64 [R]


class DataError(ValueError):
    """A data file is missing, malformed, or too small for the job."""


def read_jsonl(path: str | Path, prompt_field: str, response_field: str) -> list[tuple[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object")
            for key in (prompt_field, response_field):
                if not isinstance(obj.get(key), str):
                    raise DataError(f"{path}:{n}: field {key!r} missing or not a string")
            rows.append((obj[prompt_field], obj[response_field]))
    if not rows:
        raise DataError(f"{path} holds no examples")
    return rows


def encode(tokenizer, prompt: str, response: str, spec: DataSpec) -> Example:
    if spec.chat_template:
        # Rendered to text, then encoded without adding special tokens (the template writes its
        # own): the same ids whatever apply_chat_template(tokenize=True) returns in this version.
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids[:spec.max_response_tokens]
    if spec.append_eos and tokenizer.eos_token_id is not None:
        response_ids = response_ids[:spec.max_response_tokens - 1] + [tokenizer.eos_token_id]
    prompt_ids = prompt_ids[-spec.max_prompt_tokens:]
    if not prompt_ids:
        raise DataError(f"prompt {prompt[:40]!r} encodes to no tokens")
    return Example(prompt, response, torch.tensor(prompt_ids, dtype=torch.long),
                   torch.tensor(response_ids, dtype=torch.long))


def load_splits(spec: DataSpec, tokenizer) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples; eval is `eval_path`, else an `eval_fraction` of `path` chosen with
    `split_seed` (not the job's seed: runs of several seeds are then scored on the same rows)."""
    rows = read_jsonl(spec.path, spec.prompt_field, spec.response_field)
    if spec.eval_path:
        eval_rows = read_jsonl(spec.eval_path, spec.prompt_field, spec.response_field)
    else:
        order = list(range(len(rows)))
        random.Random(spec.split_seed).shuffle(order)
        n_eval = int(len(rows) * spec.eval_fraction)
        held = set(order[:n_eval])
        eval_rows = [rows[i] for i in sorted(held)]
        rows = [r for i, r in enumerate(rows) if i not in held]
    if not rows:
        raise DataError(f"{spec.path}: nothing left to train on after holding out the eval split")
    train = [encode(tokenizer, p, r, spec) for p, r in rows]
    evals = [encode(tokenizer, p, r, spec) for p, r in eval_rows]
    return train, evals


class ShardedOrder:
    """Endless batches of example indices for one rank; state is (epoch, cursor)."""

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0) -> None:
        if n < world:
            raise DataError(f"{n} examples cannot be sharded over {world} workers")
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.epoch, self.cursor = 0, 0
        self._shard = self._make_shard()

    def _make_shard(self) -> list[int]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        usable = self.n - self.n % self.world  # equal shards, so every rank takes the same steps
        return perm[:usable][self.rank::self.world].tolist()

    def next_batch(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.cursor >= len(self._shard):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._shard = self._make_shard()
            take = self._shard[self.cursor:self.cursor + self.batch_size - len(out)]
            out.extend(take)
            self.cursor += len(take)
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._shard = self._make_shard()


def arithmetic_rows(n: int, seed: int = 0, max_operand: int = 99) -> list[dict[str, str]]:
    """Small sums as prompt/response rows, for examples and smoke tests (no downloads)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"prompt": f"{a} + {b} =", "response": f" {a + b}"})
    return rows


def main() -> None:
    """python -m student_worker.data OUT.jsonl [--n 256] [--seed 0]: write arithmetic rows."""
    import argparse

    p = argparse.ArgumentParser(description="Write a small arithmetic JSONL data set.")
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(a.n, a.seed)))
    print(a.out)


if __name__ == "__main__":
    main()
