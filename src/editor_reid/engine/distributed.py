"""Process-group setup for ``torchrun`` and the few collectives the engine needs.

A single-process run never touches ``torch.distributed``: :func:`init_distributed` returns a
context with ``world_size == 1`` and every helper here is then a no-op. Under ``torchrun`` the
launcher's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` describe the process; the engine passes
them in (the environment is read once, by :func:`context_from_env`, called by the command).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "context_from_env",
    "init_distributed",
    "shutdown_distributed",
    "barrier",
    "broadcast_object",
    "make_all_reduce_sum",
    "make_all_gather",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""  # "" when not distributed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by torchrun; (0, 1, 0) for a plain process."""
    env = os.environ if environ is None else environ
    try:
        rank = int(env.get("RANK", "0"))
        world_size = int(env.get("WORLD_SIZE", "1"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise RuntimeError(f"torchrun environment is malformed (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from exc
    if world_size < 1 or not 0 <= rank < world_size:
        raise RuntimeError(f"torchrun environment is inconsistent: RANK={rank}, WORLD_SIZE={world_size}")
    return rank, world_size, local_rank


def init_distributed(device: str | None = None, environ: Mapping[str, str] | None = None) -> DistContext:
    """Pick the device and, under torchrun, join the process group (NCCL on CUDA, Gloo on CPU).

    ``device`` forces "cpu" or "cuda"; None picks CUDA when available.
    """
    rank, world_size, local_rank = context_from_env(environ)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available")
    if use_cuda:
        index = local_rank if world_size > 1 else torch.cuda.current_device()
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if world_size == 1:
        return DistContext(device=dev)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    log.info("process group: rank %d of %d (%s, %s)", rank, world_size, backend, dev)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(ctx: DistContext, obj):
    """Rank 0's ``obj`` on every rank (e.g. a stop decision or evaluation metrics)."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def make_all_reduce_sum(ctx: DistContext):
    """An in-place SUM all-reduce callable (the OCFR centre-statistics hook); None when single-process."""
    if not ctx.distributed:
        return None

    def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    return all_reduce_sum


class _AllGather(torch.autograd.Function):
    """Concatenate equal-sized tensors over ranks; the gradient of the local slice is the sum
    over ranks of the gradients flowing into it (every rank's loss may use every row)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None


def make_all_gather(ctx: DistContext):
    """A callable concatenating a tensor over ranks along dim 0 (the global triplet-mining hook).

    Differentiable, so the gathered rows of other ranks receive gradients; every rank must pass
    the same number of rows (the P×K sampler guarantees it). None when single-process.
    """
    if not ctx.distributed:
        return None

    def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.requires_grad:
            return _AllGather.apply(tensor, ctx.rank, ctx.world_size)
        parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    return all_gather_cat
