"""bench/quality.py as a smoke run: one seed, a few steps, barely trained built-in models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import quality  # noqa: E402

pytestmark = pytest.mark.slow


def test_quality_smoke_fills_every_cell_and_both_controls(tmp_path, capsys):
    out = tmp_path / "quality.json"
    results = quality.main(["--quick", "--quick-models", "--losses", "akl", "--jobs", "2", "--no-trl",
                            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    cells = {(r["loss"], r["warmup"], r["lambda"]) for r in results["kd"]}
    assert cells == {("akl", w, lam) for w in ("off", "on") for lam in (0.0, 1.0)}
    for r in results["kd"]:
        assert 0 <= r["exact_match"] <= 1
    assert set(results["controls"]) == {"SFT student", "SFT student + 6 more SFT steps",
                                        "SFT student + 9 more SFT steps"}
    # The untouched SFT student scores what the recipe recorded for it.
    assert results["controls"]["SFT student"][0]["exact_match"] == results["assets"]["scores"]["student"]["exact_match"]
    assert json.loads(out.read_text())["kd"] == results["kd"]
    text = capsys.readouterr().out
    assert "| akl |" in text and "Warmup-Distill effect" in text and "### Controls" in text
