"""The `distillery` command: help texts, and a clear refusal of a model without safetensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import app

runner = CliRunner()


def test_top_level_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "teacher" in result.output
    assert "distillation" in result.output.lower()


def test_teacher_serve_help():
    result = runner.invoke(app, ["teacher", "serve", "--help"])
    assert result.exit_code == 0, result.output
    for flag in ("--model", "--port", "--max-batch-requests", "--max-queue", "--token", "--metrics-port"):
        assert flag in result.output


def test_console_script_help():
    exe = Path(sys.executable).with_name("distillery")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "services.cli"]
    run = subprocess.run([*cmd, "teacher", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "serve" in run.stdout


@pytest.mark.slow
def test_serve_refuses_a_model_without_safetensors(tmp_path, tiny_llama):
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_bytes((tiny_llama / "config.json").read_bytes())
    (model / "pytorch_model.bin").write_bytes(b"not loaded")
    run = subprocess.run(
        [sys.executable, "-m", "services.cli", "teacher", "serve", "--model", str(model), "--port", "0",
         "--drain-delay-s", "0", "--grace-s", "1"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert "safetensors" in out and str(model) in out


def test_serve_engine_choices_are_checked_before_anything_loads(tiny_llama):
    import importlib.util

    serve = ["teacher", "serve", "--model", str(tiny_llama), "--port", "0"]
    result = runner.invoke(app, [*serve, "--engine", "tensorrt"])
    assert result.exit_code == 2 and "--engine must be transformers or vllm" in result.output
    result = runner.invoke(app, [*serve, "--engine", "vllm", "--device", "cuda:1"])
    assert result.exit_code == 2 and "--device: not with --engine vllm" in result.output
    if importlib.util.find_spec("vllm") is None:
        result = runner.invoke(app, [*serve, "--engine", "vllm"])
        assert result.exit_code == 2 and "pip install 'distillery[vllm]'" in result.output
