"""resources.strategy fsdp: the student sharded over 2 gloo ranks, against the same runs under ddp.

No Ray here. The module fixture starts two processes once (torch.multiprocessing, a FileStore
rendezvous), runs every 2-rank job listed in `two_rank_runs` through the Trainer, and the tests
then compare the metrics and checkpoints the jobs left behind. Each process's default group is
registered for `cuda` only, as NCCL is on GPUs, and the trainer gets a CPU gloo group through its
`Comm`: a collective anywhere in the trainer that bypasses the Comm fails every job here.

Same spec, same seeds: fsdp and ddp do the same math in a different order. Over 2 ranks the mean
of two gradients rounds the same either way, so without clipping and gradient accumulation the
runs are bit-identical (test_warmup_dpo_under_fsdp_matches_ddp). Clipping (FSDP sums per-shard
norms) and accumulation (FSDP averages every micro-batch, ddp the accumulated sum) differ by fp32
rounding, which AdamW then carries on (test_fsdp_trains_like_ddp: max |Δw| 1.8e-7 measured).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import student_worker.trainer as trainer_mod
from student_worker.checkpoint import CheckpointManager, CheckpointRef
from student_worker.config import JobSpec
from student_worker.distributed import Comm
from student_worker.trainer import Trainer, build_teacher

WORLD = 2
DEADLINE_S = 240  # a collective out of step hangs both ranks: fail instead of waiting for the suite timeout


class _Stop(Exception):
    pass


def _run_job(job: dict, rank: int, out: Path, comm: Comm) -> None:
    """One job on this rank: a run, optionally stopped after a step, optionally resumed after."""
    spec = JobSpec.model_validate_json(job["spec"])
    seen: list[dict] = []

    def on_metrics(m: dict) -> None:
        seen.append(m)
        if m["stage"] == "distill" and m["step"] == job.get("stop_after"):
            raise _Stop  # every rank raises at the same step, after its collectives

    resume = None
    if job.get("resume_from"):
        path = Path(job["resume_from"])
        stage, _, step = path.name.rpartition("-")
        resume = CheckpointRef(path, stage, int(step))
    real_loss, calls = trainer_mod.token_divergence, [0]

    def flaky_loss(*args, **kwargs):  # NaN at the job's nan_on_rank1_call-th loss of rank 1
        calls[0] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if rank == 1 and calls[0] == job.get("nan_on_rank1_call") else loss

    trainer_mod.token_divergence = flaky_loss
    trainer = Trainer(spec, build_teacher(spec.teacher), rank=rank, world=WORLD, on_metrics=on_metrics, comm=comm)
    summary, resumed_from = None, None
    try:
        trainer.setup(resume_from=resume)
        summary = trainer.train()
    except _Stop:
        trainer = Trainer(spec, build_teacher(spec.teacher), rank=rank, world=WORLD, on_metrics=seen.append,
                          comm=comm)
        trainer.setup()
        resumed_from = trainer.resumed_from.path.name
        summary = trainer.train()
    finally:
        trainer.cleanup()
        trainer_mod.token_divergence = real_loss
    (out / f"{job['name']}-r{rank}.json").write_text(json.dumps(
        {"metrics": seen, "summary": summary, "resumed_from": resumed_from, "sharded": trainer.sharded},
        default=str))


def _rank_main(rank: int, store: str, jobs: list[dict], out: str) -> None:
    torch.set_num_threads(1)
    # The default group serves `cuda` tensors only, as NCCL does on GPUs: a collective on CPU
    # tensors that does not go through the trainer's Comm raises "No backend type associated
    # with device type cpu". The trainer gets a CPU group through its Comm.
    torch_dist.init_process_group("cuda:gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    comm = Comm.of_group(torch_dist.new_group(backend="gloo"))
    try:
        for job in jobs:
            torch.manual_seed(0)
            _run_job(job, rank, Path(out), comm)
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_runs(make_spec_module, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    base = dict(distill={"steps": 4, "batch_size": 4, "grad_accum": 2, "on_policy_fraction": 0.5},
                checkpoint={"every_steps": 2, "keep_last": 5})
    warm = dict(warmup={"enabled": True, "steps": 2}, distill={"steps": 2, "grad_clip": 0.0},
                checkpoint={"every_steps": 100}, eval={"enabled": True})
    nan = dict(distill={"steps": 3, "grad_clip": 0.0, "on_policy_fraction": 0.0}, checkpoint={"every_steps": 100})

    def spec(name: str, strategy: str, **sections) -> str:
        sections["checkpoint"] = {**sections.get("checkpoint", {}), "dir": str(root / name)}
        resources = {"strategy": strategy, **sections.pop("resources", {})}
        return make_spec_module(resources=resources, **sections).to_json()

    ckpt = root / "{}" / "checkpoints" / "distill-00000002"
    jobs = [
        {"name": "fsdp", "spec": spec("fsdp", "fsdp", **base)},
        {"name": "ddp", "spec": spec("ddp", "ddp", **base)},
        {"name": "fsdp_killed", "spec": spec("fsdp_killed", "fsdp", **base), "stop_after": 3},
        {"name": "fsdp_from_ddp", "spec": spec("fsdp_from_ddp", "fsdp", **base),
         "resume_from": str(ckpt).format("ddp")},
        {"name": "ddp_from_fsdp", "spec": spec("ddp_from_fsdp", "ddp", **base),
         "resume_from": str(ckpt).format("fsdp")},
        {"name": "fsdp_nan", "spec": spec("fsdp_nan", "fsdp", **nan), "nan_on_rank1_call": 2},
        {"name": "ddp_nan", "spec": spec("ddp_nan", "ddp", **nan), "nan_on_rank1_call": 2},
        {"name": "fsdp_warmup", "spec": spec("fsdp_warmup", "fsdp", **warm)},
        {"name": "ddp_warmup", "spec": spec("ddp_warmup", "ddp", **warm)},
        {"name": "ddp_bf16_checked", "spec": spec("ddp_bf16_checked", "ddp", student={"precision": "bf16-mixed"},
                                                  distill={"steps": 2, "on_policy_fraction": 0.5},
                                                  resources={"check_replicas_every": 1})},
        {"name": "fsdp_after_warmup", "spec": spec("fsdp_after_warmup", "fsdp", **warm),
         "resume_from": str(root / "fsdp_warmup" / "checkpoints" / "distill-00000000")},
    ]
    out = root / "out"
    out.mkdir()
    start = time.monotonic()
    ctx = mp.start_processes(_rank_main, args=(str(root / "store"), jobs, str(out)), nprocs=WORLD,
                             join=False, start_method="spawn")
    while not ctx.join(timeout=2):
        if time.monotonic() - start > DEADLINE_S:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2-rank jobs did not finish in {DEADLINE_S} s")

    def result(name: str, rank: int = 0) -> dict:
        return json.loads((out / f"{name}-r{rank}.json").read_text())

    def weights(name: str, checkpoint: str = "done-00000000") -> dict[str, torch.Tensor]:
        return load_file(str(root / name / "checkpoints" / checkpoint / "model.safetensors"))

    return result, weights, root


def _losses(result: dict) -> dict[tuple[str, int], float]:
    return {(m["stage"], m["step"]): m["loss"] for m in result["metrics"] if "loss" in m and "event" not in m}


def test_fsdp_trains_like_ddp(two_rank_runs):
    """Same spec and seeds under both strategies: the same losses on every rank, the same weights."""
    result, weights, _ = two_rank_runs
    for rank in range(WORLD):
        fsdp, ddp = result("fsdp", rank), result("ddp", rank)
        assert fsdp["sharded"] and not ddp["sharded"]
        assert [m["step"] for m in fsdp["metrics"]] == [1, 2, 3, 4]
        # λ = 0.5: within a step some ranks sampled and some did not, so sampling under fsdp
        # (every rank gathers, only some generate) was exercised
        assert {m["on_policy_fraction"] for m in fsdp["metrics"]} != {1.0}
        assert _losses(fsdp) == pytest.approx(_losses(ddp), rel=1e-5)
    a, b = weights("fsdp"), weights("ddp")
    assert a.keys() == b.keys()
    for k in b:  # grad_clip 1 and grad_accum 2: fp32 rounding apart (1.8e-7 measured)
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_fsdp_checkpoint_is_a_full_plain_model(two_rank_runs, tiny_student):
    """Full weights under the plain parameter names, loadable without FSDP; optimizer state in a
    plain model's layout, equal to the one ddp saves."""
    from transformers import AutoModelForCausalLM

    _, weights, root = two_rank_runs
    ref = CheckpointManager(root / "fsdp").latest_valid()
    assert ref.path.name == "done-00000000" and CheckpointManager(root / "fsdp").verify(ref)
    plain = AutoModelForCausalLM.from_pretrained(str(ref.path))
    original = AutoModelForCausalLM.from_pretrained(str(tiny_student))
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in original.state_dict().items()}
    for k, v in plain.state_dict().items():
        assert torch.equal(v, weights("fsdp")[k]), k

    fsdp_state = torch.load(root / "fsdp" / "checkpoints" / "distill-00000002" / "state.pt", weights_only=True)
    ddp_state = torch.load(root / "ddp" / "checkpoints" / "distill-00000002" / "state.pt", weights_only=True)
    fo, do = fsdp_state["optimizer"], ddp_state["optimizer"]
    assert fo["param_groups"] == do["param_groups"]
    assert fo["state"].keys() == do["state"].keys() and len(fo["state"]) == len(list(original.parameters()))
    for i in do["state"]:
        for key, value in do["state"][i].items():
            torch.testing.assert_close(fo["state"][i][key], value, rtol=1e-5, atol=1e-8)
    assert fsdp_state["scheduler"] == ddp_state["scheduler"]


