"""Distill-step benchmark: tokens/s and time split of a KD step, three comparisons.

    python bench/train_bench.py                         # all sections, tiny models on CPU (10-20 min)
    python bench/train_bench.py --quick                 # a smoke run of every section
    python bench/train_bench.py --sections teachers     # local vs served teacher only
    python bench/train_bench.py --sections pipeline     # the served teacher's share of the step, 1 vs 4 groups
    python bench/train_bench.py --sections workers      # 1 vs 2 Ray Train workers
    python bench/train_bench.py --sections trl          # against TRL (pip install -e ".[bench]")

Sections, each printing a markdown table of medians over `--repeats` runs, runs interleaved so
drift hits every row alike, the first step of every run left out (it warms caches):

  teachers  one single-process Trainer, in-process teacher vs the same teacher served over gRPC;
  pipeline  the served teacher, its rollouts sent in 1 request per micro-batch once sampling is
            done vs in 4 requests as rows finish (`distill.score_chunks`), at grad_accum 1 and 2:
            the share of the step the worker waits on the teacher, and tokens/s;
  workers   `student_worker.run.run` (Ray Train, local Ray) as 1 worker x 1 thread, 1 x 2 and
            2 x 1 on this machine's 2 cores; tokens/s = sum over ranks of response tokens / wall
            time of the steps, read back from the job's events.jsonl;
  trl       Distillery against TRL's DistillationTrainer (bench/trl_baseline.py) on the same models,
            prompts, batch, max_new_tokens, λ = 1, generalized JSD β = 0.5, temperature, LR and
            steps; also the training loss, a common yardstick (full-vocabulary JSD of each trained
            student on held-out prompts), a what-if row, and one batch of sampling timed three ways.

Every row trains the same student (hidden 64, 2 layers) against the same teacher (hidden 256,
4 layers), both random-weight Llamas over one 512-token tokenizer, on arithmetic prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.demo.task import make_rows  # noqa: E402
from services.demo.tiny import build_model  # noqa: E402
from student_worker.config import JobSpec  # noqa: E402
from student_worker.losses import distill_loss  # noqa: E402
from student_worker.rollout import sample_responses, score_batch, student_logits  # noqa: E402
from student_worker.trainer import Trainer, build_teacher  # noqa: E402
from teacher_server.in_process import LocalTeacher  # noqa: E402
from teacher_server.process import start_teacher  # noqa: E402

SECTIONS = ("teachers", "pipeline", "workers", "trl")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--steps", type=int, default=8, help="KD steps per run (teachers, workers).")
    p.add_argument("--trl-steps", type=int, default=20, help="KD steps per run of the TRL comparison.")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--worker-repeats", type=int, default=5, help="Runs per row of the workers section.")
    p.add_argument("--batch-size", type=int, default=8, help="Prompts per step (per worker).")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="Constant learning rate, every row.")
    p.add_argument("--threads", type=int, default=2, help="torch threads of this process (teachers, trl).")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.steps, a.trl_steps, a.repeats, a.worker_repeats = 3, 4, 2, 1
    return a


def spec_for(tmp: Path, teacher: dict, args: argparse.Namespace, name: str, *, steps: int | None = None,
             workers: int = 1, threads: int = 1, full_logprobs: bool = False, score_chunks: int = 1,
             grad_accum: int = 1) -> JobSpec:
    return JobSpec.model_validate({
        "name": name, "seed": 0,
        "student": {"model": str(tmp / "student")}, "teacher": teacher,
        "data": {"path": str(tmp / "train.jsonl"), "eval_fraction": 0.0, "max_prompt_tokens": 32},
        "distill": {"loss": "jsd", "beta": 0.5, "steps": steps or args.steps, "batch_size": args.batch_size,
                    "top_k": 16, "full_logprobs": full_logprobs, "max_new_tokens": args.max_new_tokens,
                    "on_policy_fraction": 1.0, "lr": args.lr, "warmup_steps": 0, "min_lr_ratio": 1.0,
                    "score_chunks": score_chunks, "grad_accum": grad_accum},
        "checkpoint": {"dir": str(tmp / f"run-{name}"), "every_steps": 10_000},
        "eval": {"enabled": False}, "log_every": 10_000,
        # Ray gives each worker OMP_NUM_THREADS = its CPUs, hence torch's intra-op threads.
        "resources": {"workers": workers, "cpus_per_worker": threads, "max_failures": 0},
    })


def summarize(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Tokens/s and time shares over the steps after the first; `other` is the rest of the step
    (optimizer, gradient all-reduce, metrics)."""
    steps = steps[1:]
    total = sum(m["step_s"] for m in steps)
    shares = {k: sum(m[f"{k}_s"] for m in steps) / total for k in ("generate", "teacher", "forward_backward")}
    return {"tokens_per_s": sum(m["tokens"] for m in steps) / total, **shares,
            "other": 1 - sum(shares.values())}


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def split_cells(m: dict[str, float]) -> str:
    return f"{m['generate']:.0%} | {m['teacher']:.0%} | {m['forward_backward']:.0%} | {m['other']:.0%}"


