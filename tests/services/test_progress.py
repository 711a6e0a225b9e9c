"""Progress where no live bar can draw (CI logs, `| tee`): plain lines at every tenth and every 30 s."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from services.progress import PlainProgress, step_bar


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_terminal_gets_the_live_bar_and_a_pipe_plain_lines():
    assert isinstance(step_bar(Console(file=io.StringIO(), force_terminal=True)), Progress)
    assert isinstance(step_bar(Console(file=io.StringIO())), PlainProgress)


def test_plain_lines_at_each_tenth_and_after_a_pause():
    out, clock = io.StringIO(), Clock()
    with PlainProgress(Console(file=out, width=200), clock=clock) as bar:
        task = bar.add_task("train teacher", total=3000, info="")
        for step in range(20, 3001, 20):  # how the demo reports model preparation
            clock.now += 0.1
            bar.update(task, completed=step, info=f"loss {1 / step:.3f}")
        quiet = bar.add_task("job queued", total=None, info="")
        clock.now += 31
        bar.update(quiet, completed=1)
        bar.update(quiet, description="warmup", completed=1, total=60)
    lines = out.getvalue().splitlines()
    assert lines[0] == "train teacher 0/3000 (0 %)  [0 s]"
    assert [line.split("  ")[0] for line in lines[1:11]] == [
        f"train teacher {300 * k}/3000 ({10 * k} %)" for k in range(1, 11)]
    assert lines[1] == "train teacher 300/3000 (10 %)  loss 0.003  [2 s]"
    assert lines[11:] == ["job queued  [0 s]", "job queued 1  [31 s]", "warmup 1/60 (2 %)  [31 s]"]
