"""Quality benchmark: what each loss, the warmup and λ do to the built-in student.

    make bench-quality                       # the full grid (see --help), tables on stdout
    python bench/quality.py --quick          # 1 seed, few steps, two losses: a smoke run
    python bench/quality.py --losses akl jsd --seeds 0 1 2 --steps 300 --jobs 2

On the built-in task (services.demo.builtin: the cached teacher and SFT student), every cell is
a fresh in-process job (Trainer + in-process teacher) from the same SFT student:
  - KD with each loss (FKL, RKL, skew FKL, skew RKL, JSD, TVD, AKL), with and without
    Warmup-Distill, with λ (on-policy fraction) 0 (responses from the data) and 1 (sampled by
    the student), over several seeds: exact match on the eval split, mean ± std over seeds;
  - two controls: the SFT student as it is, and the SFT student trained further by SFT for as
    many optimizer steps as a KD run takes (so a KD gain is not just "more training");
  - TRL's DistillationTrainer (bench extra) with generalized JSD β = 0.5, on-policy, same
    student, teacher, prompts, batch, steps and constant LR, against our job with the same
    settings: a cross-check of the same loss.
Runs go to `--jobs` processes of one torch thread each; results are also written as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOSSES = ("fkl", "rkl", "skew_fkl", "skew_rkl", "jsd", "tvd", "akl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=None, help="Default: all (--quick: fkl akl).")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lambdas", nargs="+", type=float, default=[0.0, 1.0], help="On-policy fractions λ.")
    p.add_argument("--warmup", nargs="+", choices=("off", "on"), default=["off", "on"])
    p.add_argument("--steps", type=int, default=300, help="KD optimizer steps per run.")
    p.add_argument("--warmup-steps", type=int, default=60, help="Warmup-Distill (DPO) steps, when on.")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="Peak LR of KD (and of the SFT control).")
    p.add_argument("--warmup-lr", type=float, default=1e-3, help="LR of Warmup-Distill.")
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--jobs", type=int, default=2, help="Runs in parallel, one torch thread each.")
    p.add_argument("--no-trl", action="store_true", help="Skip the TRL cross-check.")
    p.add_argument("--cache-dir", type=Path, default=None, help="Where the built-in models are cached.")
    p.add_argument("--out", type=Path, default=None, help="JSON results file (default: a temp dir).")
    p.add_argument("--quick", action="store_true", help="1 seed, 2 losses, few steps.")
    p.add_argument("--quick-models", action="store_true",
                   help="Barely trained built-in models (builtin.quick_recipe): checks the machinery only.")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.steps, a.warmup_steps, a.eval_samples = [0], 6, 3, 32
    a.losses = a.losses or (["fkl", "akl"] if a.quick else list(LOSSES))
    return a


def job_spec(assets, args: argparse.Namespace, run_dir: Path, *, loss: str, lam: float, warmup: bool, seed: int,
             constant_lr: bool = False) -> dict[str, Any]:
    return {
        "name": run_dir.name, "seed": seed,
        "student": {"model": str(assets.student)},
        "teacher": {"local_model": str(assets.teacher)},
        "data": {"path": str(assets.train), "eval_path": str(assets.eval), "max_prompt_tokens": 32,
                 "max_response_tokens": 16},
        # The demo's warmup (services/demo/job.py): flag student tokens outside the teacher's top-1,
        # DPO with an NLL term on the corrected answer.
        "warmup": {"enabled": warmup, "prompts": 256, "samples_per_prompt": 2, "rule": "teacher_rank", "rank_k": 1,
                   "max_new_tokens": 8, "steps": args.warmup_steps, "batch_size": 16, "lr": args.warmup_lr,
                   "beta": 0.1, "sft_weight": 1.0},
        "distill": {"loss": loss, "steps": args.steps, "batch_size": args.batch_size, "on_policy_fraction": lam,
                    "off_policy_source": "data", "full_logprobs": True, "max_new_tokens": 8, "lr": args.lr,
                    "warmup_steps": 0 if constant_lr else 10, "min_lr_ratio": 1.0 if constant_lr else 0.1},
        "checkpoint": {"dir": str(run_dir), "every_steps": 1_000_000},
        "eval": {"enabled": True, "teacher": False, "max_samples": args.eval_samples, "max_new_tokens": 8,
                 "batch_size": 100},
        "log_every": 100_000,
    }


# ---------------------------------------------------------------------- one run (in a worker process)
def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_kd(doc: dict[str, Any]) -> dict[str, Any]:
    from student_worker.config import JobSpec
    from student_worker.trainer import Trainer, build_teacher

    spec = JobSpec.model_validate(doc)
    shutil.rmtree(spec.checkpoint.dir, ignore_errors=True)
    started = time.monotonic()
    trainer = Trainer(spec, build_teacher(spec.teacher))
    try:
        trainer.setup()
        summary = trainer.train()
    finally:
        trainer.cleanup()
        shutil.rmtree(spec.checkpoint.dir, ignore_errors=True)
    ev = summary["eval"]["student"]
    return {"exact_match": ev["exact_match"], "rouge_l": ev["rouge_l"], "seconds": time.monotonic() - started}


def run_sft_control(assets_root: str, steps: int, batch_size: int, lr: float, seed: int, eval_samples: int) -> dict[str, Any]:
    """The SFT student trained `steps` more SFT steps on the data (the 'just train longer' control)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.demo import builtin
    from services.demo.sft import train_sft

    assets = builtin.load(Path(assets_root))
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(assets.student))
    model = AutoModelForCausalLM.from_pretrained(str(assets.student))
    if steps:
        train_sft(model, builtin.examples(assets.train, tokenizer), batch_size=batch_size, lr=lr, steps=steps,
                  seed=seed, pad_id=tokenizer.pad_token_id, warmup_steps=10)
    result = builtin.score(model, tokenizer, builtin.examples(assets.eval, tokenizer), eval_samples)
    return {"exact_match": result.exact_match, "rouge_l": result.rouge_l, "seconds": time.monotonic() - started}


