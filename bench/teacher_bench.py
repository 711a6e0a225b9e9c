"""Teacher server benchmark: in-process vs served throughput, batching on/off, wire bytes, latency.

    python bench/teacher_bench.py                 # ~35M-parameter Llama, vocab 32k, CPU
    python bench/teacher_bench.py --quick         # a smoke run on a tiny model
    python bench/teacher_bench.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16

One run measures everything on the same model and the same token stream, interleaved: each of
--repeats rounds runs the in-process limit and then every served setting (both servers stay up),
so load drifting during the run hits all alike. Throughputs are medians over rounds; ratios are
medians of the per-round ratios. Rows:
1. in-process batched forward (LocalTeacher.score over the engine, big batches): the limit;
2. served Score with 1, 8, 32 concurrent clients, dynamic batching on;
3. the same with batching off (server --max-batch-requests 1);
4. bytes on the wire per scored position, top_k = 1, 16, 64 and full rows;
5. p50 / p99 latency of one small request at low load.
The server runs as its own process (`distillery teacher serve`) on 127.0.0.1; clients are threads.
"""

from __future__ import annotations

import argparse
import os
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
from teacher_server.in_process import LocalTeacher  # noqa: E402
from teacher_server.process import start_teacher  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--seqs-per-request", type=int, default=1)
    p.add_argument("--requests", type=int, default=128, help="requests in the token stream")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--model-dir", type=Path, default=None, help="benchmark this model instead")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 repeats: a smoke run")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.heads, args.vocab = 64, 2, 4, 4096
        args.requests, args.repeats = 32, 2
    return args


def start_server(model: Path, args: argparse.Namespace, *flags: str):
    return start_teacher(model, "--device", args.device, "--dtype", args.dtype, "--max-queue", "1024",
                         "--drain-delay-s", "0", *flags)


