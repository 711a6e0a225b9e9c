"""Gradient averaging over 2 ranks: the trainer's bucketed all-reduce after the backward against
torch's DistributedDataParallel (bucketed, overlapped with the backward), and the share of a
whole on-policy distill step that averaging takes.

    python bench/ddp_bench.py                                      # CPU, gloo, 2 processes
    python bench/ddp_bench.py --device cuda --backend nccl         # 2 GPUs (one per rank)

Sections, each a markdown table of medians over --repeats runs (interleaved, first steps left out):

  reduce   the same student, the same batch on every step: forward + backward + gradient average
           + AdamW step, with `Comm.average_gradients` vs DDP; also the backward and the average
           alone for the manual way (DDP's overlap hides its average inside the backward);
  share    2-rank on-policy distill steps of the real Trainer (in-process teacher): the median
           `reduce_s` / `step_s`, i.e. what overlapping the average could save at most.

Students are random-weight Llamas (--hidden, --layers) over one 512-token tokenizer.
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

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.demo.task import make_rows  # noqa: E402
from services.demo.tiny import build_model  # noqa: E402
from student_worker.config import JobSpec  # noqa: E402
from student_worker.distributed import Comm  # noqa: E402
from student_worker.trainer import Trainer, autocast, build_teacher, load_student  # noqa: E402

WORLD = 2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", choices=("reduce", "share"), default=["reduce", "share"])
    p.add_argument("--device", default="cpu", help="cpu or cuda (rank r uses cuda:r)")
    p.add_argument("--backend", default="gloo", help="gloo or nccl")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--precision", default="fp32", help="student.precision for both sections")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return p.parse_args()


def _device(args, rank: int) -> str:
    return f"cuda:{rank}" if args.device == "cuda" else "cpu"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _reduce_run(args, student: Path, rank: int, way: str) -> dict[str, float]:
    device = _device(args, rank)
    model = load_student(student, args.precision, device)
    comm = Comm.current()
    if way == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device != "cpu" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 500, (args.batch, args.seq), generator=gen).to(device)
    step_s, backward_s, reduce_s = [], [], []
    for _ in range(args.steps):
        _sync(device)
        t0 = time.perf_counter()
        with autocast(args.precision, device):
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        if way == "manual":
            comm.average_gradients(list(model.parameters()))
        _sync(device)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        step_s.append(time.perf_counter() - t0)
        backward_s.append(t1 - t0)
        reduce_s.append(t2 - t1)
    med = lambda xs: statistics.median(xs[2:])  # noqa: E731  first steps warm caches
    return {"step_s": med(step_s), "fwd_bwd_s": med(backward_s), "reduce_s": med(reduce_s)}


def _share_run(args, teacher: Path, student: Path, data: Path, rank: int, run_dir: Path) -> dict[str, float]:
    spec = JobSpec.model_validate({
        "student": {"model": str(student), "precision": args.precision, "device": _device(args, rank)},
        "teacher": {"local_model": str(teacher)},
        "data": {"path": str(data), "max_prompt_tokens": 16, "max_response_tokens": 16},
        "distill": {"steps": args.steps, "batch_size": args.batch, "max_new_tokens": 16, "top_k": 16},
        "checkpoint": {"dir": str(run_dir / f"r{rank}"), "every_steps": 10_000},
        "eval": {"enabled": False}, "log_every": 10_000})
    seen: list[dict] = []
    trainer = Trainer(spec, build_teacher(spec.teacher), rank=rank, world=WORLD, on_metrics=seen.append)
    trainer.setup()
    trainer.train()
    trainer.cleanup()
    shutil.rmtree(run_dir / f"r{rank}", ignore_errors=True)  # the next repeat starts afresh
    steps = [m for m in seen if m["stage"] == "distill"][2:]
    return {"step_s": statistics.median(m["step_s"] for m in steps),
            "reduce_s": statistics.median(m["reduce_s"] for m in steps),
            "share": statistics.median(m["reduce_s"] / m["step_s"] for m in steps)}


def _rank_main(rank: int, args, paths: dict[str, str], store: str, out: str) -> None:
    torch.set_num_threads(1)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(args.backend, init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results: dict[str, list] = {"manual": [], "ddp": [], "share": []}
        for _ in range(args.repeats):
            if "reduce" in args.sections:
                for way in ("manual", "ddp"):
                    results[way].append(_reduce_run(args, Path(paths["student"]), rank, way))
            if "share" in args.sections:
                results["share"].append(_share_run(args, Path(paths["teacher"]), Path(paths["student"]),
                                                   Path(paths["data"]), rank, Path(paths["runs"])))
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        student = build_model(root / "student", family="llama", hidden=args.hidden, layers=args.layers,
                              heads=max(2, args.hidden // 64), tokenizer_vocab=512)
        teacher = build_model(root / "teacher", family="llama", hidden=64, layers=2, tokenizer_vocab=512)
        data = root / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(256, seed=0, digits=2)))
        (root / "runs").mkdir()
        paths = {"student": str(student), "teacher": str(teacher), "data": str(data), "runs": str(root / "runs")}
        out = root / "out.json"
        mp.start_processes(_rank_main, args=(args, paths, str(root / "store"), str(out)), nprocs=WORLD,
                           start_method="spawn")
        results = json.loads(out.read_text())
    print(f"\n2 ranks, {args.backend} on {args.device}, student hidden {args.hidden} x {args.layers} layers, "
          f"precision {args.precision}, batch {args.batch} x {args.seq} tokens, medians of {args.repeats} runs\n")
    if results["manual"]:
        med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
        print("| gradient average | step (ms) | fwd+bwd (ms) | average alone (ms) |")
        print("|---|---:|---:|---:|")
        for way in ("manual", "ddp"):
            rows = results[way]
            alone = f"{1e3 * med(rows, 'reduce_s'):.1f}" if way == "manual" else "in the backward"
            print(f"| {way} | {1e3 * med(rows, 'step_s'):.1f} | {1e3 * med(rows, 'fwd_bwd_s'):.1f} | {alone} |")
        print(f"\nDDP / manual step time: {med(results['ddp'], 'step_s') / med(results['manual'], 'step_s'):.3f}")
    if results["share"]:
        rows = results["share"]
        print("\n| on-policy distill step | step (ms) | gradient average (ms) | share |")
        print("|---|---:|---:|---:|")
        print(f"| Trainer, 2 ranks | {1e3 * statistics.median(r['step_s'] for r in rows):.1f} | "
              f"{1e3 * statistics.median(r['reduce_s'] for r in rows):.2f} | "
              f"{100 * statistics.median(r['share'] for r in rows):.1f} % |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
