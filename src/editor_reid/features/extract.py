"""``editor-reid extract``: features of a benchmark split, a manifest or a folder of images, in chunks.

The input is one ordered list of samples (:func:`collect_inputs`). It is cut into chunks of
``chunk_size`` samples, and each chunk into batches of the batch size, so no batch straddles two
chunks: a chunk's features then do not depend on which process computed it, or when. Each
finished chunk is written at once, atomically, as a feature file of its own in a work folder
next to the output (``FEATS.npz.parts/chunk_000000.npz``, ...), beside a ``header.json`` that
records what makes the chunks valid (the weights file's path, size and modification time, a
hash of the input list, the model and input config, chunk and batch size, normalisation,
modalities, autocast). A rerun with the same arguments skips the chunks already there; a work
folder of other arguments is an error. When every chunk exists they are merged into the output,
atomically, and the work folder is removed.

Under ``torchrun --nproc_per_node=N -m editor_reid extract ...`` rank r computes the chunks
i with i % N == r; after a barrier rank 0 merges them into the same file one process writes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from editor_reid.config import Config, config_to_dict
from editor_reid.data.layouts import SPLIT_NAMES, DatasetSplits, Sample, load_dataset
from editor_reid.data.loaders import build_test_loader
from editor_reid.data.manifest import read_manifest
from editor_reid.data.validate import preflight
from editor_reid.engine import distributed as du
from editor_reid.engine.logging_utils import ensure_console_log, other_ranks_warn_only
from editor_reid.errors import EditorReidError, UsageError
from editor_reid.fileio import write_json_atomically
from editor_reid.features.extractor import FeatureExtractor
from editor_reid.features.store import FeatureFile, load_feature_file, save_feature_file
from editor_reid.modalities import MODALITIES, canonical_order
from editor_reid.model.backbone import UNKNOWN_CAMERA

__all__ = ["run_extract", "collect_inputs", "scan_images", "ExtractInputs", "IMAGE_SUFFIXES", "DEFAULT_CHUNK_SIZE",
           "PARTS_SUFFIX", "BACKENDS"]

log = logging.getLogger(__name__)

#: The files ``--images`` reads (compared in lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_CHUNK_SIZE = 4096
#: ``extract --backend``: PyTorch on a checkpoint, or onnxruntime on an exported ONNX file.
BACKENDS = ("torch", "onnxruntime")
#: The work folder of ``FEATS.npz`` is ``FEATS.npz.parts``.
PARTS_SUFFIX = ".parts"
_HEADER = "header.json"
_PARTS_FORMAT = "editor-reid/extract-parts"


@dataclass
class ExtractInputs:
    """The samples to extract, in output order, with the split each came from."""

    samples: list[Sample]
    splits: list[str]  # "train" / "query" / "gallery", or "" (a folder of images)
    protocol: str
    what: str  # for messages: "the rgbnt201 query, gallery split(s)", "the images under DIR"
    source: DatasetSplits | None = None  # what a dataset or manifest was read into

    def check_files(self, modalities: Sequence[str]) -> None:
        """Raise before any work when a file is missing or a sample has none of ``modalities``."""
        if self.source is not None:
            preflight(self.source, sorted(set(self.splits), key=SPLIT_NAMES.index), modalities)
            return
        unread = [s for s in self.samples if not any(m in s.paths for m in modalities)]
        if unread:
            raise EditorReidError(f"{len(unread)} of {len(self.samples)} samples of {self.what} have none of the "
                                  f"modalities the model reads ({', '.join(modalities)}), e.g. "
                                  f"{next(iter(unread[0].paths.values()))}")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _images_under(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive), as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if _is_image(p))


def scan_images(folder: str | Path) -> list[Sample]:
    """The samples of ``extract --images DIR``, sorted by path.

    When ``DIR`` has any of the sub-folders ``RGB/``, ``NI/``, ``TI/``, their files are paired by
    their path relative to the modality folder (``RGB/cam1/0001.jpg`` with ``NI/cam1/0001.jpg``);
    a path found in only some folders gives a sample with only those modalities, and files
    outside the modality folders are not read. Otherwise every image file under ``DIR`` is an
    RGB-only sample. Image files are those ending in :data:`IMAGE_SUFFIXES`, in any case. Every
    sample has pid -1 and camera :data:`~editor_reid.model.UNKNOWN_CAMERA` (-1).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise (NotADirectoryError if folder.exists() else FileNotFoundError)(
            f"--images '{folder}' is not a directory" if folder.exists() else f"--images '{folder}' does not exist")
    present = [m for m in MODALITIES if (folder / m).is_dir()]
    if present:
        found = {m: set(_images_under(folder / m)) for m in present}
        names = sorted(set().union(*found.values()))
        samples = [Sample(paths={m: str(folder / m / name) for m in present if name in found[m]},
                          pid=-1, camid=UNKNOWN_CAMERA) for name in names]
        where = f"'{folder}' ({', '.join(f'{m}/' for m in present)})"
    else:
        samples = [Sample(paths={"RGB": str(folder / name)}, pid=-1, camid=UNKNOWN_CAMERA)
                   for name in _images_under(folder)]
        where = f"'{folder}'"
    if not samples:
        raise EditorReidError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {where}")
    return samples


