"""Tiny teacher, smaller student (same locally trained tokenizer) and an arithmetic data set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from student_worker.config import JobSpec
from services.demo.task import as_chat, make_rows


@pytest.fixture(scope="session")
def arith_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(80, seed=0, digits=2)))
    return path


def spec_factory(teacher: Path, student: Path, data: Path, run_dir: Path):
    """A small valid JobSpec maker; keyword sections are merged into the defaults below."""

    def make(**sections) -> JobSpec:
        doc = {
            "name": "test",
            "seed": 0,
            "student": {"model": str(student)},
            "teacher": {"local_model": str(teacher)},
            "data": {"path": str(data), "eval_fraction": 0.1, "max_prompt_tokens": 16,
                     "max_response_tokens": 8},
            "warmup": {"enabled": False, "prompts": 8, "samples_per_prompt": 2, "threshold": 0.0,
                       "max_new_tokens": 6, "steps": 3, "batch_size": 4, "lr": 1e-3},
            "distill": {"loss": "fkl", "steps": 4, "batch_size": 4, "top_k": 8, "max_new_tokens": 6,
                        "lr": 1e-3, "warmup_steps": 1},
            "checkpoint": {"dir": str(run_dir), "every_steps": 2, "keep_last": 3},
            "eval": {"enabled": False, "max_samples": 4, "max_new_tokens": 6, "batch_size": 4},
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(doc.get(key), dict):
                doc[key] = {**doc[key], **value}
            else:
                doc[key] = value
        return JobSpec.model_validate(doc)

    return make


# A small chat template written with the tiny tokenizer's own special tokens (<s>, </s>).
CHAT_TEMPLATE = Path(__file__).parents[2] / "examples" / "tiny_chat_template.jinja"


@pytest.fixture(scope="session")
def chat_models(tiny_llama, tiny_student, tmp_path_factory) -> tuple[Path, Path]:
    """(teacher, student): the tiny models with CHAT_TEMPLATE saved beside their tokenizers."""
    import shutil

    out = []
    for name, src in (("teacher", tiny_llama), ("student", tiny_student)):
        dst = tmp_path_factory.mktemp(f"chat-{name}") / name
        shutil.copytree(src, dst)
        shutil.copy(CHAT_TEMPLATE, dst / "chat_template.jinja")  # transformers reads it with the tokenizer
        out.append(dst)
    return out[0], out[1]


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    """Conversational arithmetic: a system prompt, an earlier exchange, a question, its answer."""
    path = tmp_path_factory.mktemp("chat-data") / "train.jsonl"
    path.write_text("".join(json.dumps(as_chat(r)) + "\n" for r in make_rows(40, seed=0, digits=2)))
    return path


@pytest.fixture
def make_spec(tiny_llama, tiny_student, arith_data, tmp_path):
    return spec_factory(tiny_llama, tiny_student, arith_data, tmp_path / "run")


@pytest.fixture(scope="module")
def make_spec_module(tiny_llama, tiny_student, arith_data, tmp_path_factory):
    return spec_factory(tiny_llama, tiny_student, arith_data, tmp_path_factory.mktemp("run"))
