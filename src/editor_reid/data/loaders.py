"""DataLoaders for training (P×K batches) and testing (ordered), and the run's seeding policy.

Seeding policy (what makes a resumed run exact): every epoch starts from RNG states that depend
only on (solver.seed, epoch, rank), never on what ran before in the process.
:meth:`TrainLoader.set_epoch` re-seeds Python's, NumPy's and torch's global generators (dropout,
stochastic depth, augmentation in the main process), the generator that draws the worker base
seeds, and the P×K sampler's plan. Workers are not persistent, so they are started afresh each
epoch from that base seed instead of carrying their RNG streams across epochs.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from editor_reid.data.dataset import MultiModalDataset
from editor_reid.data.layouts import DatasetSplits, Sample
from editor_reid.data.sampler import DistributedRandomIdentitySampler, RandomIdentitySampler
from editor_reid.data.transforms import build_transforms
from editor_reid.modalities import MODALITIES

__all__ = [
    "collate",
    "TrainLoader",
    "build_train_loader",
    "build_test_loader",
    "seed_worker",
    "seed_everything",
    "epoch_seed",
]

# Offsets the rank in the seed of the worker-seed generator, so its stream differs from the
# global generators' stream of the same (seed, epoch, rank).
_WORKER_STREAM = 1_000_003


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    """Stack each modality present to [B, 3, H, W]; pid/camid/sceneid/index become LongTensors [B]."""
    out = {m: torch.stack([item[m] for item in batch]) for m in MODALITIES if m in batch[0]}
    for key in ("pid", "camid", "sceneid", "index"):
        out[key] = torch.tensor([item[key] for item in batch], dtype=torch.long)
    return out


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A well-mixed 32-bit seed for (seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def seed_worker(worker_id: int) -> None:
    """Seed NumPy and ``random`` in a worker from torch's per-worker seed (base seed + id).

    Workers also ignore SIGINT and SIGTERM: Ctrl-C and a cluster's pre-emption signal reach the
    whole process group, and a worker dying of it would abort the main process's step (torch
    reports a dead worker at once), which instead finishes the step, writes a checkpoint and
    then shuts its workers down itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _loader_kwargs(cfg, rank: int, *, persistent: bool) -> dict:
    workers = cfg.dataloader.num_workers
    generator = torch.Generator()
    # The generator draws the workers' base seed, so augmentation is reproducible from solver.seed.
    generator.manual_seed(cfg.solver.seed + rank)
    return {
        "num_workers": workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": persistent and workers > 0,
        "worker_init_fn": seed_worker,
        "generator": generator,
        "collate_fn": collate,
    }


class TrainLoader:
    """The training DataLoader of a run (built once) and its per-epoch seeding.

    Iterate it like a DataLoader after :meth:`set_epoch`; ``len()`` is the epoch's batch count,
    which depends on the epoch's P×K plan. ``state_dict`` / ``load_state_dict`` carry the
    sampler's position for a resume.
    """

    def __init__(self, loader: DataLoader, sampler: RandomIdentitySampler, seed: int, rank: int) -> None:
        self.loader = loader
        self.sampler = sampler
        self.seed = seed
        self.rank = rank

    def set_epoch(self, epoch: int) -> None:
        seed_everything(epoch_seed(self.seed, epoch, self.rank))
        self.loader.generator.manual_seed(epoch_seed(self.seed, epoch, self.rank + _WORKER_STREAM))
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def build_train_loader(cfg, splits: DatasetSplits, *, rank: int = 0, world_size: int = 1) -> TrainLoader:
    """The run's P×K training loader; call ``set_epoch(e)`` before each epoch.

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
    loader = DataLoader(dataset, batch_size=batch // world_size, sampler=sampler, drop_last=True,
                        **_loader_kwargs(cfg, rank, persistent=False))
    return TrainLoader(loader, sampler, cfg.solver.seed, rank)


def build_test_loader(cfg, samples: Sequence[Sample], *, modalities: Sequence[str] | None = None) -> DataLoader:
    """An ordered loader over ``samples``; ``modalities`` (default ``cfg.datasets.modalities``)
    selects which modalities are read (the batches hold only those; the model fills the rest)."""
    dataset = MultiModalDataset(
        samples,
        build_transforms(cfg, is_train=False),
        modalities=modalities if modalities is not None else cfg.datasets.modalities,
        skip_bad_images=cfg.datasets.skip_bad_images,
    )
    return DataLoader(dataset, batch_size=cfg.test.ims_per_batch, shuffle=False, drop_last=False,
                      **_loader_kwargs(cfg, 0, persistent=True))
