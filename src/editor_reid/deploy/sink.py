"""``extract --to-gallery``: the extracted gallery rows go into a gallery as the extraction runs.

:func:`gallery_sink` makes the sink :func:`~editor_reid.features.extract.run_extract` calls:

* **Milvus** (``--uri``): rank 0 opens the collection, or creates it for the model's width and
  fingerprint; then every process (every torchrun rank) upserts the gallery rows of each chunk it
  computes, as soon as the chunk is saved. The entries' primary keys are their sample keys
  (:func:`~editor_reid.deploy.gallery.sample_keys`), so a rerun after an interruption writes
  the chunks it computes plus the rows of finished chunks the collection lacks (a process killed
  between saving a chunk and writing it), and never a second copy of a sample.
* **FAISS** (an index directory): one process writes an index directory, so rank 0 adds the
  merged file's gallery rows at the end (building the index if the directory holds none),
  skipping samples the index holds already. An existing index of another width or model is
  refused before the extraction starts.

The rows that go in are the gallery split's when the input has one, else every row (a folder of
images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from editor_reid.deploy.gallery import GalleryIndex, _metadata_of, check_backend
from editor_reid.engine import distributed as du
from editor_reid.errors import EditorReidError, UsageError
from editor_reid.features.store import FeatureFile

__all__ = ["gallery_sink", "MilvusSink", "FaissSink"]


def gallery_sink(index: str, *, uri: str | None = None):
    """The sink of ``extract --to-gallery INDEX [--uri URI]``."""
    if check_backend(None, uri) == "milvus":
        return MilvusSink(str(index), str(uri))
    return FaissSink(Path(index))


def _gallery_rows(ff: FeatureFile, has_gallery: bool) -> np.ndarray:
    return np.flatnonzero(ff.split == "gallery") if has_gallery else np.arange(len(ff))


def _verdict(ctx: du.DistContext, work) -> None:
    """Run ``work`` on rank 0 and raise its one-line error on every rank."""
    problem = None
    if ctx.is_main:
        try:
            work()
        except (EditorReidError, OSError) as exc:
            if not ctx.distributed:
                raise
            problem = (type(exc).__name__, str(exc))
    problem = du.broadcast_object(ctx, problem)
    if problem:
        raise (UsageError if problem[0] == "UsageError" else EditorReidError)(problem[1])


class MilvusSink:
    """Every process writes its own chunks' gallery rows to a Milvus collection (module docstring)."""

    def __init__(self, collection: str, uri: str) -> None:
        from editor_reid.deploy.milvus import check_collection_name

        self.collection = check_collection_name(collection)
        self.uri = uri
        self.gallery = None
        self.has_gallery = True
        self.written = 0

    def open(self, ctx: du.DistContext, *, dim: int, fingerprint: str, modalities, count: int,
             has_gallery: bool) -> None:
        from editor_reid.deploy.milvus import MilvusGallery, is_lite

        if ctx.distributed and ctx.world_size > 1 and is_lite(self.uri):
            raise UsageError(f"a Milvus Lite file ('{self.uri}') is opened by one process; under torchrun start "
                             f"'milvus-lite server --data-dir {self.uri} --port 19530' and pass --uri "
                             "http://127.0.0.1:19530")
        self.has_gallery = has_gallery

        def open_or_create() -> None:
            MilvusGallery.open_or_create(self.uri, self.collection, dim=dim, fingerprint=fingerprint,
                                         modalities=modalities, size=count)

        _verdict(ctx, open_or_create)
        self.gallery = MilvusGallery.open(self.uri, self.collection)

    def chunk(self, ff: FeatureFile, rows: np.ndarray, *, resumed: bool) -> None:
        """Write the gallery rows of a chunk (``rows``: its rows in the output file); for a chunk
        finished by an earlier run, only those the collection lacks."""
        keep = _gallery_rows(ff, self.has_gallery)
        if not keep.size:
            return
        part = ff.select(keep)
        metadata = _metadata_of(part, rows[keep])
        if resumed:
            from editor_reid.deploy.gallery import entry_columns

            keys = entry_columns(metadata, len(part), part.features, fingerprint=ff.fingerprint,
                                 normalize=self.gallery.normalized)["key"]
            lacking = np.flatnonzero(~self.gallery.existing_keys(keys))
            if not lacking.size:
                return
            part, metadata = part.select(lacking), {name: value[lacking] for name, value in metadata.items()}
        self.gallery.add(part, metadata, fingerprint=ff.fingerprint)
        self.written += len(part)

    def finished(self, ctx: du.DistContext, *, quiet: bool) -> None:
        if ctx.distributed and not quiet:
            print(f"extract: rank {ctx.rank} of {ctx.world_size} wrote {self.written} gallery rows to Milvus "
                  f"collection '{self.collection}'", flush=True)

    def merged(self, ff: FeatureFile, *, quiet: bool) -> None:
        if not quiet:
            print(f"extract: the gallery rows are in Milvus collection '{self.collection}' at {self.uri} "
                  f"({self.gallery.size} entries)")


class FaissSink:
    """Rank 0 adds the merged gallery rows to an index directory (module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.has_gallery = True

    def open(self, ctx: du.DistContext, *, dim: int, fingerprint: str, modalities, count: int,
             has_gallery: bool) -> None:
        self.has_gallery = has_gallery

        def check() -> None:
            if (self.directory / "manifest.json").is_file():
                GalleryIndex.load(self.directory)._check_compatible(dim, fingerprint, "the model gives")
            elif self.directory.exists() and (not self.directory.is_dir() or any(self.directory.iterdir())):
                raise UsageError(f"--to-gallery '{self.directory}' exists and holds no gallery index; give an index "
                                 "directory or a new path")

        _verdict(ctx, check)

    def chunk(self, ff: FeatureFile, rows: np.ndarray, *, resumed: bool) -> None:
        """Nothing: one process writes an index directory, at the end."""

    def finished(self, ctx: du.DistContext, *, quiet: bool) -> None:
        """Nothing: rank 0 writes the index once the file is merged."""

    def merged(self, ff: FeatureFile, *, quiet: bool) -> None:
        rows = _gallery_rows(ff, self.has_gallery)
        part = ff.select(rows)
        if (self.directory / "manifest.json").is_file():
            index = GalleryIndex.load(self.directory)
            before = index.size
            index.add(part, _metadata_of(part, rows), fingerprint=ff.fingerprint, skip_existing=True)
            added = index.size - before
        else:
            index = GalleryIndex.build(part, _metadata_of(part, rows))
            index.save(self.directory)
            added = index.size
        if not quiet:
            print(f"extract: added {added} of {len(rows)} gallery rows to index '{self.directory}' "
                  f"({index.size} entries)")
