"""The trainer's collectives, on the device the process group serves; no-ops when it runs alone.

    comm = Comm.current()              # after init_process_group (Ray Train does it), else 1 rank
    comm.all_true(bool(torch.isfinite(loss)))
    comm.average_gradients(list(model.parameters()))

Every collective the trainer makes goes through one `Comm`, which moves its tensors to
`comm.device` first. That device is read from the process group's backends: NCCL serves only
`cuda` tensors (a CPU tensor there raises "No backend type associated with device type cpu"),
gloo serves `cpu`. The tests run 2 ranks whose default group is registered for `cuda` only and
give the trainer a CPU group through its `Comm`, so any collective that bypasses it fails.

Data parallelism is DDP's contract done by hand: every rank computes gradients on its own shard,
then once per optimizer step the gradients are averaged in buckets of at most `BUCKET_BYTES`
(bounded extra memory, as DDP's buckets), so every rank applies the same update and the replicas
stay identical. Reducing once per step (instead of DDP's hooks during the backward) means gradient
accumulation and skipped non-finite steps need no special casing: ranks first agree on "was every
loss finite", and only then average and step. What it gives up is the overlap of communication
with the backward; `docs/training.md` has the measured share and why that is the right trade here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

BUCKET_BYTES = 64 << 20  # gradient bytes reduced per collective


def device_for_backends(config: str) -> torch.device:
    """The device collectives must use, from a backend config such as "cpu:gloo,cuda:nccl".

    CPU when some backend serves `cpu` tensors, else the first device type named (cuda for nccl),
    at the current index when that accelerator is present.
    """
    types = [part.split(":", 1)[0].strip() for part in config.split(",") if ":" in part]
    if not types:  # a bare backend name; torch maps gloo to cpu and nccl to cuda
        types = ["cuda" if config.strip() == "nccl" else "cpu"]
    if "cpu" in types:
        return torch.device("cpu")
    kind = types[0]
    module = getattr(torch, kind, None)
    if module is not None and hasattr(module, "is_available") and module.is_available():
        return torch.device(kind, module.current_device())
    return torch.device(kind)


@dataclass(frozen=True)
class Comm:
    """One process group (None: the default one) and the device its collectives run on."""

    group: dist.ProcessGroup | None = None
    device: torch.device = torch.device("cpu")
    world: int = 1

    @classmethod
    def current(cls) -> "Comm":
        """The default process group when one is initialized, else a single rank."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(None, device_for_backends(dist.get_backend_config()), dist.get_world_size())

    @classmethod
    def of_group(cls, group: dist.ProcessGroup) -> "Comm":
        return cls(group, device_for_backends(dist.get_backend_config(group)), dist.get_world_size(group))

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.world > 1 else 0

    def _all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        t = t.to(self.device)
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff `flag` is true on every rank."""
        if self.world == 1:
            return flag
        return int(self._all_reduce(torch.tensor([0 if flag else 1], dtype=torch.int64))) == 0

    def sum_int(self, x: int) -> int:
        if self.world == 1:
            return x
        return int(self._all_reduce(torch.tensor([x], dtype=torch.int64)))

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over ranks (missing gradients count as zeros)."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets([p.grad for p in params]):
            flat = self._all_reduce(torch.cat([g.reshape(-1) for g in bucket]))
            flat /= self.world
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def replicas_agree(self, model: torch.nn.Module) -> bool:
        """True when every rank holds bit-identical weights."""
        if self.world == 1:
            return True
        mine = torch.frombuffer(bytearray(bytes.fromhex(weights_digest(model))), dtype=torch.uint8)
        mine = mine.to(torch.int64).to(self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine, group=self.group)
        return all(torch.equal(g, gathered[0]) for g in gathered)


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive gradients of one dtype and device, about BUCKET_BYTES a bucket."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if out and out[-1][0].dtype == g.dtype and out[-1][0].device == g.device and size + nbytes <= BUCKET_BYTES:
            out[-1].append(g)
            size += nbytes
        else:
            out.append([g])
            size = nbytes
    return out


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes: equal digests mean identical replicas."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
