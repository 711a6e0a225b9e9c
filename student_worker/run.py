"""Entrypoint of one distillation job: Ray Train over N student workers (a Ray Job's entrypoint).

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python -m student_worker.run \\
        --spec examples/tiny_ray.yaml --job-id tiny-ray-1 --events file:runs/tiny/events.jsonl

Phases: read the spec -> connect to Ray (the job's cluster, or a local one) -> start the teacher
replicas when the spec asks for them -> a TorchTrainer named after the job with
`resources.workers` workers (gloo on CPU, NCCL on GPUs) -> each worker runs the single-process
`Trainer` on its shard, gradients averaged every step, rank 0 checkpointing through
`ray.train.report` -> summary.json in the run directory.

Recovery: a failed worker group is restarted by Ray Train (`resources.max_failures`) from the last
reported checkpoint; a new driver with the same job id and storage path finds the same run and
resumes from it too. Either way training continues from the exact step it checkpointed.

Failure: a worker emits an `error` event with its exception before Ray Train sees it, and the
driver's last line is `job <id> failed: <Type>: <message>` naming that exception (the root cause,
not Ray Train's `WorkerGroupError` around it), which the scheduler turns into the job's reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import JobSpec

if TYPE_CHECKING:  # the driver imports no torch
    from .checkpoint import CheckpointRef
    from .events import EventSink
    from .trainer import CheckpointCallback, MetricsCallback

log = logging.getLogger("distillery.run")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run one distillation job on Ray Train.")
    p.add_argument("--spec", required=True, type=Path, help="Job spec, YAML or JSON.")
    p.add_argument("--job-id", required=True, help="Distillery job id: names the Ray Train run.")
    p.add_argument("--attempt", type=int, default=0,
                   help="Attempt number given by the scheduler; events of older attempts are refused.")
    p.add_argument("--events", action="append", default=[],
                   help="Event sink (stdout, file:PATH); repeatable. Default: the run dir's events.jsonl.")
    return p.parse_args(argv)


# ---------------------------------------------------------------------- on every worker
def _restore(checkpoint, rank: int):
    """Copy Ray's latest checkpoint to a local directory and return it as a CheckpointRef."""
    from .checkpoint import CheckpointManager, CheckpointRef

    if checkpoint is None:
        return None
    local = Path(tempfile.mkdtemp(prefix=f"distillery-restore-r{rank}-"))
    with checkpoint.as_directory() as d:
        manifest = json.loads((Path(d) / "manifest.json").read_text())
        dst = local / "checkpoints" / f"{manifest['stage']}-{int(manifest['step']):08d}"
        shutil.copytree(d, dst)
    ref = CheckpointRef(dst, manifest["stage"], int(manifest["step"]))
    if not CheckpointManager(local).verify(ref):
        raise RuntimeError(f"the checkpoint Ray restored ({checkpoint.path}) fails its checksums")
    return ref


