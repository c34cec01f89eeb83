"""Data-parallel training over several processes with ``torch.distributed`` (launched by ``torchrun``).

One process (rank) per GPU, or per group of CPU cores where there is no GPU. ``torchrun`` sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (and the rendezvous address);
:func:`init_from_environment` joins the process group with NCCL on GPUs and gloo on CPUs. Each
global batch of the single-process run is split across the ranks (:func:`shard`); the gradients
are averaged by :class:`torch.nn.parallel.DistributedDataParallel`, with every rank's loss
weighted by its share of the batch (:func:`shard_weight`), so that the step equals the
single-process step on the same global batch.

Without a process group every helper here is the identity of a one-process run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "Context",
    "all_reduce_sum",
    "barrier",
    "context",
    "init_from_environment",
    "launched_by_torchrun",
    "shard",
    "shard_weight",
    "shutdown",
    "wrap",
]


@dataclass(frozen=True)
class Context:
    """Where a process stands among the training processes (rank 0 of 1 without a process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on the process that writes checkpoints, outputs and progress (rank 0)."""
        return self.rank == 0


def context() -> Context:
    """Return this process's :class:`Context` (rank 0 of 1 when no process group is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def launched_by_torchrun() -> bool:
    """Tell whether this process is one rank of a ``torchrun`` launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_environment(
    want_gpu: bool, threads: int | None = None, log: logging.Logger | None = None
) -> tuple[Context, torch.device]:
    """Join the process group that ``torchrun`` described in the environment; return it and the device.

    ``want_gpu``: use the GPU ``LOCAL_RANK`` (backend NCCL) when CUDA is usable; otherwise the
    ranks run on the CPU (backend gloo), each with ``threads / LOCAL_WORLD_SIZE`` torch threads
    (``threads``: the cores the job holds on this machine, default all it may use) so that the
    ranks of one machine do not oversubscribe its cores.
    """
    logger = log or logging.getLogger(__name__)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    gpu = want_gpu and torch.cuda.is_available() and torch.cuda.device_count() > local_rank
    if gpu:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        cores = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // max(local_world, 1)))
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    ctx = context()
    logger.info(
        "rank %d of %d (local rank %d) on %s, backend %s, %d torch threads",
        ctx.rank,
        ctx.world,
        ctx.local_rank,
        device,
        backend,
        torch.get_num_threads(),
    )
    return ctx, device


def shutdown() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(index: np.ndarray, ctx: Context) -> np.ndarray:
    """Return this rank's particles of a global batch ``index`` ``(B,)``: every ``world``-th from ``rank``.

    A rank whose share is empty (a last batch smaller than the number of ranks) gets the batch's
    first particle, weighted 0 by :func:`shard_weight`: every rank must take part in each
    gradient exchange.
    """
    if ctx.world == 1:
        return index
    part = index[ctx.rank :: ctx.world]
    return part if len(part) else index[:1]


def shard_weight(index: np.ndarray, ctx: Context) -> float:
    """Return the factor on this rank's mean loss that makes the averaged gradients the whole batch's.

    DistributedDataParallel averages the ranks' gradients; the global batch's mean loss is
    ``Σ_r (n_r / B) · mean_r``, so rank ``r`` scales its mean by ``world · n_r / B`` (1 in a
    one-process run; 0 for the placeholder of :func:`shard`).
    """
    if ctx.world == 1:
        return 1.0
    n_r = len(index[ctx.rank :: ctx.world])
    return ctx.world * n_r / max(len(index), 1)


def wrap(module: nn.Module, ctx: Context) -> nn.Module:
    """Return ``module`` wrapped in DistributedDataParallel when there are several ranks, else itself.

    Parameters that take no part in a step (frozen pose heads have ``requires_grad`` False and
    are ignored) must not exist: every trainable parameter enters the loss.
    """
    if ctx.world == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=None, broadcast_buffers=False)


def all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum each value over the ranks (the same keys on every rank); identity in a one-process run."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
