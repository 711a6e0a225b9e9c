"""The Python API end to end: build a job spec, run it in this process, read its metrics, load the
trained student and let it answer; with --api-url, also submit the same job to a running service
and follow it. Nothing is downloaded: without --student/--teacher/--data it builds tiny
random-weight models and an arithmetic data set under --workdir first (a few seconds).

    .venv/bin/python examples/python_api.py                          # in this process, seconds on a CPU
    .venv/bin/distillery up                                          # then, through the service:
    .venv/bin/python examples/python_api.py --api-url http://127.0.0.1:8000

With --api-url the service must be allowed to read the models and data (DISTILLERY_MODEL_ROOTS,
DISTILLERY_DATA_ROOTS) and the job's run directory is the service's (DISTILLERY_RUNS_DIR).
docs/python-api.md explains each call.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from services import sdk


def tiny_inputs(workdir: Path) -> tuple[Path, Path, Path]:
    """A tiny teacher and a smaller student sharing one locally trained tokenizer, and 64 sums."""
    from services.demo.task import make_rows
    from services.demo.tiny import build_model

    teacher = build_model(workdir / "teacher", hidden=64, layers=2, seed=0)
    student = build_model(workdir / "student", hidden=32, layers=1, heads=2, seed=7)
    data = workdir / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in make_rows(64, seed=0, digits=2)))
    return teacher, student, data


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("runs/python-api"), help="Models, data and run dir go here.")
    p.add_argument("--teacher", type=Path, help="Teacher model directory (default: a tiny one built here).")
    p.add_argument("--student", type=Path, help="Student model directory (default: a tiny one built here).")
    p.add_argument("--data", type=Path, help="Training JSONL with prompt and response (default: sums).")
    p.add_argument("--steps", type=int, default=2, help="KD optimizer steps.")
    p.add_argument("--api-url", help="Also submit the job to the service at this URL and follow it.")
    p.add_argument("--api-key", help="API key for --api-url (default DISTILLERY_API_KEY).")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not (args.teacher and args.student and args.data):
        args.teacher, args.student, args.data = tiny_inputs(args.workdir)

    # 1. A spec: every section is a mapping merged into the defaults (docs/spec-reference.md).
    spec = sdk.make_spec(
        name="python-api",
        log_every=10,  # the trainer's own JSON lines every 10 steps; the callback below sees every step
        student={"model": str(args.student)},
        teacher={"local_model": str(args.teacher)},
        data={"path": str(args.data), "max_prompt_tokens": 16, "max_response_tokens": 8},
        distill={"loss": "jsd", "steps": args.steps, "batch_size": 4, "max_new_tokens": 8, "warmup_steps": 1},
        eval={"max_samples": 4, "max_new_tokens": 8, "teacher": False},
        checkpoint={"dir": str(args.workdir / "run")},
        tracking={"tensorboard": True},  # <run dir>/tensorboard; add mlflow / wandb sections to log there too
    )

    # 2. Run it here; every metrics event comes to the callback as the run goes.
    def show(m: dict[str, Any]) -> None:
        if "loss" in m:
            print(f"{m['stage']} step {m['step']}: loss {m['loss']:.4f}")

    result = sdk.run(spec, on_metrics=show)
    losses = [m["loss"] for m in result.metrics if m["stage"] == "distill"]
    student_eval = result.summary["eval"]["student"]
    print(f"run directory {result.run_dir}; KD losses {[round(x, 4) for x in losses]}; student exact match "
          f"{student_eval['exact_match']:.3f}, ROUGE-L {student_eval['rouge_l']:.3f}")

    # 3. The trained student, as a transformers model and tokenizer.
    model, tokenizer = sdk.load_student(result)
    prompt = tokenizer("Q: 12+30=?\nA:", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"student: 12+30 = {answer!r}")
    report: dict[str, Any] = {"run_dir": str(result.run_dir), "losses": losses, "answer": answer,
                              "checkpoint": str(result.checkpoint)}

    # 4. The same job through a running service: submit, follow its events, read its record.
    if args.api_url:
        with sdk.Service(args.api_url, args.api_key) as service:
            job = service.submit(spec.model_copy(update={"checkpoint": spec.checkpoint.model_copy(
                update={"dir": "python-api"})}))  # a run dir under the service's DISTILLERY_RUNS_DIR
            print(f"submitted {job.id} ({job.state})")
            job = service.wait(job.id, on_event=lambda e: e.get("kind") == "state" and print(f"  {e['state']}"))
            print(f"{job.id} {job.state} {job.error}".rstrip())
            report["service_job"] = {"id": job.id, "state": job.state, "run_dir": str(job.run_dir)}
    return report


if __name__ == "__main__":
    main()
