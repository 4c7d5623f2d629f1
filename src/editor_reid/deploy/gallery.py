"""The persisted gallery index: features of known samples, searched with FAISS.

::

    index = GalleryIndex.from_feature_file("gallery.npz")        # the file's gallery rows
    index.save("gallery_index/")
    index = GalleryIndex.load("gallery_index/")
    result = index.search(query_features, k=10, query_camids=cams, exclude_same_camera=True)
    result.entries, result.distances                            # [Q, k], best first

**Distances** are those ``editor-reid test`` ranks by (:func:`editor_reid.metrics.pairwise_distance`):
``metric="euclidean"`` (default) is the squared Euclidean distance of L2-normalised features,
``2 - 2 cos``, in [0, 4]; ``metric="cosine"`` is ``1 - cos``, in [0, 2]. Features and queries
are L2-normalised on entry (float32, as the metrics do), and FAISS searches by inner product.
``normalized=False`` (euclidean only) keeps the features as they are and searches by squared
Euclidean distance, like ``test.feat_norm: false``.

**Kinds**: ``flat`` is exact and ranks the gallery exactly as the metrics do. ``ivfpq`` (an
inverted file over product-quantised codes, re-ranked exactly: FAISS ``IndexRefineFlat``) and
``hnsw`` (a graph) are approximate and much faster on large galleries. ``auto`` chooses flat up
to :data:`AUTO_FLAT_MAX` entries and ivfpq above (docs/gallery.md has the measurements).

**Storage**: a directory holding ``manifest.json`` (what the index is, and which files are its
current generation), ``index.<g>.faiss``, ``metadata.<g>.npz`` and the append-only
``journal.<g>.bin`` of the entries added since generation ``g`` was written. :meth:`GalleryIndex.save`
writes a new generation under temporary names, fsyncs, renames, and switches the manifest last;
:meth:`GalleryIndex.add` appends a checksummed journal record and fsyncs it before returning. A
process killed at any point leaves the previous or the new state loadable, with every
acknowledged entry in it.

**Threads**: searches run concurrently with each other; :meth:`~GalleryIndex.add` waits for the
running searches and holds new ones off while it updates the index (a readers-writer lock).
:meth:`~GalleryIndex.save` lets searches run but holds adds off. One process writes an index
directory at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from editor_reid.errors import EditorReidError
from editor_reid.fileio import atomic_write, fsync_directory
from editor_reid.features.store import FeatureFile, load_feature_file, path_key
from editor_reid.modalities import MODALITIES

__all__ = ["GalleryIndex", "SearchResult", "GalleryIndexError", "IndexFileError", "KINDS", "METRICS",
           "AUTO_FLAT_MAX", "FORMAT_VERSION", "index_info", "select_rows", "sample_keys", "check_filters"]

FORMAT = "editor-reid gallery index"
FORMAT_VERSION = 1
KINDS = ("auto", "flat", "ivfpq", "hnsw")
METRICS = ("euclidean", "cosine")
#: ``kind="auto"`` builds an exact flat index up to this many entries and ivfpq above: on the
#: 2-core machine of docs/gallery.md a flat search of 100,000 x 2304-d entries takes 0.15-0.3 s
#: for one query, and ivfpq answers 1,000,000 entries over 10x faster at recall@10 >= 0.95.
AUTO_FLAT_MAX = 100_000
#: How many more entries than ``k`` a search fetches first when it drops same-camera entries;
#: it doubles the fetch while fewer than ``k`` survive.
EXCLUDE_OVERFETCH = 4

MANIFEST = "manifest.json"
# Per-entry columns every index has, with the value of an entry that does not know it. ``key`` is
# the entry's sample key (:func:`sample_keys`), ``timestamp`` when it was seen (any integer clock,
# e.g. Unix seconds; a search can keep one time window).
STANDARD_COLUMNS = {"pid": -1, "camid": -1, "sceneid": -1, "split": "", "row": -1, "key": -1, "timestamp": -1,
                    **{path_key(m): "" for m in MODALITIES}}
_CHUNK = 65536  # rows normalised and added at a time: a 1M x 2304 gallery is never copied whole
_EPS = 1e-12  # the norm floor of editor_reid.metrics.distance
_JOURNAL_MAGIC = b"ERJ1"
_JOURNAL_HEADER = struct.Struct("<4sIQQQ")  # magic, crc32 of the rest, payload bytes, first entry id, entry count
_JOURNAL_FIELDS = struct.Struct("<QQQ")


class GalleryIndexError(EditorReidError, ValueError):
    """A gallery index refuses an input: features of another width or model, too few entries to
    train an approximate kind, a bad search argument."""


class IndexFileError(GalleryIndexError):
    """A file of a gallery index directory is missing, truncated, corrupt, or of a newer format."""


def _faiss():
    try:
        import faiss
    except ImportError:
        raise GalleryIndexError('the gallery index needs FAISS: pip install "editor-reid[index]"') from None
    return faiss


# ----------------------------------------------------------------------------- small pieces


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer holds new readers off, so adds cannot starve."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _fill(value, n: int) -> np.ndarray:
    """A column of ``n`` copies of a standard column's unknown value (-1 or "")."""
    return np.full(n, value, dtype="<U1" if isinstance(value, str) else np.int64)


def _unknown(dtype: np.dtype, n: int) -> np.ndarray:
    """A column of ``n`` unknown values of another column's type."""
    value = {"i": -1, "u": 0, "f": np.nan, "b": False, "U": "", "S": b""}.get(np.dtype(dtype).kind, 0)
    return np.full(n, value, dtype=dtype)


def _as_column(name: str, values, n: int) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == object:  # the metadata file is read without pickle: objects become strings
        array = array.astype(np.str_)
    if array.shape != (n,):
        raise GalleryIndexError(f"metadata column '{name}' has shape {array.shape}, expected ({n},): one value "
                                "per feature row")
    if name in STANDARD_COLUMNS and not isinstance(STANDARD_COLUMNS[name], str):
        try:
            return array.astype(np.int64)
        except (TypeError, ValueError):
            raise GalleryIndexError(f"metadata column '{name}' must hold integers, got {array.dtype}") from None
    if name in STANDARD_COLUMNS:
        return array.astype(np.str_) if array.size else np.zeros(0, dtype="<U1")
    return array


