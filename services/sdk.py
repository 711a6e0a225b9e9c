"""The Python API, for notebooks and scripts: build a job spec, run it in this process or submit it
to a running service, follow its events, and load the trained student.

    from services import sdk

    spec = sdk.make_spec("examples/tiny_local.yaml", distill={"steps": 2}, checkpoint={"dir": "runs/nb"})
    result = sdk.run(spec, on_metrics=lambda m: print(m["stage"], m["step"], m.get("loss")))
    model, tokenizer = sdk.load_student(result)          # transformers model + tokenizer

    with sdk.Service("http://127.0.0.1:8000") as service:  # `distillery up`, or a deployed API
        job = service.submit(spec)
        job = service.wait(job.id, on_event=print)       # follows the events until the job ends
    model, tokenizer = sdk.load_student(job)              # when its run directory is readable here

`run` is what `distillery train` runs: the same trainer, checkpoints, summary.json and trackers
(`tracking` in the spec: TensorBoard by default, MLflow, W&B). `docs/python-api.md` walks
through it; `examples/python_api.py` runs all of it on tiny models built on the spot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from services.store import TERMINAL
from student_worker.config import JobSpec

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SpecLike = JobSpec | dict[str, Any] | str | Path
MetricsCallback = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------------------------- specs
def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_spec(base: SpecLike | None = None, /, **sections: Any) -> JobSpec:
    """A validated JobSpec: `base` (a spec, a mapping, or a YAML/JSON file) with `sections`
    merged in, nested mappings key by key:

        make_spec(student={"model": "models/s"}, teacher={"local_model": "models/t"}, data={"path": "d.jsonl"})
        make_spec("job.yaml", distill={"loss": "rkl", "steps": 50}, checkpoint={"dir": "runs/rkl"})
    """
    if base is None:
        doc: dict[str, Any] = {}
    elif isinstance(base, JobSpec):
        doc = base.model_dump(mode="json")
    elif isinstance(base, dict):
        doc = base
    else:
        doc = JobSpec.from_file(base).model_dump(mode="json")
    return JobSpec.model_validate(_merge(doc, sections))


def _as_spec(spec: SpecLike) -> JobSpec:
    return spec if isinstance(spec, JobSpec) else make_spec(spec)


# ---------------------------------------------------------------------------------- in this process
@dataclass
class RunResult:
    """What an in-process run leaves: its run directory, summary (summary.json), every metrics
    event it emitted, in order, and its final checkpoint."""

    run_dir: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None


def run(spec: SpecLike, *, run_dir: str | Path | None = None, on_metrics: MetricsCallback | None = None) -> RunResult:
    """Run a job in this process, as `distillery train` does (one worker, local or served
    teacher): checks its inputs, trains, evaluates, writes checkpoints and summary.json into the
    run directory (`run_dir`, else the spec's checkpoint.dir) and logs to the spec's trackers.
    A run directory holding a checkpoint resumes from it. `on_metrics` hears every metrics event
    (stage, step, loss, tokens_per_s, ...). Raises on failure (NonFiniteLoss, TeacherError, and
    ValueError for bad inputs, naming the field)."""
    from student_worker.checkpoint import CheckpointManager
    from student_worker.tracking import open_tracker
    from student_worker.trainer import Trainer, build_teacher, check_inputs

    spec = _as_spec(spec)
    if run_dir is not None:
        spec = spec.model_copy(update={"checkpoint": spec.checkpoint.model_copy(update={"dir": str(run_dir)})})
    check_inputs(spec)
    metrics: list[dict[str, Any]] = []

    def on_step(m: dict[str, Any]) -> None:
        metrics.append(m)
        tracker.log(m)
        if on_metrics is not None:
            on_metrics(m)

    trainer = Trainer(spec, build_teacher(spec.teacher, job_id=spec.name), on_metrics=on_step)
    tracker = open_tracker(spec)
    failed = True
    try:
        trainer.setup()
        summary = trainer.train()
        tracker.log_summary(summary)
        failed = False
    finally:
        trainer.cleanup()
        tracker.close(failed=failed)
    ref = CheckpointManager(spec.checkpoint.dir).latest_valid()
    return RunResult(Path(spec.checkpoint.dir), summary, metrics, ref.path if ref else None)


# ---------------------------------------------------------------------------------- a running service
@dataclass(frozen=True)
class Job:
    """A job's record as the service returns it (`GET /v1/jobs/{id}`)."""

    id: str
    state: str
    attempt: int
    spec: dict[str, Any]
    error: str = ""
    reason: str = ""
    progress: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    checkpoint: str = ""
    record: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, record: dict[str, Any]) -> "Job":
        return cls(id=record["id"], state=record["state"], attempt=int(record.get("attempt", 0)),
                   spec=record.get("spec") or {}, error=record.get("error", ""), reason=record.get("reason", ""),
                   progress=record.get("progress") or {}, summary=record.get("summary") or {},
                   checkpoint=record.get("checkpoint", ""), record=record)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    @property
    def run_dir(self) -> Path:
        """The job's run directory as the service resolved it (a path on the workers' disk)."""
        return Path(self.spec["checkpoint"]["dir"])