def test_fsdp_resume_repeats_the_uninterrupted_run_exactly(two_rank_runs):
    """Stopped after step 3, resumed from the step-2 checkpoint: the same losses and bit-identical
    final weights as the uninterrupted fsdp run."""
    result, weights, _ = two_rank_runs
    for rank in range(WORLD):
        killed = result("fsdp_killed", rank)
        assert killed["resumed_from"] == "distill-00000002"
        assert [m["step"] for m in killed["metrics"]] == [1, 2, 3, 3, 4]
        clean = _losses(result("fsdp", rank))
        for m in killed["metrics"]:
            assert m["loss"] == clean[(m["stage"], m["step"])], m["step"]
    a, b = weights("fsdp_killed"), weights("fsdp")
    for k in b:
        assert torch.equal(a[k], b[k]), k


def test_checkpoints_move_between_strategies(two_rank_runs):
    """ddp's step-2 checkpoint resumed under fsdp ends like the ddp run, and the other way round:
    weights and optimizer state are the same on disk whichever strategy wrote them."""
    result, weights, _ = two_rank_runs
    for resumed, original in (("fsdp_from_ddp", "ddp"), ("ddp_from_fsdp", "fsdp")):
        assert [m["step"] for m in result(resumed)["metrics"]] == [3, 4]
        assert _losses(result(resumed)) == pytest.approx(
            {k: v for k, v in _losses(result(original)).items() if k[1] > 2}, rel=1e-5)
        a, b = weights(resumed), weights(original)
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_warmup_dpo_under_fsdp_matches_ddp(two_rank_runs):
    """Warmup (DPO), distill and eval under fsdp, without clipping or accumulation: bit-identical
    to ddp. The stage boundary saves a fresh optimizer: gathering it must not step it."""
    result, weights, _ = two_rank_runs
    for rank in range(WORLD):
        fsdp, ddp = result("fsdp_warmup", rank), result("ddp_warmup", rank)
        pairs = [m for m in fsdp["metrics"] if m.get("event") == "pairs"]
        assert pairs and pairs[0]["samples"] == 4 * 2  # 8 prompts over 2 ranks, 2 samples each
        assert [(m["stage"], m["step"]) for m in fsdp["metrics"] if "event" not in m] == \
            [("warmup", 1), ("warmup", 2), ("distill", 1), ("distill", 2)]
        assert _losses(fsdp) == _losses(ddp)
    a, b = weights("fsdp_warmup"), weights("ddp_warmup")
    assert a.keys() == b.keys()
    for k in b:
        assert torch.equal(a[k], b[k]), k
    # eval ran on rank 0 inside the gathered block while rank 1 waited: the same answers as ddp
    assert result("fsdp_warmup")["summary"]["eval"] == result("ddp_warmup")["summary"]["eval"]
    # resumed at the boundary (a fresh optimizer in the checkpoint): the same distill stage again
    assert [m["step"] for m in result("fsdp_after_warmup")["metrics"]] == [1, 2]
    assert _losses(result("fsdp_after_warmup")) == {k: v for k, v in _losses(result("fsdp_warmup")).items()
                                                     if k[0] == "distill"}
    for k, v in weights("fsdp_after_warmup").items():
        assert torch.equal(v, b[k]), k


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_all(two_rank_runs):
    """Under fsdp the rank with the NaN still joins the backward's collectives (no hang); every
    rank skips that step, and the run ends where ddp's does with the same NaN."""
    result, weights, _ = two_rank_runs
    for rank in range(WORLD):
        fsdp, ddp = result("fsdp_nan", rank), result("ddp_nan", rank)
        assert [m["skipped"] for m in fsdp["metrics"]] == [False, True, False]
        assert fsdp["summary"]["non_finite_total"] == 1
        assert [m["skipped"] for m in ddp["metrics"]] == [False, True, False]
    a, b = weights("fsdp_nan"), weights("ddp_nan")
    for k in b:
        assert torch.equal(a[k], b[k]), k


