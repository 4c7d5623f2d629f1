"""Process-group setup for ``torchrun`` and the few collectives the engine needs.

A single-process run never touches ``torch.distributed``: :func:`init_distributed` returns a
context with ``world_size == 1`` and every helper here is then a no-op. Under ``torchrun`` the
launcher's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` describe the process; the engine passes
them in (the environment is read once, by :func:`context_from_env`, called by the command).
A process group that the caller created already is joined as it is, and left for the caller
to destroy.

What DDP training keeps equal to one process on the global batch (README, "Multi-GPU"):
gradients (DDP averages the per-rank means of equal shards; the triplet gather is
differentiable), OCFR centres with ``model.ocfr_scope = "global"``, and BatchNorm statistics
with ``model.sync_bn``. :func:`sync_from_main` and :func:`assert_same_across_ranks` keep and
check the ranks identical wherever the engine writes a checkpoint.
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from editor_reid.config import ConfigError
from editor_reid.errors import UsageError

__all__ = [
    "DistContext",
    "context_from_env",
    "init_distributed",
    "shutdown_distributed",
    "barrier",
    "broadcast_object",
    "mean_over_ranks",
    "max_over_ranks",
    "make_all_reduce_sum",
    "make_all_gather",
    "criterion_hooks",
    "GlobalBatchNorm1d",
    "convert_sync_batchnorm",
    "wrap_model",
    "unwrap_model",
    "check_world_size",
    "sync_from_main",
    "assert_same_across_ranks",
]

# Rank 0 evaluates while the other ranks wait at a barrier; NCCL's default 10 minutes could be
# too short for a large gallery.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""  # "" when not distributed
    owns_group: bool = False  # init_distributed created the process group (shutdown destroys it)

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

    ``device`` forces "cpu" or "cuda"; None picks CUDA when available. When the caller has
    initialised ``torch.distributed`` already, its group (rank, size, backend) is used as is.
    """
    joined = dist.is_available() and dist.is_initialized()
    if joined:
        env = os.environ if environ is None else environ
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    else:
        rank, world_size, local_rank = context_from_env(environ)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UsageError(f"device '{device}' was requested, but this machine has no CUDA device torch can use "
                         f"(torch {torch.__version__}); use --device cpu")
    if use_cuda:
        index = local_rank if world_size > 1 else torch.cuda.current_device()
        if world_size > 1 and index >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s); "
                               "give torchrun --nproc_per_node no more than the GPU count")
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if world_size == 1:
        return DistContext(device=dev)
    if joined:
        backend = str(dist.get_backend())
    else:
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=PROCESS_GROUP_TIMEOUT,
                                device_id=dev if use_cuda else None)
    log.info("process group: rank %d of %d (%s, %s)", rank, world_size, backend, dev)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend,
                       owns_group=not joined)


