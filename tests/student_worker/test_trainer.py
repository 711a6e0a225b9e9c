"""The single-process trainer on tiny models: stages, teachers, checkpoints, exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from student_worker.checkpoint import CheckpointManager
from student_worker.trainer import NonFiniteLoss, Trainer, build_teacher
from teacher_server.contract import TeacherMismatch
from teacher_server.in_process import LocalTeacher
from teacher_server.process import start_teacher


class _Stop(Exception):
    pass


def run(spec, teacher=None, on_metrics=None):
    trainer = Trainer(spec, teacher or build_teacher(spec.teacher), on_metrics=on_metrics)
    trainer.setup()
    try:
        summary = trainer.train()
    finally:
        trainer.cleanup()
    return trainer, summary


def weights(run_dir, name):
    return load_file(str(run_dir / "checkpoints" / name / "model.safetensors"))


def test_distill_with_local_teacher_reports_metrics_and_checkpoints(make_spec):
    spec = make_spec(distill={"loss": "akl", "steps": 4}, eval={"enabled": True})
    seen = []
    trainer, summary = run(spec, on_metrics=seen.append)
    steps = [m for m in seen if m["stage"] == "distill"]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for m in steps:
        assert torch.isfinite(torch.tensor(m["loss"])) and m["loss"] >= 0
        for key in ("tokens_per_s", "generate_s", "teacher_s", "forward_backward_s", "teacher_latency_s",
                    "teacher_logprob", "topk_overlap", "tail_mass", "fkl", "rkl"):
            assert key in m, key
        assert 0 <= m["topk_overlap"] <= 1 and 0 <= m["tail_mass"] <= 1
        assert m["on_policy_fraction"] == 1.0
    names = [r.path.name for r in CheckpointManager(spec.checkpoint.dir).list()]
    assert names == ["distill-00000002", "done-00000000"]  # every 2 steps, then the stage boundary
    ckpt = CheckpointManager(spec.checkpoint.dir).latest_valid()
    assert json.loads((ckpt.path / "spec.json").read_text()) == json.loads(spec.to_json())
    assert set(summary["eval"]) == {"student", "teacher"}
    assert 0 <= summary["eval"]["student"]["rouge_l"] <= 1


def test_off_policy_kd_lowers_the_loss_on_a_fixed_batch(make_spec):
    """Learning, not just running: with data responses, FKL on the same batch goes down."""
    spec = make_spec(distill={"steps": 30, "on_policy_fraction": 0.0, "lr": 1e-2, "batch_size": 8},
                     checkpoint={"every_steps": 100})
    seen = []
    run(spec, on_metrics=seen.append)
    losses = [m["loss"] for m in seen if m["stage"] == "distill"]
    assert all(m["on_policy_fraction"] == 0.0 for m in seen if m["stage"] == "distill")
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_seq_kd_takes_responses_from_the_teacher(make_spec):
    spec = make_spec(distill={"on_policy_fraction": 0.0, "off_policy_source": "teacher", "steps": 2})
    seen = []
    run(spec, on_metrics=seen.append)
    # The teacher's own greedy-free samples score high under the teacher compared to data text.
    assert all(m["on_policy_fraction"] == 0.0 for m in seen if m["stage"] == "distill")
    assert all(m["teacher_logprob"] > -8 for m in seen if m["stage"] == "distill")


def test_served_teacher_gives_the_same_run_as_local(make_spec, tiny_llama, tmp_path):
    server = start_teacher(tiny_llama, "--max-wait-ms", "2", log_path=tmp_path / "teacher.log")
    try:
        local_spec = make_spec(checkpoint={"dir": str(tmp_path / "local")})
        served_spec = make_spec(teacher={"endpoints": [server.endpoint], "local_model": None},
                                checkpoint={"dir": str(tmp_path / "served")})
        local_seen, served_seen = [], []
        run(local_spec, on_metrics=local_seen.append)
        run(served_spec, on_metrics=served_seen.append)
    finally:
        server.stop()
    for a, b in zip(local_seen, served_seen):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    wa, wb = weights(tmp_path / "local", "done-00000000"), weights(tmp_path / "served", "done-00000000")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_warmup_then_distill_with_stage_boundary_checkpoints(make_spec):
    spec = make_spec(warmup={"enabled": True}, distill={"steps": 2}, checkpoint={"every_steps": 100})
    seen = []
    run(spec, on_metrics=seen.append)
    events = [m for m in seen if m.get("event") == "pairs"]
    assert len(events) == 1 and events[0]["samples"] == 8 * 2
    warm = [m for m in seen if m["stage"] == "warmup" and "event" not in m]
    if events[0]["pairs"]:
        assert [m["step"] for m in warm] == [1, 2, 3]
        assert all("accuracy" in m and "reward_margin" in m for m in warm)
    names = [r.path.name for r in CheckpointManager(spec.checkpoint.dir).list()]
    assert names == ["distill-00000000", "done-00000000"]


def test_eval_points_before_after_warmup_and_during_kd_are_events_with_their_own_steps(make_spec):
    spec = make_spec(warmup={"enabled": True, "steps": 3}, distill={"steps": 4},
                     eval={"enabled": True, "teacher": False, "before": True, "after_warmup": True, "every_steps": 2})
    seen = []
    trainer, summary = run(spec, on_metrics=seen.append)
    evals = [m for m in seen if m["stage"] == "eval"]
    # before (step 0), after warmup (step 3), KD step 2 (step 5); KD step 4 is the final eval.
    assert [(m["point"], m["step"], m["distill_step"]) for m in evals] == [
        ("before", 0, 0), ("warmup", 3, 0), ("distill", 5, 2)]
    for m in evals:
        assert m["n"] == 4 and 0 <= m["exact_match"] <= 1 and 0 <= m["rouge_l"] <= 1
    # Evaluating is read-only: the final eval equals one made now, with the same weights.
    from student_worker.eval import evaluate_models

    again = evaluate_models(trainer.model, None, trainer.eval_set, trainer.tokenizer, spec.eval, trainer.eos_id)
    assert again["student"]["exact_match"] == summary["eval"]["student"]["exact_match"]
    assert summary["last"]["stage"] == "distill"


def test_eval_points_are_not_repeated_by_a_resumed_run(make_spec):
    spec = make_spec(distill={"steps": 4}, checkpoint={"every_steps": 2},
                     eval={"enabled": True, "teacher": False, "before": True, "every_steps": 1})
    first = []
    trainer = Trainer(spec, build_teacher(spec.teacher), on_metrics=first.append)
    trainer.setup()
    with pytest.raises(_Stop):
        trainer.on_metrics = lambda m: first.append(m) or (_raise() if m.get("step") == 3 and m["stage"] == "distill" else None)
        trainer.train()
    trainer.cleanup()
    resumed = []
    run(spec, on_metrics=resumed.append)
    assert [m["point"] for m in first if m["stage"] == "eval"] == ["before", "distill", "distill"]
    # Resumed from the step-2 checkpoint: no second "before"; KD step 3 again; step 4 is the final eval.
    assert [(m["point"], m["distill_step"]) for m in resumed if m["stage"] == "eval"] == [("distill", 3)]


def _raise():
    raise _Stop()


def test_resume_repeats_an_uninterrupted_run_exactly(make_spec, tmp_path):
    """R-40: kill mid-run, resume: same per-step losses, data order and final weights."""
    common = dict(warmup={"enabled": True, "steps": 2}, distill={"steps": 6, "on_policy_fraction": 0.5},
                  checkpoint={"every_steps": 2})
    clean_spec = make_spec(checkpoint={"dir": str(tmp_path / "clean"), "every_steps": 2}, **{
        k: v for k, v in common.items() if k != "checkpoint"})
    clean = []
    run(clean_spec, on_metrics=clean.append)

    spec = make_spec(checkpoint={"dir": str(tmp_path / "killed"), "every_steps": 2},
                     **{k: v for k, v in common.items() if k != "checkpoint"})
    first = []

    def crash_at_step_5(m):
        first.append(m)
        if m["stage"] == "distill" and m["step"] == 5:
            raise _Stop

    with pytest.raises(_Stop):
        run(spec, on_metrics=crash_at_step_5)
    resumed = []
    trainer, _ = run(spec, on_metrics=resumed.append)
    assert trainer.resumed_from.path.name == "distill-00000004"
    assert [m["step"] for m in resumed] == [5, 6]
    by_step = {(m["stage"], m["step"]): m["loss"] for m in clean if "loss" in m}
    for m in first[:-1] + resumed:
        if "loss" in m:
            assert m["loss"] == by_step[(m["stage"], m["step"])], (m["stage"], m["step"])
    wa, wb = weights(tmp_path / "clean", "done-00000000"), weights(tmp_path / "killed", "done-00000000")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_a_torn_or_corrupt_checkpoint_falls_back_to_the_previous_one(make_spec, tmp_path):
    """R-41 / R-42: a half-written directory is ignored; a checksum mismatch uses the one before."""
    spec = make_spec(distill={"steps": 4}, checkpoint={"every_steps": 1, "keep_last": 5})
    run(spec)
    mgr = CheckpointManager(spec.checkpoint.dir)
    assert mgr.latest_valid().path.name == "done-00000000"
    (mgr.root / ".distill-00000009.abc.tmp").mkdir()  # a crash mid-write leaves only this
    blob = mgr.root / "done-00000000" / "model.safetensors"
    blob.write_bytes(blob.read_bytes()[:-8] + b"\0" * 8)
    ref = mgr.latest_valid()
    assert ref.path.name == "distill-00000003"
    trainer = Trainer(spec, build_teacher(spec.teacher))
    trainer.setup()
    assert (trainer.stage, trainer.step) == ("distill", 3)


def test_checkpoint_state_is_never_unpickled(make_spec):
    spec = make_spec(distill={"steps": 2})
    run(spec)
    ref = CheckpointManager(spec.checkpoint.dir).latest_valid()
    state = torch.load(ref.path / "state.pt", weights_only=True)  # raises if anything needs pickle
    assert state["stage"] == "done"


def test_non_finite_losses_skip_steps_then_fail_the_run(make_spec, monkeypatch):
    """R-43: NaN losses are skipped and counted; K in a row fail with non_finite_loss, no checkpoint."""
    import student_worker.trainer as trainer_mod

    spec = make_spec(distill={"steps": 6, "max_non_finite": 3}, checkpoint={"every_steps": 1})
    real = trainer_mod.token_divergence
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if calls["n"] >= 2 else loss

    monkeypatch.setattr(trainer_mod, "token_divergence", flaky)
    seen = []
    with pytest.raises(NonFiniteLoss) as err:
        run(spec, on_metrics=seen.append)
    assert err.value.reason == "non_finite_loss"
    assert [m["skipped"] for m in seen] == [False, True, True]
    names = [r.path.name for r in CheckpointManager(spec.checkpoint.dir).list()]
    assert names == ["distill-00000001"]  # nothing written from the non-finite steps


def test_a_teacher_with_another_tokenizer_is_refused(make_spec, tmp_path):
    from services.demo.tiny import build_model

    from teacher_server.model_dirs import load_tokenizer_fingerprint

    other = build_model(tmp_path / "other", hidden=32, layers=1, heads=2, tokenizer_vocab=300)
    spec = make_spec(teacher={"local_model": str(other)})
    trainer = Trainer(spec, LocalTeacher.from_model_dir(str(other)))
    with pytest.raises(TeacherMismatch, match="tokenizers differ") as err:
        trainer.setup()
    # Both fingerprints in full (tokenizers are compared, not logit widths).
    assert load_tokenizer_fingerprint(other) in str(err.value)
    assert load_tokenizer_fingerprint(spec.student.model) in str(err.value)


def test_train_cli_runs_a_spec_file(make_spec, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from services.cli import app

    spec = make_spec(distill={"steps": 2}, eval={"enabled": True})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(json.loads(spec.to_json())))
    result = CliRunner().invoke(app, ["train", str(path), "--run-dir", str(tmp_path / "cli-run")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "cli-run" / "summary.json").read_text())
    assert summary["stage"] == "done" and "student" in summary["eval"]
    kd = summary["timing"]["distill"]
    assert kd["steps"] == 2 and kd["tokens"] > 0 and kd["wall_s"] > 0
    assert kd["tokens_per_s"] == pytest.approx(kd["tokens"] / kd["wall_s"], rel=1e-2)
    assert 0 < kd["teacher_wait_share"] < 1 and summary["timing"]["eval_wall_s"] > 0
    assert "tokens/s" in result.output and "waiting for the teacher" in result.output
    shutil.rmtree(tmp_path / "cli-run")


# ---- checks a new user meets: the field at fault is named, disabled stages do not count ----------
def test_a_disabled_stage_does_not_enter_the_teacher_length_check(make_spec):
    from student_worker.config import check_teacher_length, sequence_lengths

    # The teacher takes 64 tokens: 16 + 6 (distill) fits; warmup's 16 + 100 would not, but it is off.
    spec = make_spec(warmup={"enabled": False, "max_new_tokens": 100},
                     eval={"enabled": False, "max_new_tokens": 200})
    assert [f for f, _ in sequence_lengths(spec)] == ["data.max_prompt_tokens + distill.max_new_tokens"]
    check_teacher_length(spec, 64)
    spec = make_spec(warmup={"enabled": True, "max_new_tokens": 100})
    with pytest.raises(ValueError, match=r"data.max_prompt_tokens \+ warmup.max_new_tokens = 116") as exc:
        check_teacher_length(spec, 64)
    assert "distill" not in str(exc.value)  # only what is over the limit is named
    # Off-policy from the data set: the reference responses count, sampling does not.
    spec = make_spec(distill={"on_policy_fraction": 0.0, "max_new_tokens": 100})
    assert [f for f, _ in sequence_lengths(spec)] == ["data.max_prompt_tokens + data.max_response_tokens"]
    check_teacher_length(spec, 64)


@pytest.mark.parametrize("field, broken, message", [
    ("student", "missing", r"student.model: .*missing is not a model directory \(no config.json\)"),
    ("student", "relative/looking/path", r"student.model: relative/looking/path is not a model directory"),
    ("student", "no-tokenizer", r"student.model: .*no tokenizer files"),
    ("teacher", "missing", r"teacher.local_model: .*missing is not a model directory"),
    ("data", "missing.jsonl", r"data.path: .*missing.jsonl is not a file"),
])
def test_inputs_are_checked_before_anything_loads_naming_the_field(make_spec, tmp_path, tiny_student,
                                                                  field, broken, message):
    from student_worker.trainer import check_inputs

    if broken == "no-tokenizer":
        target = tmp_path / "no-tokenizer"
        target.mkdir()
        for f in tiny_student.iterdir():
            if f.is_file() and not f.name.startswith(("tokenizer", "special_tokens")):
                (target / f.name).write_bytes(f.read_bytes())
        broken = str(target)
    elif broken != "relative/looking/path":
        broken = str(tmp_path / broken)
    section = {"student": {"student": {"model": broken}}, "teacher": {"teacher": {"local_model": broken}},
               "data": {"data": {"path": broken}}}[field]
    spec = make_spec(**section)
    with pytest.raises(ValueError, match=message):
        check_inputs(spec)


def test_train_cli_refuses_a_mistyped_student_in_one_line_before_the_teacher_loads(make_spec, tmp_path,
                                                                                   monkeypatch):
    import yaml
    from typer.testing import CliRunner

    import student_worker.trainer as trainer_mod
    from services.cli import app

    monkeypatch.setattr(trainer_mod, "build_teacher", lambda *_: pytest.fail("the teacher was loaded"))
    spec = make_spec(student={"model": "models/studnet"})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(json.loads(spec.to_json())))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    # Shaped like a hub id too, so both readings are named; nothing is downloaded (tests are offline).
    assert "student.model: models/studnet is not a directory, nor a hub id in the hub cache" in result.output
    assert "Traceback" not in result.output and "Repo id" not in result.output


def test_runs_of_different_seeds_are_evaluated_on_the_same_rows(make_spec):
    """The held-out eval rows come from data.split_seed, not the job's seed, so a spread over seeds
    measures training, not which rows each seed happened to hold out."""
    from transformers import AutoTokenizer

    from student_worker.data import load_splits

    spec = make_spec()
    tok = AutoTokenizer.from_pretrained(spec.student.model)
    splits = [load_splits(make_spec(seed=s).data, tok) for s in (0, 1, 2)]
    evals = [[e.response for e in ev] for _, ev in splits]
    assert evals[0] == evals[1] == evals[2] and len(evals[0]) == 8
    other = load_splits(make_spec(data={"split_seed": 5}).data, tok)[1]
    assert [e.response for e in other] != evals[0]


def test_a_field_added_since_the_checkpoint_compares_as_its_default():
    from student_worker.config import JobSpec, resume_changes

    doc = {"student": {"model": "s"}, "teacher": {"local_model": "t"}, "data": {"path": "d"}}
    saved = json.loads(JobSpec.model_validate(doc).to_json())
    del saved["data"]["split_seed"]  # written before the field existed
    breaking, harmless = resume_changes(saved, JobSpec.model_validate(doc))
    assert breaking == [] and harmless == []
    changed = JobSpec.model_validate({**doc, "data": {"path": "d", "split_seed": 3}})
    breaking, _ = resume_changes(saved, changed)
    assert [c.field for c in breaking] == ["data.split_seed"]


def test_train_cli_ends_in_one_line_when_the_teacher_never_answers(make_spec, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from services.cli import app
    from teacher_server.process import free_port

    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    spec = make_spec(teacher={"local_model": None, "endpoints": [endpoint], "timeout_s": 1,
                              "unavailable_timeout_s": 1})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(json.loads(spec.to_json())))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 1, result.output
    assert f"job failed: TeacherUnavailable: teacher unavailable at {endpoint} since " in result.output
    assert "Traceback" not in result.output
