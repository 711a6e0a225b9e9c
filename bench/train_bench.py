"""Distill-step benchmark: tokens/s and time split of a KD step, local vs served teacher.

    python bench/train_bench.py            # tiny models on CPU, median of 5 runs
    python bench/train_bench.py --quick    # a smoke run

Each run trains `--steps` on-policy KD steps of one single-process Trainer and reports the median
over runs of: response tokens/s, and the share of step time spent sampling (generate), waiting for
the teacher, and in the student's forward + backward. Both setups use the same models, data, seed
and batch, so their step contents are identical and only where the teacher runs differs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from student_worker.config import JobSpec  # noqa: E402
from student_worker.data import arithmetic_rows  # noqa: E402
from student_worker.trainer import Trainer, build_teacher  # noqa: E402
from teacher_server.process import start_teacher  # noqa: E402
from teacher_server.tiny import build_model  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--loss", default="jsd")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.steps, a.repeats = 3, 2
    return a


def spec_for(tmp: Path, teacher: dict, args: argparse.Namespace, name: str) -> JobSpec:
    return JobSpec.model_validate({
        "name": name, "seed": 0,
        "student": {"model": str(tmp / "student")}, "teacher": teacher,
        "data": {"path": str(tmp / "train.jsonl"), "eval_fraction": 0.0, "max_prompt_tokens": 32},
        "distill": {"loss": args.loss, "steps": args.steps, "batch_size": args.batch_size, "top_k": 16,
                    "max_new_tokens": args.max_new_tokens, "on_policy_fraction": 1.0, "lr": 1e-4},
        "checkpoint": {"dir": str(tmp / f"run-{name}"), "every_steps": 10_000},
        "eval": {"enabled": False}, "log_every": 10_000,
    })


def one_run(spec: JobSpec) -> dict[str, float]:
    import shutil

    shutil.rmtree(spec.checkpoint.dir, ignore_errors=True)
    seen: list[dict] = []
    trainer = Trainer(spec, build_teacher(spec.teacher), on_metrics=seen.append)
    trainer.setup()
    trainer.train()
    trainer.cleanup()
    steps = [m for m in seen if m["stage"] == "distill"][1:]  # the first step warms caches
    total = sum(m["step_s"] for m in steps)
    return {
        "tokens_per_s": sum(m["tokens"] for m in steps) / total,
        "generate": sum(m["generate_s"] for m in steps) / total,
        "teacher": sum(m["teacher_s"] for m in steps) / total,
        "forward_backward": sum(m["forward_backward_s"] for m in steps) / total,
        "teacher_latency_ms": 1000 * statistics.mean(m["teacher_latency_s"] for m in steps),
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        build_model(tmp / "teacher", hidden=256, layers=4, heads=4, seed=0)
        build_model(tmp / "student", hidden=64, layers=2, heads=4, seed=1)
        (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(512)))
        server = start_teacher(tmp / "teacher", "--max-wait-ms", "2", "--drain-delay-s", "0")
        try:
            setups = {"local teacher": {"local_model": str(tmp / "teacher")},
                      "served teacher": {"endpoints": [server.endpoint]}}
            results: dict[str, list[dict[str, float]]] = {k: [] for k in setups}
            for _ in range(args.repeats):  # interleaved, so drift hits both alike
                for name, teacher in setups.items():
                    results[name].append(one_run(spec_for(tmp, teacher, args, name.split()[0])))
        finally:
            server.stop()
    print(f"student 0.1M-class (64 x 2 layers), teacher 256 x 4 layers; batch {args.batch_size}, "
          f"max_new_tokens {args.max_new_tokens}, loss {args.loss}, top_k 16, {args.steps} steps, "
          f"median of {args.repeats} runs")
    print()
    print("| teacher | response tokens/s | generate | teacher | forward+backward | teacher latency (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    for name, m in med.items():
        print(f"| {name} | {m['tokens_per_s']:,.0f} | {m['generate']:.0%} | {m['teacher']:.0%} | "
              f"{m['forward_backward']:.0%} | {m['teacher_latency_ms']:.1f} |")
    print()
    print(f"served / local throughput: {med['served teacher']['tokens_per_s'] / med['local teacher']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