def shutdown_distributed(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if ctx.distributed and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier(device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def broadcast_object(ctx: DistContext, obj):
    """Rank 0's ``obj`` on every rank (e.g. a stop decision or evaluation metrics)."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_over_ranks(ctx: DistContext, value: int) -> int:
    """The largest of the ranks' ``value`` (one all-reduce); ``value`` itself when single-process."""
    if not ctx.distributed:
        return value
    box = torch.tensor([value], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())


def mean_over_ranks(ctx: DistContext, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean over ranks of each scalar in ``values`` (one all-reduce), detached; the values
    themselves when single-process. Every rank gets the same result."""
    if not ctx.distributed:
        return dict(values)
    names = list(values)
    stacked = torch.stack([values[k].detach().float() for k in names])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return dict(zip(names, (stacked / ctx.world_size).unbind()))


def make_all_reduce_sum(ctx: DistContext):
    """An in-place SUM all-reduce callable (the OCFR centre-statistics hook); None when single-process."""
    if not ctx.distributed:
        return None

    def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    return all_reduce_sum


def _differentiable(collective, tensor: torch.Tensor):
    """``collective`` (from ``torch.distributed.nn.functional``) applied to ``tensor``.

    torch 2.14 marks that module deprecated in favour of the private
    ``torch.distributed._functional_collectives``, whose all_reduce has a gradient only in
    recent releases; this module's collectives are differentiable from torch 2.1 (our floor)
    on, so the FutureWarning would only repeat in every rank's log.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.", category=FutureWarning)
        return collective(tensor)


def make_all_gather(ctx: DistContext):
    """A callable concatenating a tensor over ranks along dim 0 (the global triplet-mining hook).

    Differentiable, so the gathered rows of other ranks receive gradients: the gradient of a
    rank's features is the sum over ranks, and DDP's average over ranks then equals one
    process's gradient of the global-batch mean (the library's backward is a reduce-scatter
    on NCCL, an all-to-all on Gloo). Labels take the same path; without a gradient it is a
    plain all-gather. Every rank must pass the same number of rows (the P×K sampler
    guarantees it). None when single-process.
    """
    if not ctx.distributed:
        return None

    def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat(_differentiable(dist_nn.all_gather, tensor), dim=0)

    return all_gather_cat


def criterion_hooks(ctx: DistContext) -> dict:
    """The ``gather`` / ``all_reduce`` keyword arguments of :class:`editor_reid.losses.EditorCriterion`.

    The criterion uses each one only when its scope (``model.triplet_scope`` /
    ``model.ocfr_scope``) is "global"; empty when single-process.
    """
    if not ctx.distributed:
        return {}
    return {"gather": make_all_gather(ctx), "all_reduce": make_all_reduce_sum(ctx)}


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """A BatchNorm1d that normalises with the statistics of the global batch over all ranks.

    The CPU (Gloo) counterpart of ``nn.SyncBatchNorm``, which runs on GPUs only. Mean and
    variance come from two differentiable all-reduces (the sums, then the centred squared
    sums), so every rank's samples receive the gradient they get from one process on the
    whole batch. Parameters, buffers and state-dict keys are those of BatchNorm1d. Outside
    training, or without a process group, it is a plain BatchNorm1d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if x.dim() != 2:
            raise ValueError(f"GlobalBatchNorm1d expects [B, C] input, got {tuple(x.shape)}")
        xf = x.float()
        count = xf.new_full((1,), float(x.shape[0]))
        sums = _differentiable(dist_nn.all_reduce, torch.cat([xf.sum(dim=0), count]))  # [C + 1]
        n = sums[-1].detach()
        mean = sums[:-1] / n  # [C]
        # biased, as BatchNorm normalises
        var = _differentiable(dist_nn.all_reduce, (xf - mean).square().sum(dim=0)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1.0 - factor).add_(mean.detach(), alpha=factor)
                unbiased = var.detach() * (n / (n - 1).clamp(min=1.0))
                self.running_var.mul_(1.0 - factor).add_(unbiased, alpha=factor)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, ctx: DistContext) -> nn.Module:
    """BatchNorm layers computing global-batch statistics: ``nn.SyncBatchNorm`` on CUDA, and
    :class:`GlobalBatchNorm1d` on CPU (the model's BatchNorm layers are all 1-d necks)."""
    if ctx.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm1d:
        bn = GlobalBatchNorm1d(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        bn.load_state_dict(module.state_dict())
        bn.train(module.training)
        if module.affine:
            bn.weight.requires_grad_(module.weight.requires_grad)
            bn.bias.requires_grad_(module.bias.requires_grad)
        return bn
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm1d):
        raise NotImplementedError(f"model.sync_bn on CPU supports BatchNorm1d only, found {type(module).__name__}")
    for name, child in module.named_children():
        converted = _convert_cpu(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


def wrap_model(ctx: DistContext, model: nn.Module, *, sync_bn: bool = False) -> nn.Module:
    """``model`` for training: DistributedDataParallel (after the ``sync_bn`` conversion) when
    distributed, the model itself otherwise (``sync_bn`` then has nothing to synchronise)."""
    if not ctx.distributed:
        return model
    if sync_bn:
        model = convert_sync_batchnorm(model, ctx)
    # Unused parameters exist in some settings (e.g. a modality's head when AL=1), so DDP must look for them.
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, find_unused_parameters=True)


def sync_from_main(ctx: DistContext, *modules: nn.Module) -> None:
    """Copy rank 0's buffers of ``modules`` to every rank.

    The engine calls it wherever it writes ``last.pt``: BatchNorm running statistics without
    ``model.sync_bn`` differ between ranks after a step (DDP overwrites them with rank 0's at
    the next forward anyway), and so do the OCFR centres with ``model.ocfr_scope = "local"``.
    The checkpoint, written by rank 0, then holds the state of every rank.
    """
    if not ctx.distributed:
        return
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def assert_same_across_ranks(ctx: DistContext, named_tensors: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Raise RuntimeError, on every rank, if a tensor differs between ranks (checked by its
    float64 sum and sum of squares; one all-gather). ``what`` names the collection in the error."""
    if not ctx.distributed:
        return
    names, prints = [], []
    for name, tensor in named_tensors:
        values = tensor.detach().double()
        names.append(name)
        prints.append(torch.stack([values.sum(), values.square().sum()]))
    if not prints:
        return
    local = torch.stack(prints)  # [T, 2]
    gathered = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, local)
    for rank, other in enumerate(gathered[1:], start=1):
        differs = (other != gathered[0]).any(dim=1).nonzero()
        if len(differs):
            first = int(differs[0])
            raise RuntimeError(
                f"the ranks have diverged: {what} '{names[first]}' on rank {rank} differs from rank 0 "
                f"({len(differs)} tensor(s) differ); DDP keeps them identical, so a rank changed it on its own"
            )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def check_world_size(cfg, ctx: DistContext) -> None:
    """solver.ims_per_batch is the global batch: each rank must get an equal share of it."""
    if not ctx.distributed:
        return
    batch, k, world = cfg.solver.ims_per_batch, cfg.dataloader.num_instance, ctx.world_size
    if batch % world:
        raise ConfigError(f"solver.ims_per_batch={batch} is the global batch and must be divisible by the number "
                          f"of processes ({world})")
    if (batch // world) % k:
        scopes = [name for name, scope in (("triplet_scope", cfg.model.triplet_scope),
                                           ("ocfr_scope", cfg.model.ocfr_scope)) if scope == "local"]
        log.warning("each of the %d ranks gets %d images of every P×K batch, which splits identities of "
                    "dataloader.num_instance=%d images across ranks%s", world, batch // world, k,
                    f"; with {' and '.join(f'model.{key}=local' for key in scopes)} a rank sees only part of "
                    "those identities" if scopes else "")
