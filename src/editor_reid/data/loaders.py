"""DataLoaders for training (P×K batches) and testing (ordered)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from editor_reid.config import MODALITIES
from editor_reid.data.dataset import MultiModalDataset
from editor_reid.data.layouts import DatasetSplits, Sample
from editor_reid.data.sampler import DistributedRandomIdentitySampler, RandomIdentitySampler
from editor_reid.data.transforms import build_transforms

__all__ = ["collate", "build_train_loader", "build_test_loader", "seed_worker"]


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    """Stack each modality to [B, 3, H, W]; pid/camid/sceneid/index become LongTensors [B]."""
    out = {m: torch.stack([item[m] for item in batch]) for m in MODALITIES}
    for key in ("pid", "camid", "sceneid", "index"):
        out[key] = torch.tensor([item[key] for item in batch], dtype=torch.long)
    return out


def seed_worker(worker_id: int) -> None:
    """Seed NumPy and ``random`` in a worker from torch's per-worker seed (base seed + id)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _loader_kwargs(cfg, rank: int) -> dict:
    workers = cfg.dataloader.num_workers
    generator = torch.Generator()
    # The generator draws the workers' base seed, so augmentation is reproducible from solver.seed.
    generator.manual_seed(cfg.solver.seed + rank)
    return {
        "num_workers": workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": workers > 0,
        "worker_init_fn": seed_worker,
        "generator": generator,
        "collate_fn": collate,
    }


def build_train_loader(cfg, splits: DatasetSplits, *, rank: int = 0, world_size: int = 1):
    """The training loader and its sampler (call ``sampler.set_epoch(e)`` before each epoch).

    ``cfg.solver.ims_per_batch`` is the global batch; each rank loads ``ims_per_batch //
    world_size`` of it.
    """
    dataset = MultiModalDataset(
        splits.train,
        build_transforms(cfg, is_train=True),
        modalities=cfg.datasets.modalities,
        skip_bad_images=cfg.datasets.skip_bad_images,
    )
    pids = [s.pid for s in splits.train]
    batch = cfg.solver.ims_per_batch
    k = cfg.dataloader.num_instance
    if world_size > 1:
        sampler = DistributedRandomIdentitySampler(pids, batch, k, cfg.solver.seed, rank, world_size)
    else:
        sampler = RandomIdentitySampler(pids, batch, k, cfg.solver.seed)
    loader = DataLoader(dataset, batch_size=batch // world_size, sampler=sampler, drop_last=True, **_loader_kwargs(cfg, rank))
    return loader, sampler


def build_test_loader(cfg, samples: Sequence[Sample], *, modalities: Sequence[str] | None = None) -> DataLoader:
    """An ordered loader over ``samples``; ``modalities`` (default ``cfg.datasets.modalities``)
    selects which modalities are read; the others are zero tensors (missing-modality tests)."""
    dataset = MultiModalDataset(
        samples,
        build_transforms(cfg, is_train=False),
        modalities=modalities if modalities is not None else cfg.datasets.modalities,
        skip_bad_images=cfg.datasets.skip_bad_images,
    )
    return DataLoader(dataset, batch_size=cfg.test.ims_per_batch, shuffle=False, drop_last=False, **_loader_kwargs(cfg, 0))
