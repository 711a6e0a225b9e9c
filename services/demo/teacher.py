"""`distillery teacher demo`: serve a tiny teacher on loopback and score text through the client.

This one shows the teacher contract alone, over a real gRPC server process, in seconds; the main
demo (a trained teacher distilled through the whole stack) is `distillery demo` (services/demo/job.py).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

SENTENCES = ["the teacher model learns 12 + 30 = 42.", "each student has one question and one answer"]


def _ensure_model(cache_dir: Path) -> Path:
    from .tiny import build_model

    path = cache_dir / "tiny-teacher-llama"
    if not (path / "model.safetensors").exists():
        build_model(path, family="llama", hidden=128, layers=4, seed=0)
    return path


def main(cache_dir: Path) -> None:
    from transformers import AutoTokenizer

    from teacher_server.client import TeacherClient
    from teacher_server.process import start_teacher

    console = Console()
    model = _ensure_model(cache_dir)
    tok = AutoTokenizer.from_pretrained(str(model))
    server = start_teacher(model, "--grace-s", "5")
    try:
        with TeacherClient(server.endpoint, timeout_s=30) as client:
            info = client.info()
            console.print(f"[bold]teacher[/] {info.model_name} at {server.endpoint} (pid {server.pid}): "
                          f"vocab {info.vocab_size}, max length {info.max_sequence_length}, "
                          f"{info.dtype} on {info.device}, tokenizer {info.tokenizer_fingerprint[:12]}")
            seqs = [tok(s).input_ids for s in SENTENCES]
            t0 = time.perf_counter()
            scored = client.score(seqs, [1] * len(seqs), top_k=3)
            ms = (time.perf_counter() - t0) * 1000
    finally:
        server.stop()
    piece = lambda i: tok.convert_ids_to_tokens(int(i)).replace("\u0120", "_")  # noqa: E731
    for text, ids, res in zip(SENTENCES, seqs, scored):
        table = Table(title=f"{text!r}: teacher log-probs of each token given the ones before")
        for col in ("pos", "token", "log p", "teacher top-3 (log p)", "mass elsewhere"):
            table.add_column(col, justify="left" if "top" in col or col == "token" else "right")
        for j, t in enumerate(ids[1:]):
            alts = "  ".join(f"{piece(a)} {float(lp):.2f}" for a, lp in zip(res.topk_ids[j], res.topk_logprobs[j]))
            table.add_row(str(j + 1), piece(t), f"{float(res.token_logprobs[j]):.2f}", alts,
                          f"{float(res.tail_mass[j]):.3f}")
        console.print(table)
    console.print(f"scored {sum(len(s) - 1 for s in seqs)} positions over gRPC in {ms:.1f} ms; the server "
                  "drained and stopped. (Random weights: the numbers show the contract, not knowledge.)")
