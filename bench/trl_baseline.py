"""TRL's `DistillationTrainer` as the baseline of `bench/train_bench.py --sections trl`, and where
the two trainers' time goes.

    pip install -e ".[bench]"                        # trl==1.16.0, keeps torch and transformers
    python bench/train_bench.py --sections trl --quick

`run_trl` trains the same tiny student against the same in-process teacher that the Distillery
rows use, with TRL's settings matched to the job spec (see `trl_config`), and returns per-step
metrics in the shape `train_bench.summarize` reads: response tokens, step wall time, and where it
went. TRL is on-policy only (no λ: every batch is sampled by the student, our λ = 1), computes
full-vocabulary teacher logits in-process; its generalized JSD is ours at every β (our `jsd`
follows TRL's β convention, docs/training.md).

`bench_decode` times one batch of on-policy sampling with our sampler and with transformers'
generate() (TRL's path), on prompts of equal and of mixed lengths.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from services.demo.task import make_rows


def trl_config(out_dir: Path, args: argparse.Namespace, steps: int, seed: int = 0):
    """DistillationConfig matched to `train_bench.spec_for`: batch, max_new_tokens, λ = 1 (TRL's
    only mode), JSD β = 0.5, temperature 1 for sampling and loss, constant LR, AdamW, clip 1.0,
    fp32 on CPU, no gradient checkpointing (TRL turns it on by default; we never recompute)."""
    from trl import DistillationConfig

    return DistillationConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, seed=seed,
        max_steps=steps, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.5, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        gradient_checkpointing=False, dataloader_num_workers=0,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, log_level="error",
    )


def _timed_trainer_class():
    """DistillationTrainer that records, per optimizer step, the time spent in generate(), in the
    teacher's backbone, and in the whole training_step (generate + both forwards + loss + backward)."""
    from trl import DistillationTrainer

    class TimedDistillationTrainer(DistillationTrainer):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.clock = {"generate_s": 0.0, "teacher_s": 0.0, "train_step_s": 0.0, "tokens": 0}
            backbone = self.accelerator.unwrap_model(self.teacher_model).base_model
            backbone.register_forward_pre_hook(lambda *_: setattr(self, "_t_teacher", time.perf_counter()))
            backbone.register_forward_hook(lambda *_: self._add("teacher_s", time.perf_counter() - self._t_teacher))

        def _add(self, key: str, value: float) -> None:
            self.clock[key] += value

        def _generate_single_turn(self, *a: Any, **kw: Any):
            t0 = time.perf_counter()
            completions = super()._generate_single_turn(*a, **kw)
            self._add("generate_s", time.perf_counter() - t0)
            self._add("tokens", sum(len(c) for c in completions))
            return completions

        def training_step(self, *a: Any, **kw: Any):
            t0 = time.perf_counter()
            out = super().training_step(*a, **kw)
            self._add("train_step_s", time.perf_counter() - t0)
            return out

    return TimedDistillationTrainer


def _step_recorder(trainer) -> tuple[list[dict[str, Any]], Any]:
    """A callback turning the trainer's clock into one metrics dict per optimizer step."""
    from transformers import TrainerCallback

    steps: list[dict[str, Any]] = []

    class StepRecorder(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            trainer.clock.update(generate_s=0.0, teacher_s=0.0, train_step_s=0.0, tokens=0)
            self.t0 = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            c = trainer.clock
            steps.append({"tokens": c["tokens"], "step_s": time.perf_counter() - self.t0,
                          "generate_s": c["generate_s"], "teacher_s": c["teacher_s"],
                          # student forward, loss (incl. the teacher's lm_head, done chunk-wise inside it), backward
                          "forward_backward_s": c["train_step_s"] - c["generate_s"] - c["teacher_s"]})

        def on_log(self, *_: Any, logs: dict[str, float] | None = None, **__: Any) -> None:
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = float(logs["loss"])

    return steps, StepRecorder()


def run_trl(student_dir: Path, teacher_dir: Path, prompts: list[str], out_dir: Path,
            args: argparse.Namespace, steps: int, seed: int = 0) -> tuple[list[dict[str, Any]], torch.nn.Module]:
    """Train `steps` TRL distillation steps; per-step metrics and the trained student."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    tokenizer = AutoTokenizer.from_pretrained(str(student_dir), padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    trainer = _timed_trainer_class()(
        model=student, teacher_model=teacher, args=trl_config(out_dir, args, steps, seed),
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    metrics, recorder = _step_recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    return metrics, trainer.model


# ---------------------------------------------------------------------- where the time goes
def bench_decode(tmp: Path, args: argparse.Namespace) -> None:
    """One batch of on-policy sampling, three ways, on prompts of equal and of mixed lengths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from teacher_server.contract import SamplingParams
    from teacher_server.sampling import generate, left_pad

    tokenizer = AutoTokenizer.from_pretrained(str(tmp / "student"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp / "student")).eval()
    by_len: dict[int, list[torch.Tensor]] = {}
    for r in make_rows(512, seed=0, digits=2):
        ids = torch.tensor(tokenizer(r["prompt"]).input_ids)
        by_len.setdefault(len(ids), []).append(ids)
    lengths = sorted(by_len, key=lambda n: -len(by_len[n]))
    b = args.batch_size
    batches = {"equal lengths": by_len[lengths[0]][:b],
               "mixed lengths": [by_len[lengths[i % len(lengths)]][i // len(lengths)] for i in range(b)]}
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0,
                            stop_ids=(tokenizer.eos_token_id,), seed=0)
    hf = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=[tokenizer.eos_token_id], disable_compile=True)  # what TRL's DistillationTrainer passes

    def hf_generate(prompts: list[torch.Tensor]) -> None:
        ids, mask = left_pad(prompts, "cpu", tokenizer.pad_token_id)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=hf)

    ways = {"Distillery sampler (ready 4-D mask)": lambda p: generate(model, p, params),
            "transformers generate() (TRL's path)": hf_generate}
    print(f"\n### One batch of on-policy sampling ({b} prompts x {args.max_new_tokens} new tokens, "
          f"student, median of 7)\n")
    print("| sampler | " + " | ".join(f"{k} (ms)" for k in batches) + " |")
    print("|---|" + "---:|" * len(batches))
    for name, way in ways.items():
        cells = []
        for prompts in batches.values():
            way(prompts)  # warm
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                way(prompts)
                times.append(time.perf_counter() - t0)
            cells.append(f"{1000 * statistics.median(times):.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
