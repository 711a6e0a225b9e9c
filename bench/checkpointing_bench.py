"""Gradient checkpointing (`student.gradient_checkpointing`): what one training forward keeps for
its backward, the peak memory of forward + backward, and the time, with and without.

    python bench/checkpointing_bench.py                       # CPU: peak resident memory
    python bench/checkpointing_bench.py --device cuda         # GPU: torch's peak allocated memory

Each setting runs in a fresh process (so its peak is its own) on a random-weight Llama
(--hidden, --layers, --vocab) over one batch of --batch × --seq tokens, built as the trainer builds
the student (`student_worker.models.build_student`), optionally with LoRA adapters (--lora). Columns:

  kept MiB   bytes autograd saved for the backward during the forward (exact: a saved-tensor hook);
  peak MiB   peak memory of forward + backward above what the loaded model already held: resident
             set growth on CPU (ru_maxrss, coarse), max_memory_allocated on CUDA;
  step s     median forward + backward time over --repeats steps (first left out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(args: argparse.Namespace, checkpointing: bool, model_dir: str) -> dict[str, float]:
    import torch

    from student_worker.config import StudentSpec
    from student_worker.models import build_student

    torch.manual_seed(0)
    lora = {"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]} if args.lora else None
    spec = StudentSpec(model=model_dir, gradient_checkpointing=checkpointing, lora=lora, device=args.device)
    student = build_student(spec, model_dir, tokenizer_size=args.vocab, seed=0, device=args.device)
    model = student.model.train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    cuda = args.device.startswith("cuda")

    def step() -> int:
        kept = [0]

        def pack(x):
            kept[0] += x.numel() * x.element_size()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            logits = model(input_ids=ids, use_cache=False).logits
        logits.float().logsumexp(-1).mean().backward()
        for p in student.trainable():
            p.grad = None
        return kept[0]

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kept = step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"kept_mib": kept / 2**20, "peak_mib": peak / 2**20, "step_s": statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lora", action="store_true", help="LoRA adapters on the attention projections")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:  # one setting in this process: "<0|1> <model dir>"
        flag, model_dir = args.child.split(" ", 1)
        print(json.dumps(measure(args, flag == "1", model_dir)))
        return

    from services.demo.tiny import build_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_model(Path(tmp) / "student", hidden=args.hidden, layers=args.layers,
                                    heads=max(1, args.hidden // 64), tokenizer_vocab=args.vocab))
        rows = {}
        for flag in ("0", "1"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", f"{flag} {model_dir}"]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
            rows[flag] = json.loads(out.strip().splitlines()[-1])
    what = f"Llama {args.layers}×{args.hidden}, batch {args.batch}×{args.seq} tokens, {args.device}" + (
        ", LoRA r=16" if args.lora else "")
    print(f"\n{what}\n\n| gradient_checkpointing | kept MiB | peak MiB | step s |\n|---|---|---|---|")
    for flag, name in (("0", "false"), ("1", "true")):
        r = rows[flag]
        print(f"| {name} | {r['kept_mib']:.1f} | {r['peak_mib']:.1f} | {r['step_s']:.3f} |")


if __name__ == "__main__":
    main()
