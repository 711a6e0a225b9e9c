"""docs/spec-reference.md is generated from the schema and must not go stale."""

from __future__ import annotations

import typing
from pathlib import Path

from typer.testing import CliRunner

from services.cli import app
from student_worker.spec_reference import UNITS, field_rows, render_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "spec-reference.md"


def test_the_committed_reference_is_the_generated_one():
    assert DOC.read_text() == render_markdown(), (
        "docs/spec-reference.md is stale: run `distillery spec --markdown > docs/spec-reference.md`")


def test_every_field_is_listed_with_a_description_and_every_number_with_a_unit():
    from student_worker.config import JobSpec

    rows = {r.path: r for r in field_rows()}
    for section in ("student", "teacher", "data", "warmup", "distill", "checkpoint", "eval", "resources"):
        model = typing.get_args(JobSpec.model_fields[section].annotation) or (JobSpec.model_fields[section].annotation,)
        for name in model[0].model_fields:
            assert f"{section}.{name}" in rows, f"{section}.{name} missing from the reference"
    assert all(r.description for r in rows.values()), [p for p, r in rows.items() if not r.description]
    numbers = {p for p, r in rows.items() if r.type.split(" or ")[0] in ("integer", "number")}
    assert numbers == set(UNITS), (numbers ^ set(UNITS))
    assert rows["distill.warmup_steps"].default == "10" and rows["distill.min_lr_ratio"].unit == "× lr"


def test_spec_command_prints_the_reference_and_filters_by_section():
    full = CliRunner().invoke(app, ["spec", "--markdown"])
    assert full.exit_code == 0 and full.output == render_markdown()
    some = CliRunner().invoke(app, ["spec", "distill.l"], env={"COLUMNS": "200"})
    assert some.exit_code == 0, some.output
    assert "distill.lr" in some.output and "distill.loss" in some.output and "warmup.lr" not in some.output
    none = CliRunner().invoke(app, ["spec", "nosuchfield"])
    assert none.exit_code == 2
