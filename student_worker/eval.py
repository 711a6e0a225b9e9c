"""Held-out evaluation: greedy decoding scored against the references, and by a user's scorer.

    results = evaluate_models(student, teacher, eval_examples, tokenizer, spec.eval, eos_id)
    # {"student": {"n": 64, "exact_match": 0.12, "rouge_l": 0.47, "score": 0.3, "samples": [...]},
    #  "teacher": {...}}

Decoding is greedy (temperature 0) through the same sampling loop as rollouts and the teacher
server, so student and teacher answers differ only by their weights. Predictions are decoded
with `skip_special_tokens=True` and compared to the reference *text* (`Example.response`), so
the EOS that ends a reference's ids never counts against a prediction. Exact match and ROUGE-L
are None when an eval row has no reference (data.check_data allows that only with a scorer).

`eval.scorer` ("module:function") is called as f(prompt, completion, reference) per example:
prompt is the row's prompt (text, or its messages up to the last user turn), completion the
decoded prediction, reference the reference text or None. It returns a float (averaged as
`score`) or a dict of floats (each averaged as `score/<key>`); anything else, or an exception,
fails the eval with a ScorerError naming the function and the row.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from teacher_server.contract import SamplingParams, Teacher
from teacher_server.sampling import generate

from .config import EvalSpec
from .data import Example

GenerateFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]
Scorer = Callable[[Any, str, "str | None"], "float | dict[str, float]"]


class ScorerError(ValueError):
    """eval.scorer cannot be imported, raised, or returned something other than numbers."""


def load_scorer(path: str) -> Scorer:
    """The function `path` ("package.module:function") names, imported."""
    module_name, _, name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the module's own import-time errors too
        raise ScorerError(f"eval.scorer {path}: cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ScorerError(f"eval.scorer {path}: {module_name} has no function {name!r}")
    return fn


def _score(scorer: Scorer, name: str, ex: Example, pred: str) -> dict[str, float]:
    """One call of the scorer, as metric name -> value."""
    try:
        value = scorer(ex.prompt, pred, ex.response)
    except Exception as exc:
        raise ScorerError(f"eval.scorer {name} raised {type(exc).__name__}: {exc} (on {ex.where or 'an eval row'})") \
            from exc
    items = value.items() if isinstance(value, dict) else [(None, value)]
    out = {}
    for key, v in items:
        if not isinstance(v, (int, float)) or not math.isfinite(v):  # a bool counts as 0 or 1
            raise ScorerError(f"eval.scorer {name} returned {v!r}{f' for {key!r}' if key is not None else ''} on "
                              f"{ex.where or 'an eval row'}: it must return a finite float or a dict of them")
        out["score" if key is None else f"score/{key}"] = float(v)
    return out


def normalize(text: str) -> str:
    """Leading/trailing whitespace dropped and every inner run of whitespace made one space."""
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> bool:
    return normalize(pred) == normalize(ref)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence; O(len(a)·len(b)) time, O(len(b)) memory."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 on whitespace tokens (Lin 2004, §3.1, with β = 1).

    P = LCS / len(pred), R = LCS / len(ref), F = 2PR / (P + R), with LCS the length of the longest
    common subsequence of the two token lists. Both empty gives 1.0; exactly one empty gives 0.0.
    """
    p, r = pred.split(), ref.split()
    if not p and not r:
        return 1.0
    lcs = _lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


@dataclass
class EvalResult:
    n: int  # examples scored
    exact_match: float | None  # mean over examples, in [0, 1]; None when a row has no reference
    rouge_l: float | None  # mean ROUGE-L F1 over examples, in [0, 1]; None likewise
    scores: dict[str, float] = field(default_factory=dict)  # the scorer's means: score or score/<key>
    samples: list[dict[str, Any]] = field(default_factory=list)  # first few {prompt, reference, prediction}

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "exact_match": self.exact_match, "rouge_l": self.rouge_l, **self.scores,
                "samples": [dict(s) for s in self.samples]}


