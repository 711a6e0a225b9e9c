"""Training as it runs on GPUs, checked on the CPU: mixed precision (autocast works on the CPU),
the loss normalisation over micro-batches, checkpoints a user can load, resume against the spec.

Off-policy batches (responses from the data) throughout, so runs differ only in what is tested.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from student_worker.checkpoint import CheckpointManager
from student_worker.config import JobSpec
from student_worker.trainer import Trainer, build_teacher

OFF_POLICY = {"on_policy_fraction": 0.0, "warmup_steps": 1}


class _Stop(Exception):
    pass


def _train(spec, stop_after: int | None = None) -> tuple[list[dict], Trainer]:
    seen: list[dict] = []

    def on_metrics(m: dict) -> None:
        seen.append(m)
        if m.get("step") == stop_after and m["stage"] == "distill":
            raise _Stop

    trainer = Trainer(spec, build_teacher(spec.teacher), on_metrics=on_metrics)
    trainer.setup()
    try:
        trainer.train()
    except _Stop:
        pass
    finally:
        trainer.cleanup()
    return [m for m in seen if m["stage"] == "distill"], trainer


def _floats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def _run(make_spec, tmp_path, name: str, precision: str, **distill):
    spec = make_spec(student={"precision": precision}, distill={**OFF_POLICY, **distill},
                     checkpoint={"dir": str(tmp_path / name), "every_steps": 1000}, log_every=1000)
    trainer = Trainer(spec, build_teacher(spec.teacher))
    trainer.setup()
    before = _floats(trainer.model)
    losses: list[float] = []
    trainer.on_metrics = lambda m: losses.append(m["loss"]) if m["stage"] == "distill" else None
    trainer.train()
    trainer.cleanup()
    return losses, before, _floats(trainer.model), trainer


def test_bf16_mixed_tracks_fp32_and_bf16_weights_do_not(make_spec, tmp_path):
    """200 steps at lr 1e-3: bf16-mixed stays within 3 % of the fp32 loss at every step (1.1 %
    measured), 0.02 on average (0.004 measured); bf16-true weights drift away (38 %, 0.29)."""
    runs = {p: _run(make_spec, tmp_path, p, p, steps=200, lr=1e-3) for p in ("fp32", "bf16-mixed", "bf16-true")}
    fp32 = runs["fp32"][0]
    assert fp32[-1] < fp32[0] / 3  # it learns

    def gap(precision: str) -> tuple[float, float]:
        losses = runs[precision][0]
        rel = max(abs(a - b) / b for a, b in zip(losses, fp32))
        return rel, sum(abs(a - b) for a, b in zip(losses, fp32)) / len(fp32)

    rel, mean_abs = gap("bf16-mixed")
    assert rel < 0.03 and mean_abs < 0.02, (rel, mean_abs)
    rel, mean_abs = gap("bf16-true")
    assert rel > 0.1 and mean_abs > 0.05, (rel, mean_abs)
    assert all(v.dtype == torch.float32 for v in runs["bf16-mixed"][3].model.state_dict().values())


def test_bf16_mixed_moves_every_weight_fp32_moves(make_spec, tmp_path):
    """lr 1e-5 for 10 steps: the weights fp32 changes, bf16-mixed changes too; bf16 weights
    keep most of them (updates under half a bf16 ulp round away: 8 % of fp32's moved, measured)."""
    moved = {}
    for precision in ("fp32", "bf16-mixed", "bf16-true"):
        _, before, after, _ = _run(make_spec, tmp_path, precision, precision, steps=10, lr=1e-5)
        moved[precision] = torch.cat([(after[k] != before[k]).reshape(-1) for k in before])
    assert moved["fp32"].float().mean() > 0.5
    both = (moved["bf16-mixed"] & moved["fp32"]).sum()
    assert both >= 0.99 * moved["fp32"].sum()  # (gradients exactly 0 in one run differ at the margin)
    assert moved["bf16-true"].sum() < 0.2 * moved["fp32"].sum()


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_mixed_checkpoints_hold_fp32_masters_and_resume_exactly(make_spec, tmp_path, precision):
    spec = make_spec(student={"precision": precision}, distill={**OFF_POLICY, "steps": 4},
                     checkpoint={"dir": str(tmp_path / "run"), "every_steps": 2})
    clean, _ = _train(spec)
    assert [m["step"] for m in clean] == [1, 2, 3, 4]
    if precision == "fp16-mixed":  # the gradient scaler ran, and its state is checkpointed
        assert all(m["loss_scale"] > 0 for m in clean)
        state = torch.load(tmp_path / "run" / "checkpoints" / "distill-00000002" / "state.pt", weights_only=True)
        assert state["scaler"]["scale"] > 0
    final = load_file(str(tmp_path / "run" / "checkpoints" / "done-00000000" / "model.safetensors"))
    assert {v.dtype for v in final.values()} == {torch.float32}

    spec2 = make_spec(student={"precision": precision}, distill={**OFF_POLICY, "steps": 4},
                      checkpoint={"dir": str(tmp_path / "killed"), "every_steps": 2})
    _train(spec2, stop_after=3)
    resumed, trainer = _train(spec2)
    assert trainer.resumed_from.path.name == "distill-00000002"
    assert [m["loss"] for m in resumed] == [m["loss"] for m in clean[2:]]
    again = load_file(str(tmp_path / "killed" / "checkpoints" / "done-00000000" / "model.safetensors"))
    for k in final:
        assert torch.equal(final[k], again[k]), k


def test_accumulated_micro_batches_equal_one_big_batch(make_spec, tmp_path, tiny_llama):
    """Every token of an optimizer step weighs the same: 3 micro-batches of 2 prompts make the
    update 1 batch of 6 makes, though the micro-batches hold very different token counts."""
    rows = [{"prompt": f"{i} + {i} =", "response": " " + str(i) * (1 + i % 6)} for i in range(30)]
    data = tmp_path / "uneven.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = {}
    for name, batch, accum in (("big", 6, 1), ("accum", 2, 3)):
        spec = make_spec(data={"path": str(data), "eval_fraction": 0.0},
                         distill={**OFF_POLICY, "steps": 3, "batch_size": batch, "grad_accum": accum,
                                  "grad_clip": 0.0, "lr": 1e-3},
                         checkpoint={"dir": str(tmp_path / name), "every_steps": 1000})
        metrics, trainer = _train(spec)
        result[name] = (metrics, _floats(trainer.model))
    assert [m["tokens"] for m in result["big"][0]] == [m["tokens"] for m in result["accum"][0]]
    for k, v in result["big"][1].items():
        torch.testing.assert_close(result["accum"][1][k], v, rtol=1e-5, atol=1e-6)
    for a, b in zip(result["big"][0], result["accum"][0]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_checkpoints_load_with_auto_classes_and_are_world_readable(make_spec, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    old = os.umask(0o077)  # a strict umask, as some clusters set: the files are still 0644
    try:
        _train(make_spec(distill={**OFF_POLICY, "steps": 2}))
    finally:
        os.umask(old)
    run_dir = make_spec().checkpoint.dir
    for ref in CheckpointManager(run_dir).list():
        model = AutoModelForCausalLM.from_pretrained(str(ref.path))
        tokenizer = AutoTokenizer.from_pretrained(str(ref.path))
        assert tokenizer("7 + 8 =")["input_ids"] and model.config.vocab_size >= len(tokenizer)
        assert (ref.path / "generation_config.json").is_file()
        assert stat.S_IMODE(ref.path.stat().st_mode) == 0o755
        for f in ref.path.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert stat.S_IMODE((tmp_path / "run" / "summary.json").stat().st_mode) == 0o644


def test_resume_refuses_a_spec_that_changes_the_run_and_notes_harmless_changes(make_spec, tmp_path):
    base = dict(distill={**OFF_POLICY, "steps": 4}, checkpoint={"every_steps": 2})
    _train(make_spec(**base), stop_after=3)
    changed = make_spec(distill={**OFF_POLICY, "steps": 4, "lr": 5e-4, "loss": "rkl"},
                        checkpoint={"every_steps": 2}, seed=3)
    with pytest.raises(ValueError) as err:
        Trainer(changed, build_teacher(changed.teacher)).setup()
    message = str(err.value)
    for field in ("distill.lr", "distill.loss", "seed"):
        assert field in message
    assert "checkpoint.dir" in message  # what to do instead

    harmless = make_spec(**base, log_every=2, eval={"every_steps": 3})
    metrics, trainer = _train(harmless)
    assert [m["step"] for m in metrics] == [3, 4]
    assert any("log_every" in n for n in trainer.resume_notes)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert any("eval.every_steps" in n for n in summary["resume_changes"])


def test_spec_refuses_degenerate_and_replaced_settings(make_spec):
    doc = json.loads(make_spec().to_json())
    with pytest.raises(ValidationError, match="alpha"):
        JobSpec.model_validate({**doc, "distill": {**doc["distill"], "loss": "skew_fkl", "alpha": 1.0}})
    with pytest.raises(ValidationError, match="student.precision"):
        JobSpec.model_validate({**doc, "student": {"model": doc["student"]["model"], "dtype": "bfloat16"}})
    with pytest.raises(ValidationError, match="bf16-mixed"):
        JobSpec.model_validate({**doc, "student": {**doc["student"], "precision": "fp16-mixed"},
                                "resources": {"strategy": "fsdp"}})


def test_a_finished_run_is_never_overwritten(make_spec, tmp_path):
    """Re-running a finished run: the same spec says so and leaves every file as it was; a changed
    one (more steps) is refused with the field named, before anything is written."""
    spec = make_spec(distill={**OFF_POLICY, "steps": 2}, eval={"enabled": True})
    _train(spec)
    run_dir = tmp_path / "run"
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert json.loads((run_dir / "summary.json").read_text())["eval"]["student"]["n"] > 0

    trainer = Trainer(spec, build_teacher(spec.teacher))
    trainer.setup()
    summary = trainer.train()
    assert summary["already_finished"] and summary["eval"] == json.loads(files[run_dir / "summary.json"])["eval"]
    more = make_spec(distill={**OFF_POLICY, "steps": 5}, eval={"enabled": True})
    with pytest.raises(ValueError, match=r"distill.steps: 2 -> 5"):
        Trainer(more, build_teacher(more.teacher)).setup()
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files


def test_an_in_process_teacher_ignores_the_students_autocast(tiny_llama):
    """Eval of a bf16-mixed student with `local_model` runs the teacher inside the student's
    autocast: the teacher's answers must stay what it serves (its own dtype)."""
    from teacher_server.in_process import LocalTeacher

    teacher = LocalTeacher.from_model_dir(str(tiny_llama))
    seqs = [torch.tensor([1, 2, 3, 4, 5, 6])]
    plain = teacher.score(seqs, [2], top_k=4)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = teacher.score(seqs, [2], top_k=4)[0]
    assert torch.equal(plain.token_logprobs, mixed.token_logprobs)
    assert torch.equal(plain.topk_logprobs, mixed.topk_logprobs)
