"""`distillery teacher demo`: serve a tiny teacher on loopback and score text through the client.

The full end-to-end demo (jobs, Ray, a trained teacher) replaces this once the job service lands;
this one shows the teacher contract working over a real gRPC server process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

SENTENCES = ["the teacher model learns 12 + 30 = 42.", "each student has one question and one answer"]


def _ensure_model(cache_dir: Path) -> Path:
    from teacher_server.tiny import build_model

    path = cache_dir / "tiny-teacher-llama"
    if not (path / "model.safetensors").exists():
        build_model(path, family="llama", hidden=128, layers=4, seed=0)
    return path


def main(cache_dir: Path) -> None:
    from transformers import AutoTokenizer

    from teacher_server.client import TeacherClient, wait_until_serving

    console = Console()
    model = _ensure_model(cache_dir)
    tok = AutoTokenizer.from_pretrained(str(model))
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        cmd = [sys.executable, "-m", "services.cli", "teacher", "serve", "--model", str(model),
               "--port", "0", "--port-file", str(port_file), "--grace-s", "5"]
        server = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("teacher server did not start")
                time.sleep(0.05)
            endpoint = f"127.0.0.1:{port_file.read_text()}"
            wait_until_serving(endpoint, timeout_s=120)
            with TeacherClient(endpoint, timeout_s=30) as client:
                info = client.info()
                console.print(f"[bold]teacher[/] {info.model_name} at {endpoint}: vocab "
                              f"{info.vocab_size}, max length {info.max_sequence_length}, "
                              f"{info.dtype} on {info.device}, tokenizer {info.tokenizer_fingerprint[:12]}")
                seqs = [tok(s).input_ids for s in SENTENCES]
                t0 = time.perf_counter()
                scored = client.score(seqs, [1] * len(seqs), top_k=3)
                ms = (time.perf_counter() - t0) * 1000
                for text, ids, res in zip(SENTENCES, seqs, scored):
                    table = Table(title=f"{text!r}  (teacher log-probs, top-3)")
                    for col in ("pos", "token", "log p(token)", "top-1", "top-2", "top-3", "tail mass"):
                        table.add_column(col, justify="right" if col != "token" else "left")
                    for j, t in enumerate(ids[1:]):
                        alts = [f"{tok.decode([int(a)])!r} {float(lp):.2f}"
                                for a, lp in zip(res.topk_ids[j], res.topk_logprobs[j])]
                        table.add_row(str(j + 1), repr(tok.decode([t])), f"{float(res.token_logprobs[j]):.3f}",
                                      *alts, f"{float(res.tail_mass[j]):.3f}")
                    console.print(table)
                console.print(f"scored {sum(len(s) - 1 for s in seqs)} positions in {ms:.1f} ms "
                              "(random weights: the numbers show the contract, not knowledge)")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
