"""A distillation job as it runs on GPUs: N ranks on NCCL (one GPU each), a teacher served over
gRPC on cuda:0 in bfloat16, the student in each `--precision`, on-policy KD with the sparse top-k
teacher (its exact tail on the wire). No Ray: the ranks are processes with an NCCL process group,
which is what Ray Train gives each worker, so the Trainer runs exactly as in a Ray job.

    python bench/gpu_job.py                          # min(2, GPUs) ranks, fp32 vs bf16-mixed vs bf16-true
    python bench/gpu_job.py --steps 60 --student-hidden 1024 --student-layers 8

Prints a markdown table per precision: median step time, tokens/s over all ranks, gradient
average share, peak GPU memory of rank 0, first and last loss, non-finite steps, the share of
weights changed by the run, and the max |loss - fp32 loss| over the steps. Models are random-weight Llamas over one 512-token
tokenizer; the teacher is made confident (its top logit raised by --teacher-margin nats) so that the tail is
tiny, as in real LLMs. Needs CUDA; `bench/gpu_run.sh` runs it with the other GPU checks.
"""

from __future__ import annotations

import argparse
import json
import os
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
from student_worker.trainer import Trainer, build_teacher  # noqa: E402
from teacher_server.batcher import BatcherConfig  # noqa: E402
from teacher_server.engine import EngineConfig, TeacherEngine  # noqa: E402
from teacher_server.serve import ServerConfig, TeacherServer  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=0, help="ranks (0: min(2, GPUs))")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16-mixed", "bf16-true"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--loss", default="rkl", help="a reverse-type loss is the one a wrong tail spoils")
    p.add_argument("--teacher-hidden", type=int, default=1024)
    p.add_argument("--teacher-layers", type=int, default=8)
    p.add_argument("--student-hidden", type=int, default=512)
    p.add_argument("--student-layers", type=int, default=4)
    p.add_argument("--teacher-margin", type=float, default=24.0,
                   help="nats added to the teacher's top logit: a confident teacher (24: top-1 about "
                        "1 - 1e-10, the tail near e^-26, as in real LLMs)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--device", default="cuda", help="cuda; cpu (gloo, tiny sizes) checks the script itself")
    return p.parse_args()


def _rank_main(rank: int, world: int, spec_json: str, store: str, out: str, device: str) -> None:
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        spec = JobSpec.model_validate_json(spec_json)
        spec = spec.model_copy(update={
            "student": spec.student.model_copy(update={"device": f"cuda:{rank}" if cuda else "cpu"}),
            "checkpoint": spec.checkpoint.model_copy(update={"dir": f"{spec.checkpoint.dir}/r{rank}"})})
        seen: list[dict] = []
        trainer = Trainer(spec, build_teacher(spec.teacher), rank=rank, world=world, on_metrics=seen.append)
        trainer.setup()
        before = {k: v.detach().float().cpu().clone() for k, v in trainer.model.state_dict().items()}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        after = {k: v.detach().float().cpu() for k, v in trainer.model.state_dict().items()}
        moved = sum(int((after[k] != before[k]).sum()) for k in before) / sum(v.numel() for v in before.values())
        trainer.cleanup()
        steps = [m for m in seen if m["stage"] == "distill"]
        Path(out + f".r{rank}").write_text(json.dumps({
            "losses": [m["loss"] for m in steps], "step_s": [m["step_s"] for m in steps],
            "reduce_s": [m["reduce_s"] for m in steps], "tokens": [m["tokens"] for m in steps],
            "skipped": sum(m["skipped"] for m in steps), "wall_s": wall, "moved": moved,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}))
    finally:
        dist.destroy_process_group()


class PeakedHead(torch.nn.Module):
    """The teacher's output head with its top logit raised by `margin` nats: the shape of a
    confident LLM row (one token near 1, the rest e^-20 and below) that random weights lack."""

    def __init__(self, head: torch.nn.Linear, margin: float) -> None:
        super().__init__()
        self.head, self.margin = head, margin
        self.weight = head.weight  # the engine reads the vocabulary size from it

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.head(h)
        return z.scatter_add(-1, z.argmax(-1, keepdim=True),
                             torch.full(z.shape[:-1] + (1,), self.margin, dtype=z.dtype, device=z.device))