def make_stream(args: argparse.Namespace, vocab: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [[torch.randint(3, vocab, (args.seq_len,), generator=g)
             for _ in range(args.seqs_per_request)] for _ in range(args.requests)]


def stream_tokens(stream) -> int:
    return sum(len(s) for req in stream for s in req)


def in_process(teacher: LocalTeacher, stream, args, batch: int) -> float:
    flat = [s for req in stream for s in req]
    start = time.perf_counter()
    for i in range(0, len(flat), batch):
        chunk = flat[i:i + batch]
        teacher.score(chunk, [args.seq_len // 2] * len(chunk), top_k=args.top_k)
    return stream_tokens(stream) / (time.perf_counter() - start)


def served(endpoint: str, stream, args, clients: int) -> float:
    client = TeacherClient(endpoint, timeout_s=600)
    todo = list(range(len(stream)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            req = stream[i]
            client.score(req, [args.seq_len // 2] * len(req), top_k=args.top_k)

    client.score(stream[0], [args.seq_len // 2] * len(stream[0]), top_k=args.top_k)  # warm
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = stream_tokens(stream) / (time.perf_counter() - start)
    client.close()
    return rate


def wire_bytes(endpoint: str, stream, args, vocab: int) -> dict[str, float]:
    from teacher_server import wire
    from teacher_server.contract import ScoreArgs
    from teacher_server.pb import teacher_pb2_grpc as pb_grpc
    import grpc

    seqs = stream[0]
    start = args.seq_len // 2
    positions = sum(len(s) - start for s in seqs)
    out = {}
    with grpc.insecure_channel(endpoint, options=[("grpc.max_receive_message_length", 1 << 30)]) as ch:
        stub = pb_grpc.TeacherStub(ch)
        for label, k, full in [("top_k=1", 1, False), ("top_k=16", 16, False), ("top_k=64", 64, False),
                               ("full rows", 0, True)]:
            msg = wire.score_request_to_pb(ScoreArgs(seqs, [start] * len(seqs), k, 1.0, full))
            out[label] = stub.Score(msg, timeout=120).ByteSize() / positions
    return out


def latency(endpoint: str, vocab: int, n: int = 200) -> tuple[float, float]:
    client = TeacherClient(endpoint, timeout_s=60)
    ids = torch.randint(3, vocab, (32,), generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        client.score([ids], [16], top_k=16)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.score([ids], [16], top_k=16)
        samples.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.002)
    client.close()
    q = statistics.quantiles(samples, n=100)
    return statistics.median(samples), q[98]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model_dir or build_model(
            Path(tmp) / "bench-teacher", family="llama", tokenizer_vocab=args.vocab, hidden=args.hidden,
            layers=args.layers, heads=args.heads, max_positions=max(512, args.seq_len * 2))
        local = LocalTeacher.from_model_dir(str(model), device=args.device, dtype=args.dtype)
        info = local.info()
        n_params = sum(p.numel() for p in local.engine.model.parameters())
        stream = make_stream(args, info.vocab_size)
        print(f"model: {n_params / 1e6:.1f}M parameters, vocab {info.vocab_size}, {args.dtype} on "
              f"{args.device}; stream: {args.requests} requests x {args.seqs_per_request} seq x "
              f"{args.seq_len} tokens, top_k {args.top_k}, {args.repeats} repeats; "
              f"{torch.get_num_threads()} torch threads", flush=True)

        in_process(local, stream[:8], args, 8)  # warm up
        servers = {"batching on": start_server(model, args, "--max-wait-ms", "5"),
                   "batching off": start_server(model, args, "--max-batch-requests", "1")}
        # Interleaved: every repeat measures the in-process limit and then each served setting,
        # so a change in machine load hits all of them alike; ratios are taken within a repeat.
        names = ["in-process"] + [f"{label}/{c}" for label in servers for c in (1, 8, 32)]
        runs: dict[str, list[float]] = {name: [] for name in names}
        try:
            for repeat in range(args.repeats):
                # The limit: the better of two batch sizes (on CPU the best batch is often small).
                runs["in-process"].append(max(in_process(local, stream, args, b) for b in (8, 32)))
                for label, server in servers.items():
                    for clients in (1, 8, 32):
                        runs[f"{label}/{clients}"].append(served(server.endpoint, stream, args, clients))
                print(f"  repeat {repeat + 1}/{args.repeats}: " + ", ".join(
                    f"{name} {vals[-1]:,.0f}" for name, vals in runs.items()) + " tok/s", flush=True)
            wire_rows = wire_bytes(servers["batching on"].endpoint, stream, args, info.vocab_size)
            p50, p99 = latency(servers["batching on"].endpoint, info.vocab_size)
        finally:
            for server in servers.values():
                server.stop()
        del local

    def ratio(name: str, to: str = "in-process") -> float:
        return statistics.median(a / b for a, b in zip(runs[name], runs[to]))

    base = statistics.median(runs["in-process"])
    rows = [("in-process batched forward (best of 8 / 32 sequences)", base, 1.0)]
    for label in servers:
        for clients in (1, 8, 32):
            name = f"{label}/{clients}"
            rows.append((f"served, {label}, {clients} clients", statistics.median(runs[name]),
                         ratio(name)))
    print()
    print("| measurement | tokens/s (median) | × in-process (median of per-repeat ratios) |")
    print("|---|---:|---:|")
    for name, rate, r in rows:
        print(f"| {name} | {rate:,.0f} | {r:.2f} |")
    print()
    for clients in (1, 8, 32):
        print(f"batching on / off at {clients} clients: "
              f"{ratio(f'batching on/{clients}', f'batching off/{clients}'):.2f}x")
    print()
    print("| response payload | bytes per scored position | vs full rows |")
    print("|---|---:|---:|")
    for name, b in wire_rows.items():
        print(f"| {name} | {b:,.1f} | {b / wire_rows['full rows']:.4f} |")
    print()
    print(f"single small request (32 tokens, top_k 16) at low load: p50 {p50:.2f} ms, p99 {p99:.2f} ms")


if __name__ == "__main__":
    main()
