"""`distillery demo --quick`: the main job's whole path (built-in models, stack, REST job with
Warmup-Distill + AKL, events, report, plot, shutdown) with barely trained models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from services.local import read_state

pytestmark = pytest.mark.slow


@pytest.mark.timeout(480)
def test_quick_demo_runs_the_whole_stack_and_writes_its_report(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    state_dir = tmp_path / "state"
    proc = subprocess.run([sys.executable, "-m", "services.cli", "demo", "--quick", "--runs-dir", str(tmp_path / "runs"),
                           "--cache-dir", str(tmp_path / "cache"), "--state-dir", str(state_dir)],
                          env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    for text in ("1/4", "2/4", "3/4", "4/4", "student after KD", "run directory:"):
        assert text in out, text
    run_dir = next((tmp_path / "runs").iterdir())
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["teacher", "student before", "student after warmup",
                                                    "student after KD"]
    for row in report["rows"]:
        assert 0 <= row["exact_match"] <= 1 and 0 <= row["rouge_l"] <= 1
    points = [e["point"] for e in report["evals"]]
    assert points == ["before", "warmup", "distill"]  # KD step 2 of 4; step 4 is the final eval
    assert len(report["losses"]["distill"]) == 4 and report["losses"]["warmup"]
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| student after KD |" in (run_dir / "report.md").read_text()
    # The built-in models were cached with their scores, and the stack is gone.
    cached = next((tmp_path / "cache").iterdir())
    assert json.loads((cached / "assets.json").read_text())["scores"]["teacher"]["n"] == 16
    assert read_state(state_dir) is None