def run_trl_row(assets_root: str, args: argparse.Namespace, seed: int, out: str) -> dict[str, Any]:
    from trl_baseline import run_trl  # bench/ is on sys.path as the script's directory
    from transformers import AutoTokenizer

    from services.demo import builtin
    from student_worker.data import read_jsonl

    assets = builtin.load(Path(assets_root))
    started = time.monotonic()
    prompts = [p for p, _ in read_jsonl(assets.train, "prompt", "response")]
    trl_args = argparse.Namespace(batch_size=args.batch_size, max_new_tokens=builtin.ANSWER_TOKENS, lr=args.lr)
    _, model = run_trl(assets.student, assets.teacher, prompts, Path(out), trl_args, args.steps, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(str(assets.student))
    result = builtin.score(model.eval(), tokenizer, builtin.examples(assets.eval, tokenizer), args.eval_samples)
    return {"exact_match": result.exact_match, "rouge_l": result.rouge_l, "seconds": time.monotonic() - started}


# ---------------------------------------------------------------------- the grid
def mean_std(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from services.demo import builtin

    started = time.monotonic()
    recipe = builtin.quick_recipe() if args.quick_models else builtin.Recipe()
    assets = builtin.prepare(recipe, args.cache_dir,
                             lambda what, step, total, loss: print(f"  training the built-in {what}: {step}/{total}",
                                                                   flush=True) if step % 500 == 0 else None)
    tmp = Path(tempfile.mkdtemp(prefix="distillery-quality-"))
    cells = list(itertools.product(args.losses, args.warmup, args.lambdas, args.seeds))
    print(f"built-in models: {assets.root}; teacher {assets.scores['teacher']['exact_match']:.1%}, "
          f"SFT student {assets.scores['student']['exact_match']:.1%} exact match", flush=True)
    print(f"{len(cells)} KD runs of {args.steps} steps, {args.jobs} at a time", flush=True)
    results: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "assets": {"root": str(assets.root), "scores": assets.scores, "recipe": assets.recipe},
                               "kd": [], "controls": {}, "trl": None}
    pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn"), initializer=_init_worker)
    try:
        futures = {}
        for loss, warm, lam, seed in cells:
            doc = job_spec(assets, args, tmp / f"{loss}-{warm}-{lam}-{seed}", loss=loss, lam=lam, warmup=warm == "on",
                           seed=seed)
            futures[(loss, warm, lam, seed)] = pool.submit(run_kd, doc)
        sft_extra = args.steps + (args.warmup_steps if "on" in args.warmup else 0)
        controls = {
            "SFT student": [pool.submit(run_sft_control, str(assets.root), 0, args.batch_size, args.lr, 0,
                                        args.eval_samples)],
            f"SFT student + {args.steps} more SFT steps": [
                pool.submit(run_sft_control, str(assets.root), args.steps, args.batch_size, args.lr, s, args.eval_samples)
                for s in args.seeds],
        }
        if sft_extra != args.steps:
            controls[f"SFT student + {sft_extra} more SFT steps"] = [
                pool.submit(run_sft_control, str(assets.root), sft_extra, args.batch_size, args.lr, s, args.eval_samples)
                for s in args.seeds]
        trl_runs = None
        if not args.no_trl:
            try:
                import trl  # noqa: F401
            except ImportError:
                print("trl is not installed (pip install -e '.[bench]'): skipping the TRL cross-check", flush=True)
            else:
                trl_runs = {
                    "ours": [pool.submit(run_kd, job_spec(assets, args, tmp / f"ours-trl-{s}", loss="jsd", lam=1.0,
                                                          warmup=False, seed=s, constant_lr=True))
                             for s in args.seeds],
                    "trl": [pool.submit(run_trl_row, str(assets.root), args, s, str(tmp / f"trl-{s}"))
                            for s in args.seeds],
                }
        for i, ((loss, warm, lam, seed), fut) in enumerate(futures.items(), 1):
            r = fut.result()
            results["kd"].append({"loss": loss, "warmup": warm, "lambda": lam, "seed": seed, **r})
            print(f"  [{i}/{len(futures)}] {loss} warmup={warm} λ={lam:g} seed={seed}: "
                  f"exact match {r['exact_match']:.1%} ({r['seconds']:.0f}s)", flush=True)
        results["controls"] = {name: [f.result() for f in fs] for name, fs in controls.items()}
        if trl_runs is not None:
            results["trl"] = {name: [f.result() for f in fs] for name, fs in trl_runs.items()}
    finally:
        pool.shutdown(cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    print_tables(results, args)
    out = args.out or Path(tempfile.gettempdir()) / "distillery-quality.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {out} ({results['elapsed_s'] / 60:.1f} min)")
    return results


def print_tables(results: dict[str, Any], args: argparse.Namespace) -> None:
    scores = results["assets"]["scores"]
    n_seeds = len(args.seeds)
    print(f"\n### Exact match (%) on the eval split, mean ± std over {n_seeds} seed(s), {args.steps} KD steps\n")
    print(f"teacher {100 * scores['teacher']['exact_match']:.1f}, SFT student "
          f"{100 * scores['student']['exact_match']:.1f} (n = {scores['teacher']['n']})\n")
    cols = [(lam, warm) for lam in args.lambdas for warm in args.warmup]
    print("| loss | " + " | ".join(f"λ={lam:g}, warmup {warm}" for lam, warm in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for loss in args.losses:
        cells = []
        for lam, warm in cols:
            ems = [r["exact_match"] for r in results["kd"] if r["loss"] == loss and r["lambda"] == lam
                   and r["warmup"] == warm]
            cells.append(mean_std(ems) if ems else "")
        print(f"| {loss} | " + " | ".join(cells) + " |")
    if "on" in args.warmup and "off" in args.warmup:
        print("\n### Warmup-Distill effect (points of exact match, warmup on − off, mean over losses and seeds)\n")
        print("| λ | mean Δ | best Δ (loss) | worst Δ (loss) |\n|---:|---:|---:|---:|")
        for lam in args.lambdas:
            deltas = {}
            for loss in args.losses:
                on = [r["exact_match"] for r in results["kd"] if r["loss"] == loss and r["lambda"] == lam and r["warmup"] == "on"]
                off = [r["exact_match"] for r in results["kd"] if r["loss"] == loss and r["lambda"] == lam and r["warmup"] == "off"]
                deltas[loss] = 100 * (statistics.fmean(on) - statistics.fmean(off))
            best, worst = max(deltas, key=deltas.get), min(deltas, key=deltas.get)
            print(f"| {lam:g} | {statistics.fmean(deltas.values()):+.1f} | {deltas[best]:+.1f} ({best}) | "
                  f"{deltas[worst]:+.1f} ({worst}) |")
    print("\n### Controls\n\n| run | exact match (%) |\n|---|---:|")
    for name, rs in results["controls"].items():
        print(f"| {name} | {mean_std([r['exact_match'] for r in rs])} |")
    if results.get("trl"):
        print(f"\n### TRL cross-check (JSD β=0.5, λ=1, constant LR {args.lr:g}, {args.steps} steps, "
              f"batch {args.batch_size}, no warmup)\n\n| trainer | exact match (%) | seconds per run |\n|---|---:|---:|")
        for name, rs in results["trl"].items():
            label = "Distillery" if name == "ours" else "TRL DistillationTrainer"
            print(f"| {label} | {mean_std([r['exact_match'] for r in rs])} | "
                  f"{statistics.fmean(r['seconds'] for r in rs):.0f} |")


if __name__ == "__main__":
    main()
