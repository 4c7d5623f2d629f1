"""P×K identity sampling (``RandomIdentitySampler``, docs/official-behaviour.md#training-recipe).

Each epoch: every identity's indices are shuffled and cut into chunks of K (an identity with
fewer than K images is first sampled with replacement up to K; a trailing partial chunk is
dropped, as in the official code); then batches are formed from P = batch_size / K randomly
chosen identities, one chunk each, until fewer than P identities have chunks left. Every
batch is therefore full, and its K indices per identity are contiguous, which OCFR relies on.

Randomness comes from a private NumPy generator seeded by (seed, epoch): the plan does not
depend on, or disturb, any global RNG, and every rank of a distributed job computes the same
global plan.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from editor_reid.config import ConfigError

__all__ = ["RandomIdentitySampler", "DistributedRandomIdentitySampler", "plan_epoch"]


def plan_epoch(pids: Sequence[int], batch_size: int, num_instance: int, seed: int, epoch: int) -> list[int]:
    """The full index order of one epoch: a concatenation of P×K batches."""
    rng = np.random.default_rng([seed, epoch])
    num_ids_per_batch = batch_size // num_instance
    by_pid: dict[int, list[int]] = defaultdict(list)
    for index, pid in enumerate(pids):
        by_pid[int(pid)].append(index)

    chunks: dict[int, list[list[int]]] = {}
    for pid in sorted(by_pid):  # sorted: the plan must not depend on dict insertion order
        idxs = np.asarray(by_pid[pid])
        if len(idxs) < num_instance:
            idxs = rng.choice(idxs, size=num_instance, replace=True)
        idxs = rng.permutation(idxs)
        usable = len(idxs) - len(idxs) % num_instance
        chunks[pid] = [idxs[i : i + num_instance].tolist() for i in range(0, usable, num_instance)]

    available = sorted(chunks)
    order: list[int] = []
    while len(available) >= num_ids_per_batch:
        chosen = rng.choice(len(available), size=num_ids_per_batch, replace=False)
        for pid in [available[i] for i in chosen]:
            order.extend(chunks[pid].pop(0))
            if not chunks[pid]:
                available.remove(pid)
    return order


class RandomIdentitySampler(Sampler[int]):
    """Yields dataset indices; every ``batch_size`` consecutive indices form one P×K batch.

    ``pids`` holds the identity of every dataset index. Call ``set_epoch(e)`` before each
    epoch; the same (seed, epoch) always gives the same order.
    """

    def __init__(self, pids: Sequence[int], batch_size: int, num_instance: int, seed: int = 0):
        if num_instance <= 0 or batch_size <= 0 or batch_size % num_instance:
            raise ConfigError(
                f"batch_size ({batch_size}) must be a positive multiple of num_instance ({num_instance})"
            )
        num_ids = len(set(int(p) for p in pids))
        if num_ids < batch_size // num_instance:
            raise ConfigError(
                f"a P×K batch needs P = {batch_size // num_instance} identities (solver.ims_per_batch {batch_size} / "
                f"dataloader.num_instance {num_instance}) but the training data has only {num_ids}; lower "
                "solver.ims_per_batch or raise dataloader.num_instance"
            )
        self.pids = [int(p) for p in pids]
        self.batch_size = batch_size
        self.num_instance = num_instance
        self.seed = seed
        self.epoch = 0
        self._cache: tuple[int, int, list[int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        key = (self.seed, self.epoch)
        if self._cache is None or self._cache[:2] != key:
            self._cache = (*key, plan_epoch(self.pids, self.batch_size, self.num_instance, *key))
        return self._cache[2]

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._order()))

    def __len__(self) -> int:
        # The number of batches depends on the draw, so the length comes from the epoch's plan.
        return len(self._order())

    @property
    def num_batches(self) -> int:
        return len(self._order()) // self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])


class DistributedRandomIdentitySampler(RandomIdentitySampler):
    """Rank ``rank`` of ``world_size`` gets the ``rank``-th contiguous slice of every global batch.

    ``batch_size`` is the GLOBAL batch; each rank yields ``batch_size // world_size`` indices
    per batch. The slices of one batch are disjoint and together form the global batch, and
    all ranks have the same length. A slice holds whole identities (K contiguous indices each)
    when ``batch_size // world_size`` is a multiple of ``num_instance``.
    """

    def __init__(
        self, pids: Sequence[int], batch_size: int, num_instance: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        super().__init__(pids, batch_size, num_instance, seed)
        if world_size <= 0 or batch_size % world_size:
            raise ConfigError(f"global batch_size ({batch_size}) must be divisible by world_size ({world_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = batch_size // world_size

    def _local(self) -> list[int]:
        order = self._order()
        start = self.rank * self.local_batch_size
        return [
            i
            for b in range(0, len(order), self.batch_size)
            for i in order[b + start : b + start + self.local_batch_size]
        ]

    def __iter__(self) -> Iterator[int]:
        return iter(self._local())

    def __len__(self) -> int:
        return self.num_batches * self.local_batch_size
