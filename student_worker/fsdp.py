"""FSDP: the student sharded over the workers, for students that do not fit one device.

    model = shard(load_student(path, precision, "cpu"), device)  # every rank, after init_process_group
    with full_params(model):                                 # every rank enters and leaves together
        responses = sample_responses(model, ...)             # plain forwards inside: no collectives
    model_to_save, optim_state = full_checkpoint(model, optimizer)  # every rank; full copies on rank 0
    load_optimizer(model, optimizer, saved_optim_state)      # every rank, from the full saved state

`resources.strategy: fsdp` replaces the trainer's hand-made data parallelism (a full replica per
rank and one flat all-reduce of the gradients per step, `distributed.py`) with FSDP2
(`torch.distributed.fsdp.fully_shard`). Each decoder layer is one unit and the rest (embeddings,
final norm, head) is the root unit. A rank keeps 1/N of every weight, gradient and AdamW moment; a
unit's forward and backward all-gather its weights just in time, and its backward reduce-scatters
the gradients as their mean over ranks, so the trainer skips `average_gradients`.
`torch.nn.utils.clip_grad_norm_` on the sharded (DTensor) gradients clips by the global norm.

Costs and differences from ddp:
- Sampling and eval run many forwards, and ranks run different numbers of them (responses end at
  different lengths), so per-forward collectives would deadlock. `full_params` gathers the whole
  student once on every rank, keeps it gathered while sampling and frees it afterwards. Sampling
  therefore needs the full weights plus the KV cache on each device while it runs. The saving is
  in gradients and optimizer state, and in weights outside sampling.
- Every rank must join every collective. A backward runs even when a loss is non-finite (the step
  is then skipped on every rank, as in ddp). A rank without warmup pairs computes its zero loss
  through a forward of the model.
- Checkpoints hold the full weights and the optimizer state in the layout of a plain
  `optimizer.state_dict()` (`full_checkpoint`); rank 0 writes them. A checkpoint from an fsdp run
  therefore loads into a ddp run or as a plain model directory, and a ddp checkpoint resumes under
  fsdp.
- The spec refuses `resources.check_replicas_every` with fsdp. That check compares the ranks'
  weight checksums, and shards are not replicas; nothing here replaces it.
- Warmup's DPO reference (a frozen copy of the initial student) stays a full copy on every rank.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

# Gathered to rank 0 on the CPU; the other ranks get empty dicts.
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def available() -> bool:
    """FSDP needs a process group. A single plain process (`distillery train`) does not have one."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model: the classes it lists in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model: nn.Module, device: str, group: torch_dist.ProcessGroup | None = None) -> nn.Module:
    """Shard `model` (weights anywhere, e.g. loaded on the CPU) over the ranks of `group` (None:
    the default group) and move each rank's shard to `device`. Every rank calls this together,
    with the same weights."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    mesh = (init_device_mesh(dev.type, (torch_dist.get_world_size(),)) if group is None
            else DeviceMesh.from_group(group, dev.type))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)  # the backward needs the root at once
    return model


def _reshard_layers_after_forward(model: nn.Module, on: bool) -> None:
    model.set_reshard_after_forward(on)  # every unit ...
    model.set_reshard_after_forward(False, recurse=False)  # ... except the root, as `shard` left it


@contextmanager
def full_params(model: nn.Module) -> Iterator[None]:
    """Inside the block every rank holds the full weights, so forwards make no collectives and
    ranks may run different numbers of them. Every rank must enter the block together: entering
    all-gathers each unit once; leaving frees the gathered weights locally."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    _reshard_layers_after_forward(model, False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        _reshard_layers_after_forward(model, True)


class FullModel:
    """What rank 0 passes to `CheckpointManager.save`: the sharded model's config with the full
    weights, so the checkpoint is the same model directory a ddp run writes."""

    def __init__(self, model: nn.Module, weights: dict[str, Tensor]) -> None:
        self.model, self.weights = model, weights

    def parameters(self) -> Iterator[Tensor]:
        return iter(self.weights.values())

    def save_pretrained(self, path: str, **kwargs: Any) -> None:
        self.model.save_pretrained(path, state_dict=self.weights, **kwargs)


def full_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[FullModel, dict[str, Any]]:
    """Gather the full weights and the optimizer state to rank 0, on the CPU. Every rank calls it;
    ranks other than 0 get empty ones. The optimizer state has the layout of a plain model's
    `optimizer.state_dict()`: parameters are numbered in `model.parameters()` order."""
    weights = get_model_state_dict(model, options=_FULL_ON_RANK0)
    if not optimizer.state:
        # Before the first step there is nothing to gather, and the layouts agree already. (Here
        # get_optimizer_state_dict would take a zero-lr step to create state, and that step
        # would shift AdamW's bias correction on the real first step.)
        return FullModel(model, weights), optimizer.state_dict() if torch_dist.get_rank() == 0 else {}
    optim = get_optimizer_state_dict(model, optimizer, options=_FULL_ON_RANK0)
    numbers = {name: i for i, name in enumerate(_param_names(model))}
    return FullModel(model, weights), _rekeyed(optim, numbers) if optim else {}


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimizer state in the plain layout (as `full_checkpoint` or a ddp run saves
    it) into the sharded `optimizer`; each rank keeps its shard. Every rank passes the whole state,
    before any backward: set_optimizer_state_dict creates the state it fills only while no
    parameter has a gradient."""
    if not state["state"]:  # saved before the first step: hyper-parameters only, as in `full_checkpoint`
        optimizer.load_state_dict(state)
        return
    named = _rekeyed(state, dict(enumerate(_param_names(model))))
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def _param_names(model: nn.Module) -> list[str]:
    # The trainer builds its optimizer from model.parameters(): this is its parameter order.
    return [name for name, _ in model.named_parameters()]


def _rekeyed(state: dict[str, Any], key: dict[Any, Any]) -> dict[str, Any]:
    """The optimizer state with each parameter key k replaced by key[k] (numbers <-> names)."""
    return {"state": {key[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [key[p] for p in g["params"]]} for g in state["param_groups"]]}
