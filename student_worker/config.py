"""The typed job spec: one validated document per distillation job, saved with every checkpoint.

    spec = JobSpec.from_file("examples/tiny_local.yaml")

Every field has a default and a description with its unit; unknown fields are errors; impossible
combinations are refused with a message that says why. Paths are kept as given here; the job
service checks them against its configured roots before a job is accepted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from teacher_server.model_dirs import check_revision

LossName = Literal["fkl", "rkl", "skew_fkl", "skew_rkl", "jsd", "tvd", "akl"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


Precision = Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16-true"]


# A branch, tag or commit of a hub id; `_no_dotdot` also refuses "..", as the path of a refs/ file.
REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_./-]*$"


def _no_dotdot(value: str | None) -> str | None:
    if value is not None:
        check_revision(value)
    return value


class LoraSpec(_Strict):
    r: int = Field(16, ge=1, le=4096, description="Rank of each adapter (PEFT's r).")
    alpha: float = Field(32.0, gt=0, le=1e6, description="The adapters' update is scaled by alpha / r "
                                                         "(PEFT's lora_alpha).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1, max_length=64,
        description="Modules that get adapters, by the last part of their names (q_proj, up_proj, ...), or "
                    "[all-linear] for every linear layer but the output head (PEFT's target_modules).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input (PEFT's lora_dropout).")

    @field_validator("target_modules")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        bad = [n for n in names if not re.match(r"^[A-Za-z0-9_.-]{1,128}$", n)]
        if bad:
            raise ValueError(f"student.lora.target_modules: {bad[0][:60]!r} is not a module name")
        if "all-linear" in names and len(names) > 1:
            raise ValueError("student.lora.target_modules: all-linear stands alone")
        return names


class StudentSpec(_Strict):
    model: str = Field(description="The student: a local model directory (config.json, safetensors weights, "
                                   "tokenizer), or a hub id org/name found in the hub cache (docs/training.md, "
                                   "Models).")
    revision: str | None = Field(None, max_length=128, pattern=REVISION_PATTERN,
                                 description="Branch, tag or commit of a hub id `model` (default main).")
    _revision = field_validator("revision")(_no_dotdot)
    precision: Precision = Field(
        "fp32", description="fp32: everything in float32. bf16-mixed / fp16-mixed: float32 master weights and "
                            "optimizer state, forwards (sampling, student, DPO reference, eval) under bf16 / fp16 "
                            "autocast, log-softmax and losses in float32; fp16 adds a gradient scaler. bf16-true: "
                            "bfloat16 weights and optimizer state (half the memory; small updates round away).")
    device: str = Field("cpu", max_length=32, description="cpu, cuda or cuda:N (Ray sets it per worker).")
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters on the frozen model instead of every "
                                                    "weight; checkpoints hold the adapters (needs the peft extra).")
    gradient_checkpointing: bool = Field(False, description="Recompute each decoder layer's activations in the "
                                         "backward instead of keeping them: less memory, one more forward of "
                                         "compute; the same losses and gradients.")

    @model_validator(mode="before")
    @classmethod
    def _no_dtype(cls, data):
        if isinstance(data, dict) and "dtype" in data:
            raise ValueError("student.dtype was replaced by student.precision: fp32, bf16-mixed (float32 master "
                             "weights, bf16 compute; what `dtype: bfloat16` should have been) or bf16-true "
                             "(bfloat16 weights, the old `dtype: bfloat16`)")
        return data


class TeacherActorSpec(_Strict):
    model: str = Field(description="Teacher model directory readable from the Ray nodes, or a hub id in "
                                   "their hub cache.")
    revision: str | None = Field(None, max_length=128, pattern=REVISION_PATTERN,
                                 description="Branch, tag or commit of a hub id `model` (default main).")
    _revision = field_validator("revision")(_no_dotdot)
    replicas: int = Field(1, ge=1, le=64, description="Teacher servers started as Ray actors.")
    num_cpus: float = Field(1.0, gt=0, le=256, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, le=16, description="GPUs reserved per replica.")
    device: str = Field("cpu", max_length=32, description="cpu or cuda (the replica's own GPU).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Teacher compute dtype.")
    max_restarts: int = Field(-1, ge=-1, le=1000, description="Restarts of a dead replica (-1 = always).")


# host:port (a name, IPv4 or [IPv6]) or dns:///host:port, as the teacher client dials them.
ENDPOINT = re.compile(r"^(dns:///)?(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?):(?P<port>[0-9]{1,5})$")


class TeacherSpec(_Strict):
    endpoints: list[str] = Field(default_factory=list, max_length=64,
                                 description="host:port of running teacher servers, used round-robin.")
    local_model: str | None = Field(None, description="Run this teacher model in-process instead: a directory "
                                                      "or a hub id in the hub cache.")
    revision: str | None = Field(None, max_length=128, pattern=REVISION_PATTERN,
                                 description="Branch, tag or commit of a hub id `local_model` (default main).")
    _revision = field_validator("revision")(_no_dotdot)
    ray_actor: TeacherActorSpec | None = Field(
        None, description="Start the teacher inside the Ray cluster, as gRPC servers in Ray actors.")
    timeout_s: float = Field(120.0, gt=0, le=3600, description="Deadline of one teacher call, seconds.")
    unavailable_timeout_s: float = Field(
        300.0, gt=0, le=86400, description="How long a worker waits for a teacher that does not answer (down, "
                                           "restarting, loading), from the call's first failed attempt, seconds; "
                                           "then the job fails with `teacher unavailable at <endpoints> since <time>`.")
    token_env: str | None = Field(None, max_length=128,
                                  description="Environment variable holding the teacher's bearer token.")
    student_candidates: int = Field(
        0, ge=0, le=128, description="Also ask the teacher about the student's own top-K ids at each response position: "
                                     "the sparse support becomes teacher top-k ∪ student top-K ∪ the actual token ∪ one "
                                     "tail bucket, so reverse-type losses (rkl, akl, skew_rkl, jsd) see the student's "
                                     "head exactly. 0: off. Needs a teacher whose Info has max_candidates ≥ K (the "
                                     "transformers engine; not vLLM's).")
    weight: float = Field(1.0, ge=0.01, le=100, description="This job's share of served teachers that several jobs "
                                                             "use: each server queues jobs fairly by weight (its "
                                                             "operator's --job-weight for the job wins).")
    chat_template: str | None = Field(
        None, description="The teacher's chat template: a Jinja file, or a directory whose tokenizer has one. "
                          "Templated prompts are rendered with the student's template and the teacher scores those "
                          "ids, so the job is refused unless this template renders the same ids. Default: the "
                          "teacher model directory's (local_model, ray_actor); needed with endpoints.")

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, endpoints: list[str]) -> list[str]:
        for e in endpoints:
            m = ENDPOINT.match(e)
            if m is None or not 0 < int(m["port"]) < 65536:
                raise ValueError(f"teacher endpoint {e[:100]!r} is not host:port (or dns:///host:port for every "
                                 "address of a name), with a port in 1..65535")
        if len(set(endpoints)) != len(endpoints):
            raise ValueError("teacher endpoints are listed twice")
        return endpoints

    @model_validator(mode="after")
    def _one_teacher(self) -> "TeacherSpec":
        if sum(map(bool, (self.endpoints, self.local_model, self.ray_actor))) != 1:
            raise ValueError("teacher needs exactly one of `endpoints` (running servers), `local_model` "
                             "(in-process) or `ray_actor` (started in the Ray cluster)")
        if self.revision is not None and not self.local_model:
            raise ValueError("teacher.revision is the revision of local_model (ray_actor has its own)")
        return self


# Builders `format: load_dataset` may name instead of a path: the text formats of the `datasets`
# library, read from local `data_files` only (no pickle-reading builder, nothing fetched).
LOAD_DATASET_BUILDERS = ("json", "csv", "parquet", "arrow", "text")
SPLIT_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"


class DataSpec(_Strict):
    path: str = Field(description="Training rows: a JSONL file, a Parquet file, a directory written by "
                                  "datasets' save_to_disk, or (format load_dataset) a local directory or one of the "
                                  "builders json, csv, parquet, arrow, text read from data_files (docs/training.md).")
    format: Literal["auto", "jsonl", "parquet", "saved", "load_dataset"] = Field(
        "auto", description="How `path` is read. auto: *.parquet is Parquet, any other file JSONL, a directory "
                            "holding dataset_dict.json or state.json a save_to_disk one, any other directory or "
                            "a builder name load_dataset.")
    data_files: dict[str, list[str]] | None = Field(
        None, description="format load_dataset: local data files, a list (split `train`) or a mapping of split "
                          "name to files, passed to datasets.load_dataset as data_files.")
    split: str = Field("train", pattern=SPLIT_NAME, description="Split holding the training rows, for sources "
                                                                "with splits (save_to_disk, load_dataset).")
    eval_split: str | None = Field(None, pattern=SPLIT_NAME, description="Split of the same source holding the "
                                   "eval rows; else eval_path, else eval_fraction of the training rows.")
    eval_path: str | None = Field(None, description="Eval rows, read like `path` (same format rules); when absent "
                                                    "(and no eval_split), eval_fraction of `path` is held out.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of `path` held out for eval when there is no eval_path.")
    split_seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the held-out eval rows, apart from the job's "
                            "seed: runs that differ only in seed are evaluated on the same rows.")
    prompt_field: str = Field("prompt", min_length=1, max_length=64, description="Column of the prompt text (or "
                                                                                 "of a prompt given as messages).")
    response_field: str = Field("response", min_length=1, max_length=64, description="Column of the reference "
                                "response; optional: rows without it are prompts only.")
    messages_field: str = Field("messages", min_length=1, max_length=64, description="Column of conversational "
                                "rows ([{role, content}, ...]): the prompt is every turn up to the last user turn, "
                                "the assistant turn after it (if any) the reference.")
    chat_template: bool = Field(False, description="Also wrap plain-text prompts in the student tokenizer's chat "
                                                   "template (conversational rows always are).")
    max_prompt_tokens: int = Field(256, ge=1, le=32768, description="Longer prompts are cut from the left, tokens.")
    max_response_tokens: int = Field(256, ge=1, le=32768, description="Longer reference responses are cut, tokens.")
    append_eos: bool = Field(True, description="End reference responses with the tokenizer's EOS token.")

    @field_validator("data_files", mode="before")
    @classmethod
    def _data_files(cls, value):
        """A file or a list of files means split `train`, as datasets.load_dataset reads them."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            value = {"train": value}
        if isinstance(value, dict):
            value = {k: [v] if isinstance(v, str) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _source(self) -> "DataSpec":
        if self.data_files is not None:
            if self.format not in ("auto", "load_dataset"):
                raise ValueError(f"data.data_files is read by datasets.load_dataset: it needs format load_dataset "
                                 f"(or auto), not {self.format}")
            bad = [k for k, files in self.data_files.items() if not re.match(SPLIT_NAME, k) or not files]
            if bad or not self.data_files:
                raise ValueError(f"data.data_files: each split name (letters, digits, _ . -) needs at least one "
                                 f"file; check {bad or 'the mapping'}")
        if self.eval_split is not None:
            if self.eval_path is not None:
                raise ValueError("data.eval_split and data.eval_path both name the eval rows: give one")
            if self.format in ("jsonl", "parquet"):
                raise ValueError(f"data.eval_split needs a source with splits (saved, load_dataset); a {self.format} "
                                 "file has none: use eval_path")
            if self.eval_split == self.split:
                raise ValueError(f"data.eval_split {self.eval_split!r} is the training split too")
        if self.path in LOAD_DATASET_BUILDERS and self.format not in ("auto", "load_dataset"):
            raise ValueError(f"data.path {self.path!r} is a load_dataset builder name; write ./{self.path} for a "
                             "local file or directory of that name")
        if self.path in LOAD_DATASET_BUILDERS and self.data_files is None:
            raise ValueError(f"data.path {self.path!r} names the load_dataset builder, which reads data.data_files: "
                             "give them")
        return self


class WarmupSpec(_Strict):
    enabled: bool = Field(False, description="Run Warmup-Distill (DPO on teacher-corrected pairs) before KD.")
    prompts: int = Field(64, ge=1, le=1_000_000, description="Warmup prompts taken from the training data.")
    samples_per_prompt: int = Field(2, ge=1, le=64, description="Student samples n per warmup prompt.")
    rule: Literal["prob_diff", "log_ratio", "teacher_prob", "teacher_rank"] = Field(
        "prob_diff", description="Margin rule that flags low-probability knowledge (docs/training.md).")
    threshold: float = Field(0.5, description="η: flag when M_t > η (prob_diff, log_ratio) or P_t < η (teacher_prob).")
    rank_k: int = Field(10, ge=1, le=1024, description="teacher_rank: flag tokens outside the teacher's top rank_k.")
    replacement: Literal["argmax", "sample"] = Field(
        "argmax", description="Teacher token put at the first flagged position: its argmax excluding the "
                              "student's token, or a sample from its distribution without that token.")
    sample_temperature: float = Field(1.0, gt=0, le=10, description="Student sampling temperature for warmup samples.")
    max_new_tokens: int = Field(64, ge=1, le=8192, description="Tokens per student sample and per teacher continuation.")
    loss: Literal["dpo", "simpo", "hinge"] = Field("dpo", description="Preference loss.")
    beta: float = Field(0.1, gt=0, le=100, description="β of the preference loss.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="DPO label smoothing ε.")
    simpo_gamma: float = Field(0.5, ge=0, le=100, description="SimPO target margin γ.")
    sft_weight: float = Field(0.0, ge=0, le=100, description="Weight of an NLL term on the chosen response.")
    steps: int = Field(20, ge=1, le=1_000_000, description="Optimizer steps of the warmup stage.")
    batch_size: int = Field(8, ge=1, le=1024, description="Pairs per optimizer step (per worker).")
    lr: float = Field(5e-5, gt=0, le=1, description="Peak learning rate of the warmup stage.")


class DistillSpec(_Strict):
    loss: LossName = Field("fkl", description="Divergence between teacher p and student q.")
    alpha: float = Field(0.1, ge=0, lt=1, description="Skew α of skew_fkl / skew_rkl, in [0, 1): at 1 the "
                                                     "divergence is 0 whatever the student does.")
    beta: float = Field(0.5, ge=0, le=1, description="β of generalized JSD, as TRL's: "
                      "β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q; exactly FKL at 0 and RKL at 1.")
    mu: float = Field(0.5, gt=0, le=1, description="AKL head/tail split: the head is the most likely "
                    "tokens while their cumulative teacher mass stays ≤ μ (the top token always).")
    temperature: float = Field(1.0, gt=0, le=10, description="Temperature of both distributions in the loss.")
    steps: int = Field(100, ge=1, le=10_000_000, description="Optimizer steps of the KD stage.")
    batch_size: int = Field(8, ge=1, le=1024, description="Prompts per micro-batch (per worker).")
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    score_chunks: int = Field(4, ge=1, le=1024, description="The teacher scores each micro-batch's rollouts in up to "
                              "this many requests, each sent as soon as its rows finish sampling, on a thread of "
                              "its own: the teacher works while the student samples the rest and trains on what "
                              "is scored. Strictly on-policy (the weights change only after the step). 1: one "
                              "request once sampling is done.")
    on_policy_fraction: float = Field(1.0, ge=0, le=1, description="λ: share of batches whose responses the student samples.")
    off_policy_source: Literal["data", "teacher"] = Field(
        "data", description="Where the other batches' responses come from: the data set, or the teacher (SeqKD).")
    top_k: int = Field(16, ge=1, le=1024, description="Teacher top-k per position (sparse loss support).")
    full_logprobs: bool = Field(False, description="Ask the teacher for full rows (exact loss; 4·V bytes a position).")
    sample_temperature: float = Field(1.0, gt=0, le=10, description="Temperature of on-policy sampling.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus mass of on-policy sampling.")
    max_new_tokens: int = Field(64, ge=1, le=8192, description="Tokens per sampled response.")
    lr: float = Field(1e-4, gt=0, le=1, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    warmup_steps: int = Field(10, ge=0, le=1_000_000, description="Linear LR warm-up, optimizer steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine schedule floor as a share of lr.")
    grad_clip: float = Field(1.0, ge=0, le=1e6, description="Max global grad norm; 0 disables clipping.")
    max_non_finite: int = Field(3, ge=1, le=1000, description="Non-finite losses in a row that fail the job.")
    loss_chunk_size: int | None = Field(None, ge=1, le=1_000_000, description="Positions per loss chunk (memory bound).")


class CheckpointSpec(_Strict):
    dir: str = Field("runs/job", description="Run directory: checkpoints, spec, metrics.")
    every_steps: int = Field(50, ge=1, le=10_000_000, description="Checkpoint every N optimizer steps of a stage.")
    keep_last: int = Field(2, ge=1, le=1000, description="Checkpoints kept; older ones are deleted.")


class EvalSpec(_Strict):
    enabled: bool = Field(True, description="Evaluate after the last stage.")
    max_samples: int = Field(64, ge=1, le=1_000_000, description="Eval examples used at most.")
    max_new_tokens: int = Field(64, ge=1, le=8192, description="Greedy decoding length.")
    batch_size: int = Field(16, ge=1, le=1024, description="Prompts decoded together.")
    teacher: bool = Field(True, description="Also evaluate the teacher on the same set, for reference.")
    before: bool = Field(False, description="Also evaluate the student before its first training step.")
    after_warmup: bool = Field(False, description="Also evaluate the student when Warmup-Distill ends.")
    every_steps: int = Field(0, ge=0, le=10_000_000,
                             description="Also evaluate the student every N KD optimizer steps (0 = never).")
    scorer: str | None = Field(
        None, max_length=200, pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$",
        description="module:function called as f(prompt, completion, reference) for every eval example, returning "
                    "a float or a dict of floats (averaged as `score` / `score/<key>`); reference is None for rows "
                    "without one. The job service accepts only modules its operator allows "
                    "(DISTILLERY_ALLOWED_SCORERS).")



class ResourcesSpec(_Strict):
    workers: int = Field(1, ge=1, le=1024, description="Student workers (Ray Train data-parallel ranks).")
    cpus_per_worker: float = Field(1.0, gt=0, le=256, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(0.0, ge=0, le=16, description="GPUs per worker (0 = CPU with gloo).")
    memory_gb_per_worker: float = Field(0.0, ge=0, le=16384, description="Memory reserved per worker, GiB "
                                        "(0 = not declared). Ray places workers by it and the scheduler "
                                        "admits the job only when the cluster has it free.")
    max_failures: int = Field(3, ge=-1, le=1000, description="Worker-group restarts from the latest "
                                                            "checkpoint before the job fails (-1 = no limit).")
    storage_path: str | None = Field(None, description="Ray Train storage: a directory or a URI; "
                                                      "default <checkpoint.dir>/ray.")
    check_replicas_every: int = Field(0, ge=0, le=1_000_000, description="Compare the ranks' weight checksums "
                                                                        "every N steps (0 = never); a mismatch fails the job.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every worker holds the whole student and gradients are averaged each step. "
                           "fsdp: weights, gradients and optimizer state are sharded over the workers (FSDP2), "
                           "for students that do not fit one device; checkpoints are the same full model either way.")

    @model_validator(mode="after")
    def _strategy_fits(self) -> "ResourcesSpec":
        if self.strategy == "fsdp" and self.check_replicas_every:
            raise ValueError("resources.check_replicas_every compares replicas, but fsdp workers hold different "
                             "shards of the student, not replicas: set it to 0 with strategy fsdp")
        return self


class MlflowSpec(_Strict):
    tracking_uri: str | None = Field(
        None, max_length=2048, description="MLflow tracking server, http(s)://host:port (all the job service "
                                           "accepts), or for local runs a store such as file:///path; null: the "
                                           "workers' MLFLOW_TRACKING_URI, else MLflow's own default. Credentials "
                                           "come from the workers' environment (MLFLOW_TRACKING_TOKEN, ...), never "
                                           "from the spec.")
    experiment: str = Field("distillery", min_length=1, max_length=256, description="MLflow experiment name "
                            "(created when missing).")


class WandbSpec(_Strict):
    project: str = Field("distillery", min_length=1, max_length=128, description="Weights & Biases project.")
    entity: str | None = Field(None, max_length=128, description="W&B team or user; null: the API key's default.")
    mode: Literal["online", "offline"] = Field(
        "online", description="online: sent as it runs (WANDB_API_KEY in the workers' environment); offline: "
                              "written under <checkpoint.dir>/wandb only, for `wandb sync` later.")


class TrackingSpec(_Strict):
    tensorboard: bool = Field(True, description="Write TensorBoard event files into <checkpoint.dir>/tensorboard.")
    mlflow: MlflowSpec | None = Field(None, description="Also log to MLflow "
                                                        "(needs the package: the project's `mlflow` extra).")
    wandb: WandbSpec | None = Field(None, description="Also log to Weights & Biases "
                                                      "(needs the package: the project's `wandb` extra).")


class JobSpec(_Strict):
    name: str = Field("distill", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Human-readable job name.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of data order, sampling and init.")
    student: StudentSpec
    teacher: TeacherSpec
    data: DataSpec
    warmup: WarmupSpec = Field(default_factory=WarmupSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    log_every: int = Field(1, ge=1, le=100_000, description="Print metrics, and report them to Ray Train, every N optimizer steps.")

    @model_validator(mode="after")
    def _coherent(self) -> "JobSpec":
        if self.warmup.rule == "teacher_prob" and not 0 < self.warmup.threshold < 1:
            raise ValueError("warmup.rule teacher_prob compares a probability: threshold must be in (0, 1)")
        if self.warmup.rule == "prob_diff" and not -1 < self.warmup.threshold < 1:
            raise ValueError("warmup.rule prob_diff compares probabilities: threshold must be in (-1, 1)")
        if self.student.lora is not None and self.resources.strategy == "fsdp":
            raise ValueError("student.lora with resources.strategy fsdp is not supported: adapters are small and "
                             "the frozen base is not trained, so use ddp (each worker holds the base once, "
                             "gradients and optimizer state are the adapters' only)")
        if self.teacher.student_candidates and self.distill.full_logprobs:
            raise ValueError("teacher.student_candidates extends a sparse teacher's support; with "
                             "distill.full_logprobs the teacher's rows are already whole: drop one")
        if self.student.precision == "fp16-mixed" and self.resources.strategy == "fsdp":
            raise ValueError("student.precision fp16-mixed needs a gradient scaler that sees every rank's "
                             "gradients; with resources.strategy fsdp use bf16-mixed")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> "JobSpec":
        text = Path(path).read_text()
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a job spec is a mapping, got {type(data).__name__}")
        return cls.model_validate(data)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def sequence_lengths(spec: JobSpec) -> list[tuple[str, int]]:
    """The longest sequence each enabled stage sends the teacher: (the fields that set it, tokens).

    A disabled stage (warmup off, eval off, no off-policy batches) sets nothing."""
    d, prompt = spec.distill, "data.max_prompt_tokens"
    needs: list[tuple[str, int]] = []
    if d.on_policy_fraction > 0 or d.off_policy_source == "teacher":
        needs.append((f"{prompt} + distill.max_new_tokens", d.max_new_tokens))
    if d.on_policy_fraction < 1 and d.off_policy_source == "data":
        needs.append((f"{prompt} + data.max_response_tokens", spec.data.max_response_tokens))
    if spec.warmup.enabled:
        needs.append((f"{prompt} + warmup.max_new_tokens", spec.warmup.max_new_tokens))
    if spec.eval.enabled and spec.eval.teacher:
        needs.append((f"{prompt} + eval.max_new_tokens", spec.eval.max_new_tokens))
    return [(fields, spec.data.max_prompt_tokens + n) for fields, n in needs]


def check_teacher_length(spec: JobSpec, teacher_limit: int) -> None:
    """Refuse, naming the fields to change, a spec whose enabled stages exceed the teacher's limit."""
    over = [(fields, n) for fields, n in sequence_lengths(spec) if n > teacher_limit]
    if over:
        parts = "; ".join(f"{fields} = {n}" for fields, n in over)
        raise ValueError(f"sequences longer than the teacher's limit of {teacher_limit} tokens: {parts}. "
                         f"Lower these fields (or give the teacher a longer --max-sequence-length)")


# Fields that may change between a checkpoint and the run resuming from it: where things run and
# how often the run reports, never what it computes. Prefixes of dotted field paths. A renamed
# student.revision is safe because the trainer refuses a checkpoint whose saved student commit
# differs from the one the revision now resolves to.
RESUME_SAFE = (
    "name", "log_every", "eval.", "tracking.", "checkpoint.dir", "checkpoint.every_steps", "checkpoint.keep_last",
    "student.device", "student.gradient_checkpointing", "student.revision", "teacher.", "resources.max_failures",
    "resources.storage_path",
    "resources.check_replicas_every", "resources.strategy", "resources.cpus_per_worker",
    "resources.gpus_per_worker",
)


def _flatten(doc: object, prefix: str = "") -> dict[str, object]:
    if isinstance(doc, dict):
        out: dict[str, object] = {}
        for key, value in doc.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: doc}


@dataclass(frozen=True)
class SpecChange:
    field: str
    saved: object
    current: object

    def __str__(self) -> str:
        return f"{self.field}: {self.saved!r} -> {self.current!r}"


def resume_changes(saved: dict, current: JobSpec) -> tuple[list[SpecChange], list[SpecChange]]:
    """Compare the spec saved with a checkpoint (its JSON document) with the spec about to resume.

    Returns (breaking, harmless): changes that would make the resumed run differ from an
    uninterrupted run of the saved spec (model, loss, data, batch, seed, steps...), and changes
    `RESUME_SAFE` allows (eval and log cadence, where the teacher runs...). A field only one side
    has counts as a change with the other side None.
    """
    try:  # a field added since the checkpoint was written counts as its default there
        saved = JobSpec.model_validate(saved).model_dump(mode="json")
    except ValueError:  # a spec a field has since been removed from: compared as saved
        pass
    old, new = _flatten(saved), _flatten(current.model_dump(mode="json"))
    breaking, harmless = [], []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            change = SpecChange(key, old.get(key), new.get(key))
            safe = any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUME_SAFE)
            (harmless if safe else breaking).append(change)
    return breaking, harmless
