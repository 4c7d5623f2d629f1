"""The Milvus gallery backend: the API of :class:`~editor_reid.deploy.gallery.GalleryIndex` over a
collection of a Milvus server or cluster, or of a Milvus Lite file (``gallery.db``).

::

    gallery = MilvusGallery.build(features, metadata, uri="http://milvus:19530", collection="city")
    gallery = MilvusGallery.open("http://milvus:19530", "city")
    gallery.add(more_features, more_metadata)                 # upserts: idempotent per sample key
    result = gallery.search(queries, k=10, query_camids=cams, exclude_same_camera=True,
                            where={"sceneid": [3, 4]}, time_range=(t0, t1))

**The collection.** One entity per gallery entry: the primary key ``key`` (the entry's sample key,
:func:`~editor_reid.deploy.gallery.sample_keys`: the same sample of the same model always gets the
same key, so writing it again replaces it instead of adding a copy), the feature ``vector`` (float32,
L2-normalised unless built with ``normalized=False``), and scalar fields ``pid``, ``camid``,
``sceneid``, ``row``, ``timestamp`` (INT64; -1 unknown), ``split``, ``fingerprint`` (the model's)
and ``path_<M>`` per modality (VARCHAR). Other metadata columns go to Milvus's dynamic field. What
the gallery is (width, metric, kind, index parameters, model fingerprint, calibrated open-set
thresholds) is a JSON collection property, ``editor_reid``.

**Distances** are those of the FAISS backend: Milvus searches by inner product (``IP``) on
normalised vectors, turned into ``2 - 2 cos`` (euclidean) or ``1 - cos`` (cosine), or by squared
``L2`` for ``normalized=False``. **Filters run on the server**: ``exclude_same_camera`` searches
each camera's queries with ``camid != c``, ``where`` and ``time_range`` become a boolean expression.

**Kinds**: ``flat`` (Milvus ``FLAT``, exact), ``ivf`` (``IVF_FLAT``: ``nlist``, ``nprobe``) and
``hnsw`` (``HNSW``: ``M``, ``ef_construction``, ``ef_search``); ``auto`` is flat up to
:data:`~editor_reid.deploy.gallery.AUTO_FLAT_MAX` entries and hnsw above, or when the size is not
known at creation (a gallery that starts empty and grows). Milvus Lite has no PQ index, so the
FAISS backend's ``ivfpq`` is not offered here.

**Consistency and many writers**: the collection is created with ``Strong`` consistency, so a
search sees every acknowledged write. Many processes may write one collection of a Milvus server;
Milvus Lite serialises nothing itself, so writers there take a lock (:attr:`MilvusGallery.write_lock`,
which ``extract --to-gallery`` sets under torchrun).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from editor_reid.deploy.gallery import (
    AUTO_FLAT_MAX, METRICS, GalleryIndexError, SearchResult, _check_features, _check_query_camids, _metadata_of,
    _now, _prepare, check_filters, check_queries, clean_thresholds, entry_columns, ivf_lists, select_rows,
    threshold_value, unpack_features)
from editor_reid.features.store import FeatureFile, load_feature_file, path_key
from editor_reid.modalities import MODALITIES, canonical_order

__all__ = ["MilvusGallery", "MilvusError", "MILVUS_KINDS", "connect", "check_collection_name", "milvus_params",
           "is_lite"]

FORMAT = "editor-reid gallery collection"
FORMAT_VERSION = 1
MILVUS_KINDS = ("auto", "flat", "ivf", "hnsw")
PROPERTY = "editor_reid"
#: The most matches one Milvus search returns (its ``limit``/topk cap).
MAX_K = 16384
_INDEX_TYPES = {"flat": "FLAT", "ivf": "IVF_FLAT", "hnsw": "HNSW"}
_INT_FIELDS = ("pid", "camid", "sceneid", "row", "timestamp")
_TEXT_FIELDS = {"split": 64, "fingerprint": 128}
_PATH_LENGTH = 4096
_WRITE_BATCH = 1024  # entities per upsert: 1024 x 2304-d float32 is about 9 MB, under gRPC's message limit
_SEARCH_BATCH = 256  # queries per search call
_KEY_BATCH = 1024  # keys per "key in [...]" query
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


class MilvusError(GalleryIndexError):
    """Milvus is unreachable, refuses a request, or holds a collection that is not a gallery of
    this width, model or schema."""


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise GalleryIndexError('the milvus backend needs pymilvus: pip install "editor-reid[milvus]"') from None
    # pymilvus logs every failed call with a traceback at ERROR; the one line we raise says it.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    return pymilvus


def _reason(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    message = str(message).strip().splitlines()[0] if str(message).strip() else type(exc).__name__
    return message.removeprefix("<").removesuffix(">")


def is_lite(uri: str) -> bool:
    """Whether ``uri`` is a Milvus Lite file (a local path ending in ``.db``)."""
    return "://" not in str(uri) and str(uri).endswith(".db")


def connect(uri: str, *, token: str | None = None, timeout: float = 10.0):
    """A ``pymilvus.MilvusClient`` for ``uri``: ``http(s)://HOST:PORT`` of a Milvus server or
    cluster (``token`` or the environment's ``MILVUS_TOKEN``: ``user:password`` or an API key),
    or a Milvus Lite file ``PATH.db``. MilvusError, in one line, when it cannot be reached."""
    pymilvus = _pymilvus()
    uri = str(uri)
    if is_lite(uri):
        parent = Path(uri).expanduser().resolve().parent
        if not parent.is_dir():
            raise MilvusError(f"Milvus Lite file '{uri}': its folder '{parent}' does not exist")
        kwargs = {}
    elif re.match(r"(https?|tcp|grpc)://", uri):
        kwargs = {"token": token if token is not None else os.environ.get("MILVUS_TOKEN", ""), "timeout": timeout}
    else:
        raise MilvusError(f"--uri {uri!r} is neither a Milvus server (http://HOST:19530, https://...) nor a Milvus "
                          "Lite file (a path ending in .db)")
    try:
        return pymilvus.MilvusClient(uri=uri, **kwargs)
    except Exception as exc:  # noqa: BLE001 - pymilvus raises MilvusException, grpc errors, OSError, ...
        raise MilvusError(f"cannot reach Milvus at {uri} ({_reason(exc) or 'no answer'}): start the server or "
                          "check --uri") from None


def check_collection_name(name: str) -> str:
    name = str(name)
    if not _NAME.fullmatch(name):
        raise GalleryIndexError(f"with the milvus backend the gallery is a collection name (letters, digits and _, "
                                f"not starting with a digit, at most 255), got {name!r}")
    return name


def milvus_params(kind: str, size: int | None) -> dict[str, int]:
    """The index parameters of ``kind`` for a gallery of about ``size`` entries (None: unknown).
    ivf: ``nlist`` the power of two nearest sqrt(size) (16 to 1024; 128 when the size is not
    known), ``nprobe`` = nlist / 8; hnsw: ``M`` 32, ``ef_construction`` 40, ``ef_search`` 64
    (raised to k), the FAISS backend's."""
    if kind == "ivf":
        nlist = ivf_lists(size) if size else 128
        return {"nlist": nlist, "nprobe": max(1, nlist // 8)}
    if kind == "hnsw":
        return {"M": 32, "ef_construction": 40, "ef_search": 64}
    return {}


def _resolve_kind(kind: str, size: int | None) -> str:
    if kind == "ivfpq":
        raise GalleryIndexError("kind ivfpq is the faiss backend's (Milvus Lite has no PQ index); the milvus backend "
                                f"has {', '.join(MILVUS_KINDS)}")
    if kind not in MILVUS_KINDS:
        raise GalleryIndexError(f"kind must be one of {', '.join(MILVUS_KINDS)} for the milvus backend, got {kind!r}")
    if kind == "auto":
        return "flat" if size is not None and 0 < size <= AUTO_FLAT_MAX else "hnsw"
    return kind


@contextlib.contextmanager
def _file_lock(uri: str):
    """An exclusive lock shared by the processes of this machine that write to ``uri``."""
    import fcntl
    import hashlib
    import tempfile

    name = hashlib.sha256(uri.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"editor-reid-milvus-{name}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _call(uri: str, collection: str, what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, a call to Milvus; its failure as one MilvusError line."""
    try:
        return fn(*args, **kwargs)
    except GalleryIndexError:
        raise
    except Exception as exc:  # noqa: BLE001 - pymilvus's MilvusException, grpc's RpcError, ...
        raise MilvusError(f"Milvus at {uri}, collection '{collection}': {what} failed ({_reason(exc)})") from None


def _literal(value) -> str:
    """A value in a Milvus boolean expression: an integer, or a double-quoted escaped string."""
    return str(int(value)) if isinstance(value, (int, np.integer)) else json.dumps(str(value))


def _expression(conditions: Sequence[tuple[str, str, list]]) -> str:
    parts = []
    for name, op, values in conditions:
        if op == "in":
            parts.append(f"{name} == {_literal(values[0])}" if len(values) == 1
                         else f"{name} in [{', '.join(_literal(v) for v in values)}]")
        else:
            parts.append(f"{name} {op} {_literal(values[0])}")
    return " and ".join(parts)


class MilvusGallery:
    """A gallery in a Milvus collection (module docstring). Open one with :meth:`open`, make one
    with :meth:`create` (empty), :meth:`build` or :meth:`from_feature_file`. Entry ids are the
    entries' sample keys."""

    backend = "milvus"

    def __init__(self, client, uri: str, collection: str, info: dict, fields: Mapping[str, str]) -> None:
        self._client = client
        self.uri = str(uri)
        self.collection = collection
        self._info = info
        self._fields = dict(fields)  # scalar field name -> "int" / "text"
        self.dim = int(info["dim"])
        self.metric = str(info["metric"])
        self.normalized = bool(info["normalized"])
        self.kind = str(info["kind"])
        self.params = dict(info["params"])
        self.fingerprint = str(info["fingerprint"])
        self.created = str(info.get("created", ""))
        self.lite = is_lite(self.uri) or self._server_version().startswith("milvus_lite")
        #: A context manager every write holds. Milvus Lite does not serialise concurrent writers,
        #: so against a Milvus Lite server the processes of this machine take turns (a file lock);
        #: a Milvus server or cluster takes concurrent writes itself.
        self.write_lock = (lambda: _file_lock(self.uri)) if self.lite and not is_lite(self.uri) \
            else contextlib.nullcontext

    # -- calls

    def _call(self, what: str, fn, *args, **kwargs):
        return _call(self.uri, self.collection, what, fn, *args, **kwargs)

    def _server_version(self) -> str:
        try:
            return str(self._client.get_server_version())
        except Exception:  # noqa: BLE001 - only used to recognise Milvus Lite
            return ""

    # -- making and opening

    @classmethod
    def create(cls, uri: str, collection: str, *, dim: int, metric: str = "euclidean", kind: str = "auto",
               normalized: bool = True, params: Mapping[str, int] | None = None, fingerprint: str = "",
               modalities: Sequence[str] = MODALITIES, size: int | None = None, overwrite: bool = False,
               token: str | None = None) -> "MilvusGallery":
        """An empty gallery collection for ``dim``-wide features of the model ``fingerprint``;
        ``size`` (the expected number of entries, if known) chooses ``kind="auto"`` and the ivf
        parameters. An existing collection of that name is an error unless ``overwrite``."""
        pymilvus = _pymilvus()
        check_collection_name(collection)
        if metric not in METRICS:
            raise GalleryIndexError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise GalleryIndexError(f"the feature width must be a positive integer, got {dim!r}")
        normalize = bool(normalized) or metric == "cosine"
        kind = _resolve_kind(kind, size)
        p = {**milvus_params(kind, size), **(params or {})}
        client = connect(uri, token=token)
        if _call(uri, collection, "looking up the collection", client.has_collection, collection):
            if not overwrite:
                raise MilvusError(f"Milvus at {uri} already has a collection '{collection}': pass --overwrite to "
                                  "replace it, or add to it with 'editor-reid index add'")
            _call(uri, collection, "dropping the old collection", client.drop_collection, collection)
        DataType = pymilvus.DataType
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True,
                                                     description="editor-reid gallery")
        schema.add_field("key", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
        for name in _INT_FIELDS:
            schema.add_field(name, DataType.INT64)
        for name, length in _TEXT_FIELDS.items():
            schema.add_field(name, DataType.VARCHAR, max_length=length)
        modalities = canonical_order([*MODALITIES, *modalities])
        for m in modalities:
            schema.add_field(path_key(m), DataType.VARCHAR, max_length=_PATH_LENGTH)
        index_params = client.prepare_index_params()
        build = {"nlist": p["nlist"]} if kind == "ivf" else (
            {"M": p["M"], "efConstruction": p["ef_construction"]} if kind == "hnsw" else {})
        # The build parameters as flat keys (a Milvus server reads these) and as a JSON "params"
        # entry too: Milvus Lite 3.2 reads only that, and builds with its defaults without it.
        index_params.add_index(field_name="vector", index_type=_INDEX_TYPES[kind],
                               metric_type="IP" if normalize else "L2", params={**build, "params": build} if build else {})
        info = {"format": FORMAT, "version": FORMAT_VERSION, "dim": int(dim), "metric": metric,
                "normalized": normalize, "kind": kind, "params": p, "fingerprint": fingerprint,
                "modalities": list(modalities), "thresholds": {}, "threshold_source": "", "created": _now()}
        _call(uri, collection, "creating the collection", client.create_collection, collection, schema=schema,
              index_params=index_params, consistency_level="Strong")
        _call(uri, collection, "storing the gallery's description", client.alter_collection_properties, collection,
              properties={PROPERTY: json.dumps(info)})
        return cls.open(uri, collection, token=token, client=client)

    @classmethod
    def open(cls, uri: str, collection: str, *, token: str | None = None, client=None) -> "MilvusGallery":
        """Open the gallery collection ``collection`` of ``uri``; MilvusError when it is absent,
        not an editor-reid gallery, or of another schema."""
        check_collection_name(collection)
        client = client or connect(uri, token=token)
        if not _call(uri, collection, "looking up the collection", client.has_collection, collection):
            raise MilvusError(f"Milvus at {uri} has no collection '{collection}': build the gallery with "
                              "'editor-reid index build --backend milvus'")
        described = _call(uri, collection, "describing the collection", client.describe_collection, collection)
        info = _read_info(described, uri, collection)
        fields = _check_schema(described, info, uri, collection)
        _call(uri, collection, "loading the collection", client.load_collection, collection)
        return cls(client, uri, collection, info, fields)

    load = open

    @classmethod
    def open_or_create(cls, uri: str, collection: str, *, dim: int, fingerprint: str = "",
                       modalities: Sequence[str] = MODALITIES, size: int | None = None,
                       token: str | None = None) -> "MilvusGallery":
        """The collection ``collection`` of ``uri`` if it exists (refused when it holds features of
        another width or model), else a new one as :meth:`create` makes it."""
        check_collection_name(collection)
        client = connect(uri, token=token)
        if _call(uri, collection, "looking up the collection", client.has_collection, collection):
            gallery = cls.open(uri, collection, client=client)
            gallery._check_compatible(dim, fingerprint, "the model gives")
            return gallery
        return cls.create(uri, collection, dim=dim, fingerprint=fingerprint, modalities=modalities, size=size,
                          token=token)

    @classmethod
    def build(cls, features, metadata: Mapping[str, Any] | None = None, *, uri: str, collection: str,
              kind: str = "auto", metric: str = "euclidean", fingerprint: str = "", normalized: bool = True,
              params: Mapping[str, int] | None = None, overwrite: bool = False, token: str | None = None
              ) -> "MilvusGallery":
        """A new collection holding ``features`` (a FeatureFile or float [N, F]) and ``metadata``,
        as :meth:`GalleryIndex.build <editor_reid.deploy.gallery.GalleryIndex.build>` makes one."""
        modalities = MODALITIES
        if isinstance(features, FeatureFile):
            metadata = _metadata_of(features) if metadata is None else metadata
            fingerprint = fingerprint or features.fingerprint
            modalities = tuple(features.paths)
        x = _check_features(features)
        gallery = cls.create(uri, collection, dim=x.shape[1], metric=metric, kind=kind, normalized=normalized,
                             params=params, fingerprint=fingerprint, modalities=modalities, size=x.shape[0],
                             overwrite=overwrite, token=token)
        gallery.add(x, metadata, fingerprint=fingerprint)
        return gallery

    @classmethod
    def from_feature_file(cls, path_or_ff, *, uri: str, collection: str, kind: str = "auto",
                          metric: str = "euclidean", splits: Sequence[str] | None = None,
                          params: Mapping[str, int] | None = None, overwrite: bool = False,
                          token: str | None = None) -> "MilvusGallery":
        """A new collection of a feature file's rows of ``splits`` (default: its gallery rows if
        it has any, else all; :func:`~editor_reid.deploy.gallery.select_rows`)."""
        ff = path_or_ff if isinstance(path_or_ff, FeatureFile) else load_feature_file(path_or_ff)
        rows, _ = select_rows(ff, splits)
        part = ff.select(rows)
        return cls.build(part, _metadata_of(part, rows), uri=uri, collection=collection, kind=kind, metric=metric,
                         fingerprint=ff.fingerprint, params=params, overwrite=overwrite, token=token)

    # -- what it is

    @property
    def size(self) -> int:
        """The number of entries (an exact count on the server)."""
        rows = self._call("counting the entries", self._client.query, self.collection, filter="",
                          output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def __len__(self) -> int:
        return self.size

    @property
    def location(self) -> str:
        return f"collection '{self.collection}' at {self.uri}"

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self._info.get("modalities", MODALITIES))

    @property
    def thresholds(self) -> dict[str, float]:
        return {str(k): float(v) for k, v in self._info.get("thresholds", {}).items()}

    @property
    def threshold_source(self) -> str:
        return str(self._info.get("threshold_source", ""))

    def info(self) -> dict:
        """What ``editor-reid index info`` prints: the stored description with the entry count."""
        return {**self._info, "backend": self.backend, "uri": self.uri, "collection": self.collection,
                "entries": self.size, "total_entries": self.size}

    def __repr__(self) -> str:
        return (f"MilvusGallery({self.location}, {self.dim}-d, {self.kind}, {self.metric}, "
                f"fingerprint={self.fingerprint[:12] or '-'})")

    def set_thresholds(self, thresholds: Mapping[str, float], *, source: str = "") -> None:
        """Replace the open-set thresholds (as GalleryIndex.set_thresholds) in the collection's
        description, at once."""
        clean = clean_thresholds(thresholds)
        described = self._call("describing the collection", self._client.describe_collection, self.collection)
        info = {**_read_info(described, self.uri, self.collection), "thresholds": clean,
                "threshold_source": str(source)}
        self._call("storing the thresholds", self._client.alter_collection_properties, self.collection,
                   properties={PROPERTY: json.dumps(info)})
        self._info = info

    # -- writing

    def _check_compatible(self, width: int, fingerprint: str | None, what: str = "the file has") -> None:
        if width != self.dim:
            raise GalleryIndexError(f"{self.location} holds {self.dim}-d features, {what} {width}-d")
        if fingerprint and self.fingerprint and fingerprint != self.fingerprint:
            raise GalleryIndexError(
                f"{self.location} holds features of model {self.fingerprint[:12]}, these come from model "
                f"{fingerprint[:12]}: features of different models are not comparable (build a new gallery)")

    def add(self, features, metadata: Mapping[str, Any] | None = None, *, fingerprint: str | None = None,
            skip_existing: bool = True) -> np.ndarray:
        """Write entries and return their ids, the sample keys (int64 [n]). Each entry is upserted
        under its key, so writing a sample again (a resumed run) replaces it and adds no copy;
        ``skip_existing`` is accepted for the FAISS backend's signature (this backend always
        works so). Acknowledged writes are visible to every later search (Strong consistency)."""
        del skip_existing
        x, metadata, fingerprint = unpack_features(features, metadata, fingerprint)
        self._check_compatible(x.shape[1], fingerprint)
        n = x.shape[0]
        prepared = _prepare(x, self.normalized)
        columns = entry_columns(metadata, n, x, fingerprint=fingerprint or self.fingerprint,
                                normalize=self.normalized)  # keys from the raw rows, as the FAISS backend
        model = fingerprint or self.fingerprint
        known = set(self._fields)
        extra = [name for name in columns if name not in known and name != "key"]
        with self.write_lock():
            for start in range(0, n, _WRITE_BATCH):
                stop = min(n, start + _WRITE_BATCH)
                rows = []
                for i in range(start, stop):
                    row = {"key": int(columns["key"][i]), "vector": prepared[i], "fingerprint": model}
                    for name, kind in self._fields.items():
                        if name == "fingerprint":
                            continue
                        value = columns[name][i] if name in columns else (-1 if kind == "int" else "")
                        row[name] = int(value) if kind == "int" else str(value)
                    for name in extra:
                        value = columns[name][i]
                        row[name] = value.item() if hasattr(value, "item") else value
                    rows.append(row)
                self._call("writing entries", self._client.upsert, self.collection, rows)
        return np.asarray(columns["key"], dtype=np.int64)

    def existing_keys(self, keys) -> np.ndarray:
        """Which of ``keys`` the collection holds: bool [len(keys)]."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        held: set[int] = set()
        for start in range(0, keys.size, _KEY_BATCH):
            part = keys[start:start + _KEY_BATCH].tolist()
            rows = self._call("looking up keys", self._client.query, self.collection,
                              filter=f"key in [{', '.join(str(k) for k in part)}]", output_fields=["key"])
            held.update(int(row["key"]) for row in rows)
        return np.asarray([k in held for k in keys.tolist()], dtype=bool)

    def metadata_of(self, keys) -> dict[str, np.ndarray]:
        """The scalar fields of the entries ``keys`` (in that order; -1 / "" for a key not held)."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        names = list(self._fields)
        found: dict[int, dict] = {}
        for start in range(0, keys.size, _KEY_BATCH):
            part = keys[start:start + _KEY_BATCH].tolist()
            rows = self._call("reading entries", self._client.query, self.collection,
                              filter=f"key in [{', '.join(str(k) for k in part)}]", output_fields=["key", *names])
            found.update({int(row["key"]): row for row in rows})
        out = {"key": np.asarray([k if k in found else -1 for k in keys.tolist()], dtype=np.int64)}
        for name in names:
            unknown = -1 if self._fields[name] == "int" else ""
            values = [found[k].get(name, unknown) if k in found else unknown for k in keys.tolist()]
            out[name] = np.asarray(values, dtype=np.int64 if self._fields[name] == "int" else np.str_)
        return out

    @property
    def metadata(self) -> dict[str, np.ndarray]:
        """Every entry's scalar fields, in key order. It reads the whole collection: for a large
        one, search with filters or use :meth:`metadata_of`."""
        keys = []
        # pymilvus's iterator first asks for a timestamp, which Milvus Lite does not implement (the
        # iterator goes on without it); an in-process Lite server would log that with a traceback.
        quiet = logging.getLogger("grpc._server")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            iterator = self._call("reading the collection", self._client.query_iterator, self.collection,
                                  batch_size=4096, filter="", output_fields=["key"])
            try:
                while True:
                    batch = self._call("reading the collection", iterator.next)
                    if not batch:
                        break
                    keys += [int(row["key"]) for row in batch]
            finally:
                iterator.close()
        finally:
            quiet.setLevel(level)
        return self.metadata_of(np.sort(np.asarray(keys, dtype=np.int64)))

    def save(self, directory=None) -> str:
        """Flush the collection's writes to its storage (Milvus keeps them durable already; this
        seals its segments) and return :attr:`location`. ``directory`` is the FAISS backend's."""
        if directory is not None:
            raise GalleryIndexError("a Milvus gallery lives in its collection: save() takes no directory")
        self._call("flushing", self._client.flush, self.collection)
        return self.location

    compact = save

    def drop(self) -> None:
        """Delete the collection and everything in it."""
        self._call("dropping the collection", self._client.drop_collection, self.collection)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()

    # -- searching

    def _filter_columns(self) -> dict[str, np.dtype]:
        """The fields ``where`` takes: the schema's scalar fields and the primary key (metadata in
        the dynamic field is stored, not filtered on)."""
        fields = {name: np.dtype(np.int64) if kind == "int" else np.dtype("<U1") for name, kind in self._fields.items()}
        return {**fields, "key": np.dtype(np.int64)}

    def search(self, queries, k: int = 10, *, query_camids=None, exclude_same_camera: bool = False,
               threshold: float | str | None = None, where: Mapping[str, Any] | None = None,
               time_range: tuple[int | None, int | None] | None = None) -> SearchResult:
        """As :meth:`GalleryIndex.search <editor_reid.deploy.gallery.GalleryIndex.search>`, with
        every filter run by the server; ``k`` is at most 16384 (Milvus's limit)."""
        q = check_queries(queries, k, self.dim, self.normalized, self.location)
        if k > MAX_K:
            raise GalleryIndexError(f"k is at most {MAX_K} on the milvus backend (Milvus's limit), got {k}")
        nq = q.shape[0]
        threshold = threshold_value(threshold, self.thresholds)
        cams = _check_query_camids(query_camids, nq, exclude_same_camera)
        base = check_filters(where, time_range, self._filter_columns())
        distances = np.full((nq, k), np.inf, dtype=np.float32)
        entries = np.full((nq, k), -1, dtype=np.int64)
        fields = {"pid": np.full((nq, k), -1, dtype=np.int64), "camid": np.full((nq, k), -1, dtype=np.int64),
                  "row": np.full((nq, k), -1, dtype=np.int64)}
        groups: dict[int, np.ndarray] = {-1: np.arange(nq)}
        if cams is not None:
            groups = {int(c): np.flatnonzero(np.where(cams >= 0, cams, -1) == c) for c in np.unique(np.maximum(cams, -1))}
        metric_type = "IP" if self.normalized else "L2"
        params = {"nprobe": int(self.params["nprobe"])} if self.kind == "ivf" else (
            {"ef": int(max(self.params["ef_search"], k))} if self.kind == "hnsw" else {})
        for camera, rows in groups.items():
            expression = _expression([*base, *([("camid", "!=", [camera])] if camera >= 0 else [])])
            for start in range(0, rows.size, _SEARCH_BATCH):
                part = rows[start:start + _SEARCH_BATCH]
                hits = self._call("searching", self._client.search, self.collection, data=q[part], limit=int(k),
                                  filter=expression, anns_field="vector", output_fields=["pid", "camid", "row"],
                                  search_params={"metric_type": metric_type, "params": params})
                for r, found in zip(part.tolist(), hits):
                    for j, hit in enumerate(list(found)[:k]):
                        entity = hit.get("entity", {}) or {}
                        score = float(hit["distance"])
                        distances[r, j] = self._distance(score)
                        entries[r, j] = int(hit.get("key", hit.get("id")))
                        for name in fields:
                            fields[name][r, j] = int(entity.get(name, -1))
        fields["key"] = entries.copy()
        unknown = np.zeros(nq, dtype=bool) if threshold is None else ~(distances[:, 0] <= float(threshold))
        return SearchResult(distances, entries, unknown, fields)

    def _distance(self, score: float) -> float:
        if self.normalized:
            return 1.0 - score if self.metric == "cosine" else max(2.0 - 2.0 * score, 0.0)
        return max(score, 0.0)


def _read_info(described: Mapping, uri: str, collection: str) -> dict:
    properties = described.get("properties") or {}
    text = properties.get(PROPERTY)
    if text is None:
        raise MilvusError(f"collection '{collection}' at {uri} is not an editor-reid gallery (it has no "
                          f"'{PROPERTY}' property); choose another collection name")
    try:
        info = json.loads(text)
    except ValueError:
        raise MilvusError(f"collection '{collection}' at {uri}: its '{PROPERTY}' property is not JSON") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise MilvusError(f"collection '{collection}' at {uri} is not an editor-reid gallery ('{PROPERTY}' property "
                          "of another format)")
    if not isinstance(info.get("version"), int) or info["version"] > FORMAT_VERSION:
        raise MilvusError(f"collection '{collection}' at {uri} is gallery format version {info.get('version')}, this "
                          f"editor-reid reads up to {FORMAT_VERSION}: upgrade editor-reid")
    required = {"dim": int, "metric": str, "normalized": bool, "kind": str, "params": dict, "fingerprint": str,
                "thresholds": dict}
    bad = [key for key, kind in required.items() if not isinstance(info.get(key), kind)]
    if not bad:
        bad = [key for key, allowed in (("metric", METRICS), ("kind", MILVUS_KINDS[1:])) if info[key] not in allowed]
    if bad:
        raise MilvusError(f"collection '{collection}' at {uri}: its '{PROPERTY}' property is corrupt (bad or missing "
                          f"{', '.join(bad)})")
    return info


def _type_name(value) -> str:
    return getattr(value, "name", str(value))


def _check_schema(described: Mapping, info: dict, uri: str, collection: str) -> dict[str, str]:
    """The collection's scalar fields as name -> "int" / "text", after checking that the schema
    is a gallery's of the described width (MilvusError naming the field otherwise)."""
    fields = {f["name"]: f for f in described.get("fields", [])}
    modalities = canonical_order([*MODALITIES, *info.get("modalities", MODALITIES)])
    expected = {"key": "INT64", "vector": "FLOAT_VECTOR", **{name: "INT64" for name in _INT_FIELDS},
                **{name: "VARCHAR" for name in _TEXT_FIELDS}, **{path_key(m): "VARCHAR" for m in modalities}}
    for name, kind in expected.items():
        if name not in fields:
            raise MilvusError(f"collection '{collection}' at {uri} has no field '{name}' (schema mismatch: not a "
                              "gallery of this editor-reid)")
        found = _type_name(fields[name].get("type"))
        if found != kind:
            raise MilvusError(f"collection '{collection}' at {uri}: field '{name}' is {found}, a gallery's is {kind} "
                              "(schema mismatch)")
    if not fields["key"].get("is_primary"):
        raise MilvusError(f"collection '{collection}' at {uri}: field 'key' is not the primary key (schema mismatch)")
    dim = int((fields["vector"].get("params") or {}).get("dim", -1))
    if dim != info["dim"]:
        raise MilvusError(f"collection '{collection}' at {uri}: field 'vector' is {dim}-d, its description says "
                          f"{info['dim']}-d (schema mismatch)")
    return {name: ("int" if kind == "INT64" else "text") for name, kind in expected.items()
            if name not in ("key", "vector")}
