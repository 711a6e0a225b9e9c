"""The `distillery` command.

    distillery teacher serve --model ./my-teacher [--port 50051 --device cuda --dtype bfloat16]
    distillery teacher demo      # a tiny teacher served on loopback, scored through the client
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer

from teacher_server.serve import DEFAULT_PORT

app = typer.Typer(help="Distillery: on-policy knowledge distillation as a service.",
                  no_args_is_help=True, add_completion=False)
teacher_app = typer.Typer(help="The teacher inference server.", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")


@teacher_app.command("serve")
def teacher_serve(
    model: Path = typer.Option(..., "--model", help="Local model directory (config.json + *.safetensors)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes it (set --token then)."),
    port: int = typer.Option(DEFAULT_PORT, help="gRPC port; 0 picks a free one (see --port-file)."),
    port_file: Optional[Path] = typer.Option(None, help="Write the bound port here once listening."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decoder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Run Python code shipped in the model directory."),
    max_sequence_length: Optional[int] = typer.Option(None, min=1, help="Tokens per sequence at most "
                                                      "(default: the model's max positions)."),
    max_batch_tokens: int = typer.Option(16384, min=1, help="Tokens merged into one forward."),
    max_batch_requests: int = typer.Option(64, min=1, help="Requests merged into one forward (1 = no batching)."),
    max_wait_ms: float = typer.Option(5.0, min=0, help="How long a request waits for company, ms."),
    max_queue: int = typer.Option(256, min=1, help="Requests allowed to wait; more get RESOURCE_EXHAUSTED."),
    top_k_limit: int = typer.Option(128, min=0, help="Largest top_k a request may ask for."),
    max_full_row_positions: int = typer.Option(4096, min=0, help="Positions per request with full rows."),
    max_message_mb: int = typer.Option(256, min=1, help="Largest gRPC message, MiB."),
    token: Optional[str] = typer.Option(None, envvar="DISTILLERY_TEACHER_TOKEN",
                                        help="Bearer token required from clients."),
    metrics_port: Optional[int] = typer.Option(None, help="Serve Prometheus metrics on this port."),
    grace_s: float = typer.Option(30.0, min=0, help="Seconds in-flight calls get after SIGTERM."),
    drain_delay_s: float = typer.Option(0.5, min=0, help="Seconds NOT_SERVING shows before the port closes."),
) -> None:
    """Serve a causal LM over gRPC (Info, Score, Generate) with dynamic batching."""
    from teacher_server.batcher import BatcherConfig
    from teacher_server.engine import EngineConfig, check_model_dir
    from teacher_server.serve import ServerConfig, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # fail in a second with one line, not after binding and a traceback
        check_model_dir(model)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"could not load the teacher model: {exc}", err=True)
        raise typer.Exit(1)
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        logging.warning("teacher exposed on %s without --token: anyone who reaches it can use it", host)
    config = ServerConfig(
        engine=EngineConfig(model_dir=str(model), device=device, dtype=dtype, compile=compile,
                            trust_remote_code=trust_remote_code,
                            max_sequence_length=max_sequence_length,
                            max_batch_tokens=max_batch_tokens, top_k_limit=top_k_limit,
                            max_full_row_positions=max_full_row_positions),
        batcher=BatcherConfig(max_batch_tokens=max_batch_tokens, max_batch_requests=max_batch_requests,
                              max_wait_ms=max_wait_ms, max_queue=max_queue),
        host=host, port=port, port_file=str(port_file) if port_file else None,
        max_message_mb=max_message_mb, token=token, metrics_port=metrics_port, grace_s=grace_s,
        drain_delay_s=drain_delay_s,
    )
    raise typer.Exit(run(config))


@app.command("train")
def train(
    spec_path: Path = typer.Argument(..., exists=True, dir_okay=False, help="Job spec (YAML or JSON)."),
    run_dir: Optional[Path] = typer.Option(None, help="Override checkpoint.dir of the spec."),
) -> None:
    """Run one distillation job in this process (local or served teacher), with a progress bar."""
    from student_worker.config import JobSpec
    from student_worker.trainer import NonFiniteLoss, Trainer, build_teacher
    from services.progress import TrainProgress

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = JobSpec.from_file(spec_path)
    if run_dir is not None:
        spec = spec.model_copy(update={"checkpoint": spec.checkpoint.model_copy(update={"dir": str(run_dir)})})
    with TrainProgress(spec) as progress:
        trainer = Trainer(spec, build_teacher(spec.teacher), on_metrics=progress.update)
        try:
            trainer.setup()
            summary = trainer.train()
        except NonFiniteLoss as exc:
            typer.echo(f"job failed: {exc.reason}: {exc}", err=True)
            raise typer.Exit(1)
        finally:
            trainer.cleanup()
    progress.report(summary, spec.checkpoint.dir)


@teacher_app.command("demo")
def teacher_demo(
    cache_dir: Path = typer.Option(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                   / "distillery", help="Where the tiny demo teacher is kept."),
) -> None:
    """Serve a tiny random-weight teacher on loopback and score a few sentences through the client."""
    from services.teacher_demo import main

    main(cache_dir)


if __name__ == "__main__":
    app()