SPLIT_HEADER = "generate | teacher | student fwd+bwd | other"


def train_once(spec: JobSpec) -> tuple[list[dict[str, Any]], torch.nn.Module]:
    """One fresh single-process run; its distill-step metrics and the trained student."""
    shutil.rmtree(spec.checkpoint.dir, ignore_errors=True)
    seen: list[dict[str, Any]] = []
    trainer = Trainer(spec, build_teacher(spec.teacher), on_metrics=seen.append)
    trainer.setup()
    trainer.train()
    trainer.cleanup()
    return [m for m in seen if m["stage"] == "distill"], trainer.model


# ---------------------------------------------------------------------- local vs served teacher
def bench_teachers(tmp: Path, endpoint: str, args: argparse.Namespace) -> None:
    setups = {"local teacher": {"local_model": str(tmp / "teacher")}, "served teacher": {"endpoints": [endpoint]}}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in setups}
    for _ in range(args.repeats):
        for name, teacher in setups.items():
            steps, _ = train_once(spec_for(tmp, teacher, args, name.split()[0]))
            latency = 1000 * statistics.mean(m["teacher_latency_s"] for m in steps[1:])
            runs[name].append({**summarize(steps), "latency_ms": latency})
    med = {name: medians(r) for name, r in runs.items()}
    print(f"\n### Distill step — local vs served teacher ({args.steps} steps, median of {args.repeats} runs)\n")
    print(f"| teacher | response tokens/s | {SPLIT_HEADER} | teacher latency (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['tokens_per_s']:,.0f} | {split_cells(m)} | {m['latency_ms']:.1f} |")
    ratio = med["served teacher"]["tokens_per_s"] / med["local teacher"]["tokens_per_s"]
    print(f"\nserved / local throughput: {ratio:.2f}x")


# ---------------------------------------------------------------------- the teacher behind sampling
def bench_pipeline(tmp: Path, endpoint: str, args: argparse.Namespace) -> None:
    setups = {f"{label}, grad_accum {accum}": dict(score_chunks=chunks, grad_accum=accum)
              for accum in (1, 2) for label, chunks in (("1 request after sampling", 1),
                                                         ("4 requests as rows finish", 4))}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in setups}
    for _ in range(args.repeats):
        for name, kw in setups.items():
            steps, _ = train_once(spec_for(tmp, {"endpoints": [endpoint]}, args, "pipe", **kw))
            wait = sum(m["teacher_s"] for m in steps[1:]) / sum(m["step_s"] for m in steps[1:])
            busy = sum(m["teacher_latency_s"] * kw["grad_accum"] for m in steps[1:]) / sum(
                m["step_s"] for m in steps[1:])
            runs[name].append({**summarize(steps), "wait": wait, "busy": busy})
    med = {name: medians(r) for name, r in runs.items()}
    print(f"\n### Distill step — served teacher behind sampling ({args.steps} steps, median of "
          f"{args.repeats} runs)\n")
    print("| teacher requests | response tokens/s | step waits on the teacher | teacher busy (share of step) |")
    print("|---|---:|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['tokens_per_s']:,.0f} | {m['wait']:.1%} | {m['busy']:.1%} |")


