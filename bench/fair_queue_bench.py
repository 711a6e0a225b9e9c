"""One teacher, two jobs: what a flooding job does to a light job's latency, with and without
fair queueing by job.

    .venv/bin/python bench/fair_queue_bench.py [--runs 5] [--calls 30] [--flood 10]

A teacher server (transformers engine, a tiny random Llama, CPU) on loopback. The light client
sends one Score at a time (4 sequences of 32 tokens); the heavy one sends from `--flood` threads at
once (8 sequences of 32 tokens each), i.e. about 10x the light one's load. Per run: the light
client's median latency alone, then beside the flood. Two modes, in the same run:

- by job: the clients name their jobs (`TeacherClient(job_id=...)`), the batcher shares each step
  between the jobs by weight (weighted fair queueing);
- unnamed: no job ids, so all calls are one job and the batcher is round-robin by request (what
  every request got before jobs were named).

Prints a table of medians over the runs; record it in docs/benchmarks.md. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch


def score_args(n: int, first: int, length: int):
    from teacher_server.contract import ScoreArgs

    return ScoreArgs([torch.full((length,), first + i) for i in range(n)], [1] * n, top_k=8)


def p50(client, args, calls: int) -> float:
    took = []
    for _ in range(calls):
        began = time.perf_counter()
        client.score(args.sequences, args.score_from, top_k=args.top_k)
        took.append(time.perf_counter() - began)
    return statistics.median(took)


def one_run(endpoint: str, named: bool, calls: int, flood: int) -> dict[str, float]:
    from teacher_server.client import TeacherClient

    light_args, heavy_args = score_args(4, 300, 32), score_args(8, 100, 32)
    stop = threading.Event()
    heavy_tokens = [0]

    def heavy() -> None:
        with TeacherClient(endpoint, timeout_s=120, job_id="heavy" if named else None) as c:
            while not stop.is_set():
                c.score(heavy_args.sequences, heavy_args.score_from, top_k=heavy_args.top_k)
                heavy_tokens[0] += 8 * 32

    with TeacherClient(endpoint, timeout_s=120, job_id="light" if named else None) as light:
        p50(light, light_args, 5)  # warm
        alone = p50(light, light_args, calls)
        threads = [threading.Thread(target=heavy, daemon=True) for _ in range(flood)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the flood's queue fills
        began, tokens0 = time.perf_counter(), heavy_tokens[0]
        loaded = p50(light, light_args, calls)
        heavy_rate = (heavy_tokens[0] - tokens0) / (time.perf_counter() - began)
        stop.set()
        for t in threads:
            t.join(60)
    return {"alone": alone, "loaded": loaded, "ratio": loaded / alone, "heavy_tok_s": heavy_rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calls", type=int, default=30, help="light calls per measurement")
    ap.add_argument("--flood", type=int, default=10, help="threads of the heavy job")
    ap.add_argument("--max-batch-tokens", type=int, default=512)
    args = ap.parse_args()

    from services.demo.tiny import build_model
    from teacher_server.batcher import BatcherConfig
    from teacher_server.engine import EngineConfig, TeacherEngine
    from teacher_server.serve import ServerConfig, TeacherServer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "teacher", family="llama", hidden=128, layers=4, heads=4)
        server = TeacherServer(ServerConfig(
            engine=EngineConfig(model_dir=str(model), max_batch_tokens=args.max_batch_tokens),
            batcher=BatcherConfig(max_batch_tokens=args.max_batch_tokens, max_wait_ms=1.0),
            port=0, grace_s=1.0, drain_delay_s=0.0))
        port = server.start()
        server.load(TeacherEngine.load(server.config.engine))
        endpoint = f"127.0.0.1:{port}"
        results: dict[str, list[dict[str, float]]] = {"by job": [], "unnamed": []}
        try:
            for run in range(args.runs):
                for mode in results:  # interleaved, so drift hits both modes alike
                    r = one_run(endpoint, mode == "by job", args.calls, args.flood)
                    results[mode].append(r)
                    print(f"run {run + 1} {mode:8s}: alone {r['alone'] * 1e3:6.1f} ms, beside the flood "
                          f"{r['loaded'] * 1e3:7.1f} ms ({r['ratio']:.2f}x), heavy {r['heavy_tok_s']:.0f} tok/s",
                          flush=True)
        finally:
            server.stop()

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    print(f"\nmedians of {args.runs} runs; light: 1 client, 4 x 32 tokens a call; heavy: {args.flood} clients, "
          f"8 x 32 tokens a call; max_batch_tokens {args.max_batch_tokens}\n")
    print("| mode | light p50 alone (ms) | light p50 beside the flood (ms) | ratio | heavy tokens/s |")
    print("|---|---|---|---|---|")
    for mode in results:
        print(f"| {mode} | {med(mode, 'alone') * 1e3:.1f} | {med(mode, 'loaded') * 1e3:.1f} | "
              f"{med(mode, 'ratio'):.2f}x | {med(mode, 'heavy_tok_s'):.0f} |")
    print(f"\nlight job's flooded latency, by job vs unnamed: "
          f"{med('by job', 'loaded') / med('unnamed', 'loaded'):.2f}x")


if __name__ == "__main__":
    main()
