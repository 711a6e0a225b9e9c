"""The `distillery` command: help texts, a clear refusal of a model without safetensors, a light start,
one-line user errors, and defaults that are the configs' own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


# ------------------------------------------------------------------------ start-up and user errors
HEAVY = ("torch", "transformers", "ray", "grpc", "fastapi")


def closed_port_url() -> str:
    """An address where nothing listens (a port just released): connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_start_and_remote_commands_import_nothing_heavy(tmp_path):
    """`--help` and the remote commands load neither torch, transformers, Ray, gRPC nor FastAPI:
    fast to start, and usable where only the client's light dependencies are installed (README)."""
    spec = tmp_path / "job.yaml"
    spec.write_text("name: x\n")
    url = closed_port_url()
    script = f"""
import sys
from services.cli import app
for args in (["--help"], ["jobs"], ["status", "j1"], ["cancel", "j1"], ["resume", "j1"], ["logs", "j1"],
             ["logs", "j1", "--follow"], ["submit", {str(spec)!r}]):
    try:
        app([*args, "--api-url", {url!r}] if args != ["--help"] else args)
    except SystemExit:
        pass
print("HEAVY:" + ",".join(m for m in {HEAVY!r} if m in sys.modules))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "HEAVY:\n" in run.stdout, run.stdout + run.stderr
    assert run.stderr.count(f"no API at {url}") == 7 and "Traceback" not in run.stderr


def test_unreachable_api_is_one_line_naming_it_and_debug_shows_the_traceback():
    from services.apiclient import ApiError

    url = closed_port_url()
    result = runner.invoke(app, ["jobs", "--api-url", url])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"error: no API at {url} (is the stack up? `distillery up`)"]
    result = runner.invoke(app, ["--debug", "jobs", "--api-url", url])
    assert isinstance(result.exception, ApiError)


def test_bad_spec_files_are_one_line_naming_file_and_field(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\ndistill: [1, 2\nlog_every: 3\n")
    a_list = tmp_path / "list.yaml"
    a_list.write_text("- 1\n")
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("student: {model: s}\nteacher: {local_model: t}\ndata: {path: d.jsonl}\n"
                       "distill: {loss: nope}\n")
    for command in ("train", "submit"):  # submit reads the file before it calls the API
        result = runner.invoke(app, [command, str(bad_yaml), *(["--api-url", closed_port_url()]
                                                                if command == "submit" else [])])
        assert result.exit_code == 2
        assert result.stderr.splitlines() == [f"{bad_yaml}: not valid YAML at line 3, column 10: expected ',' "
                                              "or ']', but got ':'"]
    result = runner.invoke(app, ["train", str(a_list)])
    assert result.exit_code == 2 and result.stderr.strip() == f"{a_list}: a job spec is a mapping of fields, got list"
    result = runner.invoke(app, ["train", str(invalid)])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"{invalid}: distill.loss: Input should be 'fkl'")


def test_a_bad_setting_names_the_variable():
    result = runner.invoke(app, ["jobs"], env={"DISTILLERY_API_PORT": "abc"})
    assert result.exit_code == 2
    assert result.stderr.strip() == "DISTILLERY_API_PORT='abc': expected an integer"


def test_jobs_limit_is_bounded_like_the_api():
    from services.defaults import JOBS_PAGE_MAX

    result = runner.invoke(app, ["jobs", "--limit", str(JOBS_PAGE_MAX + 1)])
    assert result.exit_code == 2 and "--limit" in result.output


def test_version_and_completion():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"distillery {version('distillery')}\n"
    assert "--install-completion" in runner.invoke(app, ["--help"]).output


def test_demo_defaults_are_the_demo_jobs():
    from services.defaults import DEMO_DISTILL_STEPS, DEMO_WARMUP_STEPS
    from services.demo import DemoJob

    assert (DemoJob().distill_steps, DemoJob().warmup_steps) == (DEMO_DISTILL_STEPS, DEMO_WARMUP_STEPS)


def test_serve_defaults_are_the_configs(tmp_path, monkeypatch):
    """With no flags, `teacher serve` builds exactly the configs' defaults (teacher_server/defaults.py)."""
    import teacher_server.model_dirs as model_dirs
    import teacher_server.serve as serve
    from teacher_server.batcher import BatcherConfig
    from teacher_server.engine import EngineConfig

    monkeypatch.delenv("DISTILLERY_TEACHER_TOKEN", raising=False)
    monkeypatch.setattr(model_dirs, "resolve_model", lambda model, revision: SimpleNamespace(path=Path(model)))
    monkeypatch.setattr(model_dirs, "check_model_dir", lambda path: path)
    built = []
    monkeypatch.setattr(serve, "run", lambda config: built.append(config) or 0)
    result = runner.invoke(app, ["teacher", "serve", "--model", str(tmp_path)])
    assert result.exit_code == 0, result.output
    expected = serve.ServerConfig(engine=EngineConfig(model_dir=str(tmp_path)), batcher=BatcherConfig())
    assert built == [expected]
    # Fair sharing among jobs: weights per job and the per-job queue limit reach the batcher.
    built.clear()
    result = runner.invoke(app, ["teacher", "serve", "--model", str(tmp_path), "--job-weight", "a=2",
                                 "--job-weight", "team=b=0.5", "--max-queue-per-job", "4"])
    assert result.exit_code == 0, result.output
    assert built[0].batcher.job_weights == (("a", 2.0), ("team=b", 0.5))
    assert built[0].batcher.max_queue_per_job == 4
    for bad in ("a", "a=0", "=1", "a=x"):
        result = runner.invoke(app, ["teacher", "serve", "--model", str(tmp_path), "--job-weight", bad])
        assert result.exit_code == 2 and "--job-weight" in result.output, result.output
