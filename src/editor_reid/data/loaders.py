"""DataLoaders for training (P×K batches) and testing (ordered), and the run's seeding policy.

Both loaders report a worker that dies without a Python error (a signal, a decoder crash,
``os._exit``) as :class:`DataLoaderWorkerError`, naming the sample it was reading: the dataset
writes each worker's current sample index into a small shared-memory table.

Seeding policy (what makes a resumed run exact): every epoch starts from RNG states that depend
only on (solver.seed, epoch, rank), never on what ran before in the process.
:meth:`TrainLoader.set_epoch` re-seeds Python's, NumPy's and torch's global generators (dropout,
stochastic depth, augmentation in the main process), the generator that draws the worker base
seeds, and the P×K sampler's plan. Workers are not persistent, so they are started afresh each
epoch from that base seed instead of carrying their RNG streams across epochs.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
import weakref
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from editor_reid.data.dataset import MultiModalDataset
from editor_reid.data.layouts import DatasetSplits, Sample
from editor_reid.data.sampler import DistributedRandomIdentitySampler, RandomIdentitySampler
from editor_reid.data.transforms import build_transforms
from editor_reid.errors import EditorReidError
from editor_reid.modalities import absent_like

__all__ = [
    "SAMPLE_KEYS",
    "collate",
    "TrainLoader",
    "EvalLoader",
    "DataLoaderWorkerError",
    "build_train_loader",
    "build_test_loader",
    "seed_worker",
    "seed_everything",
    "epoch_seed",
]

# Offsets the rank in the seed of the worker-seed generator, so its stream differs from the
# global generators' stream of the same (seed, epoch, rank).
_WORKER_STREAM = 1_000_003


#: The keys of a sample (and of a collated batch) that are not modality images.
SAMPLE_KEYS = ("pid", "camid", "sceneid", "index")


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    """Stack each modality that some sample carries to [B, 3, H, W]; pid/camid/sceneid/index
    become LongTensors [B].

    A sample without a modality that others in the batch carry (a manifest row with an empty
    cell) gets :func:`~editor_reid.modalities.absent_like` there, the same input the model
    gives a modality missing from the whole batch.
    """
    out = {}
    # The modalities, in the order the samples carry them (the dataset's order).
    modalities = list(dict.fromkeys(k for item in batch for k in item if k not in SAMPLE_KEYS))
    for m in modalities:
        carried = [item[m] for item in batch if m in item]
        if len(carried) == len(batch):
            out[m] = torch.stack(carried)
        elif carried:
            out[m] = torch.stack([item[m] if m in item else absent_like(carried[0]) for item in batch])
    for key in SAMPLE_KEYS:
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


class DataLoaderWorkerError(EditorReidError, RuntimeError):
    """A DataLoader worker died without a Python error (a signal, a crash in a decoder,
    ``os._exit``); names the worker, the sample it was reading and that sample's files.

    ``index`` is None when the worker was between samples (or not yet reading one).
    """

    def __init__(self, message: str, *, worker_id: int | None, pid: int | None, index: int | None,
                 paths: dict[str, str]) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.pid = pid
        self.index = index
        self.paths = paths


# torch's messages for a dead worker: "DataLoader worker (pid 12) is killed by signal: Killed."
# (from its SIGCHLD handler) and "DataLoader worker (pid(s) 12, 13) exited unexpectedly".
_WORKER_DEATH = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")

# Datasets whose workers have been started, for the SIGCHLD handler (weak: a loader's end frees them).
_STARTED: weakref.WeakSet[MultiModalDataset] = weakref.WeakSet()
_sigchld_wrapped = False
# Worker pids whose death was reported. torch reports a death again from its SIGCHLD handler for
# as long as the failed iterator lives, and a traceback on its way up keeps it alive: the
# repeats, raised wherever the main thread then is, are dropped.
_REPORTED: set[int] = set()


def _dead_pids(exc: BaseException) -> set[int]:
    match = _WORKER_DEATH.search(str(exc))
    return {int(p) for p in match.group(1).replace(",", " ").split()} if match else set()


def _raise_once(report: DataLoaderWorkerError, exc: BaseException) -> None:
    _REPORTED.update(_dead_pids(exc) | ({report.pid} if report.pid is not None else set()))
    raise report from exc


def _death_of(pid: int) -> str | None:
    """How child process ``pid`` ended, in torch's words, without reaping it (torch still
    will); None while it runs."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return "exited"  # reaped already: how is no longer known
    if info is None:
        return None
    if info.si_code == os.CLD_EXITED:
        return f"exited unexpectedly with exit code {info.si_status}"
    return f"is killed by signal: {signal.strsignal(info.si_status) or info.si_status}"


