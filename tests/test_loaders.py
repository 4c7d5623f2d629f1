"""The loaders: P×K training batches, rank slices, the per-epoch seeding policy, ordered test loaders."""

from __future__ import annotations

import os
import random
import signal
import time

import numpy as np
import pytest
import torch
from torch.utils.data import get_worker_info

import editor_reid.data.dataset as dataset_module

from editor_reid.config import load_config
from editor_reid.data.layouts import load_dataset
from editor_reid.data.loaders import (
    DataLoaderWorkerError,
    EvalLoader,
    TrainLoader,
    _lost_worker,
    build_test_loader,
    build_train_loader,
    collate,
    epoch_seed,
)
from editor_reid.data.synthetic import make_synthetic
from editor_reid.errors import EditorReidError


def _cfg(*overrides):
    return load_config(None, overrides=[
        "input.size_train=[32,16]", "input.size_test=[32,16]", "solver.ims_per_batch=8",
        "dataloader.num_instance=2", "dataloader.num_workers=0", "test.ims_per_batch=5", *overrides,
    ])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic("rgbnt201", root, ids=8, views=2, seed=0)
    return root


@pytest.fixture(scope="module")
def splits(root):
    return load_dataset("rgbnt201", root)


def test_train_loader_yields_pk_batches(splits):
    loader = build_train_loader(_cfg(), splits)
    assert isinstance(loader, TrainLoader)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) == len(loader.sampler) // 8 > 0
    for batch in batches:
        assert batch["RGB"].shape == (8, 3, 32, 16)
        assert batch["pid"].dtype == torch.long and batch["pid"].shape == (8,)
        pids = batch["pid"].view(4, 2)
        assert (pids == pids[:, :1]).all() and len(set(pids[:, 0].tolist())) == 4


def test_distributed_train_loader_uses_the_rank_slice(splits):
    cfg = _cfg()
    global_loader = build_train_loader(cfg, splits)
    global_loader.set_epoch(1)
    global_idx = [b["index"] for b in global_loader]
    parts = [build_train_loader(cfg, splits, rank=r, world_size=2) for r in range(2)]
    for part in parts:
        part.set_epoch(1)
    local = [[b["index"] for b in loader] for loader in parts]
    assert all(len(x) == len(global_idx) for x in local)
    for g, a, b in zip(global_idx, *local):
        assert a.shape == (4,) and torch.equal(torch.cat([a, b]), g)


def _epoch(loader: TrainLoader, epoch: int) -> list[dict]:
    loader.set_epoch(epoch)
    return list(loader)


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x["index"], y["index"]) and torch.equal(x["RGB"], y["RGB"])
                                    and torch.equal(x["TI"], y["TI"]) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 1])
def test_an_epoch_depends_only_on_seed_and_epoch(splits, workers):
    """What makes resume exact: epoch 2 after epoch 1 equals epoch 2 of a fresh loader (a
    resumed run), index order and augmented pixels alike, with and without workers."""
    cfg = _cfg(f"dataloader.num_workers={workers}", "input.re_prob=1.0", "solver.seed=5")
    run = build_train_loader(cfg, splits)
    _epoch(run, 1)
    continued = _epoch(run, 2)
    resumed = _epoch(build_train_loader(cfg, splits), 2)
    assert _same_batches(continued, resumed)
    # Augmentation really is random between epochs (the policy is not "the same every epoch").
    assert not _same_batches(_epoch(build_train_loader(cfg, splits), 1), resumed)
    # And the seed matters.
    other = _epoch(build_train_loader(_cfg(f"dataloader.num_workers={workers}", "input.re_prob=1.0",
                                           "solver.seed=6"), splits), 2)
    assert not _same_batches(other, resumed)
    assert run.loader.persistent_workers is False


def test_set_epoch_reseeds_the_global_generators(splits):
    loader = build_train_loader(_cfg(), splits)
    draws = []
    for _ in range(2):
        torch.rand(3), random.random(), np.random.rand()  # disturb the generators
        loader.set_epoch(4)
        draws.append((torch.rand(3), random.random(), np.random.rand()))
    assert torch.equal(draws[0][0], draws[1][0]) and draws[0][1:] == draws[1][1:]
    loader.set_epoch(5)
    assert not torch.equal(torch.rand(3), draws[0][0])
    # Each rank gets its own streams.
    assert epoch_seed(1111, 4, 0) != epoch_seed(1111, 4, 1) != epoch_seed(1111, 5, 0)


def test_state_dict_carries_the_sampler_position(splits):
    cfg = _cfg()
    a = build_train_loader(cfg, splits)
    a.set_epoch(3)
    b = build_train_loader(cfg, splits)
    b.load_state_dict(a.state_dict())
    assert b.sampler.epoch == 3 and list(b.sampler) == list(a.sampler)