def collect_inputs(*, dataset: str | None = None, root: str | Path | None = None, manifest: str | Path | None = None,
                   images: str | Path | None = None, splits: Sequence[str] = ("query", "gallery")) -> ExtractInputs:
    """The samples of one input: a benchmark ``dataset`` under ``root``, a CSV ``manifest``, or a
    folder of ``images`` (:func:`scan_images`). For the first two, ``splits`` are read and their
    samples listed split after split, in the order given (RGBNT201's query and gallery are the
    same images: asking for both lists them twice, once per split)."""
    given = [name for name, value in (("--dataset", dataset), ("--manifest", manifest), ("--images", images))
             if value is not None]
    if len(given) != 1:
        raise UsageError("extract needs exactly one input: --dataset NAME --root DIR, --manifest FILE or --images DIR"
                         + (f" (got {', '.join(given)})" if given else ""))
    if images is not None:
        samples = scan_images(images)
        return ExtractInputs(samples, [""] * len(samples), "same_camera", f"the images under '{images}'")
    splits = tuple(splits)
    bad = [s for s in splits if s not in SPLIT_NAMES]
    if bad or not splits or len(set(splits)) != len(splits):
        raise UsageError(f"--splits must name distinct splits among {', '.join(SPLIT_NAMES)}, got {','.join(splits)}")
    if dataset is not None:
        if root is None:
            raise UsageError(f"extract --dataset {dataset} needs --root DIR, the directory that contains the "
                             "dataset folder")
        loaded = load_dataset(dataset, root, splits=splits)
        what = f"the {dataset} {', '.join(splits)} split(s)"
    else:
        loaded = read_manifest(manifest, splits=splits)
        what = f"the {', '.join(splits)} split(s) of manifest '{manifest}'"
    samples, names = [], []
    for split in splits:
        part = getattr(loaded, split)
        samples += part
        names += [split] * len(part)
    if not samples:
        raise EditorReidError(f"{what} hold(s) no samples")
    return ExtractInputs(samples, names, loaded.protocol, what, loaded)


# ------------------------------------------------------------------------------------ chunks


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _inputs_digest(inputs: ExtractInputs) -> str:
    rows = [[s.paths, s.pid, s.camid, s.sceneid, s.crop, split, *([list(s.strip)] if s.strip else [])]
            for s, split in zip(inputs.samples, inputs.splits)]
    return _digest(rows)


def _header(weights: str | Path, cfg: Config, inputs: ExtractInputs, *, chunk_size: int, normalize: bool,
            modalities: Sequence[str], amp: str) -> dict:
    """What the chunks of a work folder depend on (the data loading settings do not count)."""
    stat = Path(weights).stat()
    settings = config_to_dict(cfg)
    return {
        "format": _PARTS_FORMAT,
        "version": 1,
        "weights": str(Path(weights).resolve()),
        "weights_size": stat.st_size,
        "weights_mtime_ns": stat.st_mtime_ns,
        "inputs_sha256": _inputs_digest(inputs),
        "num_samples": len(inputs.samples),
        "config_sha256": _digest({"model": settings["model"], "input": settings["input"]}),
        "chunk_size": chunk_size,
        "batch_size": cfg.test.ims_per_batch,
        "normalize": normalize,
        "modalities": list(modalities),
        "amp": amp,
    }


