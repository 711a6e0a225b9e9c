"""Held-out evaluation: ROUGE-L and exact match against hand-computed values, batching of
`evaluate`, and greedy generators checked against a plain argmax loop and against the teacher."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from student_worker.config import DataSpec, EvalSpec
from student_worker.data import Example, encode
from student_worker.eval import (
    EvalResult,
    evaluate,
    evaluate_models,
    exact_match,
    normalize,
    rouge_l,
    student_generator,
    teacher_generator,
)
from teacher_server.in_process import LocalTeacher

PAIRS = [
    ("what is 2 + 3 =", "2 + 3 = 5."),
    ("the teacher has", "one student and two models"),
    ("seven plus eight", "equals fifteen"),
    ("the loss is", "less each step"),
    ("answer the question", "the answer is 42"),
    ("data", "more data"),
    ("sum of four and five", "nine"),
]


# ---- metrics --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pred, ref, expected", [
    ("a b c", "a b c", 1.0),
    ("a b c", "d e f", 0.0),
    ("", "", 1.0),
    ("", "a b", 0.0),
    ("a b", "", 0.0),
    ("   ", "\n", 1.0),  # whitespace only is empty
    ("c b a", "a b c", 1 / 3),  # reordered: LCS 1, P = R = 1/3
    # Lin (2004) §3.1: LCS 3 ("police the gunman"), P = R = 3/4.
    ("police kill the gunman", "police killed the gunman", 0.75),
    # ... and LCS 2 ("the gunman"), P = R = 1/2.
    ("the gunman kill police", "police killed the gunman", 0.5),
    ("a b", "a x b y z", 4 / 7),  # LCS 2: P = 1, R = 2/5, F = 2·(2/5) / (7/5)
    ("a a a", "a", 0.5),  # LCS 1: P = 1/3, R = 1, F = (2/3) / (4/3)
    ("  a\tb \n", "a b", 1.0),
])
def test_rouge_l_hand_computed(pred, ref, expected):
    assert rouge_l(pred, ref) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from("abcd"), max_size=8), st.lists(st.sampled_from("abcd"), max_size=8))
def test_rouge_l_properties(p, r):
    pred, ref = " ".join(p), " ".join(r)
    score = rouge_l(pred, ref)
    assert 0.0 <= score <= 1.0
    assert score == pytest.approx(rouge_l(ref, pred))  # F1 is symmetric
    assert rouge_l(pred, pred) == 1.0
    assert (score == 1.0) == (p == r)


def test_exact_match_normalizes_whitespace_only():
    assert normalize("  the  answer\tis\n42 ") == "the answer is 42"
    assert exact_match(" the answer  is 42\n", "the answer is 42")
    assert exact_match("", "   ")
    assert not exact_match("the answer is 42", "The answer is 42")  # case matters
    assert not exact_match("the answer is 42", "the answer is 42.")


# ---- evaluate with fake generators ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama))


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[Example]:
    spec = DataSpec(path="unused.jsonl", append_eos=True)
    return [encode(tokenizer, p, r, spec) for p, r in PAIRS]


def reference_lookup(examples: list[Example]) -> dict[tuple[int, ...], torch.Tensor]:
    return {tuple(ex.prompt_ids.tolist()): ex.response_ids for ex in examples}


def test_perfect_generator_scores_one(examples, tokenizer):
    refs = reference_lookup(examples)
    assert all(int(ex.response_ids[-1]) == tokenizer.eos_token_id for ex in examples)  # EOS is skipped
    result = evaluate(lambda prompts: [refs[tuple(p.tolist())] for p in prompts], examples, tokenizer,
                      batch_size=3, max_samples=100)
    assert (result.n, result.exact_match, result.rouge_l) == (len(examples), 1.0, 1.0)
    assert result.samples[0] == {"prompt": PAIRS[0][0], "reference": PAIRS[0][1], "prediction": PAIRS[0][1]}


def test_empty_generator_scores_zero(examples, tokenizer):
    result = evaluate(lambda prompts: [torch.empty(0, dtype=torch.long) for _ in prompts], examples,
                      tokenizer, batch_size=4, max_samples=100)
    assert (result.n, result.exact_match, result.rouge_l) == (len(examples), 0.0, 0.0)
    assert all(s["prediction"] == "" for s in result.samples)


def test_scores_are_means_over_examples(examples, tokenizer):
    refs = reference_lookup(examples)
    index = {tuple(ex.prompt_ids.tolist()): i for i, ex in enumerate(examples)}

    def every_other(prompts):
        return [refs[tuple(p.tolist())] if index[tuple(p.tolist())] % 2 == 0
                else torch.empty(0, dtype=torch.long) for p in prompts]

    result = evaluate(every_other, examples, tokenizer, batch_size=2, max_samples=4)
    assert (result.n, result.exact_match, result.rouge_l) == (4, 0.5, 0.5)


def test_batches_cover_first_max_samples_in_order(examples, tokenizer):
    seen: list[list[tuple[int, ...]]] = []

    def record(prompts):
        seen.append([tuple(p.tolist()) for p in prompts])
        return [torch.empty(0, dtype=torch.long) for _ in prompts]

    result = evaluate(record, examples, tokenizer, batch_size=2, max_samples=5, num_samples_kept=3)
    assert [len(b) for b in seen] == [2, 2, 1]
    assert [p for b in seen for p in b] == [tuple(ex.prompt_ids.tolist()) for ex in examples[:5]]
    assert result.n == 5
    assert [s["prompt"] for s in result.samples] == [p for p, _ in PAIRS[:3]]


def test_evaluate_refuses_bad_inputs(examples, tokenizer):
    with pytest.raises(ValueError, match="no eval examples"):
        evaluate(lambda ps: ps, [], tokenizer, batch_size=2, max_samples=5)
    with pytest.raises(ValueError, match="returned 1 outputs for 2 prompts"):
        evaluate(lambda ps: ps[:1], examples, tokenizer, batch_size=2, max_samples=5)


def test_as_dict_round_trips():
    r = EvalResult(n=2, exact_match=0.5, rouge_l=0.75, samples=[{"prompt": "p", "reference": "r",
                                                                  "prediction": "q"}])
    assert r.as_dict() == {"n": 2, "exact_match": 0.5, "rouge_l": 0.75,
                           "samples": [{"prompt": "p", "reference": "r", "prediction": "q"}]}


# ---- greedy generators on a tiny model ------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)


def argmax_loop(model, prompt: torch.Tensor, max_new_tokens: int, eos_id: int) -> list[int]:
    """Reference greedy decoding: a full forward pass per token, no cache, no padding."""
    ids, out = prompt.tolist(), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tok = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(tok)
            if tok == eos_id:
                break
    return out


def test_student_generator_is_greedy_and_restores_mode(model, examples, tokenizer):
    max_new, eos = 12, tokenizer.eos_token_id
    prompts = [ex.prompt_ids for ex in examples[:4]]  # different lengths: left padding is exercised
    modes: list[bool] = []
    handle = model.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    try:
        model.train()
        got = student_generator(model, max_new_tokens=max_new, eos_id=eos)(prompts)
        assert model.training and all(m.training for m in model.modules())
        assert modes and not any(modes)  # every forward ran in eval mode
        model.eval()
        student_generator(model, max_new_tokens=max_new, eos_id=eos)(prompts[:1])
        assert not model.training
    finally:
        handle.remove()
    assert len({len(p) for p in prompts}) > 1
    for p, g in zip(prompts, got):
        assert g.dtype == torch.long
        assert g.tolist() == argmax_loop(model, p, max_new, eos)


def test_teacher_generator_matches_student_on_same_weights(model, tiny_llama, examples, tokenizer):
    teacher = LocalTeacher.from_model_dir(str(tiny_llama))
    prompts = [ex.prompt_ids for ex in examples]
    kw = dict(max_new_tokens=10, eos_id=tokenizer.eos_token_id)
    s = student_generator(model, **kw)(prompts)
    t = teacher_generator(teacher, **kw)(prompts)
    assert [x.tolist() for x in s] == [x.tolist() for x in t]

    spec = EvalSpec(max_samples=5, max_new_tokens=10, batch_size=2, teacher=True)
    both = evaluate_models(model, teacher, examples, tokenizer, spec, tokenizer.eos_token_id)
    assert set(both) == {"student", "teacher"}
    assert both["student"] == both["teacher"]  # same weights, same greedy answers
    assert both["student"]["n"] == 5
    assert both["student"]["samples"][0]["prediction"] == tokenizer.decode(s[0], skip_special_tokens=True)

    no_teacher = EvalSpec(max_samples=5, max_new_tokens=10, batch_size=2, teacher=False)
    assert set(evaluate_models(model, teacher, examples, tokenizer, no_teacher, tokenizer.eos_token_id)) \
        == {"student"}
    assert set(evaluate_models(model, None, examples, tokenizer, spec, tokenizer.eos_token_id)) == {"student"}
