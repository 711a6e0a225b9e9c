"""The few collective operations the trainer needs, as no-ops when it runs alone.

Data parallelism is DDP's contract done by hand: every rank computes gradients on its own shard,
then one flat all-reduce per optimizer step averages them, so every rank applies the same update
and the replicas stay identical. One flat buffer per step (instead of DDP's per-bucket hooks)
also means gradient accumulation and skipped non-finite steps need no special casing: ranks
agree on "was every loss finite" first, and only then average and step.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_true(flag: bool) -> bool:
    """True on every rank iff `flag` is true on every rank."""
    if world_size() == 1:
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t) == 0


def sum_int(x: int) -> int:
    if world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks (missing gradients count as zeros)."""
    n = world_size()
    if n == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= n
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes: equal digests mean identical replicas."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def replicas_agree(model: torch.nn.Module) -> bool:
    """True when every rank holds bit-identical weights."""
    if world_size() == 1:
        return True
    digests: list[str | None] = [None] * world_size()
    dist.all_gather_object(digests, weights_digest(model))
    return len(set(digests)) == 1