class _Columns:
    """Per-entry metadata in growable buffers, so a one-row add to a million-entry index copies
    nothing; a read is a view of the first ``size`` rows (a snapshot later adds do not change)."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}
        self._size = 0

    def append(self, columns: Mapping[str, np.ndarray], n: int) -> None:
        need = self._size + n
        for name in columns.keys() - self._buffers.keys():
            self._buffers[name] = _unknown(columns[name].dtype, need)
        for name, buffer in self._buffers.items():
            new = columns[name] if name in columns else _unknown(buffer.dtype, n)
            try:
                dtype = np.result_type(buffer.dtype, new.dtype)
            except TypeError:
                raise GalleryIndexError(f"metadata column '{name}' is {new.dtype}, the index holds "
                                        f"{buffer.dtype}") from None
            if need > len(buffer) or dtype != buffer.dtype:  # grow by half, or widen (longer strings)
                grown = _unknown(dtype, max(need, len(buffer) * 3 // 2 + 16))
                grown[:self._size] = buffer[:self._size]
                self._buffers[name] = buffer = grown
            buffer[self._size:need] = new
        self._size = need

    def column(self, name: str) -> np.ndarray:
        view = self._buffers[name][:self._size]
        view.flags.writeable = False
        return view

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: self.column(name) for name in self._buffers}


def entry_columns(metadata: Mapping[str, Any] | None, n: int, features, *, fingerprint: str = "",
                  normalize: bool = True) -> dict[str, np.ndarray]:
    """The stored columns of ``n`` new entries: the given ones (``row`` defaults to 0..n-1), the
    standard ones filled with their unknown value, and each entry's sample key (:func:`sample_keys`)."""
    given = {} if metadata is None else dict(metadata)
    if "row" not in given:
        given["row"] = np.arange(n)
    columns = {name: _as_column(name, values, n) for name, values in given.items()}
    for name, value in STANDARD_COLUMNS.items():
        if name not in columns:
            columns[name] = _fill(value, n)
    columns["key"] = sample_keys(columns, n, fingerprint=fingerprint, features=features, normalize=normalize)
    return columns


def _metadata_of(ff: FeatureFile, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    rows = np.arange(len(ff)) if rows is None else rows
    return {"pid": ff.pid, "camid": ff.camid, "sceneid": ff.sceneid, "split": ff.split, "row": rows,
            **{path_key(m): ff.paths.get(m, np.full(len(ff), "")) for m in MODALITIES}}


def unpack_features(features, metadata, fingerprint: str | None):
    """(float [n, F] array, metadata, fingerprint) of what ``add`` is given: a FeatureFile brings
    its columns and fingerprint unless others are given, an array brings neither."""
    if isinstance(features, FeatureFile):
        metadata = _metadata_of(features) if metadata is None else metadata
        fingerprint = features.fingerprint if fingerprint is None else fingerprint
    return _check_features(features), metadata, fingerprint


def _check_features(x, name: str = "features") -> np.ndarray:
    if isinstance(x, FeatureFile):
        x = x.features
    if not isinstance(x, np.ndarray):  # a torch tensor or a list
        x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
    if x.ndim != 2 or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise GalleryIndexError(f"{name} must be a float [N, F] array, got {x.dtype} {x.shape}")
    return x


def _prepare(x: np.ndarray, normalize: bool, offset: int = 0) -> np.ndarray:
    """Rows as a contiguous float32 copy, L2-normalised when asked; refuses NaN and inf."""
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(out).all():
        bad = int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0]) + offset
        raise GalleryIndexError(f"features row {bad} holds NaN or inf")
    if normalize:
        norms = np.sqrt((out * out).sum(axis=1))
        out /= np.maximum(norms, _EPS)[:, None]
    return out


def _chunks(x: np.ndarray, normalize: bool):
    for start in range(0, x.shape[0], _CHUNK):
        yield _prepare(x[start:start + _CHUNK], normalize, start)


def key_of(data: bytes) -> int:
    """A sample key from what identifies the sample: 63 bits of its BLAKE2b digest (>= 0, so -1
    stays free to mean "no entry")."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def sample_keys(columns: Mapping[str, np.ndarray], n: int, *, fingerprint: str = "", features=None,
                normalize: bool = True) -> np.ndarray:
    """The sample key of each of ``n`` entries: 63 bits of BLAKE2b over the model fingerprint, the
    split and the sample's image paths (``path_*`` columns), so the same sample of the same model
    always gets the same key, whichever process adds it. An entry without any path is keyed by its
    labels (pid, camid, sceneid, timestamp) and its feature vector (``features`` [n, F], float32,
    L2-normalised when ``normalize``) instead. A ``key`` column given with values >= 0 wins."""
    given = np.asarray(columns["key"], dtype=np.int64) if "key" in columns else np.full(n, -1, dtype=np.int64)
    keys = given.copy()
    paths = sorted(name for name in columns if name.startswith("path_"))
    splits = columns.get("split", np.full(n, ""))
    missing = np.flatnonzero(keys < 0)
    without_path = []
    for i in missing.tolist():
        parts = [f"{name}={columns[name][i]}" for name in paths if str(columns[name][i])]
        if not parts:
            without_path.append(i)
            continue
        keys[i] = key_of("\0".join([fingerprint, str(splits[i]), *parts]).encode())
    if without_path:
        if features is None:
            raise GalleryIndexError("an entry without image paths is keyed by its feature vector; give the features")
        labels = [np.asarray(columns.get(name, np.full(n, -1))) for name in ("pid", "camid", "sceneid", "timestamp")]
        rows = np.asarray(without_path)
        for start in range(0, rows.size, _CHUNK):
            part = rows[start:start + _CHUNK]
            vectors = _prepare(np.asarray(features[part]), normalize)
            for j, i in enumerate(part.tolist()):
                head = "\0".join([fingerprint, str(splits[i]), *(str(label[i]) for label in labels)])
                keys[i] = key_of(head.encode() + b"\0" + vectors[j].tobytes())
    return keys


def check_filters(where: Mapping[str, Any] | None, time_range, columns: Mapping[str, np.dtype]
                  ) -> list[tuple[str, str, list]]:
    """``where`` ({column: value or list of values}) and ``time_range`` ((start, end), either None:
    ``start <= timestamp < end``) as checked conditions ``(column, op, values)`` with op "in",
    ">=" or "<". ``columns`` maps the filterable column names to their dtypes; a column not there,
    or a value of the wrong type, is a GalleryIndexError naming it."""
    conditions: list[tuple[str, str, list]] = []
    for name, value in (where or {}).items():
        if name not in columns:
            raise GalleryIndexError(f"where: the gallery has no column {name!r} to filter on (it has: "
                                    f"{', '.join(sorted(columns))})")
        values = list(value) if isinstance(value, (list, tuple, set, np.ndarray)) else [value]
        if not values:
            raise GalleryIndexError(f"where: column {name!r} is given no value")
        numeric = np.dtype(columns[name]).kind in "iu"
        clean = []
        for v in values:
            if numeric:
                if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                    try:
                        v = int(str(v), 10)
                    except ValueError:
                        raise GalleryIndexError(f"where: column {name!r} holds integers, got {v!r}") from None
                clean.append(int(v))
            else:
                clean.append(str(v))
        conditions.append((name, "in", clean))
    if time_range is not None:
        try:
            start, end = time_range
            bounds = [None if b is None else int(b) for b in (start, end)]
        except (TypeError, ValueError):
            raise GalleryIndexError(f"time_range must be (start, end) integers or None, got {time_range!r}") from None
        if bounds[0] is not None:
            conditions.append(("timestamp", ">=", [bounds[0]]))
        if bounds[1] is not None:
            conditions.append(("timestamp", "<", [bounds[1]]))
    return conditions


def clean_thresholds(thresholds: Mapping[str, float]) -> dict[str, float]:
    """Open-set thresholds as stored: FPR string -> float distance; GalleryIndexError for an FPR
    outside (0, 1) or a distance that is not finite."""
    clean = {}
    for fpr, distance in thresholds.items():
        try:
            ok = 0 < float(fpr) < 1 and math.isfinite(float(distance))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise GalleryIndexError(f"a threshold maps an FPR in (0, 1) to a finite distance, got {fpr!r}: "
                                    f"{distance!r}")
        clean[str(fpr)] = float(distance)
    return clean


def threshold_value(threshold: float | str | None, thresholds: Mapping[str, float]) -> float | None:
    """A search's open-set threshold: a distance as given, or the distance calibrated for the FPR
    key ``threshold`` (e.g. ``"0.001"``) among ``thresholds``."""
    if isinstance(threshold, str):
        if threshold not in thresholds:
            known = ", ".join(thresholds) or "none; run calibrate"
            raise GalleryIndexError(f"no threshold calibrated for FPR {threshold} (calibrated: {known})")
        return thresholds[threshold]
    return threshold


def check_queries(queries, k, dim: int, normalize: bool, holder: str = "the index") -> np.ndarray:
    """Queries (float [Q, F], or [F] for one; a tensor too) as float32 rows of width ``dim``,
    normalised when ``normalize``; GalleryIndexError for a bad ``k`` or width."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise GalleryIndexError(f"k must be a positive integer, got {k!r}")
    q = np.asarray(queries.detach().cpu() if hasattr(queries, "detach") else queries)
    q = _check_features(q[None] if q.ndim == 1 else q, "queries")
    if q.shape[1] != dim:
        raise GalleryIndexError(f"{holder} holds {dim}-d features, the queries are {q.shape[1]}-d")
    return _prepare(q, normalize)


