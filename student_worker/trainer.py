"""Trainer: one worker's distillation loop, resumable to the exact step.

    trainer = Trainer(spec, teacher=build_teacher(spec.teacher))
    trainer.setup()          # student, data, optimizer; resumes from the latest checkpoint
    summary = trainer.train()  # (warmup) -> distill -> eval, checkpoints at every stage boundary
    trainer.cleanup()

Phases of one distill step (`_distill_step`):
  1. for each of the `grad_accum` micro-batches: take B prompts from this rank's shard; with
     probability λ the student samples the responses, else they come from the data set or the
     teacher (SeqKD) (the coin and the sampler are seeded from (seed, stage, step, micro, rank));
     teacher.score on prompt + response from len(prompt), top-k (or full rows);
  2. the step's loss tokens are counted over every micro-batch and every rank (one collective);
  3. for each micro-batch: student forward, the chosen divergence summed over its response
     positions and divided by that global count, backward; so every token of the optimizer step
     weighs the same, however the tokens fall into micro-batches and ranks;
  4. gradients averaged over ranks, clip, optimizer and LR step, unless any loss was non-finite
     (skipped on every rank, counted).
All randomness comes from those seeds, and the data position, optimizer, scheduler, gradient
scaler and counters are checkpointed, so a resumed run repeats an uninterrupted one step for step
(R-40).

Precision (`student.precision`): the weights and AdamW state stay float32 under the mixed
settings; the student's forwards (sampling, the training forward, the DPO reference, eval) run
under autocast, the log-softmax and losses in float32; fp16 scales the loss (GradScaler).

The student (`models.py`): `student.model` is a directory or a hub id in the hub cache; its logits
are cut to its tokenizer's tokens, and teacher ids past them are dropped before a loss sees them.
With `student.lora` only the adapters train and are saved (`lora.py`), and Warmup-Distill's DPO
reference is the same model with the adapters off.

Ranks are data-parallel: with `resources.strategy` ddp each holds the whole student and gradients
are averaged by hand (`distributed.py`); with fsdp the student is sharded over them (`fsdp.py`).
Every collective goes through `self.comm`, on the device its process group serves.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import random
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from teacher_server.contract import Generation, ScoredSequence, Teacher, TeacherMismatch
from teacher_server.model_dirs import check_model_dir, resolve_model, tokenizer_fingerprint
from teacher_server.sampling import derive_seed

from . import fsdp
from . import warmup as warmup_mod
from .checkpoint import CheckpointManager, CheckpointRef, write_text_atomic
from .config import JobSpec, TeacherSpec, check_teacher_length, resume_changes
from .distributed import Comm
from .chat import check_teacher_template
from .data import Example, ShardedOrder, check_data, load_splits
from .eval import evaluate_models, load_scorer
from .losses import token_divergence
from .models import Student, build_student, load_student, restrict_teacher, slice_vocab
from .rollout import (
    KDBatch,
    collate,
    forward_top_ids,
    mismatch_metrics,
    sample_rollouts,
    student_candidates,
    student_logits,
    teacher_responses,
)

log = logging.getLogger(__name__)
MetricsCallback = Callable[[dict[str, Any]], None]
# Called on every rank at every save point: rank 0 passes the checkpoint it wrote, others None.
CheckpointCallback = Callable[[CheckpointRef | None, dict[str, Any]], None]


class NonFiniteLoss(RuntimeError):
    """Too many non-finite losses in a row; the job fails with reason `non_finite_loss`."""

    reason = "non_finite_loss"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def check_inputs(spec: JobSpec) -> None:
    """Check every local input of the job before anything loads, naming the spec field at fault:
    model directories (config.json, safetensors weights; the student's tokenizer too) and data
    sources and rows (data.check_data), and that an eval.scorer imports. A hub id is found in the
    hub cache, and downloaded into it first only where downloads are allowed
    (teacher_server.model_dirs)."""
    dirs = [("student.model", spec.student.model, spec.student.revision, True)]
    if spec.teacher.local_model:
        dirs.append(("teacher.local_model", spec.teacher.local_model, spec.teacher.revision, False))
    for field, ref, revision, needs_tokenizer in dirs:
        try:
            path = check_model_dir(resolve_model(ref, revision).path)
        except (FileNotFoundError, ValueError) as exc:
            raise ValueError(f"{field}: {exc}") from None
        if needs_tokenizer and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
            raise ValueError(f"{field}: {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                             f"save the tokenizer beside the weights")
    if spec.student.lora is not None and importlib.util.find_spec("peft") is None:
        raise ValueError("student.lora: LoRA students need the peft package: pip install 'distillery[peft]'")
    if spec.eval.enabled and spec.eval.scorer is not None:
        load_scorer(spec.eval.scorer)
    check_data(spec)


def build_teacher(spec: TeacherSpec, on_unavailable: Callable[[str], None] | None = None,
                  job_id: str | None = None) -> Teacher:
    """A gRPC client for served teachers, or the teacher in-process for `local_model`.

    A served teacher that stops answering is waited for up to `spec.unavailable_timeout_s`;
    `on_unavailable(message)` hears once per call that waits. Calls name `job_id` and ask for
    `spec.weight`, so a server that several jobs share queues them fairly."""
    import os

    if spec.local_model:
        from teacher_server.in_process import LocalTeacher

        return LocalTeacher.from_model_dir(spec.local_model, revision=spec.revision)
    from teacher_server.client import TeacherClient

    token = os.environ.get(spec.token_env) if spec.token_env else None
    return TeacherClient(spec.endpoints, timeout_s=spec.timeout_s, unavailable_timeout_s=spec.unavailable_timeout_s,
                         token=token, on_unavailable=on_unavailable, job_id=job_id, job_weight=spec.weight)


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total_steps`."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def autocast(precision: str, device: str) -> AbstractContextManager:
    """The compute context of the student's forwards under `precision` (a no-op unless mixed)."""
    if precision not in AUTOCAST_DTYPES:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[precision])


