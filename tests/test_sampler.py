"""P×K identity sampler: batch structure, replacement, determinism, distributed slices."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from editor_reid.data.sampler import DistributedRandomIdentitySampler, RandomIdentitySampler

P, K = 4, 4
BATCH = P * K


def _pids(counts):
    """Dataset pids with ``counts[i]`` images of identity 100 + i, interleaved like a real listing."""
    pids = [100 + i for i, n in enumerate(counts) for _ in range(n)]
    random.Random(0).shuffle(pids)
    return pids


COUNTS = [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 30]
PIDS = _pids(COUNTS)


def _batches(order, batch=BATCH):
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def _check_structure(pids, order, num_ids, k):
    assert len(order) % (num_ids * k) == 0 and len(order) > 0
    for batch in _batches(order, num_ids * k):
        chunks = [batch[i : i + k] for i in range(0, len(batch), k)]
        chunk_pids = [{pids[j] for j in chunk} for chunk in chunks]
        assert all(len(p) == 1 for p in chunk_pids)  # K contiguous indices of one identity
        assert len({next(iter(p)) for p in chunk_pids}) == num_ids  # P distinct identities


def test_batches_are_full_pk_with_contiguous_instances():
    sampler = RandomIdentitySampler(PIDS, BATCH, K, seed=1)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler)
        _check_structure(PIDS, order, P, K)


def test_small_identities_are_sampled_with_replacement():
    pids = [0] + [i for i in range(1, 6) for _ in range(K)]  # identity 0 has one image
    sampler = RandomIdentitySampler(pids, 2 * K, K, seed=0)
    seen = False
    for epoch in range(10):
        sampler.set_epoch(epoch)
        for batch in _batches(list(sampler), 2 * K):
            if 0 in batch:
                assert batch.count(0) == K
                seen = True
    assert seen


def test_leftover_partial_chunk_is_dropped_and_nothing_repeats():
    sampler = RandomIdentitySampler(PIDS, BATCH, K, seed=3)
    order = list(sampler)
    per_pid = Counter(PIDS[i] for i in order)
    for i, n in enumerate(COUNTS):
        used = per_pid.get(100 + i, 0)
        assert used % K == 0 and used <= max(n - n % K, K)
    for pid, n in zip(range(100, 100 + len(COUNTS)), COUNTS):
        if n >= K:  # without replacement, an index appears at most once
            idx = [i for i in order if PIDS[i] == pid]
            assert len(idx) == len(set(idx))


def test_deterministic_under_seed_and_epoch():
    a = RandomIdentitySampler(PIDS, BATCH, K, seed=11)
    b = RandomIdentitySampler(PIDS, BATCH, K, seed=11)
    assert list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    a.set_epoch(0)
    assert list(a) != list(b)  # different epochs differ
    assert list(RandomIdentitySampler(PIDS, BATCH, K, seed=12)) != list(RandomIdentitySampler(PIDS, BATCH, K, seed=11))


def test_global_random_state_is_untouched():
    np_state, torch_state, py_state = np.random.get_state(), torch.get_rng_state(), random.getstate()
    sampler = RandomIdentitySampler(PIDS, BATCH, K, seed=5)
    list(sampler)
    len(sampler)
    assert random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    new_np = np.random.get_state()
    assert all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(new_np, np_state))


def test_state_dict_round_trip():
    sampler = RandomIdentitySampler(PIDS, BATCH, K, seed=2)
    sampler.set_epoch(7)
    fresh = RandomIdentitySampler(PIDS, BATCH, K, seed=0)
    fresh.load_state_dict(sampler.state_dict())
    assert fresh.state_dict() == {"epoch": 7, "seed": 2}
    assert list(fresh) == list(sampler)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="multiple"):
        RandomIdentitySampler(PIDS, 10, 4)
    with pytest.raises(ValueError, match="identities"):
        RandomIdentitySampler([0, 0, 1, 1], 12, 2)
    with pytest.raises(ValueError, match="world_size"):
        DistributedRandomIdentitySampler(PIDS, BATCH, K, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        DistributedRandomIdentitySampler(PIDS, BATCH, K, rank=2, world_size=2)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_distributed_slices_partition_every_global_batch(world_size):
    seed, epoch = 4, 3
    reference = RandomIdentitySampler(PIDS, BATCH, K, seed=seed)
    reference.set_epoch(epoch)
    global_batches = _batches(list(reference))
    ranks = []
    for rank in range(world_size):
        s = DistributedRandomIdentitySampler(PIDS, BATCH, K, seed=seed, rank=rank, world_size=world_size)
        s.set_epoch(epoch)
        ranks.append(list(s))
        assert len(s) == len(ranks[-1]) == len(global_batches) * BATCH // world_size
    local = BATCH // world_size
    for b, batch in enumerate(global_batches):
        slices = [r[b * local : (b + 1) * local] for r in ranks]
        assert sum(slices, []) == batch  # union (in rank order) is the global batch
        assert len(set().union(*map(set, slices))) == len(set(batch))  # and the slices are disjoint
        if local % K == 0:
            for part in slices:
                _check_structure(PIDS, part, local // K, K)


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 12), min_size=2, max_size=15),
    p=st.integers(1, 3),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    epoch=st.integers(0, 50),
)
def test_structure_property(counts, p, k, seed, epoch):
    if len(counts) < p:
        return
    pids = _pids(counts)
    sampler = RandomIdentitySampler(pids, p * k, k, seed=seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    assert len(order) == len(sampler)
    _check_structure(pids, order, p, k)