def test_fsdp_refuses_the_replica_check(make_spec):
    with pytest.raises(ValueError, match="shards of the student, not replicas"):
        make_spec(resources={"strategy": "fsdp", "check_replicas_every": 1})
    assert make_spec().resources.strategy == "ddp"


def test_fsdp_without_a_process_group_trains_as_one_plain_process(make_spec):
    """`distillery train` runs one process with no process group: nothing to shard over."""
    spec = make_spec(resources={"strategy": "fsdp"}, distill={"steps": 1})
    trainer = Trainer(spec, build_teacher(spec.teacher))
    trainer.setup()
    try:
        assert not trainer.sharded
        assert trainer.train()["stage"] == "done"
    finally:
        trainer.cleanup()


def test_every_collective_runs_on_the_trainers_comm(two_rank_runs):
    """The default group serves only `cuda` (as NCCL): every job above ran its collectives through
    the trainer's Comm. A bf16-mixed ddp run compared the replicas' checksums after every step."""
    result, _, _ = two_rank_runs
    for rank in range(WORLD):
        run = result("ddp_bf16_checked", rank)
        assert [m["step"] for m in run["metrics"]] == [1, 2] and run["summary"]["stage"] == "done"
        assert all(m["reduce_s"] > 0 for m in run["metrics"])


def test_collectives_pick_the_device_the_backend_serves():
    from student_worker.distributed import device_for_backends

    assert device_for_backends("cpu:gloo,cuda:nccl") == torch.device("cpu")
    assert device_for_backends("gloo") == torch.device("cpu")
    assert device_for_backends("cuda:nccl").type == "cuda"
    assert device_for_backends("nccl").type == "cuda"
    assert device_for_backends("cuda:gloo").type == "cuda"