class Service:
    """A running Distillery service over REST. `url` and `api_key` default to DISTILLERY_API_URL
    and DISTILLERY_API_KEY, as the CLI's do."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout_s: float = 30.0) -> None:
        from services.apiclient import ApiClient
        from services.settings import Settings

        settings = Settings.from_env() if url is None or api_key is None else None
        self.client = ApiClient(url or settings.api_url, api_key if api_key is not None else settings.api_key,
                                timeout_s=timeout_s)

    def submit(self, spec: SpecLike, *, idempotency_key: str | None = None) -> Job:
        """Submit a job (the service checks it: paths inside its roots, ...); raises ApiError."""
        doc = _as_spec(spec).model_dump(mode="json")
        return Job.of(self.client.submit(doc, idempotency_key))

    def job(self, job_id: str) -> Job:
        return Job.of(self.client.job(job_id))

    def jobs(self, state: str | None = None, limit: int = 50) -> list[Job]:
        return [Job.of(r) for r in self.client.jobs(state, limit)["jobs"]]

    def events(self, job_id: str, after: str | None = None) -> Iterator[dict[str, Any]]:
        """A job's events, the backlog then live, until the job ends: `state` changes, `metrics`
        of every step and rank, `eval` points, `summary`, `error`; the last is `end`."""
        return self.client.events(job_id, after)

    def wait(self, job_id: str, *, on_event: MetricsCallback | None = None) -> Job:
        """Follow a job's events until it ends (each to `on_event`), and return its final record."""
        for event in self.client.events(job_id):
            if on_event is not None:
                on_event(event)
        return self.job(job_id)

    def cancel(self, job_id: str) -> str:
        return self.client.cancel(job_id)["state"]

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------- the result
def checkpoint_of(source: RunResult | Job | str | Path) -> Path:
    """The checkpoint directory a source names: a checkpoint itself, or the newest intact one of a
    run directory (the final one once the run finished)."""
    from student_worker.checkpoint import CheckpointManager

    if isinstance(source, RunResult):
        source = source.checkpoint or source.run_dir
    elif isinstance(source, Job):
        source = source.run_dir
    path = Path(source)
    if (path / "manifest.json").is_file():
        return path
    ref = CheckpointManager(path).latest_valid()
    if ref is None:
        raise FileNotFoundError(f"{path} holds no intact checkpoint (a run directory has them under checkpoints/)")
    return ref.path


def load_student(source: RunResult | Job | str | Path, *, device: str = "cpu",
                 dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The trained student as a transformers model (eval mode, on `device`, in `dtype`, else the
    dtype it was saved in) and its tokenizer, from a run's final checkpoint (or any checkpoint
    directory). A LoRA checkpoint's adapters are folded into its base (float32 unless `dtype`).
    Weights load from safetensors only and no code from the directory runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from student_worker.config import JobSpec
    from student_worker.lora import merged_student

    path = checkpoint_of(source)
    spec_file = path / "spec.json"
    spec = JobSpec.model_validate_json(spec_file.read_text()) if spec_file.is_file() else None
    if spec is not None and spec.student.lora is not None:  # adapters only: folded into their base
        model = merged_student(path, spec)
        model = model.to(dtype) if dtype is not None else model
    else:
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, trust_remote_code=False,
                                                     local_files_only=True, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    return model.to(device).eval(), tokenizer