def _lost_worker(dataset: MultiModalDataset, exc: BaseException) -> DataLoaderWorkerError | None:
    """A worker that dies while the main process reads from its queue can break the pipe
    (ConnectionResetError, EOFError) before torch sees the death and words it: find the dead
    worker among the dataset's readers (waiting briefly for its exit to be visible)."""
    if dataset.reading is None or not hasattr(os, "waitid"):
        return None
    deadline = time.monotonic() + 2.0
    while True:
        for worker, (pid, index) in enumerate(dataset.reading.tolist()):
            death = _death_of(pid) if pid > 0 else None
            if death is not None:
                cause = f"DataLoader worker (pid {pid}) {death} ({type(exc).__name__} on its queue)"
                return _report(dataset, worker, pid, index, cause=cause)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _reading_table(num_workers: int) -> torch.Tensor | None:
    """The shared [num_workers, 2] (pid, sample index) table the dataset's workers write into."""
    if num_workers <= 0:
        return None
    return torch.full((num_workers, 2), -1, dtype=torch.int64).share_memory_()


def _torch_cause(exc: BaseException) -> str:
    """torch's most precise words on the death: its "exited unexpectedly" is often raised from
    the SIGCHLD handler's "is killed by signal: Killed" or "... with exit code 3"."""
    cause, inner = str(exc), exc.__cause__ or exc.__context__
    while inner is not None:
        if _WORKER_DEATH.search(str(inner)):
            cause = str(inner)
        inner = inner.__cause__ or inner.__context__
    return cause.split(". ")[0].strip().rstrip(".")  # drop torch's "Details are lost ..." advice


def _exit_status(workers: Sequence, dead: set[int]) -> str:
    """" with exit code N" or " (killed by signal: NAME)" for the first dead worker process whose
    status is known: torch's "exited unexpectedly", raised by the iterator when it notices the
    death before the SIGCHLD handler does, leaves it out."""
    for process in workers:
        if getattr(process, "pid", None) not in dead:
            continue
        process.join(timeout=1.0)
        code = process.exitcode
        if code is None:
            continue
        if code < 0:
            return f" (killed by signal: {signal.strsignal(-code) or -code})"
        return f" with exit code {code}"
    return ""


def _worker_error(exc: BaseException, datasets: Sequence[MultiModalDataset], *,
                  fallback: bool = False, workers: Sequence = ()) -> DataLoaderWorkerError | None:
    """The report for torch's worker-death error ``exc``: the first of ``datasets`` whose
    ``reading`` table holds a dead pid names the sample. None when ``exc`` is something else or
    no table knows the pid, unless ``fallback`` (a worker that died before its first sample).
    ``workers``: the iterator's worker processes, asked for an exit status torch left out."""
    dead = _dead_pids(exc)
    if not dead:
        return None
    cause = _torch_cause(exc)
    if "exit code" not in cause and "signal" not in cause:
        cause += _exit_status(workers, dead)
    for dataset in datasets:
        if dataset.reading is None:
            continue
        found = [(w, pid, index) for w, (pid, index) in enumerate(dataset.reading.tolist()) if pid in dead]
        if found:
            found.sort(key=lambda row: row[2] < 0)  # blame a worker caught reading a sample first
            return _report(dataset, *found[0], cause=cause)
    if not fallback:
        return None
    pid = min(dead)
    return DataLoaderWorkerError(f"DataLoader worker (pid {pid}) died before reading any sample ({cause})",
                                 worker_id=None, pid=pid, index=None, paths={})


def _report(dataset: MultiModalDataset, worker: int, pid: int, index: int, *, cause: str) -> DataLoaderWorkerError:
    if index < 0:
        return DataLoaderWorkerError(f"DataLoader worker {worker} (pid {pid}) died between samples ({cause})",
                                     worker_id=worker, pid=pid, index=None, paths={})
    sample = dataset.samples[index]
    paths = {m: sample.paths[m] for m in dataset.modalities if m in sample.paths}  # a manifest row may lack some
    if sample.crop is None:
        files = ", ".join(f"{m} {p}" for m, p in paths.items())
    else:
        files = f"{'|'.join(sample.strip or ('R', 'N', 'T'))} strip {next(iter(paths.values()), '')}"
    hint = " (SIGKILL is most often the out-of-memory killer)" if "Killed" in cause else ""
    return DataLoaderWorkerError(
        f"DataLoader worker {worker} (pid {pid}) died while reading sample {index} ({files}): {cause}{hint}",
        worker_id=worker, pid=pid, index=index, paths=paths)


