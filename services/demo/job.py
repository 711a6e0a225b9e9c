"""`distillery demo` (`make demo`): a trained teacher distilled into a small student, end to end.

    distillery demo                      # ~/.cache/distillery/builtin holds the models after run 1

1. The built-in teacher and SFT student (services.demo.builtin) are trained on this machine, once.
2. The one-machine stack comes up in its own state directory: Redis (REDIS_URL, else embedded),
   a local Ray head with its dashboard, the teacher server, the scheduler and the API.
3. A job is submitted over REST: Warmup-Distill, then on-policy KD with the adaptive KL loss,
   evaluated before training, after the warmup, during KD and at the end.
4. Its events are followed with a progress bar; at the end a table (teacher, student before,
   after warmup, after KD: exact match and ROUGE-L) and a PNG of the loss and accuracy curves
   are written into the job's run directory, whose path is printed.
5. Everything the demo started is stopped, also on Ctrl-C or an error.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from services.progress import step_bar

POINTS = (("before", "student before"), ("warmup", "student after warmup"), ("final", "student after KD"))


@dataclass(frozen=True)
class DemoJob:
    """The knobs of the submitted job; the defaults are what `make demo` runs (docs/quality.md
    shows how they were chosen)."""
    warmup_prompts: int = 256
    warmup_steps: int = 60
    warmup_lr: float = 1e-3
    distill_steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    eval_every: int = 100
    eval_samples: int = 200
    log_every: int = 20  # also how often Ray Train gets a report


QUICK_JOB = DemoJob(warmup_prompts=16, warmup_steps=2, distill_steps=4, batch_size=8, eval_every=2, eval_samples=16,
                    log_every=1)


def job_spec(assets, endpoint: str, job: DemoJob, name: str) -> dict[str, Any]:
    """The REST document of the demo job (docs/training.md describes every field).

    Warmup-Distill flags every student token outside the teacher's top-1 (for arithmetic, a
    wrong digit), puts the teacher's token there and lets the teacher finish the answer; the
    preference loss is DPO with an NLL term on the corrected answer. KD is on-policy (λ = 1)
    with the adaptive KL loss over the teacher's full rows (the vocabulary is 23 tokens).
    """
    return {
        "name": name, "seed": 0,
        "student": {"model": str(assets.student)},
        "teacher": {"endpoints": [endpoint], "timeout_s": 60},
        "data": {"path": str(assets.train), "eval_path": str(assets.eval), "max_prompt_tokens": 32,
                 "max_response_tokens": 16},
        "warmup": {"enabled": True, "prompts": job.warmup_prompts, "samples_per_prompt": 2,
                   "rule": "teacher_rank", "rank_k": 1, "max_new_tokens": 8, "steps": job.warmup_steps,
                   "batch_size": 16, "lr": job.warmup_lr, "beta": 0.1, "sft_weight": 1.0},
        "distill": {"loss": "akl", "mu": 0.5, "steps": job.distill_steps, "batch_size": job.batch_size,
                    "on_policy_fraction": 1.0, "full_logprobs": True, "max_new_tokens": 8, "lr": job.lr,
                    "warmup_steps": 10, "sample_temperature": 1.0},
        "checkpoint": {"every_steps": 200},
        "eval": {"max_samples": job.eval_samples, "max_new_tokens": 8, "batch_size": 100, "before": True,
                 "after_warmup": True, "every_steps": job.eval_every},
        "log_every": job.log_every,
    }


class Follower:
    """Progress bar and record of one job's events: losses per stage, evals, the final summary."""

    def __init__(self, console: Console, spec: dict[str, Any]) -> None:
        self.spec, self.console = spec, console
        self.plain = not console.is_terminal  # no live bar in a log file: a line now and then instead
        self.losses: dict[str, list[tuple[int, float]]] = {"warmup": [], "distill": []}
        self.evals: list[dict[str, Any]] = []
        self.state = "queued"
        self.bar = step_bar(console)
        self.task = self.bar.add_task("job queued", total=None, info="")

    def on_event(self, ev: dict[str, Any]) -> None:
        kind, stage = ev.get("kind"), ev.get("stage")
        if kind == "state":
            self.state = ev["state"]
            self.bar.update(self.task, description=f"job {self.state}")
        elif kind == "metrics" and ev.get("rank", 0) == 0 and stage == "eval":
            self.evals.append(ev)
            self.bar.update(self.task, info=f"eval {ev['point']}: exact match {ev['exact_match']:.1%}")
            if self.plain:
                self.console.print(f"     eval ({ev['point']}, step {ev['step']}): exact match {ev['exact_match']:.1%}")
        elif kind == "metrics" and ev.get("rank", 0) == 0 and stage in self.losses and "loss" in ev:
            self.losses[stage].append((int(ev["step"]), float(ev["loss"])))
            info = f"loss {ev['loss']:.4f}"
            if "tokens_per_s" in ev:
                info += f"  {ev['tokens_per_s']:.0f} tok/s"
            self.bar.update(self.task, description=stage, completed=ev["step"],
                            total=self.spec[stage]["steps"], info=info)
            if self.plain and ev["step"] % 100 == 0:
                self.console.print(f"     {stage} step {ev['step']}/{self.spec[stage]['steps']}: {info}")


