"""Progress of long work: one bar per stage with loss and tokens/s, or plain lines in a log.

On a terminal the bar is rich's live one. Where nothing can redraw a line (a CI log, `| tee`, a
file), `step_bar` gives `PlainProgress` instead: the same calls, printed as a line when a task
starts, at every tenth of its total, at least every 30 s while it moves, and when it completes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from student_worker.config import JobSpec


class PlainProgress:
    """The part of rich's Progress the CLI uses (add_task, update, start, stop, `with`), as lines."""

    def __init__(self, console: Console, *, parts: int = 10, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """A line at each 1/`parts` of a task's total, and `every_s` after the last one while it moves."""
        self.console, self.parts, self.every_s, self.clock = console, parts, every_s, clock
        self.tasks: list[dict[str, Any]] = []

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def add_task(self, description: str, total: float | None = None, info: str = "", **_: Any) -> int:
        now = self.clock()
        self.tasks.append({"description": description, "total": total, "completed": 0, "info": info,
                           "started": now, "printed": now, "part": 0})
        self._print(self.tasks[-1])
        return len(self.tasks) - 1

    def update(self, task_id: int, *, description: str | None = None, completed: float | None = None,
               total: float | None = None, info: str | None = None, advance: float | None = None,
               **_: Any) -> None:
        t = self.tasks[task_id]
        before = (t["description"], t["total"], t["completed"])
        for key, value in (("description", description), ("total", total), ("info", info),
                           ("completed", completed)):
            if value is not None:
                t[key] = value
        if advance is not None:
            t["completed"] += advance
        part = int(t["completed"] * self.parts / t["total"]) if t["total"] else 0
        renamed = (t["description"], t["total"]) != before[:2]  # a new stage on the same task
        moved = t["completed"] != before[2]
        if renamed or (moved and (part != t["part"] or self.clock() - t["printed"] >= self.every_s)):
            t["part"] = part
            self._print(t)

    def _print(self, t: dict[str, Any]) -> None:
        now = self.clock()
        t["printed"] = now
        line = t["description"]
        if t["total"]:
            line += f" {t['completed']:g}/{t['total']:g} ({100 * t['completed'] / t['total']:.0f} %)"
        elif t["completed"]:
            line += f" {t['completed']:g}"
        if t["info"]:
            line += f"  {t['info']}"
        self.console.print(f"{line}  [{now - t['started']:.0f} s]", markup=False, highlight=False)


def step_bar(console: Console) -> Progress | PlainProgress:
    """The one progress layout of the CLI: description, bar, n/total, an info field, time; plain
    lines (PlainProgress) when `console` is not a terminal."""
    if not console.is_terminal:
        return PlainProgress(console)
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