def _chunk_path(parts: Path, index: int) -> Path:
    return parts / f"chunk_{index:06d}.npz"


def _write_json(path: Path, value) -> None:
    write_json_atomically(path, value, indent=2)


def _prepare_parts(parts: Path, header: dict, num_chunks: int) -> list[int]:
    """Create the work folder, or check that the one there belongs to the same arguments;
    returns the indices of the chunks finished already."""
    header_path = parts / _HEADER
    if parts.exists() and not parts.is_dir():
        raise FileExistsError(f"the work folder '{parts}' of the output exists and is not a folder; remove it")
    if header_path.is_file():
        try:
            found = json.loads(header_path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"work folder '{parts}' has an unreadable {_HEADER} ({exc}); delete the folder") from None
        differ = [key for key in header if found.get(key) != header[key]] if isinstance(found, dict) else ["all"]
        if differ:
            raise UsageError(f"work folder '{parts}' holds the chunks of another extraction ({', '.join(differ)} "
                             "differ); rerun with the same arguments to continue it, or delete the folder to "
                             "start over")
    else:
        leftovers = sorted(parts.glob("chunk_*.npz")) if parts.is_dir() else []
        if leftovers:
            raise UsageError(f"work folder '{parts}' holds chunks but no {_HEADER}; delete the folder to start over")
        parts.mkdir(parents=True, exist_ok=True)
        _write_json(header_path, header)
    return [i for i in range(num_chunks) if _chunk_path(parts, i).is_file()]


def _chunk_file(inputs: ExtractInputs, lo: int, hi: int, features: np.ndarray, *, normalize: bool,
                modalities: Sequence[str], weights: str, fingerprint: str) -> FeatureFile:
    samples = inputs.samples[lo:hi]
    return FeatureFile(
        features=features,
        pid=np.asarray([s.pid for s in samples], dtype=np.int64),
        camid=np.asarray([s.camid for s in samples], dtype=np.int64),
        sceneid=np.asarray([s.sceneid for s in samples], dtype=np.int64),
        split=np.asarray(inputs.splits[lo:hi], dtype=np.str_),
        paths={m: np.asarray([s.paths.get(m, "") for s in samples], dtype=np.str_)
               for m in canonical_order([*MODALITIES, *(k for s in samples for k in s.paths)])},
        protocol=inputs.protocol,
        normalized=normalize,
        modalities=tuple(modalities),
        weights=weights,
        fingerprint=fingerprint,
    )


def _merge(parts: Path, out: Path, inputs: ExtractInputs, bounds: list[tuple[int, int]], **columns) -> FeatureFile:
    features = []
    for index, (lo, hi) in enumerate(bounds):
        chunk = load_feature_file(_chunk_path(parts, index))
        if len(chunk) != hi - lo:
            raise EditorReidError(f"chunk '{_chunk_path(parts, index)}' has {len(chunk)} rows, expected {hi - lo}; "
                                  f"delete the work folder '{parts}' and extract again")
        features.append(chunk.features)
    ff = _chunk_file(inputs, 0, len(inputs.samples), np.concatenate(features), **columns)
    save_feature_file(out, ff)
    shutil.rmtree(parts)
    return ff


def _counted(batches: Iterator[dict], count: int, bar) -> Iterator[dict]:
    """The next ``count`` batches of ``batches``, advancing ``bar`` by their samples."""
    for batch in itertools.islice(batches, count):
        yield batch
        bar.update(len(batch["pid"]))