def confident_engine(model_dir: Path, device: str, margin: float) -> tuple[TeacherEngine, str]:
    """The bf16 teacher with a `PeakedHead`, and a line describing how confident it is."""
    from teacher_server.contract import ScoreArgs

    loaded = TeacherEngine.load(EngineConfig(model_dir=str(model_dir), device=device, dtype="bfloat16"))
    model = loaded.model
    model.lm_head = PeakedHead(model.lm_head, margin)
    engine = TeacherEngine(model, loaded.config, loaded.fingerprint, name=loaded.name)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, engine.vocab_size, (48,), generator=g) for _ in range(8)]
    scored = engine.score(ScoreArgs(seqs, [1] * len(seqs), top_k=16, temperature=1.0, full_logprobs=False))
    # 1 - top-1, from the other top-k and the tail (in float32, 1 - exp(top-1 log-prob) is 0).
    rest = torch.cat([torch.cat([r.topk_logprobs[:, 1:], r.tail_logprobs[:, None]], -1).logsumexp(-1)
                      for r in scored]).double().exp()
    tail = torch.cat([r.tail_logprobs for r in scored])
    return engine, (f"median 1 - top-1 {float(rest.median()):.1e}, "
                    f"median log tail {float(tail.median()):.1f}")


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_job.py needs CUDA (or --device cpu to check the script)")
    world = args.workers or (min(2, torch.cuda.device_count()) if args.device == "cuda" else 2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher_dir = build_model(root / "teacher", hidden=args.teacher_hidden, layers=args.teacher_layers,
                                  heads=max(1, args.teacher_hidden // 64), tokenizer_vocab=512)
        student_dir = build_model(root / "student", hidden=args.student_hidden, layers=args.student_layers,
                                  heads=max(1, args.student_hidden // 64), tokenizer_vocab=512, seed=7)
        data = root / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(1024, seed=0, digits=2)))
        engine, confidence = confident_engine(teacher_dir, "cuda:0" if args.device == "cuda" else "cpu",
                                              args.teacher_margin)
        server = TeacherServer(ServerConfig(engine=engine.config, port=0, batcher=BatcherConfig()))
        port = server.start()
        server.load(engine)
        results = {}
        try:
            for precision in args.precision:
                spec = JobSpec.model_validate({
                    "student": {"model": str(student_dir), "precision": precision},
                    "teacher": {"endpoints": [f"127.0.0.1:{port}"]},
                    "data": {"path": str(data), "max_prompt_tokens": 32, "max_response_tokens": args.max_new_tokens},
                    "distill": {"loss": args.loss, "steps": args.steps, "batch_size": args.batch,
                                "max_new_tokens": args.max_new_tokens, "top_k": 16, "lr": args.lr},
                    "checkpoint": {"dir": str(root / "runs" / precision), "every_steps": 10_000},
                    "resources": {"workers": world, "gpus_per_worker": 1},
                    "eval": {"enabled": False}, "log_every": 10_000})
                out = str(root / f"{precision}.json")
                mp.start_processes(_rank_main, args=(world, spec.to_json(), str(root / f"store-{precision}"), out,
                                                               args.device),
                                   nprocs=world, start_method="spawn")
                ranks = [json.loads(Path(f"{out}.r{r}").read_text()) for r in range(world)]
                results[precision] = ranks
        finally:
            server.stop()
    print(f"\n{world} ranks on {'NCCL' if args.device == 'cuda' else 'gloo (CPU)'}, teacher {args.teacher_hidden}x{args.teacher_layers} bf16 served on "
          f"{'cuda:0' if args.device == 'cuda' else 'cpu'}, "
          f"student {args.student_hidden}x{args.student_layers}, loss {args.loss}, lr {args.lr}, "
          f"batch {args.batch}/rank, {args.steps} steps; teacher {confidence}\n")
    print("| precision | step (ms) | tokens/s | average share | peak GB | loss first -> last | skipped | "
          "weights moved | max dloss vs fp32 |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    base = results.get("fp32", [{}])[0].get("losses")
    for precision, ranks in results.items():
        r0 = ranks[0]
        steps = r0["step_s"][2:]
        tokens = sum(sum(r["tokens"][2:]) for r in ranks)
        share = statistics.median(a / b for a, b in zip(r0["reduce_s"][2:], steps))
        dloss = max(abs(a - b) for a, b in zip(r0["losses"], base)) if base else float("nan")
        print(f"| {precision} | {1e3 * statistics.median(steps):.0f} | {tokens / sum(steps):.0f} | "
              f"{100 * share:.1f} % | {r0['peak_gb']:.2f} | {r0['losses'][0]:.3f} -> {r0['losses'][-1]:.3f} | "
              f"{r0['skipped']} | {100 * r0['moved']:.1f} % | {dloss:.4f} |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
