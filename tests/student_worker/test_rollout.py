"""One rollout's tensors: the teacher's answer and the student's logits land on the same response
positions, checked against each sequence run alone and unpadded; collate's padding; seeded
sampling; the mismatch metrics of two identical models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from student_worker.losses import DenseTeacher, SparseTeacher, token_divergence
from student_worker.rollout import collate, mismatch_metrics, sample_responses, score_batch, student_logits
from teacher_server.contract import ScoredSequence
from teacher_server.in_process import LocalTeacher

PAD = 0
# Prompts and responses of different lengths, so the batch is padded on both.
PROMPTS = [torch.tensor([5, 17, 42, 9]), torch.tensor([7, 3]), torch.tensor([11, 12, 13, 14, 15, 16])]
RESPONSES = [torch.tensor([20, 21, 22]), torch.tensor([30, 31, 32, 33, 34]), torch.tensor([40])]


@pytest.fixture(scope="module")
def model(tiny_llama) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def teacher(tiny_llama) -> LocalTeacher:
    return LocalTeacher.from_model_dir(str(tiny_llama))


def alone(model: torch.nn.Module, prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """[len(response), V] log-probs of each response token's position, from the sequence run by
    itself (no padding, no batch): row j is the distribution that predicts response[j]."""
    ids = torch.cat([prompt, response])[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    return logits[len(prompt) - 1:len(ids[0]) - 1].log_softmax(-1)


def test_student_logits_are_at_the_teachers_positions(model, teacher):
    batch = score_batch(teacher, PROMPTS, RESPONSES, top_k=8, temperature=1.0, full_logprobs=False, pad_id=PAD)
    with torch.no_grad():
        logits = student_logits(model, batch)
    assert logits.shape[:2] == batch.response_ids.shape == (3, 5)
    t = batch.teacher
    assert isinstance(t, SparseTeacher)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        want = alone(model, p, r)  # the same weights serve as teacher and student here
        n = len(r)
        assert batch.response_mask[i].tolist() == [True] * n + [False] * (5 - n)
        assert torch.equal(batch.response_ids[i, :n], r) and torch.equal(t.token_ids[i, :n], r)
        torch.testing.assert_close(logits[i, :n].log_softmax(-1), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t.token_logprobs[i, :n], want.gather(-1, r[:, None])[:, 0], atol=1e-5, rtol=1e-5)
        assert torch.equal(t.topk_ids[i, :n], want.topk(8, dim=-1).indices)
    # Aligned, identical models disagree nowhere: every divergence is zero on the real positions.
    for loss in ("fkl", "rkl", "jsd"):
        div = token_divergence(logits, t, batch.response_mask, loss=loss)
        assert div[batch.response_mask].abs().max() < 1e-4, loss


def test_a_shifted_alignment_would_be_caught(model, teacher):
    """The check above has teeth: the student's logits one position early are far from the teacher."""
    batch = score_batch(teacher, PROMPTS, RESPONSES, top_k=8, temperature=1.0, full_logprobs=True, pad_id=PAD)
    with torch.no_grad():
        logits = student_logits(model, batch)
    shifted = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    mask = batch.response_mask.clone()
    mask[:, 0] = False
    div = token_divergence(shifted, batch.teacher, mask, loss="fkl")
    assert div[mask].mean() > 0.1


def test_dense_rows_are_the_full_distribution_at_each_position(model, teacher):
    batch = score_batch(teacher, PROMPTS, RESPONSES, top_k=4, temperature=2.0, full_logprobs=True, pad_id=PAD)
    assert isinstance(batch.teacher, DenseTeacher)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        ids = torch.cat([p, r])[None]
        with torch.no_grad():
            want = (model(input_ids=ids).logits[0, len(p) - 1:-1] / 2.0).log_softmax(-1)  # at temperature 2
        torch.testing.assert_close(batch.teacher.logprobs[i, :len(r)], want, atol=1e-5, rtol=1e-5)


def test_collate_pads_and_lays_out_each_row():
    scored = [ScoredSequence(topk_ids=torch.tensor([[3, 4]] * len(r)), topk_logprobs=torch.full((len(r), 2), -1.0),
                             token_logprobs=torch.full((len(r),), -0.5 * (i + 1)),
                             tail_logprobs=torch.full((len(r),), -2.0))
              for i, r in enumerate(RESPONSES)]
    batch = collate(PROMPTS, RESPONSES, scored, pad_id=PAD)
    assert batch.input_ids.shape == batch.attention_mask.shape == (3, 7)  # longest prompt + response: 2 + 5
    assert batch.prompt_lens.tolist() == [4, 2, 6] and batch.num_response_tokens == 9
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        n = len(p) + len(r)
        assert torch.equal(batch.input_ids[i, :n], torch.cat([p, r])) and (batch.input_ids[i, n:] == PAD).all()
        assert batch.attention_mask[i].tolist() == [1] * n + [0] * (7 - n)
    t = batch.teacher
    assert t.token_logprobs[1].tolist() == [-1.0] * 5 and t.token_logprobs[2].tolist() == [-1.5, 0, 0, 0, 0]
    assert t.tail_logprobs[2, 1:].eq(float("-inf")).all()  # padding positions hold no mass


def test_sampling_is_seeded_and_restores_the_mode(model):
    model.train()
    try:
        kwargs = dict(max_new_tokens=6, temperature=1.0, top_p=1.0, stop_ids=[], seed=3)
        first = sample_responses(model, PROMPTS, **kwargs)
        assert model.training
        assert all(torch.equal(a, b) for a, b in zip(first, sample_responses(model, PROMPTS, **kwargs)))
        assert [len(r) for r in first] == [6, 6, 6]
        other = sample_responses(model, PROMPTS, **{**kwargs, "seed": 4})
        assert any(not torch.equal(a, b) for a, b in zip(first, other))
    finally:
        model.eval()


def test_mismatch_metrics_of_identical_models(model, teacher):
    batch = score_batch(teacher, PROMPTS, RESPONSES, top_k=8, temperature=1.0, full_logprobs=False, pad_id=PAD)
    with torch.no_grad():
        m = mismatch_metrics(student_logits(model, batch), batch)
    assert m["topk_overlap"] == pytest.approx(1.0)
    assert abs(m["fkl"]) < 1e-4 and abs(m["rkl"]) < 1e-4
    real = batch.response_mask
    assert m["teacher_logprob"] == pytest.approx(float(batch.teacher.token_logprobs[real].mean()), abs=1e-6)
    assert 0 < m["tail_mass"] < 1
