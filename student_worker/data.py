"""Training data: rows from JSONL, Parquet or `datasets`, tokenized once, served in a deterministic order.

    check_data(spec)                                  # before anything loads: sources, fields, references
    train, evals = load_splits(spec.data, tokenizer)  # Example lists

A row is plain (`prompt_field` text, optional `response_field` reference) or conversational
(`messages_field`: [{role, content}, ...]; also a `prompt_field` holding messages): its prompt is
every turn up to the last user turn, rendered with the student's chat template and its generation
prompt, and the assistant turn after it, if any, is the reference. Rows without a reference are
prompts only; what needs references (off-policy data batches, exact match and ROUGE-L) refuses a
data set without them in `check_data`, naming the field. Sources: `sources.py`; templates and the
teacher's: `chat.py`.

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
from typing import Any

import torch

from .chat import Message, has_template, render, split_messages, teacher_template
from .config import DataSpec, JobSpec
from .sources import DataError, check_source, read_source
from . import sources

__all__ = ["DataError", "Example", "ShardedOrder", "check_data", "encode", "load_splits", "read_jsonl"]


@dataclass(frozen=True)
class Example:
    prompt: str | list[Message]  # the row's prompt: text, or the messages up to the last user turn
    response: str | None  # the reference, or None for a prompt-only row
    prompt_ids: torch.Tensor  # int64 [P]
    response_ids: torch.Tensor | None  # int64 [R]; None without a reference
    where: str = ""  # the row, for messages: file:line or "path [split] row i"


@dataclass(frozen=True)
class Row:
    where: str
    prompt: str | list[Message]
    response: str | None


def parse_row(where: str, obj: dict[str, Any], spec: DataSpec) -> Row:
    messages = obj.get(spec.messages_field)
    if messages is None and isinstance(obj.get(spec.prompt_field), list):  # a prompt given as messages
        messages = obj[spec.prompt_field]
    if messages is not None:
        prompt, reference = split_messages(messages, where)
        response = obj.get(spec.response_field)
        if isinstance(response, list):  # a completion given as messages: its first turn
            response = response[0].get("content") if response and isinstance(response[0], dict) else None
        if response is not None and not isinstance(response, str):
            raise DataError(f"{where}: field {spec.response_field!r} is not a string")
        return Row(where, prompt, response if response is not None else reference)
    prompt, response = obj.get(spec.prompt_field), obj.get(spec.response_field)
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field {spec.prompt_field!r} (data.prompt_field) missing or not a string, and no "
                        f"{spec.messages_field!r} (data.messages_field)")
    if response is not None and not isinstance(response, str):
        raise DataError(f"{where}: field {spec.response_field!r} (data.response_field) is not a string")
    return Row(where, prompt, response)


def read_jsonl(path: str | Path, prompt_field: str, response_field: str) -> list[tuple[str, str]]:
    """(prompt, response) pairs of a JSONL file whose every row has both, as strings."""
    pairs = []
    for where, obj in sources.read_jsonl(path):
        for key in (prompt_field, response_field):
            if not isinstance(obj.get(key), str):
                raise DataError(f"{where}: field {key!r} missing or not a string")
        pairs.append((obj[prompt_field], obj[response_field]))
    if not pairs:
        raise DataError(f"{path} holds no examples")
    return pairs


def _read(spec: DataSpec, field: str, path: str, split: str | None) -> list[Row]:
    rows = [parse_row(where, obj, spec) for where, obj in read_source(spec, path, split)]
    if not rows:
        raise DataError(f"{field}: {path}{f' [{split}]' if split else ''} holds no rows")
    return rows


def _read_splits(spec: DataSpec) -> tuple[list[Row], list[Row]]:
    rows = _read(spec, "data.path", spec.path, spec.split)
    if spec.eval_split is not None:
        return rows, _read(spec, "data.eval_split", spec.path, spec.eval_split)
    if spec.eval_path is not None:
        return rows, _read(spec, "data.eval_path", spec.eval_path, None)
    order = list(range(len(rows)))
    random.Random(spec.split_seed).shuffle(order)
    held = set(order[:int(len(rows) * spec.eval_fraction)])
    train = [r for i, r in enumerate(rows) if i not in held]
    if not train:
        raise DataError(f"{spec.path}: nothing left to train on after holding out the eval split")
    return train, [rows[i] for i in sorted(held)]


# The rows check_data read, kept for the load_splits that follows it (one read of the data per job).
_checked: dict[str, tuple[list[Row], list[Row]]] = {}


def _key(spec: DataSpec) -> str:
    stamps = [(p, s.st_mtime_ns, s.st_size) for p in (spec.path, spec.eval_path) if p and Path(p).is_file()
              for s in (Path(p).stat(),)]
    return spec.model_dump_json() + json.dumps(stamps)


def read_splits(spec: DataSpec, *, keep: bool = False) -> tuple[list[Row], list[Row]]:
    """(train, eval) rows; eval is `eval_split`, else `eval_path`, else an `eval_fraction` of `path`
    chosen with `split_seed` (not the job's seed: runs of several seeds are then scored on the same
    rows). `keep` holds them for the next call (check_data, then load_splits)."""
    key = _key(spec)
    rows = _checked.pop(key, None) or _read_splits(spec)
    _checked.clear()
    if keep:
        _checked[key] = rows
    return rows


def check_data(spec: JobSpec) -> None:
    """Check the job's data before anything loads, naming the spec field at fault: the sources, the
    rows' fields, and references wherever the job needs them (off-policy data batches; exact match
    and ROUGE-L when no eval.scorer replaces them); also the teacher's chat template where it must
    be named (chat.teacher_template)."""
    d = spec.data
    check_source(d, "data.path", d.path)
    if d.eval_path is not None:
        check_source(d, "data.eval_path", d.eval_path)
    train, evals = read_splits(d, keep=True)
    ref = (f"a {d.response_field!r} field (data.response_field) or an assistant turn after the last user turn "
           f"of {d.messages_field!r} (data.messages_field)")
    dist = spec.distill
    missing = sum(r.response is None for r in train)
    if dist.on_policy_fraction < 1 and dist.off_policy_source == "data" and missing:
        raise DataError(
            f"distill.on_policy_fraction {dist.on_policy_fraction} < 1 with off_policy_source data trains on the "
            f"data's reference responses, but {missing} of {len(train)} training rows have none ({ref}; first: "
            f"{next(r.where for r in train if r.response is None)}). Give every row a reference, or set "
            f"distill.on_policy_fraction 1 or distill.off_policy_source teacher")
    scored = evals[:spec.eval.max_samples]
    missing = sum(r.response is None for r in scored)
    if spec.eval.enabled and spec.eval.scorer is None and missing:
        raise DataError(
            f"eval scores exact match and ROUGE-L against references, but {missing} of the {len(scored)} eval rows "
            f"have none ({ref}; first: {next(r.where for r in scored if r.response is None)}). Add references, "
            f"set eval.scorer, or set eval.enabled false")
    if any(isinstance(r.prompt, list) for r in train + evals) or d.chat_template:
        teacher_template(spec)  # a served teacher's template must be named


def encode(tokenizer, prompt: str | list[Message], response: str | None, spec: DataSpec, where: str = "") -> Example:
    if isinstance(prompt, list) or spec.chat_template:
        # Rendered to text, then encoded without adding special tokens (the template writes its
        # own): the same ids whatever apply_chat_template(tokenize=True) returns in this version.
        prompt_ids = tokenizer(render(tokenizer, prompt), add_special_tokens=False).input_ids
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
    prompt_ids = prompt_ids[-spec.max_prompt_tokens:]
    if not prompt_ids:
        raise DataError(f"{where or 'a row'}: the prompt {str(prompt)[:40]!r} encodes to no tokens")
    response_ids = None
    if response is not None:
        ids = tokenizer(response, add_special_tokens=False).input_ids[:spec.max_response_tokens]
        if spec.append_eos and tokenizer.eos_token_id is not None:
            ids = ids[:spec.max_response_tokens - 1] + [tokenizer.eos_token_id]
        response_ids = torch.tensor(ids, dtype=torch.long)
    return Example(prompt, response, torch.tensor(prompt_ids, dtype=torch.long), response_ids, where)


def load_splits(spec: DataSpec, tokenizer) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples of `read_splits`, tokenized."""
    train, evals = read_splits(spec)
    templated = spec.chat_template or any(isinstance(r.prompt, list) for r in train + evals)
    if templated and not has_template(tokenizer):
        why = "data.chat_template is set" if spec.chat_template else "the data has conversational rows"
        raise DataError(f"{why}, but the student's tokenizer has no chat template: save one with it "
                        f"(chat_template.jinja beside tokenizer_config.json)")
    return ([encode(tokenizer, r.prompt, r.response, spec, r.where) for r in train],
            [encode(tokenizer, r.prompt, r.response, spec, r.where) for r in evals])


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

