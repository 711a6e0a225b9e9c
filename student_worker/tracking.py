"""Metrics to experiment trackers: TensorBoard event files (on by default), MLflow and Weights &
Biases when the spec's `tracking` section asks for them and their packages are installed.

    tracker = open_tracker(spec, rank=rank, run_name=job_id)   # a null tracker on ranks other than 0
    trainer = Trainer(spec, teacher, on_metrics=tracker.log)
    tracker.log_summary(trainer.train())
    tracker.close()

Names: every number of a metrics event becomes `<stage>/<key>` at the event's `step`, so the
trackers hold exactly what the events hold: `distill/loss`, `distill/tokens_per_s`,
`distill/teacher_latency_s`, the mismatch diagnostics `distill/fkl`, `distill/rkl`,
`distill/topk_overlap`, `distill/tail_mass`, `distill/teacher_logprob`; `warmup/loss`,
`warmup/accuracy`; the warmup's pair statistics as `warmup/pairs/<key>` at step 0; mid-run eval
points as `eval/exact_match`, `eval/rouge_l` at the optimizer step counted over both stages. Steps
count per stage (warmup and distill each start at 1). The summary's numbers (final eval, timing)
go in as `final/<path>`, e.g. `final/eval/student/exact_match`.

Where: TensorBoard into `<run dir>/tensorboard`; MLflow into `tracking.mlflow.tracking_uri` (or
the process's MLFLOW_TRACKING_URI), experiment `tracking.mlflow.experiment`, with the spec as
params (`distill.loss`, `student.model`, ...); W&B into `tracking.wandb.project`, files under `<run dir>/wandb`, the spec as its
config. The run ids are kept in `<run dir>/tracking.json`, so a resumed job (a restarted worker
group, a new attempt, `distillery resume`) goes on logging into the same MLflow and W&B runs.
Credentials are never in the spec: MLflow and W&B read theirs from the environment of the process
that logs (MLFLOW_TRACKING_TOKEN, WANDB_API_KEY, ...).

A tracker never stops or slows training: the trackers open and log in a thread of their own (the
loop only queues events), and one that fails to open, to log or to close is warned about once and
dropped while the others go on.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from .checkpoint import write_text_atomic
from .config import JobSpec

log = logging.getLogger(__name__)

# Fields of a metrics event that label it rather than measure it.
LABELS = frozenset({"kind", "id", "stage", "step", "event", "point", "rank", "pid", "job_id", "distill_step"})
STATE_FILE = "tracking.json"


def scalars(event: dict[str, Any]) -> tuple[str, int, dict[str, float]]:
    """(stage, step, {tag: value}) of a metrics event: its numbers (booleans as 0/1) under
    `<stage>/`, or `<stage>/<event>/` for a named event such as the warmup's `pairs`."""
    stage = str(event.get("stage", "distill"))
    prefix = f"{stage}/{event['event']}/" if event.get("event") else f"{stage}/"
    values = {f"{prefix}{k}": float(v) for k, v in event.items()
              if k not in LABELS and isinstance(v, (int, float))}
    return stage, int(event.get("step", 0)), values