def ivf_lists(n: int) -> int:
    """Inverted lists of an IVF index over ``n`` entries: the power of two nearest sqrt(n), 16 to 1024."""
    return int(min(1024, max(16, 2 ** round(math.log2(max(n, 1)) / 2))))


def _check_query_camids(query_camids, nq: int, exclude_same_camera: bool) -> np.ndarray | None:
    if not exclude_same_camera:
        return None
    if query_camids is None:
        raise GalleryIndexError("exclude_same_camera needs query_camids (one camera id per query)")
    query_camids = np.asarray(query_camids, dtype=np.int64).reshape(-1)
    if query_camids.shape != (nq,):
        raise GalleryIndexError(f"query_camids has {query_camids.size} values for {nq} queries")
    return query_camids


def _gather(column: np.ndarray, entries: np.ndarray) -> np.ndarray:
    """``column`` at ``entries`` [Q, k], its unknown value where an entry is -1 (padding)."""
    out = column[np.where(entries >= 0, entries, 0)] if column.size else _unknown(column.dtype, entries.size).reshape(
        entries.shape)
    out = np.array(out, copy=True)
    out[entries < 0] = _unknown(column.dtype, 1)[0]
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _gpu_replica(index, kind: str):
    """A copy of a flat index on every GPU, when this FAISS build has GPUs (``faiss-gpu``);
    searches use it, adds go to both, the CPU index is what is saved. None otherwise, and for
    the approximate kinds (FAISS's GPU build has neither the 4-bit fast-scan IVF-PQ nor HNSW)."""
    faiss = _faiss()
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    if kind != "flat" or get_num_gpus is None or get_num_gpus() < 1:
        return None
    return faiss.index_cpu_to_all_gpus(index)


def _write_atomic(path: Path, write) -> int:
    """Call ``write(tmp_path)``, fsync, rename onto ``path``; returns the bytes written."""
    atomic_write(path, write)
    return path.stat().st_size


# ----------------------------------------------------------------------------- parameters