def run_extract(weights: str | Path | None, out: str | Path, *, config: Config | str | Path | None = None,
                dataset: str | None = None, root: str | Path | None = None, manifest: str | Path | None = None,
                images: str | Path | None = None, splits: Sequence[str] = ("query", "gallery"),
                inputs: ExtractInputs | None = None, batch_size: int | None = None,
                chunk_size: int = DEFAULT_CHUNK_SIZE, num_workers: int | None = None, normalize: bool = True,
                device: str | None = None, amp: str = "none", quiet: bool = False,
                on_chunk: Callable[[int], None] | None = None, backend: str | None = None,
                onnx: str | Path | None = None, sink=None) -> Path:
    """Extract the features of one input (see :func:`collect_inputs`; or ``inputs``, samples
    listed by the caller) with ``weights`` and write them to the feature file ``out``
    (:mod:`editor_reid.features.store`), in input order.

    ``config``, ``device``, ``batch_size`` and ``amp`` are those of
    :class:`~editor_reid.features.extractor.FeatureExtractor`; ``num_workers`` overrides the
    config's ``dataloader.num_workers``. Work is saved every ``chunk_size`` samples (see the
    module docstring); ``on_chunk(i)`` runs after chunk ``i`` is written. Under torchrun each
    rank computes its share of the chunks and rank 0 writes ``out``. Returns ``out``.

    ``backend``: "torch" runs ``weights`` (a checkpoint); "onnxruntime" runs ``onnx``, a file of
    ``editor-reid export`` (:meth:`FeatureExtractor.from_onnx`; its config is in the file, so
    neither ``weights`` nor ``config`` is given). Default: the one the given model file needs.

    ``sink`` also sends the features somewhere as they are made (``extract --to-gallery``:
    :func:`editor_reid.deploy.sink.gallery_sink`): every rank calls ``sink.open(ctx, dim=,
    fingerprint=, modalities=, count=, has_gallery=)`` before extracting, ``sink.chunk(ff, rows,
    resumed=)`` for each chunk it computes (``resumed=True`` for its chunks an earlier run
    finished) and ``sink.finished(ctx, quiet=)`` after them; rank 0 calls ``sink.merged(ff,
    quiet=)`` after writing ``out``.
    """
    ensure_console_log()
    if chunk_size < 1:
        raise UsageError(f"--chunk-size must be at least 1, got {chunk_size}")
    backend = _check_backend(backend, weights, onnx, config, amp)
    out = Path(out)
    kind = None if device in (None, "auto") else "cuda" if str(device).startswith("cuda") else "cpu"
    ctx = du.init_distributed(kind)
    try:
        with other_ranks_warn_only(ctx.is_main):
            # The input first: its mistakes are found in milliseconds, a large checkpoint loads in seconds.
            if inputs is None:
                inputs = collect_inputs(dataset=dataset, root=root, manifest=manifest, images=images, splits=splits)
            elif any(value is not None for value in (dataset, manifest, images)):
                raise UsageError("run_extract takes either inputs= or one of dataset=, manifest=, images=")
            if backend == "onnxruntime":  # "auto": CUDA if this onnxruntime has it
                target = ctx.device if ctx.distributed else device or "auto"
                extractor = FeatureExtractor.from_onnx(onnx, device=target, batch_size=batch_size)
            else:
                target = ctx.device if ctx.distributed or device in (None, "auto") else device
                extractor = FeatureExtractor(weights, config, device=target, batch_size=batch_size, amp=amp)
            return _extract(ctx, extractor, inputs, out, chunk_size=chunk_size, num_workers=num_workers,
                            normalize=normalize, quiet=quiet, on_chunk=on_chunk, sink=sink)
    finally:
        du.shutdown_distributed(ctx)


def _check_backend(backend: str | None, weights, onnx, config, amp: str) -> str:
    """The backend to run, or UsageError when the model files and options do not fit it."""
    if backend not in (None, *BACKENDS):
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if (weights is None) == (onnx is None):
        raise UsageError("extract needs exactly one model: --weights W (a checkpoint) or --onnx M.onnx (a file of "
                         "'editor-reid export')" + (", not both" if weights is not None else ""))
    backend = backend or ("torch" if onnx is None else "onnxruntime")
    if backend == "onnxruntime":
        if onnx is None:
            raise UsageError("--backend onnxruntime runs an exported model: give --onnx M.onnx (written by "
                             "'editor-reid export --format onnx'), not --weights")
        if config is not None:
            raise UsageError("--config goes with --weights: an ONNX file carries the config it was exported with")
        if amp != "none":
            raise UsageError(f"--amp {amp} goes with --backend torch: the onnxruntime backend runs the graph in fp32")
    elif onnx is not None:
        raise UsageError("--onnx runs with --backend onnxruntime; --backend torch needs --weights W (a checkpoint)")
    return backend