def _resume_point(checkpoint, run_dir: Path, rank: int):
    """(where this worker starts, the temporary copy to remove at the end): the newer of Ray's
    latest registered checkpoint (copied locally) and the newest intact checkpoint in the run
    directory. Rank 0 writes the latter and Ray registers it only a report later, so after a
    stopped driver (a cancelled or failed job, resumed) it can be the only one that holds the last
    step. Every rank reads the same run directory before any of them trains, so all start alike.
    (None, None): from the start."""
    from .checkpoint import CheckpointManager

    ray_ref = _restore(checkpoint, rank)
    copy = ray_ref.path.parents[1] if ray_ref is not None else None
    local = CheckpointManager(run_dir).latest_valid() if run_dir.is_dir() else None
    if local is not None and (ray_ref is None or local.order > ray_ref.order):
        if copy is not None:
            shutil.rmtree(copy, ignore_errors=True)
        return local, None
    return ray_ref, copy


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch

    from .events import open_sink
    from .metrics import RayMetrics

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = JobSpec.model_validate_json(config["spec"])
    if spec.resources.gpus_per_worker > 0:
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)  # NCCL's collectives and object transfers use the current device
        spec = spec.model_copy(update={"student": spec.student.model_copy(update={"device": str(device)})})
    if config["teacher_endpoints"]:
        spec = spec.model_copy(update={"teacher": served_replicas(spec.teacher, config["teacher_endpoints"])})
    torch.manual_seed(spec.seed)
    job_id = config["job_id"]
    sink = open_sink(config["events"], job_id=job_id, attempt=config.get("attempt", 0))
    ray_metrics = RayMetrics(job_id)
    resume, restored_copy = _resume_point(ray.train.get_checkpoint(), Path(spec.checkpoint.dir), rank)
    sink.emit({"kind": "worker_start", "id": f"worker_start:{rank}:{os.getpid()}:{time.time_ns()}",
               "stage": resume.stage if resume else "", "step": resume.step if resume else 0, "rank": rank,
               "pid": os.getpid(), "restored": resume.path.name if resume else None,
               "attempt_started_at": time.time(), "job_id": job_id})

    def on_metrics(m: dict[str, Any]) -> None:
        ray_metrics.record(m)
        sink.emit({"kind": "metrics", "rank": rank, "pid": os.getpid(), "job_id": job_id, **m})
        # Every rank reports at the same steps, so Ray Train's report barrier lines up. A report is
        # a round trip through Ray Train's controller (about a second or two on a small machine),
        # so only every log_every-th step is reported; the event sink still gets every step.
        if "loss" in m and m["step"] % spec.log_every == 0:
            ray.train.report({k: v for k, v in m.items() if isinstance(v, (int, float, str, bool))})

    def on_checkpoint(ref, info: dict[str, Any]) -> None:
        from ray.train import Checkpoint

        report = {"stage": info["stage"], "step": info["step"], "non_finite_total": info["non_finite_total"]}
        if ref is not None:
            ray.train.report(report, checkpoint=Checkpoint.from_directory(str(ref.path)))
        else:
            ray.train.report(report)

    if rank != 0:  # only rank 0 writes checkpoints; the others keep nothing on disk
        spec = spec.model_copy(update={"checkpoint": spec.checkpoint.model_copy(
            update={"dir": tempfile.mkdtemp(prefix=f"distillery-rank{rank}-")})})
    try:
        train_worker(spec, sink, job_id=job_id, rank=rank, world=world, resume=resume, on_metrics=on_metrics,
                     on_checkpoint=on_checkpoint)
    finally:
        sink.close()  # sends what is buffered (the error event too) before Ray Train sees the end
        if restored_copy is not None:  # Ray's checkpoint, copied to a temporary directory of its own
            shutil.rmtree(restored_copy, ignore_errors=True)
        if rank != 0:
            shutil.rmtree(spec.checkpoint.dir, ignore_errors=True)


def train_worker(spec: JobSpec, sink: EventSink, *, job_id: str, rank: int = 0, world: int = 1,
                 resume: CheckpointRef | None = None, on_metrics: MetricsCallback | None = None,
                 on_checkpoint: CheckpointCallback | None = None) -> dict[str, Any]:
    """One worker's `Trainer` from setup to summary (no Ray here), and the events users need to
    see why a run stalls or ends: `teacher_wait` when a teacher call begins to wait for an
    unavailable teacher, rank 0's `summary`, and on a failure `error` with the one-line cause
    (`describe_failure`) before the exception goes on to Ray Train. Rank 0 also logs its metrics
    to the spec's trackers (`tracking.py`)."""
    from .tracking import open_tracker
    from .trainer import Trainer, build_teacher

    def event(kind: str, **fields: Any) -> dict[str, Any]:
        return {"kind": kind, "id": f"{kind}:{rank}:{os.getpid()}:{time.time_ns()}", "stage": trainer.stage,
                "step": trainer.step, "rank": rank, "pid": os.getpid(), "job_id": job_id, **fields}

    def on_teacher_wait(message: str) -> None:
        sink.emit(event("teacher_wait", message=message))

    def on_step(m: dict[str, Any]) -> None:
        tracker.log(m)
        if on_metrics is not None:
            on_metrics(m)

    trainer = Trainer(spec, build_teacher(spec.teacher, on_teacher_wait, job_id=job_id), rank=rank, world=world,
                      on_metrics=on_step, on_checkpoint=on_checkpoint)
    tracker = open_tracker(spec, rank=rank, run_name=job_id, job_id=job_id)  # TensorBoard, MLflow, W&B on rank 0
    failed = True
    try:
        trainer.setup(resume_from=resume)
        summary = trainer.train()
        tracker.log_summary(summary)
        failed = False
    except Exception as exc:
        sink.emit(event("error", error=describe_failure(exc)))
        raise
    finally:
        trainer.cleanup()
        tracker.close(failed=failed)
    if rank == 0:
        sink.emit({"kind": "summary", "stage": "done", "step": 0, "rank": 0, "job_id": job_id, "summary": summary})
    return summary