def flatten(doc: Any, sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of `a/b/c` keys (or `a.b.c` with sep=".")."""
    if isinstance(doc, dict):
        out: dict[str, Any] = {}
        for key, value in doc.items():
            out.update(flatten(value, sep, f"{prefix}{key}{sep}"))
        return out
    return {prefix[:-len(sep)]: doc}


def summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers of a run's summary (final eval, timing) as `final/<path>`."""
    return {f"final/{k}": float(v) for k, v in flatten(summary).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Backend(Protocol):
    name: str

    def log(self, stage: str, step: int, values: dict[str, float]) -> None: ...

    def log_summary(self, step: int, values: dict[str, float]) -> None: ...

    def close(self, failed: bool) -> None: ...


# ---------------------------------------------------------------------------------- backends
class TensorBoard:
    """Event files written by tensorboardX (no TensorFlow, no `tensorboard` package needed to write;
    `tensorboard --logdir <run dir>/tensorboard` shows them)."""

    name = "tensorboard"

    def __init__(self, logdir: Path, spec_json: str) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(logdir), flush_secs=10)
        self.writer.add_text("spec", f"```json\n{spec_json}\n```", 0)

    def log(self, stage: str, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_summary(self, step: int, values: dict[str, float]) -> None:
        self.log("final", step, values)

    def close(self, failed: bool) -> None:
        self.writer.close()


class Mlflow:
    """One MLflow run per job, through `MlflowClient` (no global active run, so a notebook's own
    MLflow runs are left alone)."""

    name = "mlflow"
    MAX_PARAM_CHARS = 500  # what every MLflow server accepts

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str, spec_doc: dict[str, Any],
                 tags: dict[str, str], run_id: str | None) -> None:
        import mlflow
        from mlflow.entities import Param

        self.entities = mlflow.entities
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self.run_id = self._existing(run_id)
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
            params = [Param(k, str(v)[:self.MAX_PARAM_CHARS]) for k, v in sorted(flatten(spec_doc, ".").items())]
            for i in range(0, len(params), 100):  # a batch holds at most 100 params
                self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _existing(self, run_id: str | None) -> str | None:
        if run_id is None:
            return None
        try:
            self.client.update_run(run_id, status="RUNNING")
        except Exception as exc:  # noqa: BLE001 - gone, or another server: start a new run
            log.info("MLflow run %s cannot be resumed (%s); starting a new one", run_id, exc)
            return None
        return run_id

    def log(self, stage: str, step: int, values: dict[str, float]) -> None:
        # NaN and inf do not survive MLflow's JSON everywhere; a skipped step shows as <stage>/skipped.
        now = int(time.time() * 1000)
        metrics = [self.entities.Metric(k, v, now, step) for k, v in values.items() if math.isfinite(v)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_summary(self, step: int, values: dict[str, float]) -> None:
        self.log("final", step, values)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class Wandb:
    """One W&B run per job. W&B wants one increasing step per run, and our steps count per stage,
    so each stage's metrics are plotted against their own `<stage>/step` (`define_metric`)."""

    name = "wandb"

    def __init__(self, project: str, entity: str | None, mode: str, run_name: str, run_dir: Path,
                 spec_doc: dict[str, Any], run_id: str | None) -> None:
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, entity=entity, mode=mode, name=run_name, id=run_id,
                              resume="allow", dir=str(run_dir), config=spec_doc, reinit="create_new")
        self.run_id = self.run.id
        for stage in ("warmup", "distill", "eval"):
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")

    def log(self, stage: str, step: int, values: dict[str, float]) -> None:
        self.run.log({**values, f"{stage}/step": step})

    def log_summary(self, step: int, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# ---------------------------------------------------------------------------------- the tracker
Opener = Callable[[], Backend]


class Tracker:
    """The trackers of one run, fed from a thread of their own: the training loop only queues an
    event and never waits for a tracker (a slow or unreachable MLflow server included). A backend
    that raises, on opening or later, is warned about once and dropped; the others go on. They
    open with the first event, so a run that logs nothing (one found already finished) leaves no
    trace. `close` sends what is queued, waiting at most `close_timeout_s`."""

    MAX_PENDING = 10_000

    def __init__(self, openers: list[tuple[str, Opener]], *, on_open: Callable[[list[Backend]], None] | None = None,
                 close_timeout_s: float = 30.0) -> None:
        self.backends: list[Backend] = []
        self.openers, self.on_open, self.close_timeout_s = openers, on_open, close_timeout_s
        self.dropped = 0
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = not openers

    def log(self, event: dict[str, Any]) -> None:
        """Queue one metrics event (a Trainer's on_metrics)."""
        stage, step, values = scalars(event)
        if values:
            self._put(("log", (stage, step, values)))

    def log_summary(self, summary: dict[str, Any]) -> None:
        """Queue a run's summary as its final numbers; a run found already finished logs nothing."""
        if summary.get("already_finished"):
            return
        values = summary_scalars({k: v for k, v in summary.items() if k in ("eval", "timing", "non_finite_total")})
        timing = summary.get("timing") or {}
        step = sum(int((timing.get(s) or {}).get("steps", 0)) for s in ("warmup", "distill"))
        if values:
            self._put(("log_summary", (step, values)))

    def close(self, failed: bool = False) -> None:
        """Send what is queued and close every tracker (`failed`: the run ended in an error)."""
        self._closed = True
        if self._thread is None:
            return
        self._queue.put(("close", failed))
        self._thread.join(self.close_timeout_s)
        if self._thread.is_alive():
            log.warning("trackers still busy after %.0f s (%d events queued); leaving them", self.close_timeout_s,
                        self._queue.qsize())
        if self.dropped:
            log.warning("trackers fell behind: %d metrics events were not logged", self.dropped)
        self._thread = None

    def _put(self, item: tuple[str, Any]) -> None:
        if self._closed:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="trackers", daemon=True)
            self._thread.start()
        if self._queue.qsize() >= self.MAX_PENDING:
            self.dropped += 1
            return
        self._queue.put(item)

    def _run(self) -> None:
        for name, make in self.openers:
            try:
                self.backends.append(make())
            except ImportError as exc:
                log.warning("tracking.%s is set but its package is not installed (%s; the project's `%s` extra); "
                            "training goes on without it", name, exc, name)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops training
                log.warning("tracker %s failed to start (%s: %s); training goes on without it", name,
                            type(exc).__name__, exc)
        if self.on_open is not None and self.backends:
            self.on_open(self.backends)
        while True:
            what, args = self._queue.get()
            if what == "close":
                self._each("close", lambda b: b.close(args))
                return
            self._each(what, lambda b: getattr(b, what)(*args))

    def _each(self, what: str, call: Callable[[Backend], None]) -> None:
        for backend in list(self.backends):
            try:
                call(backend)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops training
                self.backends.remove(backend)
                log.warning("tracker %s failed to %s (%s: %s); training goes on without it", backend.name,
                            what.replace("_", " "), type(exc).__name__, exc)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def open_tracker(spec: JobSpec, *, rank: int = 0, run_name: str | None = None,
                 job_id: str | None = None) -> Tracker:
    """The trackers `spec.tracking` asks for, on rank 0 (they open in the tracker's thread); an
    empty tracker on other ranks."""
    t = spec.tracking
    if rank != 0:
        return Tracker([])
    run_dir = Path(spec.checkpoint.dir)
    run_name = run_name or job_id or spec.name
    doc = spec.model_dump(mode="json")
    state_path = run_dir / STATE_FILE
    try:
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    except ValueError:
        state = {}
    openers: list[tuple[str, Opener]] = []
    if t.tensorboard:
        openers.append(("tensorboard", lambda: TensorBoard(run_dir / "tensorboard", spec.to_json())))
    if t.mlflow is not None:
        tags = {"distillery.job_id": job_id or "", "distillery.run_dir": str(run_dir.resolve())}
        openers.append(("mlflow", lambda: Mlflow(t.mlflow.tracking_uri, t.mlflow.experiment, run_name, doc, tags,
                                                 state.get("mlflow_run_id"))))
    if t.wandb is not None:
        openers.append(("wandb", lambda: Wandb(t.wandb.project, t.wandb.entity, t.wandb.mode, run_name, run_dir,
                                               doc, state.get("wandb_run_id"))))

    def keep_run_ids(backends: list[Backend]) -> None:
        ids = {f"{b.name}_run_id": b.run_id for b in backends if getattr(b, "run_id", None)}
        if ids and ids != {k: state.get(k) for k in ids}:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(state_path, json.dumps({**state, **ids}, indent=2))
            except OSError as exc:
                log.warning("could not keep the tracker run ids in %s (%s); a resumed run starts new ones",
                            state_path, exc)

    return Tracker(openers, on_open=keep_run_ids)
