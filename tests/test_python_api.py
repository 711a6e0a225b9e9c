"""examples/python_api.py runs as docs/python-api.md shows it: a spec built in Python, run in this
process on tiny local models (2 KD steps), its metrics, summary and TensorBoard files, and the
student loaded back from the final checkpoint. (The service half, --api-url, is exercised by
tests/services/test_sdk.py against the API with a real Redis.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services import sdk
from services.demo.task import make_rows

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "python_api.py"


def load_example():
    spec = importlib.util.spec_from_file_location("python_api_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_in_process_and_loads_the_student(tiny_llama, tiny_student, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(40, seed=0, digits=2)))
    report = load_example().main(["--workdir", str(tmp_path / "work"), "--teacher", str(tiny_llama),
                                  "--student", str(tiny_student), "--data", str(data), "--steps", "2"])
    out = capsys.readouterr().out
    assert "distill step 2: loss" in out and "student: 12+30 = " in out
    run_dir = Path(report["run_dir"])
    assert run_dir == tmp_path / "work" / "run" and len(report["losses"]) == 2
    assert Path(report["checkpoint"]) == run_dir / "checkpoints" / "done-00000000"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "done" and summary["eval"]["student"]["n"] == 4
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # the default tracker

    model, tokenizer = sdk.load_student(run_dir)  # a run directory names its final checkpoint
    saved = load_file(str(Path(report["checkpoint"]) / "model.safetensors"))
    trained = model.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in saved.items())
    initial = load_file(str(tiny_student / "model.safetensors"))
    assert any(not torch.equal(initial[k], v) for k, v in saved.items())  # it did train
    assert not model.training and tokenizer("1 + 1 =")["input_ids"]


def test_make_spec_merges_sections_into_a_base(tmp_path):
    base = tmp_path / "job.yaml"
    base.write_text("student: {model: s}\nteacher: {local_model: t}\ndata: {path: d.jsonl, eval_fraction: 0.2}\n"
                    "distill: {loss: rkl, steps: 10}\n")
    spec = sdk.make_spec(base, distill={"steps": 3}, data={"max_prompt_tokens": 8}, name="nb")
    assert (spec.distill.loss, spec.distill.steps, spec.name) == ("rkl", 3, "nb")
    assert (spec.data.eval_fraction, spec.data.max_prompt_tokens) == (0.2, 8)
    assert sdk.make_spec(spec, seed=5).seed == 5 and spec.seed == 0
    with pytest.raises(ValueError, match="distill.steps"):
        sdk.make_spec(spec, distill={"steps": 0})


def test_load_student_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no intact checkpoint"):
        sdk.load_student(tmp_path)
