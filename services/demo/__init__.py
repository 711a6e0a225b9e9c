"""The demo wing: `distillery demo`, `distillery teacher demo`, and what they are made of.

    job.py       `distillery demo`: the built-in teacher distilled into its student through the whole stack
    teacher.py   `distillery teacher demo`: a tiny teacher served on loopback, scored through the client
    task.py      the built-in task (arithmetic with a checkable answer): rows, splits, a character
                 tokenizer, and `python -m services.demo.task` to write small data sets
    sft.py       supervised fine-tuning from scratch (how the built-in models are made)
    builtin.py   the built-in teacher and SFT student, trained once and cached
    tiny.py      tiny random-weight models and a locally trained BPE tokenizer, for examples,
                 tests and benches (`python -m services.demo.tiny DIR`)

None of it is imported by the library packages (student_worker, teacher_server).
"""

from .job import POINTS, QUICK_JOB, DemoJob, Follower, job_spec, plot, report_rows, run

__all__ = ["POINTS", "QUICK_JOB", "DemoJob", "Follower", "job_spec", "plot", "report_rows", "run"]