def report_rows(follower: Follower, summary: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(model, exact match, ROUGE-L) rows of the report table, from the job's own evaluations."""
    final = (summary.get("eval") or {})
    rows = []
    teacher = final.get("teacher")
    if teacher:
        rows.append(("teacher", teacher["exact_match"], teacher["rouge_l"]))
    by_point = {e["point"]: e for e in follower.evals}
    for point, label in POINTS:
        if point == "final" and "student" in final:
            rows.append((label, final["student"]["exact_match"], final["student"]["rouge_l"]))
        elif point in by_point:
            rows.append((label, by_point[point]["exact_match"], by_point[point]["rouge_l"]))
    return rows


def plot(follower: Follower, rows: list[tuple[str, float, float]], spec: dict[str, Any], path: Path) -> Path:
    """Loss of each stage and student exact match against the optimizer step (warmup first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offset = spec["warmup"]["steps"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if follower.losses["warmup"]:
        xs, ys = zip(*follower.losses["warmup"])
        left.plot(xs, ys, label="warmup (DPO + NLL)")
    if follower.losses["distill"]:
        xs, ys = zip(*follower.losses["distill"])
        left.plot([x + offset for x in xs], ys, label="KD (adaptive KL)")
    left.axvline(offset, color="grey", lw=0.8, ls=":")
    left.set(xlabel="optimizer step", ylabel="loss", title="training loss")
    left.legend()
    points = sorted((_global_step(e, offset), e["exact_match"]) for e in follower.evals)
    final = [r for r in rows if r[0] == "student after KD"]
    if final:  # the end-of-run eval is in the job summary, not an eval event
        points.append((offset + spec["distill"]["steps"], final[0][1]))
    if points:
        xs, ys = zip(*points)
        right.plot(xs, [100 * y for y in ys], marker="o", label="student")
    teacher = [r for r in rows if r[0] == "teacher"]
    if teacher:
        right.axhline(100 * teacher[0][1], color="tab:red", ls="--", label="teacher")
    right.axvline(offset, color="grey", lw=0.8, ls=":")
    right.set(xlabel="optimizer step", ylabel="exact match (%)", title="eval accuracy", ylim=(0, 100))
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _global_step(ev: dict[str, Any], warmup_steps: int) -> int:
    if ev["point"] == "before":
        return 0
    if ev["point"] == "warmup":
        return warmup_steps
    return warmup_steps + int(ev.get("distill_step", 0))


def run(*, job: DemoJob = DemoJob(), runs_dir: Path = Path("runs"), cache_dir: Path | None = None,
        state_dir: Path | None = None, console: Console | None = None, recipe=None) -> Path:
    """The whole demo; returns the run directory holding report.md, report.json and report.png."""
    from services import local
    from services.apiclient import ApiClient
    from teacher_server.process import free_port

    from . import builtin

    console = console or Console()
    started = time.monotonic()
    console.rule("[bold]Distillery demo")
    console.print("1/4  the built-in teacher and SFT student (trained once, then cached)")
    with step_bar(console) as bar:
        tasks: dict[str, Any] = {}

        def on_step(what: str, step: int, total: int, loss: float) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(f"train {what}", total=total, info="")
            if step % 20 == 0 or step == total:
                bar.update(tasks[what], completed=step, info=f"loss {loss:.3f}")

        assets = builtin.prepare(recipe or builtin.Recipe(), cache_dir, on_step)
    console.print(f"     cached in {assets.root}")
    table = Table(title="built-in models")
    for col in ("model", "parameters", "exact match"):
        table.add_column(col)
    for who in ("teacher", "student"):
        s = assets.scores[who]
        table.add_row(who, f"{s['parameters'] / 1e6:.2f}M", f"{s['exact_match']:.1%}")
    console.print(table)

    console.print("2/4  the stack: Redis, Ray (with dashboard), teacher server, scheduler, API")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ["DISTILLERY_MODEL_ROOTS"] = str(assets.root)
    os.environ["DISTILLERY_DATA_ROOTS"] = str(assets.root)
    # Keys of its own: with a shared REDIS_URL, the demo's scheduler must not take other jobs.
    os.environ["DISTILLERY_REDIS_PREFIX"] = "distillery-demo"
    state_dir = state_dir or local.default_state_dir().with_name("demo-stack")
    runs_dir = runs_dir.resolve()
    dashboard_port = 8265 if _port_free(8265) else free_port()
    state = local.up(state_dir, api_port=free_port(), dashboard_port=dashboard_port,
                     teacher_model=str(assets.teacher), runs_dir=runs_dir, redis_url=os.environ.get("REDIS_URL"))
    try:
        console.print(state.describe().replace("`distillery down`", "Ctrl-C (the demo stops it)"))
        client = ApiClient(state.api_url)
        name = time.strftime("demo-%Y%m%d-%H%M%S")
        spec = job_spec(assets, state.teacher_endpoint, job, name)
        submitted = client.submit(spec)
        job_id = submitted["id"]
        console.print(f"3/4  job {job_id} submitted over REST ({state.api_url}/v1/jobs/{job_id}): "
                      f"Warmup-Distill {job.warmup_steps} steps, then on-policy KD with adaptive KL "
                      f"{job.distill_steps} steps")
        follower = Follower(console, submitted["spec"])
        with follower.bar:
            for ev in client.events(job_id):
                follower.on_event(ev)
        final = client.job(job_id)
        run_dir = Path(state.runs_dir) / job_id  # the scheduler runs every job in <runs dir>/<job id>
        if final["state"] != "succeeded":
            raise RuntimeError(f"job {job_id} {final['state']}: {final.get('error') or 'no error recorded'} "
                               f"(run directory {run_dir}, service logs {state_dir / 'logs'})")
        summary = final.get("summary") or {}
        rows = report_rows(follower, summary)
        console.print("4/4  report")
        _print_report(console, rows)
        plot(follower, rows, final["spec"], run_dir / "report.png")
        elapsed = time.monotonic() - started
        _write_report(run_dir, rows, follower, final, assets, elapsed)
        console.print(f"run directory: {run_dir}  (report.md, report.json, report.png)")
        console.print(f"demo took {elapsed / 60:.1f} min")
        return run_dir
    finally:
        console.print("stopping the stack ...")
        local.down(state_dir)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _print_report(console: Console, rows: list[tuple[str, float, float]]) -> None:
    table = Table(title="eval split: greedy answers")
    for col in ("model", "exact match", "ROUGE-L"):
        table.add_column(col)
    for who, em, rl in rows:
        table.add_row(who, f"{em:.1%}", f"{rl:.3f}")
    console.print(table)


def _write_report(run_dir: Path, rows, follower: Follower, job: dict[str, Any], assets, elapsed: float) -> None:
    lines = ["# Distillery demo report", "", f"job `{job['id']}`, {elapsed / 60:.1f} min end to end", "",
             "| model | exact match | ROUGE-L |", "|---|---|---|"]
    lines += [f"| {who} | {em:.1%} | {rl:.3f} |" for who, em, rl in rows]
    lines += ["", "Greedy answers on the eval split. Each answer is one number, so ROUGE-L (on whitespace",
              "tokens) equals exact match on this task.", "", "![loss and accuracy](report.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    doc = {"job_id": job["id"], "rows": [{"model": w, "exact_match": e, "rouge_l": r} for w, e, r in rows],
           "evals": follower.evals, "losses": follower.losses, "assets": {"root": str(assets.root),
                                                                           "scores": assets.scores},
           "elapsed_s": round(elapsed, 1)}
    (run_dir / "report.json").write_text(json.dumps(doc, indent=2))
