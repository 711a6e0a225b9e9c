"""An `eval.scorer` for the arithmetic examples: is the first number of the completion the result
the prompt asks for (`Q: 34-12+5=?`: the sum of its signed terms)? It needs no reference, so it
scores prompt-only data too.

    PYTHONPATH=examples .venv/bin/distillery train examples/prompts_scorer.yaml

Distillery calls it as f(prompt, completion, reference) for every eval row: prompt is the row's
text, or its messages up to the last user turn; reference is None for a row without one.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+")


def answer_is_sum(prompt: str | list[dict], completion: str, reference: str | None) -> float:
    question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
    terms = [int(x) for x in NUMBER.findall(question)]  # "34-12" gives 34 and -12
    answer = NUMBER.search(completion)
    return float(answer is not None and int(answer.group()) == sum(terms))


def answer_and_length(prompt: str | list[dict], completion: str, reference: str | None) -> dict[str, float]:
    """Several numbers at once: each is averaged as score/<key>."""
    return {"correct": answer_is_sum(prompt, completion, reference), "words": float(len(completion.split()))}