def _pq_m(dim: int) -> int:
    """Sub-quantizers of the product quantizer: the most that divide ``dim`` with at least 12
    dimensions each (192 of 4 bits, 96 bytes, per 2304-d entry)."""
    return max(m for m in range(1, max(1, dim // 12) + 1) if dim % m == 0)


def default_params(kind: str, n: int, dim: int) -> dict[str, int]:
    """The parameters ``build`` uses for ``kind`` with ``n`` entries of width ``dim``.

    ivfpq: ``nlist`` inverted lists (the power of two nearest sqrt(n), 16 to 1024), of which
    ``nprobe`` = nlist / 8 are searched; ``m`` sub-quantizers of ``nbits`` = 4 bits (FAISS
    fast-scan PQ); the best ``k_factor`` x k candidates are re-ranked with the exact features.
    hnsw: ``M`` links per node, ``ef_construction``, ``ef_search`` (raised to k when k is
    larger). docs/gallery.md has the measurements behind these."""
    if kind == "ivfpq":
        nlist = ivf_lists(n)
        return {"nlist": nlist, "nprobe": max(1, nlist // 8), "m": _pq_m(dim), "nbits": 4, "k_factor": 8}
    if kind == "hnsw":
        return {"M": 32, "ef_construction": 40, "ef_search": 64}
    return {}


def min_entries(kind: str, params: Mapping[str, int]) -> int:
    """The fewest entries ``kind`` trains on: 4 per centroid of the coarse quantizer and of the
    product quantizer."""
    if kind == "ivfpq":
        return 4 * max(params["nlist"], 2 ** params["nbits"])
    return 0


def resolve_kind(kind: str, n: int) -> str:
    if kind not in KINDS:
        raise GalleryIndexError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "auto":
        return "flat" if n <= AUTO_FLAT_MAX else "ivfpq"
    return kind


# ----------------------------------------------------------------------------- search result


@dataclass
class SearchResult:
    """What :meth:`GalleryIndex.search` found for Q queries: ``distances`` float32 [Q, k] best
    first (inf where fewer than k entries qualified), ``entries`` int64 [Q, k] (index entry ids,
    -1 padding), ``unknown`` bool [Q] (the best distance is above the threshold, or nothing
    matched; all False without a threshold)."""

    distances: np.ndarray
    entries: np.ndarray
    unknown: np.ndarray
    #: The matches' metadata, [Q, k] per column (pid, camid, row, key, ...; -1 or "" as padding).
    fields: dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self, metadata: Mapping[str, np.ndarray] | None = None) -> list[dict]:
        """One dict per query: ``{"query": i, "unknown": bool, "matches": [{"gallery": entry,
        "distance": d, ...}]}``; each match also carries its ``pid``, ``camid`` and ``row`` (the
        row of the feature file it came from), from :attr:`fields` or else from ``metadata``
        (per-entry columns of a FAISS index)."""
        keys = [key for key in ("pid", "camid", "row") if key in self.fields or (metadata is not None
                                                                                   and key in metadata)]
        out = []
        for i in range(self.entries.shape[0]):
            matches = []
            for j, (entry, distance) in enumerate(zip(self.entries[i], self.distances[i])):
                if entry < 0:
                    break
                match = {"gallery": int(entry)}
                match.update({key: (self.fields[key][i, j] if key in self.fields else metadata[key][entry]).item()
                              for key in keys})
                match["distance"] = float(distance)
                matches.append(match)
            out.append({"query": i, "unknown": bool(self.unknown[i]), "matches": matches})
        return out


# ----------------------------------------------------------------------------- the index


class GalleryIndex:
    """Gallery features with their per-entry metadata, searchable and persisted (module docstring).

    Entry ids are 0, 1, 2, ... in the order of insertion; ``metadata[key][id]`` describes entry
    ``id``. Build one with :meth:`build` or :meth:`from_feature_file`, open a saved one with
    :meth:`load`."""

    #: Which gallery backend this is (``editor_reid.deploy.milvus.MilvusGallery`` is "milvus").
    backend = "faiss"

    def __init__(self, faiss_index, *, kind: str, metric: str, normalized: bool, params: Mapping[str, int],
                 fingerprint: str = "") -> None:
        self._index = faiss_index
        self._columns = _Columns()
        self.kind = kind
        self.metric = metric
        self.normalized = normalized
        self.params = dict(params)
        self.fingerprint = fingerprint
        self.dim = int(faiss_index.d)
        self._thresholds: dict[str, float] = {}
        self.threshold_source = ""
        self.created = self.updated = _now()
        self.directory: Path | None = None
        self._generation = 0
        self._journal_bytes = 0  # valid length of the journal; a torn tail beyond it is cut on the next add
        self._journal_entries = 0
        self._key_ids: dict[int, int] | None = None  # sample key -> entry id, built when first needed
        self._lock = _ReadWriteLock()
        self._save_lock = threading.Lock()
        self._gpu = _gpu_replica(faiss_index, kind)  # searches run here when this FAISS build has GPUs

    # -- properties

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    def __len__(self) -> int:
        return self.size

    @property
    def metadata(self) -> dict[str, np.ndarray]:
        """Per-entry arrays (pid, camid, sceneid, split, row, path_RGB/NI/TI and any others given)."""
        with self._lock.read():
            return self._columns.as_dict()

    @property
    def location(self) -> str:
        """Where the index lives, for messages: its directory ("" before the first save)."""
        return "" if self.directory is None else str(self.directory)

    @property
    def journal_entries(self) -> int:
        """Entries added since the index was last saved, held in the journal of its directory."""
        return self._journal_entries

    @property
    def thresholds(self) -> dict[str, float]:
        """Open-set thresholds by false-positive rate (``{"0.001": distance}``), from calibration."""
        return dict(self._thresholds)

    def __repr__(self) -> str:
        return (f"GalleryIndex({self.size} entries, {self.dim}-d, {self.kind}, {self.metric}, "
                f"fingerprint={self.fingerprint[:12] or '-'})")

    # -- building

    @classmethod
    def build(cls, features, metadata: Mapping[str, Any] | None = None, *, kind: str = "auto",
              metric: str = "euclidean", fingerprint: str = "", normalized: bool = True,
              params: Mapping[str, int] | None = None) -> "GalleryIndex":
        """An index of ``features`` (a :class:`~editor_reid.features.store.FeatureFile`, whose
        columns and fingerprint come along, or float [N, F]; a memory-mapped array is read in
        chunks, never copied whole). ``metadata`` maps column names to per-row arrays; ``params``
        overrides :func:`default_params`. Approximate kinds train on a fixed sample of the rows."""
        faiss = _faiss()
        if isinstance(features, FeatureFile):
            metadata = _metadata_of(features) if metadata is None else metadata
            fingerprint = fingerprint or features.fingerprint
        x = _check_features(features)
        n, dim = x.shape
        if metric not in METRICS:
            raise GalleryIndexError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        normalize = bool(normalized) or metric == "cosine"
        kind = resolve_kind(kind, n)
        p = {**default_params(kind, n, dim), **(params or {})}
        need = min_entries(kind, p)
        if n < need:
            raise GalleryIndexError(f"an index of kind {kind} needs at least {need} entries to train (nlist "
                                    f"{p['nlist']}, {2 ** p['nbits']} PQ codes), the gallery has {n}: use kind flat "
                                    "(exact) or auto")
        faiss_metric = faiss.METRIC_INNER_PRODUCT if normalize else faiss.METRIC_L2
        if kind == "flat":
            index = faiss.IndexFlat(dim, faiss_metric)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, p["M"], faiss_metric)
            index.hnsw.efConstruction = p["ef_construction"]
        else:
            if dim % p["m"]:
                raise GalleryIndexError(f"PQ m={p['m']} does not divide the feature width {dim}")
            quantizer = faiss.IndexFlat(dim, faiss_metric)
            ivf = faiss.IndexIVFPQFastScan(quantizer, dim, p["nlist"], p["m"], p["nbits"], faiss_metric)
            for cp in (ivf.cp, ivf.pq.cp):
                cp.niter = 10
                cp.min_points_per_centroid = 4  # min_entries keeps FAISS from warning on small galleries
                cp.max_points_per_centroid = 64
                cp.seed = 1234
            index = faiss.IndexRefineFlat(ivf)
            sample = np.sort(np.random.default_rng(0).choice(n, min(n, max(64 * p["nlist"], 16384)), replace=False))
            index.train(_prepare(x[sample], normalize))
        gallery = cls(index, kind=kind, metric=metric, normalized=normalize, params=p, fingerprint=fingerprint)
        columns = gallery._columns_for(metadata, n, x)
        gallery._append(x, columns, normalize_input=True)
        return gallery

    @classmethod
    def from_feature_file(cls, path_or_ff, *, kind: str = "auto", metric: str = "euclidean",
                          splits: Sequence[str] | None = None, params: Mapping[str, int] | None = None
                          ) -> "GalleryIndex":
        """An index of a feature file's rows of ``splits`` (default: its gallery rows if it has
        any, else all of them; :func:`select_rows`); ``metadata["row"]`` is the file's row."""
        ff = path_or_ff if isinstance(path_or_ff, FeatureFile) else load_feature_file(path_or_ff)
        rows, _ = select_rows(ff, splits)
        part = ff.select(rows)
        return cls.build(part, _metadata_of(part, rows), kind=kind, metric=metric, fingerprint=ff.fingerprint,
                         params=params)

    def _append(self, x: np.ndarray, columns: dict[str, np.ndarray], *, normalize_input: bool) -> np.ndarray:
        """Add rows to the FAISS index and their columns (of :meth:`_columns_for`; the caller holds
        the write lock or owns the index alone); returns their ids."""
        n = x.shape[0]
        first = self.size
        chunks = _chunks(x, self.normalized) if normalize_input else [np.ascontiguousarray(x, dtype=np.float32)]
        for chunk in chunks:
            self._index.add(chunk)
            if self._gpu is not None:
                self._gpu.add(chunk)
        self._columns.append(columns, n)
        ids = np.arange(first, first + n, dtype=np.int64)
        if self._key_ids is not None:
            for key, entry in zip(columns["key"].tolist(), ids.tolist()):
                self._key_ids.setdefault(key, entry)
        return ids

    def _columns_for(self, metadata, n: int, features, *, fingerprint: str | None = None) -> dict[str, np.ndarray]:
        return entry_columns(metadata, n, features, fingerprint=fingerprint or self.fingerprint,
                             normalize=self.normalized)

    # -- adding

    def add(self, features, metadata: Mapping[str, Any] | None = None, *, fingerprint: str | None = None,
            skip_existing: bool = False) -> np.ndarray:
        """Append entries and return their ids (int64 [n]). ``features`` is a FeatureFile (its
        columns and fingerprint come along) or float [n, F]. When the index has a directory, the
        entries are in its journal, fsynced, before this returns: a crash after it cannot lose
        them. Refuses features of another width, or of another model (both fingerprints known
        and different). ``skip_existing`` adds only the entries whose sample key
        (:func:`sample_keys`) the index does not hold yet, and returns the id of the held entry
        for the others: adding the same samples again changes nothing (the Milvus backend always
        works so)."""
        x, metadata, fingerprint = unpack_features(features, metadata, fingerprint)
        self._check_compatible(x.shape[1], fingerprint)
        n = x.shape[0]
        prepared = _prepare(x, self.normalized)
        columns = self._columns_for(metadata, n, x, fingerprint=fingerprint)  # keys from the raw rows, as build
        with self._lock.write():
            if not skip_existing:
                if self.directory is not None and n:
                    self._journal_append(prepared, columns)
                ids = self._append(prepared, columns, normalize_input=False)
            else:
                keys = columns["key"]
                ids = self._held_ids(keys)
                _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
                new = np.sort(first[ids[first] < 0])  # the first row of each key the index lacks
                if new.size:
                    part = {name: value[new] for name, value in columns.items()}
                    if self.directory is not None:
                        self._journal_append(prepared[new], part)
                    ids[new] = self._append(prepared[new], part, normalize_input=False)
                ids = ids[first][inverse.reshape(-1)]  # repeats within the batch get their first's id
            self.updated = _now()
        return ids

    def _held_ids(self, keys: np.ndarray) -> np.ndarray:
        """The entry id holding each sample key, -1 where none does (the caller holds a lock). The
        key -> id map is built on the first call and kept up to date by :meth:`_append`, so an add
        of n entries costs O(n), not a pass over the whole index."""
        if self._key_ids is None:
            self._key_ids = {}
            for entry, key in enumerate(self._columns.column("key").tolist() if self.size else []):
                if key >= 0:
                    self._key_ids.setdefault(key, entry)
        return np.asarray([self._key_ids.get(key, -1) for key in keys.tolist()], dtype=np.int64)

    def existing_keys(self, keys) -> np.ndarray:
        """Which of ``keys`` (sample keys, :func:`sample_keys`) the index holds: bool [len(keys)]."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        with self._lock.read():
            return self._held_ids(keys) >= 0

    def _check_compatible(self, width: int, fingerprint: str | None, what: str = "the file has") -> None:
        if width != self.dim:
            raise GalleryIndexError(f"the index holds {self.dim}-d features, {what} {width}-d")
        if fingerprint and self.fingerprint and fingerprint != self.fingerprint:
            raise GalleryIndexError(
                f"the index holds features of model {self.fingerprint[:12]}, these come from model {fingerprint[:12]}: "
                "features of different models are not comparable (build a new index)")

    # -- searching

    def search(self, queries, k: int = 10, *, query_camids=None, exclude_same_camera: bool = False,
               threshold: float | str | None = None, where: Mapping[str, Any] | None = None,
               time_range: tuple[int | None, int | None] | None = None) -> SearchResult:
        """The ``k`` nearest entries of each query (float [Q, F], or [F] for one).

        ``exclude_same_camera`` drops entries whose camid equals the query's (``query_camids``
        int [Q]; -1, an unknown camera, excludes nothing), like the evaluation protocol.
        ``where`` keeps only entries whose columns hold the given values (``{"sceneid": [1, 2],
        "split": "gallery"}``) and ``time_range`` those with ``start <= timestamp < end``
        (:func:`check_filters`). With any of these the search fetches ``EXCLUDE_OVERFETCH x k``
        entries and doubles that for the queries left with fewer than ``k``, up to the whole
        index, so the result is that of an exact search of the kept entries for a flat index.
        ``threshold`` (a distance, or an FPR key of :attr:`thresholds` such as ``"0.001"``) marks
        a query ``unknown`` when its best distance is above it."""
        q = check_queries(queries, k, self.dim, self.normalized)
        nq = q.shape[0]
        threshold = threshold_value(threshold, self._thresholds)
        query_camids = _check_query_camids(query_camids, nq, exclude_same_camera)
        distances = np.full((nq, k), np.inf, dtype=np.float32)
        entries = np.full((nq, k), -1, dtype=np.int64)
        with self._lock.read():
            conditions = check_filters(where, time_range, self._filter_columns())
            n = self.size
            if n and not exclude_same_camera and not conditions:
                d, i = self._raw_search(q, min(k, n))
                distances[:, : d.shape[1]], entries[:, : i.shape[1]] = d, i
            elif n:
                kept = self._kept(conditions)
                if kept is None or kept.any():
                    self._search_excluding(q, k, query_camids if exclude_same_camera else None, kept,
                                           distances, entries)
            fields = {name: _gather(self._columns.column(name), entries) for name in ("pid", "camid", "row", "key")}
        unknown = np.zeros(nq, dtype=bool) if threshold is None else ~(distances[:, 0] <= float(threshold))
        return SearchResult(distances, entries, unknown, fields)

    def _filter_columns(self) -> dict[str, np.dtype]:
        columns = {name: self._columns.column(name).dtype for name in self._columns.as_dict()}
        return {name: dtype for name, dtype in columns.items() if dtype.kind in "iuU"}

    def _kept(self, conditions) -> np.ndarray | None:
        """The entries all ``conditions`` keep (bool [n]), None when there are none."""
        if not conditions:
            return None
        kept = np.ones(self.size, dtype=bool)
        for name, op, values in conditions:
            column = self._columns.column(name)
            if op == "in":
                kept &= np.isin(column, np.asarray(values, dtype=column.dtype))
            elif op == ">=":
                kept &= column >= values[0]
            else:
                kept &= column < values[0]
        return kept

    def _search_excluding(self, q, k, q_cams, kept, distances, entries) -> None:
        """Search keeping only the entries of ``kept`` (bool [n] or None) and, when ``q_cams`` is
        given, those of other cameras than each query's."""
        n = self.size
        g_cams = self._columns.column("camid")
        fetch = min(n, EXCLUDE_OVERFETCH * k)
        pending = np.arange(q.shape[0])
        while pending.size:
            d, i = self._raw_search(q[pending], fetch)
            valid = i >= 0
            keep = valid.copy()
            safe = np.where(valid, i, 0)
            if kept is not None:
                keep &= kept[safe]
            if q_cams is not None:
                own = q_cams[pending][:, None]
                keep &= ~((g_cams[safe] == own) & (own >= 0))
            done = (keep.sum(axis=1) >= k) | (fetch >= n) | (valid.sum(axis=1) < fetch)
            for row in np.flatnonzero(done):
                chosen = np.flatnonzero(keep[row])[:k]
                distances[pending[row], : chosen.size] = d[row, chosen]
                entries[pending[row], : chosen.size] = i[row, chosen]
            pending = pending[~done]
            fetch = min(n, fetch * 2)

    def _raw_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search, scores turned into distances; the caller holds the read lock."""
        faiss = _faiss()
        p = self.params
        ivf_params = None  # referenced here for as long as the search runs: FAISS holds a raw pointer
        if self.kind == "ivfpq":
            ivf_params = faiss.SearchParametersIVF(nprobe=p["nprobe"])
            params = faiss.IndexRefineSearchParameters(k_factor=float(p["k_factor"]), base_index_params=ivf_params)
        elif self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(p["ef_search"], k))
        else:
            params = None
        scores, ids = (self._index if self._gpu is None else self._gpu).search(q, k, params=params)
        del ivf_params
        if self.normalized:
            dist = 1.0 - scores if self.metric == "cosine" else np.maximum(2.0 - 2.0 * scores, 0.0)
        else:
            dist = np.maximum(scores, 0.0)
        dist = dist.astype(np.float32, copy=False)
        dist[ids < 0] = np.inf
        return dist, ids.astype(np.int64, copy=False)

    # -- thresholds

    def set_thresholds(self, thresholds: Mapping[str, float], *, source: str = "") -> None:
        """Replace the open-set thresholds (``{"0.001": distance}``: an FPR as a string, to the
        distance that gives it) and say where they came from; an index with a directory writes
        them to its manifest at once."""
        clean = clean_thresholds(thresholds)
        with self._save_lock:
            self._thresholds, self.threshold_source = clean, str(source)
            self.updated = _now()
            if self.directory is not None:
                manifest = _read_manifest(self.directory)
                manifest.update(thresholds=clean, threshold_source=self.threshold_source, updated=self.updated)
                _write_manifest(self.directory, manifest)

    # -- persistence

    def save(self, directory: str | os.PathLike | None = None) -> Path:
        """Write the index as a new generation of ``directory`` (default: the one it was loaded
        from or last saved to) and switch the manifest to it; the journal is folded in and the
        older generation's files removed. The index is then bound to ``directory``: later adds
        go to its journal. Returns the directory."""
        faiss = _faiss()
        with self._save_lock, self._lock.read():
            target = Path(directory) if directory is not None else self.directory
            if target is None:
                raise GalleryIndexError("save() needs a directory: this index was never saved or loaded")
            target.mkdir(parents=True, exist_ok=True)
            previous = _current_generation(target)
            generation = max(previous, self._generation if target == self.directory else 0) + 1
            files = {"index": f"index.{generation}.faiss", "metadata": f"metadata.{generation}.npz",
                     "journal": f"journal.{generation}.bin"}
            columns = self._columns.as_dict()
            sizes = {
                "index": _write_atomic(target / files["index"], lambda tmp: faiss.write_index(self._index, str(tmp))),
                "metadata": _write_atomic(target / files["metadata"], lambda tmp: _save_npz(tmp, columns)),
            }
            self.updated = _now()
            fsync_directory(target)
            _write_manifest(target, self._manifest(generation, files, sizes))
            self.directory, self._generation = target, generation
            self._journal_bytes = self._journal_entries = 0
            _remove_other_generations(target, generation)
        return target

    compact = save

    def _manifest(self, generation: int, files: dict, sizes: dict) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "generation": generation, "files": files,
                "file_bytes": sizes, "entries": self.size, "dim": self.dim, "metric": self.metric,
                "normalized": self.normalized, "kind": self.kind, "params": self.params,
                "fingerprint": self.fingerprint, "thresholds": self._thresholds,
                "threshold_source": self.threshold_source, "created": self.created, "updated": self.updated}

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "GalleryIndex":
        """Open a saved index and replay its journal (a torn last record, from a process killed
        while writing it, was never acknowledged and is ignored). IndexFileError names a file
        that is missing, truncated, corrupt or of a newer format."""
        faiss = _faiss()
        directory = Path(directory)
        manifest = _read_manifest(directory)
        index_path = directory / manifest["files"]["index"]
        meta_path = directory / manifest["files"]["metadata"]
        for key, path in (("index", index_path), ("metadata", meta_path)):
            if not path.is_file():
                raise IndexFileError(f"gallery index file '{path}' is missing (the manifest names it)")
            size, expected = path.stat().st_size, manifest["file_bytes"][key]
            if size != expected:
                raise IndexFileError(f"gallery index file '{path}' is {'truncated' if size < expected else 'corrupt'}: "
                                     f"{size} bytes, the manifest says {expected}")
        try:
            index = faiss.read_index(str(index_path))
        except Exception as exc:  # noqa: BLE001 - FAISS reports every read problem as RuntimeError or MemoryError
            raise IndexFileError(f"gallery index file '{index_path}' is corrupt ({_first_line(exc)})") from None
        if index.ntotal != manifest["entries"] or index.d != manifest["dim"]:
            raise IndexFileError(f"gallery index file '{index_path}' holds {index.ntotal} x {index.d}-d entries, "
                                 f"the manifest says {manifest['entries']} x {manifest['dim']}-d")
        columns = _load_npz(meta_path, manifest["entries"])
        for name, value in STANDARD_COLUMNS.items():  # an index written before the column existed
            if name not in columns:
                columns[name] = _fill(value, manifest["entries"])
        gallery = cls(index, kind=manifest["kind"], metric=manifest["metric"], normalized=manifest["normalized"],
                      params=manifest["params"], fingerprint=manifest["fingerprint"])
        gallery._columns.append(columns, manifest["entries"])
        gallery._thresholds = {str(k): float(v) for k, v in manifest["thresholds"].items()}
        gallery.threshold_source = manifest.get("threshold_source", "")
        gallery.created, gallery.updated = manifest["created"], manifest["updated"]
        gallery.directory, gallery._generation = directory, manifest["generation"]
        journal = directory / manifest["files"]["journal"]
        records, gallery._journal_bytes = _scan_journal(journal)
        for first, count, payload in records:
            if first != gallery.size:
                raise IndexFileError(f"journal '{journal}' has a record for entries from {first}, but the index "
                                     f"holds {gallery.size}: the journal belongs to another index")
            x, cols = _journal_payload(journal, payload, count, gallery.dim)
            gallery._append(x, cols, normalize_input=False)
            gallery._journal_entries += count
        return gallery

    def _journal_append(self, x: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, features=x, **{f"meta.{name}": value for name, value in columns.items()})
        payload = buffer.getvalue()
        fields = _JOURNAL_FIELDS.pack(len(payload), self.size, x.shape[0])
        record = _JOURNAL_MAGIC + struct.pack("<I", zlib.crc32(payload, zlib.crc32(fields))) + fields + payload
        path = self.directory / f"journal.{self._generation}.bin"
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != self._journal_bytes:  # a torn record from a killed writer
                os.ftruncate(fd, self._journal_bytes)
            os.lseek(fd, self._journal_bytes, os.SEEK_SET)
            view = memoryview(record)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_directory(self.directory)
        self._journal_bytes += len(record)
        self._journal_entries += x.shape[0]


# ----------------------------------------------------------------------------- files


def _first_line(exc: BaseException) -> str:
    """The gist of an exception: its last line, without FAISS's C++ location prefix."""
    text = str(exc).strip().splitlines()
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", text[-1].strip()) if text else type(exc).__name__


def _save_npz(path: Path, columns: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **columns)


def _load_npz(path: Path, n: int) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            columns = {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise IndexFileError(f"gallery metadata file '{path}' is corrupt ({_first_line(exc)})") from None
    for key, value in columns.items():
        if value.shape != (n,):
            raise IndexFileError(f"gallery metadata file '{path}': column '{key}' has shape {value.shape}, "
                                 f"the index has {n} entries")
    return columns


def _read_manifest(directory: Path) -> dict:
    if not directory.is_dir():
        raise FileNotFoundError(2, "No such gallery index directory", str(directory))
    path = directory / MANIFEST
    if not path.is_file():
        raise IndexFileError(f"'{directory}' holds no gallery index (no {MANIFEST}); build one with "
                             "'editor-reid index build'")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise IndexFileError(f"gallery manifest '{path}' is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFileError(f"'{path}' is not a gallery index manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise IndexFileError(f"gallery manifest '{path}' is format version {version}, this editor-reid reads up to "
                             f"{FORMAT_VERSION}: upgrade editor-reid")
    required = {"generation": int, "files": dict, "file_bytes": dict, "entries": int, "dim": int, "metric": str,
                "normalized": bool, "kind": str, "params": dict, "fingerprint": str, "thresholds": dict,
                "created": str, "updated": str}
    bad = [key for key, kind in required.items() if not isinstance(manifest.get(key), kind)]
    if not bad:
        bad = [f"files.{key}" for key in ("index", "metadata", "journal")
               if not isinstance(manifest["files"].get(key), str) or "/" in manifest["files"][key]]
        bad += [f"file_bytes.{key}" for key in ("index", "metadata")
                if not isinstance(manifest["file_bytes"].get(key), int)]
        bad += [key for key, allowed in (("metric", METRICS), ("kind", KINDS[1:])) if manifest[key] not in allowed]
    if bad:
        raise IndexFileError(f"gallery manifest '{path}' is corrupt: bad or missing {', '.join(bad)}")
    return manifest


def _write_manifest(directory: Path, manifest: dict) -> None:
    _write_atomic(directory / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    fsync_directory(directory)


def _current_generation(directory: Path) -> int:
    try:
        return int(json.loads((directory / MANIFEST).read_text()).get("generation", 0))
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


_GENERATION_FILE = re.compile(r"(index\.\d+\.faiss|metadata\.\d+\.npz|journal\.\d+\.bin)")
_TEMP_FILE = re.compile(r"\.(index|metadata|journal|manifest)\..*\.tmp-\d+")


def _remove_other_generations(directory: Path, generation: int) -> None:
    """Delete the files of other generations, and temporaries left by a killed writer."""
    keep = {f"index.{generation}.faiss", f"metadata.{generation}.npz", f"journal.{generation}.bin"}
    for path in directory.iterdir():
        if (_GENERATION_FILE.fullmatch(path.name) and path.name not in keep) or _TEMP_FILE.fullmatch(path.name):
            path.unlink(missing_ok=True)


def _scan_journal(path: Path) -> tuple[list[tuple[int, int, bytes]], int]:
    """The valid records of a journal as (first entry id, count, payload), and the bytes they
    span. A torn last record (cut short, or zeros) ends the scan; damage followed by more data
    raises IndexFileError, since acknowledged entries after it would be lost silently."""
    records: list[tuple[int, int, bytes]] = []
    if not path.is_file():
        return records, 0
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        header = data[pos:pos + _JOURNAL_HEADER.size]
        end = None
        if len(header) == _JOURNAL_HEADER.size:
            magic, crc, length, first, count = _JOURNAL_HEADER.unpack(header)
            if magic == _JOURNAL_MAGIC:
                end = pos + _JOURNAL_HEADER.size + length
                payload = data[pos + _JOURNAL_HEADER.size:end]
                if end <= len(data) and zlib.crc32(payload, zlib.crc32(header[8:])) == crc:
                    records.append((first, count, payload))
                    pos = end
                    continue
        torn = len(header) < _JOURNAL_HEADER.size or (end is not None and end >= len(data)) \
            or not data[pos:].strip(b"\0")
        if torn:
            break
        raise IndexFileError(f"journal '{path}' is corrupt at byte {pos} ({len(data) - pos} bytes of damaged records "
                             "follow); the entries before it are intact: move the file away to load without them")
    return records, pos


def _journal_payload(path: Path, payload: bytes, count: int, dim: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as data:
            x = data["features"]
            cols = {key[5:]: data[key] for key in data.files if key.startswith("meta.")}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise IndexFileError(f"journal '{path}' has an unreadable record ({_first_line(exc)})") from None
    if x.shape != (count, dim) or any(c.shape != (count,) for c in cols.values()):
        raise IndexFileError(f"journal '{path}' has a record of {x.shape} features, expected ({count}, {dim})")
    return x, cols


def index_info(directory: str | os.PathLike) -> dict:
    """The manifest of a saved index, with ``journal_entries`` (added since the last save) and
    ``total_entries``; reads no features."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    records, _ = _scan_journal(directory / manifest["files"]["journal"])
    journal = sum(count for _, count, _ in records)
    return {**manifest, "journal_entries": journal, "total_entries": manifest["entries"] + journal,
            "directory": str(directory)}


# ----------------------------------------------------------------------------- the commands


def select_rows(ff: FeatureFile, splits: Sequence[str] | None, source: str = "the feature file"
                ) -> tuple[np.ndarray, str]:
    """The rows of ``ff`` to index, and words saying which: those of ``splits``, or by default
    the gallery rows if there are any, else every row."""
    if splits:
        rows = np.flatnonzero(np.isin(ff.split, list(splits)))
        if not rows.size:
            present = ", ".join(sorted(set(ff.split.tolist()) - {""})) or "none"
            raise GalleryIndexError(f"{source} has no rows of split(s) {', '.join(splits)} (its splits: {present})")
        return rows, f"split {','.join(splits)}"
    rows = np.flatnonzero(ff.split == "gallery")
    if rows.size:
        return rows, "split gallery"
    return np.arange(len(ff)), "all rows: the file has no gallery split"


#: ``--backend``: FAISS (an index directory, the default) or Milvus (a collection at ``--uri``).
GALLERY_BACKENDS = ("faiss", "milvus")


def check_backend(backend: str | None, uri: str | None) -> str:
    """The gallery backend of a command: ``backend``, or milvus when only ``uri`` is given, else
    faiss; UsageError when the two do not fit."""
    from editor_reid.errors import UsageError

    backend = backend or ("milvus" if uri else "faiss")
    if backend not in GALLERY_BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(GALLERY_BACKENDS)}, got {backend!r}")
    if backend == "milvus" and not uri:
        raise UsageError("--backend milvus needs --uri: a Milvus server (http://HOST:19530) or a Milvus Lite file "
                         "(gallery.db)")
    if backend == "faiss" and uri:
        raise UsageError("--uri is the Milvus server of --backend milvus; a faiss gallery is the directory --index "
                         "names")
    return backend


def open_gallery(index: str | os.PathLike, *, backend: str | None = None, uri: str | None = None):
    """The gallery ``index`` names: a FAISS index directory (:meth:`GalleryIndex.load`) or, with
    ``backend="milvus"`` (or just ``uri``), the collection of that name at ``uri``
    (:class:`~editor_reid.deploy.milvus.MilvusGallery`)."""
    if check_backend(backend, uri) == "milvus":
        from editor_reid.deploy.milvus import MilvusGallery

        return MilvusGallery.open(uri, str(index))
    return GalleryIndex.load(index)


def gallery_name(gallery, index: str | os.PathLike) -> str:
    """What messages call the gallery opened from ``index``: the directory as given, or for a
    Milvus collection "NAME at URI"."""
    return f"{gallery.collection} at {gallery.uri}" if gallery.backend == "milvus" else str(index)


def gallery_info(index: str | os.PathLike, *, backend: str | None = None, uri: str | None = None) -> dict:
    """``editor-reid index info``: what the gallery is and holds (:func:`index_info` for FAISS,
    which reads no features; the collection's description and count for Milvus)."""
    if check_backend(backend, uri) == "milvus":
        return open_gallery(index, backend="milvus", uri=uri).info()
    return {**index_info(index), "backend": "faiss"}


def _describe(index) -> str:
    exact = "exact" if index.kind == "flat" else "approximate"
    return (f"{index.kind} index ({exact}), {index.size} entries, {index.dim}-d, {index.metric}, "
            f"model {index.fingerprint[:12] or 'unknown'}")


def run_index_build(features: str | os.PathLike, out: str | os.PathLike, *, kind: str = "auto",
                    metric: str = "euclidean", splits: Sequence[str] | None = None,
                    overwrite: bool = False, backend: str | None = None, uri: str | None = None):
    """``editor-reid index build``: index a feature file's rows into ``out``, a new index
    directory (absent or empty unless ``overwrite``) or, with the milvus backend, a new collection
    of that name at ``uri``."""
    backend = check_backend(backend, uri)
    out_path = Path(out)
    if backend == "faiss" and out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())) \
            and not overwrite:
        raise FileExistsError(f"'{out}' exists and is not empty: pass --overwrite to write the index there")
    start = time.perf_counter()
    ff = load_feature_file(features)
    rows, which = select_rows(ff, splits, f"'{features}'")
    if backend == "milvus":
        from editor_reid.deploy.milvus import MilvusGallery

        index = MilvusGallery.from_feature_file(ff, uri=uri, collection=str(out), kind=kind, metric=metric,
                                                splits=splits, overwrite=overwrite)
        target = index.location
    else:
        index = GalleryIndex.from_feature_file(ff, kind=kind, metric=metric, splits=splits)
        index.save(out_path)
        target = str(out)
    print(f"index build: {len(rows)} of {len(ff)} rows of {features} ({which}) -> {target}: {_describe(index)}; "
          f"{time.perf_counter() - start:.1f} s")
    return index


def run_index_add(index_dir: str | os.PathLike, features: str | os.PathLike, *,
                  splits: Sequence[str] | None = None, compact: bool = False, backend: str | None = None,
                  uri: str | None = None):
    """``editor-reid index add``: add a feature file's rows to a gallery; rows whose sample is
    held already (same sample key) are not added again, so adding a file twice changes nothing.
    FAISS: journaled, and ``compact`` then writes a new generation; Milvus: upserted."""
    backend = check_backend(backend, uri)
    if compact and backend == "milvus":
        from editor_reid.errors import UsageError

        raise UsageError("--compact folds a FAISS index's journal into new files; a Milvus collection has no journal")
    index = open_gallery(index_dir, backend=backend, uri=uri)
    ff = load_feature_file(features)
    rows, which = select_rows(ff, splits, f"'{features}'")
    part = ff.select(rows)
    before = index.size
    ids = index.add(part, _metadata_of(part, rows), fingerprint=ff.fingerprint, skip_existing=True)
    added = index.size - before
    if compact:
        index.save()
    if backend == "milvus":
        how = f"upserted into {index.location}"
    else:
        how = ("compacted into a new generation" if compact
               else f"journaled ({index.journal_entries} entries in the journal)")
    print(f"index add: {len(ids)} rows of {features} ({which}): {added} new, {len(ids) - added} held already; "
          f"{how}; now {_describe(index)}")
    return index
