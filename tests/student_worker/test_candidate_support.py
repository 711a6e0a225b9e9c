"""Student-candidate support: the teacher also scores the student's own top ids, and the sparse
losses compare the two models on teacher top-k ∪ student top-C ∪ the actual token ∪ one exact tail.

Each sparse loss here is checked against the dense divergence on the same rows (computed from full
log-prob rows, independently of the sparse code). The error reductions the test prints are the
figures docs/training.md quotes.
"""

from __future__ import annotations

import pytest
import torch

from student_worker.losses import DenseTeacher, SparseTeacher, token_divergence
from teacher_server.sampling import outside_logmass

REVERSE = ("rkl", "akl", "skew_rkl", "jsd")


def sparse_view(teacher_lp: torch.Tensor, tokens: torch.Tensor, k: int,
                candidates: torch.Tensor | None = None) -> SparseTeacher:
    """What a teacher server sends: top-k (plus the candidates' log-probs as extra slots, and the
    tail outside all of them), from full rows [B, T, V]."""
    vals, ids = teacher_lp.topk(k, dim=-1)
    if candidates is not None:
        ids = torch.cat([ids, candidates], -1)
        vals = torch.cat([vals, teacher_lp.gather(-1, candidates)], -1)
    token_lp = teacher_lp.gather(-1, tokens[..., None])[..., 0]
    return SparseTeacher(ids, vals, tokens, token_lp, outside_logmass(teacher_lp, ids, tokens))


def errors(student_logits, teacher_lp, tokens, k, c, loss):
    """|sparse - dense| mean over positions: teacher top-k alone, and with the student's top-c."""
    dense = token_divergence(student_logits, DenseTeacher(teacher_lp), loss=loss)
    student_top = student_logits.topk(c, dim=-1).indices
    alone = token_divergence(student_logits, sparse_view(teacher_lp, tokens, k), loss=loss)
    union = token_divergence(student_logits, sparse_view(teacher_lp, tokens, k, student_top), loss=loss)
    return float((alone - dense).abs().mean()), float((union - dense).abs().mean())


def test_every_id_as_a_candidate_is_the_dense_loss():
    g = torch.Generator().manual_seed(0)
    teacher_lp = torch.randn(2, 5, 40, generator=g).mul(3).log_softmax(-1)
    student = torch.randn(2, 5, 40, generator=g, requires_grad=True)
    tokens = torch.randint(0, 40, (2, 5), generator=g)
    every = torch.arange(40).expand(2, 5, 40)
    for loss in ("fkl", *REVERSE, "tvd"):
        want = token_divergence(student, DenseTeacher(teacher_lp), loss=loss)
        got = token_divergence(student, sparse_view(teacher_lp, tokens, 4, every), loss=loss)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # and its gradient
        gw, = torch.autograd.grad(want.sum(), student)
        gg, = torch.autograd.grad(got.sum(), student)
        torch.testing.assert_close(gg, gw, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sharpness", [1.0, 4.0])
def test_student_candidates_bring_reverse_losses_closer_to_dense_on_random_models(sharpness):
    # Teacher and student disagree on where their mass is: the student's head lies mostly in the
    # teacher's tail, which reverse-type losses weigh by the student's probabilities.
    g = torch.Generator().manual_seed(1)
    b, t, v, k, c = 4, 16, 256, 8, 8
    teacher_lp = (sharpness * torch.randn(b, t, v, generator=g)).log_softmax(-1)
    student = sharpness * torch.randn(b, t, v, generator=g)
    tokens = torch.randint(0, v, (b, t), generator=g)
    for loss in REVERSE:
        alone, union = errors(student, teacher_lp, tokens, k, c, loss)
        print(f"random (sharpness {sharpness}) {loss}: |sparse - dense| {alone:.4f} -> {union:.4f} "
              f"({100 * (1 - union / alone):.0f} % less)")
        assert union < alone, (loss, alone, union)


def test_student_candidates_bring_reverse_losses_closer_to_dense_on_tiny_models(tiny_llama, tiny_student):
    """Real model rows: the tiny teacher and student (random weights, one tokenizer), and a student
    that is the teacher with its output head perturbed (one that has learned most of it)."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    student = AutoModelForCausalLM.from_pretrained(str(tiny_student)).eval()
    close = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    with torch.no_grad():
        head = close.get_output_embeddings().weight
        head.add_(0.5 * head.std() * torch.randn(head.shape, generator=torch.Generator().manual_seed(2)))
    g = torch.Generator().manual_seed(3)
    v = min(teacher.config.vocab_size, student.config.vocab_size)
    ids = torch.randint(3, v, (4, 24), generator=g)
    with torch.no_grad():
        teacher_lp = teacher(ids).logits[:, :-1, :v].float().log_softmax(-1)
        rows = {"tiny student": student(ids).logits[:, :-1, :v].float(),
                "perturbed teacher": close(ids).logits[:, :-1, :v].float()}
    tokens = ids[:, 1:]
    for name, logits in rows.items():
        for loss in REVERSE:
            alone, union = errors(logits, teacher_lp, tokens, 8, 8, loss)
            print(f"{name} {loss}: |sparse - dense| {alone:.5f} -> {union:.5f} "
                  f"({100 * (1 - union / alone):.0f} % less)")
            assert union < alone, (name, loss, alone, union)


def test_a_job_with_student_candidates_sends_them_and_trains(make_spec):
    """On-policy (candidates from the sampler) and data (one no-grad forward) batches alike: the
    teacher is asked about [len(response), C] ids per row, every id the student's."""
    from student_worker.trainer import Trainer, build_teacher

    spec = make_spec(teacher={"student_candidates": 4},
                     distill={"loss": "rkl", "steps": 3, "grad_accum": 2, "on_policy_fraction": 0.5,
                              "top_k": 4})
    teacher = build_teacher(spec.teacher)
    seen = []
    score = teacher.score

    def spy(sequences, score_from, **kw):
        seen.append((sequences, score_from, kw.get("candidates")))
        return score(sequences, score_from, **kw)

    teacher.score = spy
    metrics = []
    trainer = Trainer(spec, teacher, on_metrics=metrics.append)
    trainer.setup()
    try:
        trainer.train()
        vocab = trainer.student.vocab_size
    finally:
        trainer.cleanup()
    distill = [m for m in metrics if m["stage"] == "distill"]
    assert len(distill) == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in distill)
    sampled = sum(2 * m["on_policy_fraction"] for m in distill)
    assert 0 < sampled < 6 and len(seen) >= 6  # both kinds of micro-batch ran (sampled ones in groups)
    for sequences, score_from, cands in seen:
        assert cands is not None and len(cands) == len(sequences)
        for s, f, c in zip(sequences, score_from, cands):
            assert tuple(c.shape) == (len(s) - f, 4) and int(c.max()) < vocab


def test_a_teacher_that_scores_no_candidates_is_refused_before_training(make_spec):
    import dataclasses

    from student_worker.trainer import Trainer, build_teacher
    from teacher_server.contract import TeacherMismatch

    spec = make_spec(teacher={"student_candidates": 4})
    teacher = build_teacher(spec.teacher)
    info = teacher.info()
    teacher.info = lambda: dataclasses.replace(info, max_candidates=0, engine="vllm 0.32.0")
    trainer = Trainer(spec, teacher)
    with pytest.raises(TeacherMismatch, match="student_candidates is 4.*at most 0"):
        trainer.setup()
    trainer.cleanup()