def evaluate(generate_fn: GenerateFn, examples: Sequence[Example], tokenizer, *, batch_size: int,
             max_samples: int, num_samples_kept: int = 4, scorer: str | None = None) -> EvalResult:
    """Decode the first `max_samples` examples' prompts in batches and score them.

    `generate_fn` maps a batch of prompt ids (int64 [P] each) to the generated ids of each
    prompt (int64 [n] each, prompt excluded). The first `num_samples_kept` predictions are kept
    as samples for a human to read. `scorer` is an eval.scorer path (module docstring).
    """
    if batch_size < 1 or max_samples < 1:
        raise ValueError(f"batch_size and max_samples must be >= 1, got {batch_size} and {max_samples}")
    chosen = list(examples[:max_samples])
    if not chosen:
        raise ValueError("no eval examples to evaluate")
    referenced = all(ex.response is not None for ex in chosen)
    fn = load_scorer(scorer) if scorer is not None else None
    em_total, rouge_total, totals, samples = 0.0, 0.0, {}, []
    for start in range(0, len(chosen), batch_size):
        batch = chosen[start:start + batch_size]
        outputs = generate_fn([ex.prompt_ids for ex in batch])
        if len(outputs) != len(batch):
            raise ValueError(f"generate_fn returned {len(outputs)} outputs for {len(batch)} prompts")
        for ex, ids in zip(batch, outputs):
            pred = tokenizer.decode(torch.as_tensor(ids).tolist(), skip_special_tokens=True)
            if referenced:
                em_total += exact_match(pred, ex.response)
                rouge_total += rouge_l(pred, ex.response)
            sample: dict[str, Any] = {"prompt": ex.prompt, "reference": ex.response, "prediction": pred}
            if fn is not None:
                scores = _score(fn, scorer, ex, pred)
                if totals and scores.keys() != totals.keys():
                    raise ScorerError(f"eval.scorer {scorer} returned {sorted(scores)} on {ex.where or 'an eval row'} "
                                      f"but {sorted(totals)} before: it must return the same keys every time")
                totals = {k: totals.get(k, 0.0) + v for k, v in scores.items()}
                sample["scores"] = scores
            if len(samples) < num_samples_kept:
                samples.append(sample)
    n = len(chosen)
    return EvalResult(n=n, exact_match=em_total / n if referenced else None,
                      rouge_l=rouge_total / n if referenced else None,
                      scores={k: v / n for k, v in totals.items()}, samples=samples)


def _greedy(max_new_tokens: int, eos_id: int | None) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                          stop_ids=() if eos_id is None else (eos_id,))


def student_generator(model: torch.nn.Module, *, max_new_tokens: int, eos_id: int | None) -> GenerateFn:
    """Greedy decoding with `model` in eval mode (dropout off); its training mode is restored after.

    `sampling.generate` runs under no_grad, so evaluation builds no autograd graph.
    """
    params = _greedy(max_new_tokens, eos_id)

    def generate_fn(prompts: list[torch.Tensor]) -> list[torch.Tensor]:
        was_training = model.training
        model.eval()
        try:
            gens = generate(model, prompts, params)
        finally:
            model.train(was_training)
        return [g.token_ids for g in gens]  # type: ignore[union-attr]  # None only when cancelled

    return generate_fn


def teacher_generator(teacher: Teacher, *, max_new_tokens: int, eos_id: int | None) -> GenerateFn:
    """Greedy decoding by the teacher, served or in-process, through the `Teacher` contract."""
    params = _greedy(max_new_tokens, eos_id)

    def generate_fn(prompts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [g.token_ids for g in teacher.generate(prompts, params)]

    return generate_fn


def evaluate_models(student: torch.nn.Module, teacher: Teacher | None, examples: Sequence[Example],
                    tokenizer, spec: EvalSpec, eos_id: int | None) -> dict[str, dict[str, Any]]:
    """{"student": EvalResult.as_dict(), "teacher": ...} on the same examples.

    The teacher is evaluated only when `spec.teacher` is set and a teacher is given.
    """
    gens: dict[str, GenerateFn] = {
        "student": student_generator(student, max_new_tokens=spec.max_new_tokens, eos_id=eos_id)}
    if spec.teacher and teacher is not None:
        gens["teacher"] = teacher_generator(teacher, max_new_tokens=spec.max_new_tokens, eos_id=eos_id)
    return {name: evaluate(fn, examples, tokenizer, batch_size=spec.batch_size,
                           max_samples=spec.max_samples, scorer=spec.scorer).as_dict()
            for name, fn in gens.items()}