# ---------------------------------------------------------------------- 1 vs 2 Ray Train workers
def steps_from_events(path: Path) -> list[dict[str, Any]]:
    """Per-step metrics merged over ranks: tokens summed, step wall time the slowest rank's (they
    meet at the all-reduce), time split averaged over ranks."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        e = json.loads(line)
        if e.get("kind") == "metrics" and e.get("stage") == "distill":
            by_step.setdefault(e["step"], []).append(e)
    merged = []
    for step in sorted(by_step):
        ranks = by_step[step]
        merged.append({"tokens": sum(r["tokens"] for r in ranks), "step_s": max(r["step_s"] for r in ranks),
                       "ranks": len(ranks),
                       **{k: statistics.mean(r[k] for r in ranks)
                          for k in ("generate_s", "teacher_s", "forward_backward_s")}})
    return merged


def bench_workers(tmp: Path, args: argparse.Namespace) -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    from student_worker.run import run

    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    layouts = [(1, 1), (1, 2), (2, 1)]  # (workers, torch threads per worker) on 2 cores
    runs: dict[tuple[int, int], list[dict[str, float]]] = {w: [] for w in layouts}
    try:
        for i in range(args.worker_repeats):
            for workers, threads in layouts:
                spec = spec_for(tmp, {"local_model": str(tmp / "teacher")}, args, f"w{workers}x{threads}",
                                workers=workers, threads=threads)
                shutil.rmtree(spec.checkpoint.dir, ignore_errors=True)
                run(spec, f"bench-w{workers}x{threads}-{i}", [])
                steps = steps_from_events(Path(spec.checkpoint.dir) / "events.jsonl")
                assert len(steps) == args.steps and all(s["ranks"] == workers for s in steps), steps
                runs[(workers, threads)].append(summarize(steps))
    finally:
        ray.shutdown()
    med = {w: medians(r) for w, r in runs.items()}
    print(f"\n### Workers: 1 vs 2 ({args.steps} steps, batch {args.batch_size} per worker, in-process teacher "
          f"per worker, median of {args.worker_repeats} runs)\n")
    print(f"| workers x torch threads | response tokens/s (all ranks) | × 1 x 1 | {SPLIT_HEADER} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = med[(1, 1)]["tokens_per_s"]
    for (w, t), m in med.items():
        print(f"| {w} x {t} | {m['tokens_per_s']:,.0f} | {m['tokens_per_s'] / base:.2f} | {split_cells(m)} |")
    print(f"\n2 workers x 1 thread / 1 worker x 2 threads: "
          f"{med[(2, 1)]['tokens_per_s'] / med[(1, 2)]['tokens_per_s']:.2f}x")


# ---------------------------------------------------------------------- against TRL
@torch.no_grad()
def heldout_jsd(model: torch.nn.Module, teacher: LocalTeacher, prompts: list[torch.Tensor],
                responses: list[torch.Tensor], pad_id: int) -> float:
    """Full-vocabulary generalized JSD (β = 0.5, token mean) of `model` against the teacher on
    fixed prompt + response pairs: the same number whichever trainer produced the model."""
    model.eval()
    batch = score_batch(teacher, prompts, responses, top_k=1, temperature=1.0, full_logprobs=True, pad_id=pad_id)
    logits = student_logits(model, batch)
    return float(distill_loss(logits, batch.teacher, batch.response_mask, loss="jsd", beta=0.5))


def bench_trl(tmp: Path, endpoint: str, args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_baseline import bench_decode, run_trl

    tokenizer = AutoTokenizer.from_pretrained(str(tmp / "student"))
    teacher = LocalTeacher.from_model_dir(str(tmp / "teacher"))
    # Yardstick: held-out prompts, continued once by the untrained student (the distribution
    # on-policy training starts from), scored against full teacher rows.
    held = [torch.tensor(tokenizer(r["prompt"]).input_ids) for r in make_rows(64, seed=1, digits=2)]
    initial = AutoModelForCausalLM.from_pretrained(str(tmp / "student"))
    held_resp = sample_responses(initial, held, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0,
                                 stop_ids=[tokenizer.eos_token_id], seed=0)
    yardstick = lambda m: heldout_jsd(m, teacher, held, held_resp, tokenizer.pad_token_id)  # noqa: E731
    prompts = [r["prompt"] for r in make_rows(512, seed=0, digits=2)]

    def distillery(name: str, teacher_spec: dict, **kw: Any):
        return lambda: train_once(spec_for(tmp, teacher_spec, args, name, steps=args.trl_steps, **kw))

    local, served = {"local_model": str(tmp / "teacher")}, {"endpoints": [endpoint]}
    trl_name = "TRL DistillationTrainer (in-process teacher, full vocab)"
    setups = {
        "Distillery, in-process teacher, top-16": distillery("d-local", local),
        "Distillery, in-process teacher, full rows": distillery("d-full", local, full_logprobs=True),
        "Distillery, served teacher, top-16": distillery("d-served", served),
        trl_name: lambda: run_trl(tmp / "student", tmp / "teacher", prompts, tmp / "trl-out", args, args.trl_steps),
    }
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in setups}
    for _ in range(args.repeats):
        for name, train in setups.items():
            steps, model = train()
            runs[name].append({**summarize(steps), "first_loss": steps[0]["loss"],
                               "final_loss": statistics.mean(m["loss"] for m in steps[-3:]),
                               "heldout_jsd": yardstick(model)})
    med = {name: medians(r) for name, r in runs.items()}
    trl = med[trl_name]["tokens_per_s"]
    print(f"\n### Against TRL's DistillationTrainer ({args.trl_steps} steps, batch {args.batch_size}, "
          f"max_new_tokens {args.max_new_tokens}, lr {args.lr:g}, median of {args.repeats} runs)\n")
    print(f"| trainer | response tokens/s | × TRL | {SPLIT_HEADER} | loss step 1 | final loss (last 3) "
          "| held-out full-vocab JSD |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['tokens_per_s']:,.0f} | {m['tokens_per_s'] / trl:.2f} | {split_cells(m)} | "
              f"{m['first_loss']:.4f} | {m['final_loss']:.4f} | {m['heldout_jsd']:.4f} |")
    print(f"\nheld-out full-vocab JSD of the untrained student: {yardstick(initial):.4f}")
    bench_decode(tmp, args)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started, load = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        build_model(tmp / "teacher", hidden=256, layers=4, heads=4, seed=0)
        build_model(tmp / "student", hidden=64, layers=2, heads=4, seed=1)
        (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(512, seed=0, digits=2)))
        server = start_teacher(tmp / "teacher", "--max-wait-ms", "2", "--drain-delay-s", "0")
        try:
            if "teachers" in args.sections:
                bench_teachers(tmp, server.endpoint, args)
            if "pipeline" in args.sections:
                bench_pipeline(tmp, server.endpoint, args)
            if "trl" in args.sections:
                bench_trl(tmp, server.endpoint, args)
        finally:
            server.stop()
        if "workers" in args.sections:  # last: Ray's processes outlive a section by a few seconds
            bench_workers(tmp, args)
    print(f"\nstudent hidden 64 x 2 layers, teacher hidden 256 x 4 layers, vocab 512; batch {args.batch_size}, "
          f"max_new_tokens {args.max_new_tokens}, jsd beta 0.5, top_k 16, {args.threads} torch threads; {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{time.time() - started:.0f} s; load average (1/5/15 min) before "
          f"{'/'.join(f'{x:.2f}' for x in load)}, after {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