def _wrap_sigchld_handler() -> None:
    """Make torch's SIGCHLD handler name the sample too.

    torch raises a worker's death from that handler wherever the main thread happens to be,
    usually inside the training step rather than in the loader's ``next``, where no iterator
    can catch it. Wrapped once per process, after torch has installed its handler (when the
    first iterator with workers starts), and only in the main thread, as signals require.
    """
    global _sigchld_wrapped
    if _sigchld_wrapped or threading.current_thread() is not threading.main_thread():
        return
    torch_handler = signal.getsignal(signal.SIGCHLD)
    if not callable(torch_handler):
        return

    def handler(signum, frame) -> None:
        try:
            torch_handler(signum, frame)
        except RuntimeError as exc:
            dead = _dead_pids(exc)
            if dead and dead <= _REPORTED:
                return
            report = _worker_error(exc, list(_STARTED))
            if report is None:
                raise
            _raise_once(report, exc)

    signal.signal(signal.SIGCHLD, handler)
    _sigchld_wrapped = True


def _reporting_worker_death(loader: DataLoader) -> Iterator[dict]:
    """Iterate ``loader``, turning torch's worker-death RuntimeError into DataLoaderWorkerError."""
    batches = None
    while True:
        try:
            if batches is None:
                if loader.dataset.reading is not None and not loader.persistent_workers:
                    loader.dataset.reading.fill_(-1)  # fresh workers: forget the last epoch's pids
                batches = iter(loader)
                if loader.num_workers > 0:
                    _STARTED.add(loader.dataset)
                    _wrap_sigchld_handler()
            batch = next(batches)
        except StopIteration:
            return
        except RuntimeError as exc:
            if isinstance(exc, DataLoaderWorkerError):
                raise  # already reported by the SIGCHLD handler
            report = _worker_error(exc, [loader.dataset], fallback=True, workers=getattr(batches, "_workers", ()))
            if report is None:
                raise
            _raise_once(report, exc)
        except (ConnectionError, EOFError) as exc:
            report = _lost_worker(loader.dataset, exc) if loader.num_workers > 0 else None
            if report is None:
                raise
            _raise_once(report, exc)
        yield batch


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
        return _reporting_worker_death(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class EvalLoader:
    """An ordered test loader: a DataLoader whose dead workers are reported by sample.

    Iterate it and take ``len()`` like the DataLoader; ``dataset`` and ``batch_size`` are the
    DataLoader's, ``loader`` is the DataLoader itself.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.dataset = loader.dataset
        self.batch_size = loader.batch_size

    def __iter__(self) -> Iterator[dict]:
        return _reporting_worker_death(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


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
        reading=_reading_table(cfg.dataloader.num_workers),
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


def build_test_loader(cfg, samples: Sequence[Sample], *, modalities: Sequence[str] | None = None,
                      batches: Sequence[Sequence[int]] | None = None) -> EvalLoader:
    """An ordered loader over ``samples``; ``modalities`` (default ``cfg.datasets.modalities``)
    selects which modalities are read (the batches hold only those; the model fills the rest).
    ``batches``: the sample indices of each batch, in order (default: consecutive batches of
    ``test.ims_per_batch``); ``extract`` uses it to keep batches inside its chunks."""
    dataset = MultiModalDataset(
        samples,
        build_transforms(cfg, is_train=False),
        modalities=modalities if modalities is not None else cfg.datasets.modalities,
        skip_bad_images=cfg.datasets.skip_bad_images,
        reading=_reading_table(cfg.dataloader.num_workers),
    )
    kwargs = _loader_kwargs(cfg, 0, persistent=True)
    if batches is not None:
        return EvalLoader(DataLoader(dataset, batch_sampler=batches, **kwargs))
    return EvalLoader(DataLoader(dataset, batch_size=cfg.test.ims_per_batch, shuffle=False, drop_last=False, **kwargs))