def root_cause(exc: BaseException) -> BaseException:
    """The exception that failed a run, out of Ray Train's wrappers: a `WorkerGroupError` holds
    each failed rank's own exception in `worker_failures` (the lowest rank whose exception is not
    Ray's own, such as a dead worker's, is the cause), a `ControllerError` its
    `controller_failure`. Any other exception is its own cause."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures, key=lambda r: (type(failures[r]).__module__.startswith("ray."), r))
        return root_cause(failures[rank])
    inner = getattr(exc, "controller_failure", None)
    return root_cause(inner) if isinstance(inner, BaseException) else exc


def describe_failure(exc: BaseException) -> str:
    """`<Type>: <message>` of the root cause, on one line (the job's record keeps one line)."""
    cause = root_cause(exc)
    return " ".join(f"{type(cause).__name__}: {cause}".split())


# ---------------------------------------------------------------------- driver
def run(spec: JobSpec, job_id: str, events: list[str], attempt: int = 0) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from teacher_server.ray_replica import TeacherReplicas

    run_dir = Path(spec.checkpoint.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    events = events or [f"file:{run_dir / 'events.jsonl'}"]
    res = spec.resources
    storage = res.storage_path or str(run_dir / "ray")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
    actor = spec.teacher.ray_actor
    replicas = TeacherReplicas(
        {"model_dir": actor.model, "revision": actor.revision, "device": actor.device, "dtype": actor.dtype},
        job_id, replicas=actor.replicas, num_cpus=actor.num_cpus, num_gpus=actor.num_gpus,
        max_restarts=actor.max_restarts) if actor else None
    try:
        gpus = res.gpus_per_worker
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"spec": spec.model_dump_json(), "job_id": job_id, "events": events,
                               "attempt": attempt,
                               "teacher_endpoints": replicas.endpoints if replicas else []},
            torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
            scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=gpus > 0,
                                         resources_per_worker=worker_resources(res)),
            run_config=RunConfig(name=job_id, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=res.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep_last)),
        )
        result = trainer.fit()
    finally:
        if replicas is not None:
            replicas.stop()
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    summary["worker_group_starts"] = _count_starts(events)
    summary["ray_checkpoint"] = result.checkpoint.path if result.checkpoint else None
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def served_replicas(teacher, endpoints: list[str]):
    """The teacher section a worker uses once the spec's Ray replicas serve at `endpoints`. The
    endpoints send token ids only, so the replicas' model directory becomes the teacher's chat
    template (unless one is named, or the model has none) for the check of templated prompts."""
    update = {"endpoints": endpoints, "ray_actor": None}
    if teacher.chat_template is None:
        from teacher_server.model_dirs import resolve_model

        from .chat import template_of

        model_dir = str(resolve_model(teacher.ray_actor.model, teacher.ray_actor.revision).path)
        if template_of(model_dir) is not None:
            update["chat_template"] = model_dir
    return teacher.model_copy(update=update)


def worker_resources(res) -> dict[str, float]:
    """What Ray reserves for one worker: CPUs, GPUs, and memory (bytes) when the spec declares it."""
    out = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        out["GPU"] = res.gpus_per_worker
    if res.memory_gb_per_worker:
        out["memory"] = res.memory_gb_per_worker * 2**30
    return out


def _count_starts(events: list[str]) -> int:
    """How many times rank 0 started (1 + worker-group restarts), from the file sink if any."""
    for t in events:
        path = Path(t[len("file:"):] if t.startswith("file:") else t)
        if t != "stdout" and path.exists():
            return sum(1 for line in path.read_text().splitlines()
                       if '"worker_start"' in line and json.loads(line).get("rank") == 0)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    spec = JobSpec.from_file(args.spec)
    try:
        summary = run(spec, args.job_id, args.events, args.attempt)
    except Exception as exc:  # noqa: BLE001 - the job's failure, told in one line
        print(f"job {args.job_id} failed: {describe_failure(exc)}", file=sys.stderr)
        return 1
    print(json.dumps({"job_id": args.job_id, "summary": summary}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