def test_test_loader_is_ordered_and_complete(splits):
    cfg = _cfg()
    loader = build_test_loader(cfg, splits.gallery)
    assert isinstance(loader, EvalLoader) and loader.batch_size == 5
    assert len(loader) == -(-len(splits.gallery) // 5) and loader.dataset.samples == splits.gallery
    indices = torch.cat([b["index"] for b in loader])
    assert indices.tolist() == list(range(len(splits.gallery)))
    camids = torch.cat([b["camid"] for b in loader])
    assert camids.tolist() == [s.camid for s in splits.gallery]
    # Only the requested modalities are read; the model stands in for the others.
    ni_only = next(iter(build_test_loader(cfg, splits.gallery, modalities=["NI"])))
    assert "RGB" not in ni_only and "TI" not in ni_only and torch.count_nonzero(ni_only["NI"]) > 0


def test_worker_loading_is_reproducible(splits):
    cfg = _cfg("dataloader.num_workers=1", "solver.seed=3")

    def first_batch():
        loader = build_train_loader(cfg, splits)
        loader.set_epoch(1)
        return next(iter(loader))

    a, b = first_batch(), first_batch()
    assert torch.equal(a["index"], b["index"]) and torch.equal(a["RGB"], b["RGB"])


def test_collate_stacks_modalities():
    items = [
        {"RGB": torch.zeros(3, 4, 2), "NI": torch.ones(3, 4, 2), "TI": torch.zeros(3, 4, 2), "pid": i, "camid": 0,
         "sceneid": -1, "index": i}
        for i in range(3)
    ]
    batch = collate(items)
    assert batch["NI"].shape == (3, 3, 4, 2) and batch["index"].tolist() == [0, 1, 2]
    assert batch["sceneid"].dtype == torch.long
    partial = collate([{k: v for k, v in item.items() if k != "TI"} for item in items])
    assert "TI" not in partial and partial["RGB"].shape == (3, 3, 4, 2)


# ----------------------------------------------------------------------------- dead workers


def _die_on(monkeypatch, victim, how: str) -> None:
    """Reading ``victim`` kills the DataLoader worker reading it, without a Python error (the
    workers are forked, so they inherit the patched reader)."""
    read = dataset_module.read_sample_images

    def read_or_die(sample, modalities):
        if sample is victim and get_worker_info() is not None:
            if how == "signal":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(3)
        return read(sample, modalities)

    monkeypatch.setattr(dataset_module, "read_sample_images", read_or_die)


def _assert_names(error: DataLoaderWorkerError, index: int, sample, how: str) -> None:
    assert isinstance(error, EditorReidError) and error.exit_code == 1
    assert error.worker_id == 0 and error.index == index and f"sample {index}" in str(error)
    assert all(path in str(error) for path in sample.paths.values())
    assert ("killed by signal: Killed" if how == "signal" else "exit code 3") in str(error)
    # torch's own error stays chained (or the broken queue's, when the death broke the pipe first)
    assert isinstance(error.__cause__, (RuntimeError, ConnectionError, EOFError))


@pytest.mark.parametrize("how", ["signal", "exit"])
def test_dead_test_worker_names_the_sample(splits, monkeypatch, how):
    victim = 7
    _die_on(monkeypatch, splits.gallery[victim], how)
    loader = build_test_loader(_cfg("dataloader.num_workers=1"), splits.gallery)
    with pytest.raises(DataLoaderWorkerError) as info:
        list(loader)
    _assert_names(info.value, victim, splits.gallery[victim], how)


def test_dead_train_worker_names_the_sample(splits, monkeypatch):
    loader = build_train_loader(_cfg("dataloader.num_workers=1"), splits)
    loader.set_epoch(0)
    victim = list(loader.sampler)[3]
    _die_on(monkeypatch, splits.train[victim], "signal")
    loader.set_epoch(0)
    with pytest.raises(DataLoaderWorkerError) as info:
        list(loader)
    _assert_names(info.value, victim, splits.train[victim], "signal")


def test_a_worker_dying_while_the_main_process_computes_is_reported_too(splits, monkeypatch):
    """torch raises a dead worker from its SIGCHLD handler wherever the main thread is, most
    often in the training step, not in the loader's next(): that error names the sample too."""
    victim = 2
    _die_on(monkeypatch, splits.gallery[victim], "signal")
    loader = build_test_loader(_cfg("dataloader.num_workers=1", "test.ims_per_batch=1"), splits.gallery)
    seen = []
    with pytest.raises(DataLoaderWorkerError) as info:
        for batch in loader:
            seen.append(int(batch["index"]))
            time.sleep(10)  # "the training step": the worker reads ahead and dies meanwhile
    assert seen == [0]  # raised inside the loop body, not by the iterator
    _assert_names(info.value, victim, splits.gallery[victim], "signal")


@pytest.mark.parametrize("how", ["signal", "exit"])
def test_a_worker_that_breaks_its_queue_is_found_by_its_exit(splits, how):
    """A death that breaks the queue's pipe before torch notices it (ConnectionResetError)."""
    dataset = build_test_loader(_cfg("dataloader.num_workers=1"), splits.gallery).dataset
    pid = os.fork()
    if pid == 0:  # the "worker": dies at once
        if how == "signal":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)
    try:
        dataset.reading[0] = torch.tensor([pid, 7])
        error = _lost_worker(dataset, ConnectionResetError(104, "Connection reset by peer"))
    finally:
        os.waitpid(pid, 0)
    assert isinstance(error, DataLoaderWorkerError) and error.pid == pid and error.index == 7
    assert "sample 7" in str(error) and all(path in str(error) for path in splits.gallery[7].paths.values())
    assert ("killed by signal: Killed" if how == "signal" else "exit code 3") in str(error)


def test_exit_status_is_added_when_torch_leaves_it_out():
    # torch's iterator can notice a dead worker before its SIGCHLD handler does; its message then
    # lacks the status, which the worker process still knows.
    from types import SimpleNamespace

    from editor_reid.data.loaders import _worker_error

    exc = RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
    exited = SimpleNamespace(pid=4242, exitcode=3, join=lambda timeout: None)
    killed = SimpleNamespace(pid=4242, exitcode=-9, join=lambda timeout: None)
    other = SimpleNamespace(pid=7, exitcode=1, join=lambda timeout: None)
    assert "exited unexpectedly with exit code 3" in str(_worker_error(exc, [], fallback=True, workers=[other, exited]))
    assert "(killed by signal: Killed)" in str(_worker_error(exc, [], fallback=True, workers=[killed]))
    assert str(_worker_error(exc, [], fallback=True, workers=[other])).endswith("exited unexpectedly)")