def _extract(ctx: du.DistContext, extractor: FeatureExtractor, inputs: ExtractInputs, out: Path, *, chunk_size: int,
             num_workers: int | None, normalize: bool, quiet: bool, on_chunk, sink=None) -> Path:
    cfg = extractor.cfg
    if num_workers is not None:
        cfg.dataloader.num_workers = num_workers
    inputs.check_files(extractor.modalities)
    extractor.check_cameras((s.camid for s in inputs.samples), inputs.what)
    total = len(inputs.samples)
    bounds = [(lo, min(lo + chunk_size, total)) for lo in range(0, total, chunk_size)]
    parts = out.with_name(out.name + PARTS_SUFFIX)
    header = _header(extractor.weights, cfg, inputs, chunk_size=chunk_size, normalize=normalize,
                     modalities=extractor.modalities, amp=extractor.amp)
    columns = dict(normalize=normalize, modalities=extractor.modalities, weights=extractor.weights,
                   fingerprint=extractor.fingerprint)

    # Rank 0 owns the work folder; the others learn its verdict, and check that they listed the
    # same input (a file system that differs between machines would mix rows).
    verdict: tuple[str | None, list[int], dict] = (None, [], header)
    if ctx.is_main:
        try:
            verdict = (None, _prepare_parts(parts, header, len(bounds)), header)
        except (UsageError, OSError) as exc:
            verdict = (str(exc), [], header)
            if not ctx.distributed:
                raise
    problem, done, main_header = du.broadcast_object(ctx, verdict)
    if problem:
        raise UsageError(problem)
    if main_header != header:
        raise EditorReidError(f"rank {ctx.rank} sees other inputs or settings than rank 0 "
                              f"({', '.join(k for k in header if header[k] != main_header.get(k))} differ)")
    if done and ctx.is_main and not quiet:
        print(f"extract: {len(done)} of {len(bounds)} chunks already done in '{parts}', skipping them")

    mine = [i for i in range(len(bounds)) if i % ctx.world_size == ctx.rank]
    finished = set(done)
    if sink is not None:
        has_gallery = "gallery" in set(inputs.splits)
        count = sum(split == "gallery" for split in inputs.splits) if has_gallery else total
        sink.open(ctx, dim=extractor.feature_dim, fingerprint=extractor.fingerprint or "",
                  modalities=extractor.modalities, count=count, has_gallery=has_gallery)
        for i in mine:
            if i in finished:
                sink.chunk(load_feature_file(_chunk_path(parts, i)), np.arange(*bounds[i]), resumed=True)
    pending = [i for i in mine if i not in finished]
    mine_rows = sum(bounds[i][1] - bounds[i][0] for i in mine)
    batch = extractor.batch_size
    order: list[int] = []
    plan: list[list[int]] = []  # batches as positions in ``order``, never straddling a chunk
    for i in pending:
        lo, hi = bounds[i]
        start = len(order)
        order += range(lo, hi)
        plan += [list(range(b, min(b + batch, start + hi - lo))) for b in range(start, start + hi - lo, batch)]
    bar_kwargs = {} if ctx.is_main and not quiet else {"disable": True}
    with tqdm(total=mine_rows, initial=mine_rows - len(order), desc="extract", unit="sample", dynamic_ncols=True,
              leave=False, **bar_kwargs) as bar:
        if pending:
            loader = build_test_loader(cfg, [inputs.samples[j] for j in order], batches=plan)
            batches = iter(loader)
            for i in pending:
                lo, hi = bounds[i]
                feats = extractor.extract_batches(_counted(batches, -(-(hi - lo) // batch), bar), normalize=normalize)
                chunk = _chunk_file(inputs, lo, hi, feats, **columns)
                save_feature_file(_chunk_path(parts, i), chunk)
                if sink is not None:
                    sink.chunk(chunk, np.arange(lo, hi), resumed=False)
                if on_chunk is not None:
                    on_chunk(i)
            del batches, loader
    if sink is not None:
        sink.finished(ctx, quiet=quiet)
    du.barrier(ctx)
    if ctx.is_main:
        ff = _merge(parts, out, inputs, bounds, **columns)
        if not quiet:
            kind = "L2-normalised" if normalize else "not normalised"
            print(f"extract: wrote {len(ff)} features ({ff.features.shape[1]}-d, {kind}) of {inputs.what} to '{out}'")
        if sink is not None:
            sink.merged(ff, quiet=quiet)
    du.barrier(ctx)
    return out
