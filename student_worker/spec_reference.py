"""The job spec's field reference, generated from the schema in `config.py`.

    distillery spec                 # the reference as a table in the terminal
    distillery spec --markdown      # the same as docs/spec-reference.md (a test keeps them equal)

Every field appears with its type, default, unit, allowed range and description; the unit of every
number is stated in `UNITS` (a test fails when a numeric field has none).
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .config import JobSpec

# Unit of every numeric field; "" for a plain number (a ratio, a coefficient, a temperature).
UNITS: dict[str, str] = {
    "seed": "",
    "log_every": "optimizer steps",
    "student.lora.r": "rank",
    "student.lora.alpha": "",
    "student.lora.dropout": "probability",
    "teacher.timeout_s": "seconds",
    "teacher.unavailable_timeout_s": "seconds",
    "teacher.student_candidates": "ids per position",
    "distill.score_chunks": "requests per micro-batch",
    "teacher.weight": "× a weight-1 job's share",
    "teacher.ray_actor.replicas": "replicas",
    "teacher.ray_actor.num_cpus": "CPUs",
    "teacher.ray_actor.num_gpus": "GPUs",
    "teacher.ray_actor.max_restarts": "restarts",
    "data.eval_fraction": "share of rows",
    "data.split_seed": "",
    "data.max_prompt_tokens": "tokens",
    "data.max_response_tokens": "tokens",
    "warmup.prompts": "prompts",
    "warmup.samples_per_prompt": "samples",
    "warmup.threshold": "the rule's margin",
    "warmup.rank_k": "ranks",
    "warmup.sample_temperature": "",
    "warmup.max_new_tokens": "tokens",
    "warmup.beta": "",
    "warmup.label_smoothing": "probability",
    "warmup.simpo_gamma": "nats",
    "warmup.sft_weight": "",
    "warmup.steps": "optimizer steps",
    "warmup.batch_size": "pairs per worker",
    "warmup.lr": "",
    "distill.alpha": "",
    "distill.beta": "",
    "distill.mu": "probability mass",
    "distill.temperature": "",
    "distill.steps": "optimizer steps",
    "distill.batch_size": "prompts per worker",
    "distill.grad_accum": "micro-batches",
    "distill.on_policy_fraction": "share of batches",
    "distill.top_k": "tokens",
    "distill.sample_temperature": "",
    "distill.top_p": "probability mass",
    "distill.max_new_tokens": "tokens",
    "distill.lr": "",
    "distill.weight_decay": "",
    "distill.warmup_steps": "optimizer steps",
    "distill.min_lr_ratio": "× lr",
    "distill.grad_clip": "gradient L2 norm",
    "distill.max_non_finite": "optimizer steps",
    "distill.loss_chunk_size": "positions",
    "checkpoint.every_steps": "optimizer steps",
    "checkpoint.keep_last": "checkpoints",
    "eval.max_samples": "examples",
    "eval.max_new_tokens": "tokens",
    "eval.batch_size": "prompts",
    "eval.every_steps": "optimizer steps",
    "resources.workers": "workers",
    "resources.cpus_per_worker": "CPUs",
    "resources.gpus_per_worker": "GPUs",
    "resources.memory_gb_per_worker": "GiB",
    "resources.max_failures": "restarts",
    "resources.check_replicas_every": "optimizer steps",
}

SECTIONS: dict[str, str] = {
    "student": "The model being trained.",
    "teacher": "Where the teacher runs: exactly one of endpoints, local_model, ray_actor.",
    "student.lora": "LoRA adapters trained on the frozen student (the peft extra).",
    "teacher.ray_actor": "Teacher servers started in the Ray cluster for this job.",
    "data": "Training and eval rows: JSONL, Parquet, save_to_disk or load_dataset; plain or conversational.",
    "warmup": "Warmup-Distill: DPO on (student sample, teacher-corrected sample) pairs before KD.",
    "distill": "The KD stage: the divergence, on-policy sampling, the optimizer and its schedule.",
    "checkpoint": "The run directory and how often it is written.",
    "eval": "Exact match and ROUGE-L of greedy decodes on the eval rows, and an optional scorer of your own.",
    "resources": "Workers, devices and fault tolerance of the Ray job.",
    "tracking": "Where metrics go besides the events: TensorBoard, MLflow, Weights & Biases (rank 0 only).",
}

NOTES = """\
## Notes

- **Learning-rate schedule** (each stage has its own optimizer): KD warms up linearly over
  `distill.warmup_steps` (default 10) optimizer steps to `distill.lr`, then follows a cosine down
  to `distill.min_lr_ratio` × lr (default 0.1) at `distill.steps`. Warmup-Distill has no warm-up
  and the same cosine from `warmup.lr` to `distill.min_lr_ratio` × `warmup.lr`. For a constant
  LR set `distill.warmup_steps: 0` and `distill.min_lr_ratio: 1`.
- **Eval rows**: `data.eval_split` of the same source when given, else `data.eval_path`, else a
  seeded `data.eval_fraction` of `data.path` (held out from training, chosen with
  `data.split_seed`); the first `eval.max_samples` of them are decoded greedily for at most
  `eval.max_new_tokens` tokens.
- **Exact match** compares the decoded prediction with the reference response after dropping
  leading and trailing whitespace and making every inner run of whitespace one space; case and
  punctuation count. ROUGE-L is over whitespace-separated words.
- A spec is strict: an unknown field is an error, and so is a value outside its range.
"""


@dataclass(frozen=True)
class FieldRow:
    path: str
    type: str
    default: str
    unit: str
    range: str
    description: str


def _type_name(annotation: object) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__)
    return str(annotation)


def _section_model(annotation: object) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _default(info: FieldInfo) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    value = info.default_factory() if info.default_factory is not None else info.default
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return "[]" if value == [] else str(value)


def _range(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"),
                           ("min_length", "length ≥"), ("max_length", "length ≤"), ("pattern", "matches")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def _is_number(annotation: object) -> bool:
    return any(a in (int, float) for a in (annotation, *typing.get_args(annotation)))


def field_rows(model: type[BaseModel] = JobSpec, prefix: str = "") -> list[FieldRow]:
    """Every field of `model`, depth first; a section is a row followed by its own fields."""
    rows = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        section = _section_model(info.annotation)
        type_name = "section" if section else _type_name(info.annotation)
        if section and info.annotation is not section:
            type_name = "section or null"
        unit = UNITS.get(path, "") if _is_number(info.annotation) and section is None else ""
        description = info.description or SECTIONS.get(path, "")
        rows.append(FieldRow(path, type_name, _default(info), unit, _range(info),
                             " ".join(description.split())))
        if section:
            rows.extend(field_rows(section, f"{path}."))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|") if "\\|" not in text else text


def render_markdown() -> str:
    lines = [
        "# Job spec reference",
        "",
        "Generated from the schema (`student_worker/config.py`) by `distillery spec --markdown`;",
        "`tests/student_worker/test_spec_reference.py` fails when this file is stale. A job spec is",
        "YAML or JSON; the example specs in `examples/` are a good start. Units: a blank unit is a",
        "plain number (a ratio, a coefficient, a temperature).",
        "",
        "| field | type | default | unit | range | description |",
        "|---|---|---|---|---|---|",
    ]
    for r in field_rows():
        lines.append(f"| `{r.path}` | {_cell(r.type)} | {_cell(r.default)} | {r.unit} | "
                     f"{_cell(r.range)} | {_cell(r.description)} |")
    return "\n".join(lines) + "\n\n" + NOTES