@dataclasses.dataclass
class _Scoring:
    """One group of rollouts on its way through the teacher (see Trainer._distill_step)."""

    prompts: list[torch.Tensor]
    responses: list[torch.Tensor]
    candidates: list[torch.Tensor] | None
    future: Future | None = None
    took_s: float = 0.0  # the teacher call's own time


class Trainer:
    def __init__(self, spec: JobSpec, teacher: Teacher, *, rank: int = 0, world: int = 1,
                 on_metrics: MetricsCallback | None = None,
                 on_checkpoint: CheckpointCallback | None = None, comm: Comm | None = None) -> None:
        self.spec, self.teacher, self.rank, self.world = spec, teacher, rank, world
        self.comm = comm or Comm.current()
        self.on_metrics, self.on_checkpoint = on_metrics, on_checkpoint
        self.run_dir = Path(spec.checkpoint.dir)
        self.ckpt = CheckpointManager(self.run_dir, spec.checkpoint.keep_last)
        self.is_main = rank == 0
        self.stage, self.step = "warmup" if spec.warmup.enabled else "distill", 0
        self.non_finite_streak = self.non_finite_total = 0
        # Wall time per stage over the whole run (resumes included: kept in checkpoints).
        self.timing: dict[str, dict[str, float]] = {
            "warmup": {"wall_s": 0.0, "steps": 0.0},
            "distill": {"wall_s": 0.0, "steps": 0.0, "tokens": 0.0, "teacher_s": 0.0},
            "eval": {"wall_s": 0.0}}
        self.history: list[dict[str, Any]] = []
        self.resumed_from: CheckpointRef | None = None
        self.resume_notes: list[str] = []
        precision = spec.student.precision
        self.scaler = torch.amp.GradScaler(torch.device(spec.student.device).type) \
            if precision == "fp16-mixed" else None
        self.sharded = spec.resources.strategy == "fsdp" and fsdp.available()
        if spec.resources.strategy == "fsdp" and not self.sharded:
            log.info("strategy fsdp without a process group: one process holds the whole student")
        # The teacher's calls of a step, one at a time in order, beside the sampling and training.
        self._scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-score")
        self._scoring_error: BaseException | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, resume_from: CheckpointRef | None = None) -> None:
        """Build everything; resume from `resume_from`, else from the run directory's latest."""
        from transformers import AutoTokenizer

        spec = self.spec
        check_inputs(spec)
        self.student_ref = resolve_model(spec.student.model, spec.student.revision)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.student_ref.path), local_files_only=True)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_id = self.tokenizer.eos_token_id
        ref = resume_from or self.ckpt.latest_valid()
        if ref is not None:
            self._check_resumable(ref)
        else:  # dropout (LoRA's, a model's own) draws from the global RNG: seeded here, restored on resume
            torch.manual_seed(derive_seed(spec.seed, "torch", self.rank))
        # Full weights from the checkpoint, or (LoRA) the base from student.model plus its adapters.
        self.student: Student = build_student(
            spec.student, self.student_ref.path, tokenizer_size=len(self.tokenizer), seed=spec.seed,
            device="cpu" if self.sharded else spec.student.device, checkpoint=ref.path if ref else None)
        self.model = self.student.model
        if self.sharded:  # each rank keeps its shard, on its device
            self.model = fsdp.shard(self.model, spec.student.device, self.comm.group)
        info = self.teacher.info()
        info.check_compatible(self.student.vocab_size, tokenizer_fingerprint(self.tokenizer))
        self.teacher_vocab = info.vocab_size
        wanted = spec.teacher.student_candidates
        if wanted > info.max_candidates:
            raise TeacherMismatch(f"teacher.student_candidates is {wanted}, but teacher {info.model_name!r} "
                                  f"({info.engine or 'an older server'}) scores at most {info.max_candidates} "
                                  f"candidate ids per position; lower it, or use the transformers engine")
        check_teacher_length(spec, info.max_sequence_length)
        self.train_set, self.eval_set = load_splits(spec.data, self.tokenizer)
        check_teacher_template(spec, self.tokenizer, self.train_set + self.eval_set)
        self.order = ShardedOrder(len(self.train_set), spec.distill.batch_size, rank=self.rank,
                                  world=self.world, seed=spec.seed)
        self.pairs: list[warmup_mod.PreferencePair] = []
        self.pair_order: ShardedOrder | None = None
        self.reference: torch.nn.Module | None = None
        self.reference_ctx: Callable[[], AbstractContextManager] = nullcontext
        if ref is not None:
            self.load(ref)
        self._new_optimizer()
        if ref is not None:
            self._restore_optimizer(self._pending_state)

    def _check_resumable(self, ref: CheckpointRef) -> None:
        """Refuse a checkpoint whose spec differs in a field that changes the run; note the rest."""
        saved_path = ref.path / "spec.json"
        if not saved_path.is_file():
            return
        breaking, harmless = resume_changes(json.loads(saved_path.read_text()), self.spec)
        if breaking:
            raise ValueError(
                f"checkpoint {ref.path} was written by a different job spec, and these fields change what the "
                f"run computes, so it cannot resume exactly: {'; '.join(map(str, breaking))}. Restore them, or "
                f"use a new checkpoint.dir for a new run")
        self.resume_notes = [str(c) for c in harmless]
        if harmless:
            log.info("resuming %s with changed fields that do not affect the run: %s", ref.path.name,
                     "; ".join(self.resume_notes))

    def _compute(self) -> AbstractContextManager:
        """The context of the student's forwards: autocast under the mixed precisions."""
        return autocast(self.spec.student.precision, self.spec.student.device)

    def _stage_spec(self):
        return self.spec.warmup if self.stage == "warmup" else self.spec.distill

    def _new_optimizer(self) -> None:
        d = self.spec.distill
        s = self._stage_spec()
        self.optimizer = torch.optim.AdamW(self._trainable(), lr=s.lr, weight_decay=d.weight_decay)
        warm = d.warmup_steps if self.stage == "distill" else 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(warm, s.steps, d.min_lr_ratio))

    # ------------------------------------------------------------------ save / load
    def state_dict(self, optimizer_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything but the weights; `optimizer_state` is the full one gathered under fsdp."""
        return {
            "stage": self.stage, "step": self.step,
            "optimizer": self.optimizer.state_dict() if optimizer_state is None else optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "order": self.order.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "counters": {"non_finite_streak": self.non_finite_streak,
                         "non_finite_total": self.non_finite_total},
            "timing": self.timing,
            "student_commit": self.student_ref.commit,  # the hub snapshot of student.model, if one
        }

    def save(self) -> CheckpointRef | None:
        """A save point: rank 0 writes the checkpoint; every rank tells `on_checkpoint`."""
        ref = None
        model = self.student.adapters if self.student.adapters is not None else self.model  # LoRA: adapters only
        optimizer_state = None
        if self.sharded:  # a collective: every rank gathers, rank 0 receives the full copies
            model, optimizer_state = fsdp.full_checkpoint(self.model, self.optimizer)
        if self.is_main:
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                raise NonFiniteLoss(f"non-finite weights at {self.stage} step {self.step}; not saving them")
            ref = self.ckpt.save(model, self.state_dict(optimizer_state), self.spec.to_json(), stage=self.stage,
                                 step=self.step, tokenizer=self.tokenizer)
            log.info("checkpoint %s", ref.path)
        if self.on_checkpoint is not None:
            self.on_checkpoint(ref, {"stage": self.stage, "step": self.step,
                                     "non_finite_total": self.non_finite_total})
        return ref

    def load(self, ref: CheckpointRef) -> None:
        """Counters and positions from `ref` (weights were loaded from it by setup)."""
        state = self.ckpt.load_state(ref)
        saved_commit = state.get("student_commit")
        if saved_commit and self.student_ref.commit and saved_commit != self.student_ref.commit:
            raise ValueError(f"checkpoint {ref.path} was trained from {self.spec.student.model} at commit "
                             f"{saved_commit}, which now resolves to {self.student_ref.commit}: pin "
                             f"student.revision: {saved_commit} to resume it")
        self.stage, self.step = state["stage"], int(state["step"])
        self.order.load_state_dict(state["order"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_tuple(state["rng"]["python"]))
        self.non_finite_streak = int(state["counters"]["non_finite_streak"])
        self.non_finite_total = int(state["counters"]["non_finite_total"])
        if "timing" in state:  # checkpoints from before timing was kept start from zero
            for stage, totals in state["timing"].items():
                self.timing.setdefault(stage, {}).update({k: float(v) for k, v in totals.items()})
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._pending_state = state
        self.resumed_from = ref
        log.info("resumed from %s (stage %s, step %d)", ref.path.name, self.stage, self.step)

    def _restore_optimizer(self, state: dict[str, Any]) -> None:
        if self.sharded:
            fsdp.load_optimizer(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def cleanup(self) -> None:
        self._scorer.shutdown(wait=True, cancel_futures=True)
        close = getattr(self.teacher, "close", None)
        if close is not None:
            close()

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        """Run the remaining stages; returns the summary (also written to <run dir>/summary.json).

        A run that already finished (its done checkpoint and summary.json exist) is left as it
        is: nothing is trained, evaluated or written, and the saved summary is returned with
        `already_finished` set."""
        summary_path = self.run_dir / "summary.json"
        if self.stage == "done" and self.resumed_from is not None and summary_path.is_file():
            log.warning("the run in %s already finished; nothing to do, its files are left as they are",
                        self.run_dir)
            return {**json.loads(summary_path.read_text()), "already_finished": True}
        if self.resumed_from is None and self.spec.eval.before:  # a fresh run, at its first step
            self._eval_point("before")
        if self.stage == "warmup":
            t0 = time.perf_counter()
            self._run_warmup()
            self.timing["warmup"]["wall_s"] += time.perf_counter() - t0
            if self.spec.eval.after_warmup:
                self._eval_point("warmup")
            self._advance("distill")
        if self.stage == "distill":
            every = self.spec.eval.every_steps
            while self.step < self.spec.distill.steps:
                metrics = self._distill_step()
                t = self.timing["distill"]
                t["wall_s"] += metrics["step_s"]
                t["steps"] += 1
                t["tokens"] += metrics["tokens"]
                t["teacher_s"] += metrics["teacher_s"]
                self._emit(metrics)
                if every and self.step % every == 0 and self.step < self.spec.distill.steps:
                    self._eval_point("distill")
                self._maybe_checkpoint()
            self._advance("done")
        summary = {"stage": self.stage, "non_finite_total": self.non_finite_total,
                   "last": self.history[-1] if self.history else None}
        if self.resume_notes:
            summary["resume_changes"] = self.resume_notes
        if self.spec.eval.enabled and self.eval_set:
            t0 = time.perf_counter()
            with self._full_weights(), self._compute():
                if self.is_main:
                    summary["eval"] = evaluate_models(
                        self.model, self.teacher if self.spec.eval.teacher else None, self.eval_set,
                        self.tokenizer, self.spec.eval, self.eos_id)
            self.timing["eval"]["wall_s"] += time.perf_counter() - t0
        summary["timing"] = self.timing_summary()
        if self.is_main:
            write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        return summary

    def timing_summary(self) -> dict[str, Any]:
        """Where the run's time went, for summary.json: wall seconds per stage (mid-run eval
        points included in eval), and for KD its tokens/s and the share of step time spent waiting
        for the teacher's scores, as rank 0 saw them."""
        w, d, e = self.timing["warmup"], self.timing["distill"], self.timing["eval"]
        out: dict[str, Any] = {"eval_wall_s": round(e["wall_s"], 6)}
        if self.spec.warmup.enabled:
            out["warmup"] = {"wall_s": round(w["wall_s"], 6), "steps": int(self.spec.warmup.steps)}
        out["distill"] = {
            "wall_s": round(d["wall_s"], 6), "steps": int(d["steps"]), "tokens": int(d["tokens"]),
            "tokens_per_s": round(d["tokens"] / d["wall_s"], 2) if d["wall_s"] else None,
            "teacher_wait_share": round(d["teacher_s"] / d["wall_s"], 4) if d["wall_s"] else None}
        return out

    def _eval_point(self, point: str) -> None:
        """Student-only evaluation in the middle of a run, emitted as a metrics event of stage
        "eval" (`point` before / warmup / distill); its step is the optimizer step counted over
        both stages, so every point of a run has its own event key."""
        if not (self.spec.eval.enabled and self.eval_set):
            return
        t0 = time.perf_counter()
        with self._full_weights(), self._compute():
            if not self.is_main:
                return
            result = evaluate_models(self.model, None, self.eval_set, self.tokenizer, self.spec.eval,
                                     self.eos_id)["student"]
        self.timing["eval"]["wall_s"] += time.perf_counter() - t0
        warmup_steps = self.spec.warmup.steps if self.spec.warmup.enabled else 0
        distill_step = self.step if point == "distill" else 0
        self._emit({"stage": "eval", "point": point, "distill_step": distill_step,
                    "step": 0 if point == "before" else warmup_steps + distill_step,
                    **{k: v for k, v in result.items() if k != "samples"}})

    def _advance(self, stage: str) -> None:
        """Stage boundary: fresh optimizer for the next stage, and a checkpoint."""
        self.stage, self.step = stage, 0
        if stage != "done":
            self._new_optimizer()
        self.save()

    def _maybe_checkpoint(self) -> None:
        every = self.spec.checkpoint.every_steps
        # A step just skipped for a non-finite loss is no point to save from.
        if self.step % every == 0 and self.step < self._stage_spec().steps and not self.non_finite_streak:
            self.save()

    def _emit(self, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)
        if self.is_main and metrics["step"] % self.spec.log_every == 0:
            shown = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in metrics.items()}
            print(json.dumps(shown), flush=True)
        if self.on_metrics is not None:
            self.on_metrics(metrics)

    def _full_weights(self, needed: bool = True) -> AbstractContextManager[None]:
        """Under fsdp, a block in which every rank holds the full student (for sampling and eval,
        whose forwards differ in number between ranks); every rank enters it together."""
        return fsdp.full_params(self.model) if self.sharded and needed else nullcontext()

    def _backward(self, loss: torch.Tensor) -> None:
        # FSDP: every rank joins the backward's reduce-scatters; a non-finite step is dropped after.
        if self.sharded or torch.isfinite(loss):
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _update(self, losses: list[torch.Tensor]) -> tuple[bool, float]:
        """Average gradients over ranks, clip and step, unless a loss on any rank was non-finite.
        Returns whether the step was taken (the same answer on every rank) and the seconds spent
        averaging gradients."""
        finite = self.comm.all_true(all(bool(torch.isfinite(l)) for l in losses))
        reduce_s = 0.0
        if finite:
            if not self.sharded:  # FSDP averaged them in the backward
                t0 = time.perf_counter()
                self.comm.average_gradients(self._trainable())
                reduce_s = time.perf_counter() - t0
            if self.scaler is not None:  # after the average, so every rank sees the same infs
                self.scaler.unscale_(self.optimizer)
            if self.spec.distill.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self._trainable(), self.spec.distill.grad_clip)
            stepped = True
            if self.scaler is not None:  # skips the update itself when a gradient overflowed
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                stepped = self.scaler.get_scale() >= scale  # it lowers the scale after an overflow
            else:
                self.optimizer.step()
            if stepped:  # the schedule follows the updates made, as the optimizer's own counter does
                self.scheduler.step()
            self.non_finite_streak = 0
        else:
            self.non_finite_streak += 1
            self.non_finite_total += 1
            if self.non_finite_streak >= self.spec.distill.max_non_finite:
                raise NonFiniteLoss(f"{self.non_finite_streak} non-finite losses in a row at "
                                    f"{self.stage} step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        return finite, reduce_s

    def _check_replicas(self) -> None:
        every = self.spec.resources.check_replicas_every
        if every and self.step % every == 0 and not self.comm.replicas_agree(self.model):
            raise RuntimeError(f"rank weights diverged at {self.stage} step {self.step}")

    # ------------------------------------------------------------------ distill
    def _distill_step(self) -> dict[str, Any]:
        """One optimizer step. The teacher scores groups of rollouts on its own thread as soon as
        their rows finish sampling (`distill.score_chunks`), so it works while the student samples
        the rest of the micro-batch and the later ones, and while it trains on the micro-batches
        already scored; `teacher_s` is only the time the step waits for it. Every rollout comes
        from the weights of this step."""
        d, t_start = self.spec.distill, time.perf_counter()
        self.model.train()
        times = {"generate_s": 0.0, "teacher_s": 0.0, "forward_backward_s": 0.0}
        micros: list[list[_Scoring]] = []
        on_policy = 0
        for micro in range(d.grad_accum):  # 1. rollouts, sent to the teacher group by group
            examples = [self.train_set[i] for i in self.order.next_batch()]
            prompts = [e.prompt_ids for e in examples]
            seed = derive_seed(self.spec.seed, self.stage, self.step, micro, self.rank)
            t0 = time.perf_counter()
            groups: list[_Scoring] = []
            with self._full_weights(d.on_policy_fraction > 0 or self.spec.teacher.student_candidates > 0):
                on_policy += self._rollouts(examples, prompts, seed, lambda *g: groups.append(self._score(*g)))
            micros.append(groups)
            times["generate_s"] += time.perf_counter() - t0
        tokens = sum(len(r) for groups in micros for g in groups for r in g.responses)
        global_tokens = self.comm.sum_int(tokens)  # 2. every token of the step weighs the same
        scale = self.comm.world / max(global_tokens, 1)  # the gradient average divides by world
        loss_sums, parts = [], []
        for groups in micros:  # 3. forward and backward, one micro-batch at a time
            # One backward per micro-batch, whatever its groups: FSDP ranks must run equally many
            # (collectives), and ddp and fsdp then add the same gradients in the same order.
            batch, waited = self._collate(groups)
            times["teacher_s"] += waited
            t2 = time.perf_counter()
            with self._compute():
                logits = student_logits(self.model, batch)
            per_token = token_divergence(logits, batch.teacher, batch.response_mask, loss=d.loss, alpha=d.alpha,
                                         beta=d.beta, mu=d.mu, temperature=d.temperature,
                                         chunk_size=d.loss_chunk_size)
            loss_sum = per_token.sum()
            self._backward(loss_sum * scale)
            loss_sums.append(loss_sum.detach())
            parts.append(mismatch_metrics(logits.detach().float(), batch, d.temperature))
            times["forward_backward_s"] += time.perf_counter() - t2
        took, reduce_s = self._update(loss_sums)  # 4.
        self.step += 1
        self._check_replicas()
        elapsed = time.perf_counter() - t_start
        metrics: dict[str, Any] = {
            "stage": "distill", "step": self.step, "loss": float(torch.stack(loss_sums).sum()) / max(tokens, 1),
            "skipped": not took, "lr": self.scheduler.get_last_lr()[0], "tokens": tokens,
            "tokens_per_s": tokens / elapsed, "step_s": elapsed,
            "on_policy_fraction": on_policy / d.grad_accum, **times, "reduce_s": reduce_s,
            "teacher_latency_s": sum(g.took_s for groups in micros for g in groups) / d.grad_accum,
            "teacher_wait_share": times["teacher_s"] / elapsed,
        }
        if self.scaler is not None:
            metrics["loss_scale"] = float(self.scaler.get_scale())
        for key in parts[0]:
            metrics[key] = sum(p[key] for p in parts) / len(parts)
        return metrics

    def _rollouts(self, examples: list[Example], prompts: list[torch.Tensor], seed: int,
                  emit: Callable[..., None]) -> int:
        """The micro-batch's responses, handed to `emit(prompts, responses, top_ids)` in groups:
        sampled ones as soon as `distill.score_chunks` of them (about) are done, the others at once.
        top_ids: the student's top ids per response position when teacher.student_candidates asks
        for them (from the sampler, or one forward without gradient), else None. Returns 1 when the
        student sampled them."""
        d, wanted = self.spec.distill, self.spec.teacher.student_candidates
        if random.Random(seed).random() < d.on_policy_fraction:
            size = -(-len(prompts) // d.score_chunks)
            ready: list[tuple[int, Generation]] = []

            def flush() -> None:
                rows = sorted(ready, key=lambda x: x[0])
                ready.clear()
                emit([prompts[i] for i, _ in rows], [g.token_ids for _, g in rows],
                     [g.topk_ids for _, g in rows] if wanted else None)

            def finished(i: int, gen: Generation) -> None:
                ready.append((i, gen))
                if len(ready) >= size:
                    flush()

            with self._compute():
                sample_rollouts(self.model, prompts, max_new_tokens=d.max_new_tokens,
                                temperature=d.sample_temperature, top_p=d.top_p, stop_ids=[self.eos_id],
                                seed=seed, top_k_ids=wanted, on_finished=finished)
            if ready:
                flush()
            return 1
        if d.off_policy_source == "teacher":
            responses = teacher_responses(self.teacher, prompts, max_new_tokens=d.max_new_tokens,
                                          temperature=d.sample_temperature, top_p=d.top_p,
                                          stop_ids=[self.eos_id], seed=seed)
        else:
            responses = [e.response_ids for e in examples]
        top_ids = None
        if wanted:  # not sampled here: one forward without gradient
            with self._compute():
                top_ids = forward_top_ids(self.model, prompts, responses, wanted,
                                          vocab=self.student.vocab_size, pad_id=self.pad_id)
        emit(prompts, responses, top_ids)
        return 0

    def _score(self, prompts: list[torch.Tensor], responses: list[torch.Tensor],
               top_ids: list[torch.Tensor] | None) -> "_Scoring":
        """Send one group to the teacher, on the scoring thread."""
        d = self.spec.distill
        cands = (student_candidates(top_ids, responses, min(self.student.vocab_size, self.teacher_vocab))
                 if top_ids is not None else None)
        group = _Scoring(prompts, responses, cands)

        def work() -> list[ScoredSequence]:
            if self._scoring_error is not None:  # an earlier group failed: the step fails with it
                raise self._scoring_error
            began = time.perf_counter()
            seqs = [torch.cat([p, r]) for p, r in zip(prompts, responses)]
            extra = {} if cands is None else {"candidates": cands}
            try:
                scored = self.teacher.score(seqs, [len(p) for p in prompts], top_k=d.top_k,
                                            temperature=d.temperature, full_logprobs=d.full_logprobs, **extra)
            except BaseException as exc:
                self._scoring_error = exc
                raise
            group.took_s = time.perf_counter() - began
            return scored

        group.future = self._scorer.submit(work)
        return group

    def _collate(self, groups: list["_Scoring"]) -> tuple[KDBatch, float]:
        """(one KD batch of `groups`, seconds waited for the teacher's answers)."""
        began = time.perf_counter()
        scored = [s for g in groups for s in g.future.result()]  # the teacher's error, if any, is raised here
        waited = time.perf_counter() - began
        cands = None if groups[0].candidates is None else [c for g in groups for c in g.candidates]
        batch = collate([p for g in groups for p in g.prompts], [r for g in groups for r in g.responses], scored,
                        pad_id=self.pad_id, full_logprobs=self.spec.distill.full_logprobs, candidates=cands)
        if self.teacher_vocab > self.student.vocab_size:  # ids past the student's tokens never reach a loss
            batch = dataclasses.replace(batch, teacher=restrict_teacher(batch.teacher, self.student.vocab_size))
        return batch, waited

    # ------------------------------------------------------------------ warmup
    def _run_warmup(self) -> None:
        w = self.spec.warmup
        if self.student.adapters is not None:  # the base itself with the adapters off: no second copy
            self.reference, self.reference_ctx = self.model, self.student.adapters.disable_adapter
        else:
            base = load_student(self.student_ref.path, self.spec.student.precision, self.spec.student.device)
            slice_vocab(base, len(self.tokenizer))
            self.reference = warmup_mod.frozen_copy(base)
        # Pairs come from the frozen initial student, so a resumed warmup rebuilds the same ones.
        prompt_order = ShardedOrder(len(self.train_set), max(1, w.prompts // self.world), rank=self.rank,
                                    world=self.world, seed=self.spec.seed + 1)
        prompts = [self.train_set[i].prompt_ids for i in prompt_order.next_batch()]
        with self.reference_ctx():
            self.pairs, stats = warmup_mod.build_pairs(
                self.reference, self.teacher, prompts, w, eos_id=self.eos_id,
                seed=derive_seed(self.spec.seed, "pairs", self.rank), compute=self._compute,
                vocab_size=self.student.vocab_size)
        self._emit({"stage": "warmup", "step": self.step, "event": "pairs", **stats.as_dict()})
        if self.comm.sum_int(len(self.pairs)) == 0:
            log.warning("warmup built no pairs (nothing flagged); skipping the warmup stage")
            return
        # A rank without pairs still takes every step (zero gradients) so collectives line up.
        self.pair_order = ShardedOrder(len(self.pairs), w.batch_size, seed=self.spec.seed) if self.pairs else None
        for _ in range(self.step if self.pair_order else 0):  # ranks differ in pair counts: replay
            self.pair_order.next_batch()
        while self.step < w.steps:
            t0 = time.perf_counter()
            self.model.train()
            if self.pair_order is not None:
                batch = [self.pairs[i] for i in self.pair_order.next_batch()]
                with self._compute():
                    loss, metrics = warmup_mod.preference_loss(self.model, self.reference, batch, w,
                                                               pad_id=self.pad_id,
                                                               reference_context=self.reference_ctx)
            else:
                loss, metrics = self._zero_loss(), {"loss": 0.0}
            self._backward(loss)
            took, _ = self._update([loss.detach()])
            self.step += 1
            self._check_replicas()
            self._emit({"stage": "warmup", "step": self.step, "skipped": not took,
                        "lr": self.scheduler.get_last_lr()[0], "step_s": time.perf_counter() - t0, **metrics})
            self._maybe_checkpoint()
        self.reference, self.reference_ctx = None, nullcontext

    def _trainable(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates: all of them, or a LoRA student's adapters."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def _zero_loss(self) -> torch.Tensor:
        """A loss with zero gradients for a rank without pairs; under fsdp through a forward, so
        the rank joins the same collectives as the others."""
        if self.sharded:
            ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.spec.student.device)
            return self.model(input_ids=ids).logits.sum() * 0.0
        return sum(p.sum() for p in self.model.parameters()) * 0.0


def _as_tuple(x: Any) -> Any:
    """random.setstate wants tuples; a checkpoint may hold lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
