"""Several processes on one job (``torchrun``), through ``ignite.distributed``: each item of the cohort has one owner
process, per-item work is done by its owner and gathered, training averages gradients, and rank 0 writes the tables.

With one process every helper is a no-op, so single-process runs take exactly the same path.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import ignite.distributed as idist
import torch

__all__ = ["initialize", "finalize", "is_main", "owns", "gather", "map_owned", "average_gradients", "broadcast_module"]


def initialize(backend: str | None = None) -> None:
    """Join the ``torchrun`` process group (``backend`` None: NCCL with CUDA, else gloo); a no-op outside torchrun.
    Processes other than rank 0 log warnings only."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or idist.get_world_size() > 1:
        return
    idist.initialize(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    if idist.get_rank() != 0:
        for name in ("", "bundle", "ignite"):
            logging.getLogger(name).setLevel(logging.WARNING)


def finalize() -> None:
    """Leave the process group (a no-op in a single process)."""
    if idist.get_world_size() > 1:
        idist.finalize()


def is_main() -> bool:
    """Whether this process writes the run's shared outputs (rank 0)."""
    return idist.get_rank() == 0


def owns(index: int) -> bool:
    """Whether this process owns item ``index`` of an ordered collection (round robin over ranks)."""
    return index % idist.get_world_size() == idist.get_rank()


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def gather(local: dict[Any, Any]) -> dict[Any, Any]:
    """Every process's ``local`` results merged into one dict, on every process (tensors come back on the CPU)."""
    if idist.get_world_size() == 1:
        return local
    merged: dict[Any, Any] = {}
    for part in idist.all_gather(_to_cpu(local)):
        merged.update(part)
    return merged


def map_owned(fn: Callable[[int], Any], positions: Sequence[int], bar: Callable = iter) -> list[Any]:
    """``fn(i)`` for every position ``i``, each computed by the process that owns it (``owns``) and gathered: the
    results in order, on every process. ``bar`` wraps the positions this process computes (progress)."""
    if idist.get_world_size() == 1:
        return [fn(i) for i in bar(positions)]
    results = gather({i: fn(i) for i in bar([i for i in positions if owns(i)])})
    return [results[i] for i in positions]


def average_gradients(module: torch.nn.Module) -> None:
    """Sum the gradients of ``module`` over processes in one collective (each process scaled its loss by its share
    of the global batch, so the sum is the single-process gradient). Parameters without a gradient count as zero."""
    if idist.get_world_size() == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    flat = idist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers in every process."""
    if idist.get_world_size() == 1:
        return
    with torch.no_grad():
        for value in module.state_dict().values():
            value.copy_(idist.broadcast(value.clone(), src=0))
