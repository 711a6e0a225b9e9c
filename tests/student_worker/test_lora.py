"""LoRA students: only the adapters train and are saved, the DPO reference is the base with the
adapters off, an interrupted run resumes exactly, and a run exports as one merged model."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import student_worker.warmup as warmup_mod
from services.cli import app
from student_worker.checkpoint import CheckpointManager
from student_worker.config import JobSpec
from student_worker.models import load_student
from student_worker.trainer import Trainer, build_teacher

LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "dropout": 0.1}
COMMON = dict(warmup={"enabled": True, "steps": 2},
              distill={"steps": 4, "on_policy_fraction": 0.5, "lr": 1e-2})


class _Stop(Exception):
    pass


def run(spec, on_metrics=None):
    trainer = Trainer(spec, build_teacher(spec.teacher), on_metrics=on_metrics)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer


def lora_spec(make_spec, run_dir, **extra):
    return make_spec(student={"lora": LORA, **extra}, checkpoint={"dir": str(run_dir), "every_steps": 2}, **COMMON)


@pytest.fixture(scope="module")
def lora_run(make_spec_module, tiny_student, tmp_path_factory):
    """One uninterrupted LoRA run with warmup, watched: what the DPO reference computes, and
    whether a second copy of the student was made for it."""
    run_dir = tmp_path_factory.mktemp("lora") / "clean"
    spec = lora_spec(make_spec_module, run_dir)
    base = load_student(tiny_student, "fp32", "cpu").eval()
    ids = torch.arange(3, 20)[None]
    checks, real = [], warmup_mod.preference_loss

    def watched(policy, reference, batch, spec, *, pad_id, reference_context):
        # Looking must not change the run: no dropout (eval mode), the global RNG left as it was.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            policy.eval()
            with reference_context():
                as_reference = reference(input_ids=ids).logits
            as_policy = policy(input_ids=ids).logits
            policy.train()
        checks.append({"same_module": reference is policy, "reference": as_reference, "policy": as_policy})
        return real(policy, reference, batch, spec, pad_id=pad_id, reference_context=reference_context)

    def no_copy(model):
        raise AssertionError("a LoRA student's reference must not be a copy")

    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(warmup_mod, "preference_loss", watched)
        mp.setattr(warmup_mod, "frozen_copy", no_copy)
        trainer = run(spec, on_metrics=seen.append)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    return {"spec": spec, "trainer": trainer, "seen": seen, "checks": checks, "base_logits": base_logits,
            "run_dir": run_dir}


def test_only_the_adapters_train_and_only_they_are_checkpointed(lora_run, tiny_student):
    trainer, spec = lora_run["trainer"], lora_run["spec"]
    assert [m["step"] for m in lora_run["seen"] if m["stage"] == "distill"] == [1, 2, 3, 4]
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(trained)
    # The base is untouched; the adapters moved (B starts at zero).
    original = load_file(str(tiny_student / "model.safetensors"))
    state = {n.replace(".base_layer", ""): p for n, p in trainer.model.state_dict().items() if "lora_" not in n}
    assert original.keys() <= state.keys()
    assert all(torch.equal(original[k], state[k]) for k in original)
    assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)

    ckpt = CheckpointManager(spec.checkpoint.dir).latest_valid().path
    files = {f.name for f in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "state.pt", "spec.json"} <= files
    assert "model.safetensors" not in files and "README.md" not in files
    size = (ckpt / "adapter_model.safetensors").stat().st_size
    assert size < (tiny_student / "model.safetensors").stat().st_size / 20
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == spec.student.model
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.1)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_the_dpo_reference_is_the_base_with_the_adapters_off(lora_run):
    checks = lora_run["checks"]
    assert len(checks) == 2 and all(c["same_module"] for c in checks)  # no second copy in memory
    for c in checks:
        assert torch.allclose(c["reference"], lora_run["base_logits"], atol=1e-6)
    # By the second warmup step the adapters have moved the policy, not the reference.
    assert not torch.allclose(checks[1]["policy"], lora_run["base_logits"], atol=1e-4)


def test_an_interrupted_lora_run_resumes_exactly(lora_run, make_spec, tmp_path):
    spec = lora_spec(make_spec, tmp_path / "killed")
    first = []

    def crash_at_step_3(m):
        first.append(m)
        if m["stage"] == "distill" and m["step"] == 3:
            raise _Stop

    with pytest.raises(_Stop):
        run(spec, on_metrics=crash_at_step_3)
    resumed = []
    trainer = run(spec, on_metrics=resumed.append)
    assert trainer.resumed_from.path.name == "distill-00000002"
    assert [m["step"] for m in resumed] == [3, 4]
    clean = {(m["stage"], m["step"]): m["loss"] for m in lora_run["seen"] if "loss" in m}
    for m in first[:-1] + resumed:
        if "loss" in m:
            assert m["loss"] == clean[(m["stage"], m["step"])], (m["stage"], m["step"])
    done = "checkpoints/done-00000000/adapter_model.safetensors"
    a, b = load_file(str(lora_run["run_dir"] / done)), load_file(str(tmp_path / "killed" / done))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_merged_folds_the_adapters_into_one_model(lora_run, make_spec, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["export-merged", str(lora_run["run_dir"]), str(out)])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in out.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any("lora" in k for k in merged.state_dict())
    ids = torch.arange(3, 30)[None]
    trainer = lora_run["trainer"]
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, trainer.model(input_ids=ids).logits, atol=1e-5)
    assert AutoTokenizer.from_pretrained(str(out))("1 + 1")["input_ids"]
    from services.sdk import load_student  # the Python API folds the adapters in memory the same way

    loaded, _ = load_student(lora_run["run_dir"])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-6)
    again = CliRunner().invoke(app, ["export-merged", str(lora_run["run_dir"]), str(out)])
    assert again.exit_code == 1 and "exists" in again.output

    # A full-weight run is already a model directory: its files are copied, the run's own left out.
    full = make_spec(distill={"steps": 1}, checkpoint={"dir": str(tmp_path / "full")})
    run(full)
    copied = tmp_path / "full-export"
    assert CliRunner().invoke(app, ["export-merged", str(tmp_path / "full"), str(copied)]).exit_code == 0
    names = {f.name for f in copied.iterdir()}
    assert "model.safetensors" in names and not names & {"state.pt", "spec.json", "manifest.json"}


def test_lora_specs_are_checked(make_spec, monkeypatch, tiny_student):
    doc = json.loads(make_spec(student={"lora": LORA}).to_json())
    with pytest.raises(ValueError, match="student.lora with resources.strategy fsdp is not supported"):
        JobSpec.model_validate({**doc, "resources": {"strategy": "fsdp"}})
    for bad in (["q_proj", "all-linear"], ["q proj"], []):
        with pytest.raises(ValueError):
            JobSpec.model_validate({**doc, "student": {**doc["student"], "lora": {"target_modules": bad}}})
    from student_worker.config import LoraSpec
    from student_worker.lora import add_adapters

    with pytest.raises(ValueError, match="student.lora.target_modules"):
        add_adapters(load_student(tiny_student, "fp32", "cpu"), LoraSpec(target_modules=["nope_proj"]), seed=0)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"distillery\[peft\]"):
        add_adapters(load_student(tiny_student, "fp32", "cpu"), LoraSpec(), seed=0)


def test_the_lora_example_is_a_valid_spec_and_starts_with_its_command():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "tiny_lora.yaml"
    spec = JobSpec.from_file(path)
    assert spec.student.lora is not None and spec.student.gradient_checkpointing
    assert "distillery train examples/tiny_lora.yaml" in path.read_text().split("\nname:")[0]
