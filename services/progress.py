"""Rich progress for a training run: one bar per stage, with loss and tokens/s."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from student_worker.config import JobSpec


def step_bar(console: Console) -> Progress:
    """The one progress-bar layout of the CLI: description, bar, n/total, an info field, time."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)


class TrainProgress:
    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.console = Console(stderr=True)
        self.progress = step_bar(self.console)
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "TrainProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, m: dict[str, Any]) -> None:
        stage = m.get("stage", "distill")
        total = self.spec.warmup.steps if stage == "warmup" else self.spec.distill.steps
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, info="")
        if "loss" in m:
            info = f"loss {m['loss']:.4f}"
            if "tokens_per_s" in m:
                info += f"  {m['tokens_per_s']:.0f} tok/s"
            if "accuracy" in m:
                info += f"  pref acc {m['accuracy']:.2f}"
            self.progress.update(self.tasks[stage], completed=m["step"], info=info)

    def report(self, summary: dict[str, Any], run_dir: str) -> None:
        if summary.get("already_finished"):
            self.console.print(f"already finished: {run_dir} holds a finished run of this spec; nothing was "
                               "trained or overwritten (its results are below)")
        ev = summary.get("eval") or {}
        if ev:
            table = Table(title="eval")
            scores = sorted({k for r in ev.values() for k in r if k.startswith("score")})
            for col in ("model", "examples", "exact match", "ROUGE-L", *scores):
                table.add_column(col)
            for who, r in ev.items():  # exact match and ROUGE-L are None for rows without references
                table.add_row(who, str(r["n"]), *(f"{r[k]:.3f}" if r.get(k) is not None else "-"
                                                  for k in ("exact_match", "rouge_l", *scores)))
            self.console.print(table)
        timing = summary.get("timing") or {}
        kd = timing.get("distill") or {}
        if kd.get("steps"):
            warm = timing.get("warmup")
            self.console.print(
                (f"warmup {warm['wall_s']:.1f} s, " if warm else "")
                + f"KD {kd['wall_s']:.1f} s for {kd['steps']} steps ({kd['tokens_per_s']:.4g} tokens/s, "
                f"{100 * kd['teacher_wait_share']:.0f} % waiting for the teacher), "
                f"eval {timing.get('eval_wall_s', 0.0):.1f} s")
        self.console.print(f"run directory: {run_dir}")
