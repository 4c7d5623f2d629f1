"""``editor-reid search``: the nearest gallery items of every query, and whether it is known at all.

The queries are the rows of a feature file (all of them, or those of some splits), or samples
extracted on the spot with a checkpoint (:mod:`editor_reid.deploy._inputs`). They are searched in
a saved :class:`~editor_reid.deploy.gallery.GalleryIndex`, which refuses features of another model
(fingerprint) or width. With an open-set threshold (a distance, or the one ``calibrate`` chose
for a false-positive rate), a query whose best match is farther than the threshold is
*unknown* (docs/open-set.md).

The result is a JSON list, one object per query, in query order::

    {"query": 3,                    # the query's row in its feature file (or in the extracted input)
     "pid": 12, "camid": 0,         # the query's labels (-1 when unknown), for convenience
     "split": "query", "paths": {"RGB": "...", "NI": "...", "TI": "..."},
     "unknown": false,              # best distance > threshold (always false without a threshold)
     "matches": [{"gallery": 7, "pid": 12, "camid": 2, "row": 41, "distance": 0.61}, ...]}  # best first

``gallery`` is the match's index entry (0, 1, 2, ... in the order entries were added), ``row``
its row in the feature file it was indexed from (-1 for an entry added otherwise), as
:meth:`~editor_reid.deploy.gallery.SearchResult.to_json` writes them; ``distance`` is in the
index's metric (squared Euclidean or 1 - cosine on L2-normalised features). Fewer than ``k``
matches come back when the gallery (or, with ``exclude_same_camera``, its other cameras) has fewer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from editor_reid.deploy.thresholds import check_compatible, load_thresholds, lookup_threshold
from editor_reid.errors import EditorReidError, UsageError
from editor_reid.fileio import write_json_atomically
from editor_reid.modalities import MODALITIES

__all__ = ["run_search", "resolve_threshold", "query_rows"]


def resolve_threshold(index, index_dir: str | Path, *, threshold: float | None = None, fpr: float | None = None,
                      thresholds: str | Path | None = None) -> float | None:
    """The open-set distance threshold of a search: ``threshold`` itself, or the one calibrated for
    ``fpr`` in the index's manifest or in the ``thresholds`` file (checked against the index's
    metric and model); None for a closed-set search."""
    if threshold is not None and fpr is not None:
        raise UsageError("give --threshold or --fpr, not both: each sets the open-set distance threshold")
    if thresholds is not None and fpr is None:
        raise UsageError("--thresholds goes with --fpr: it holds the thresholds of calibrated false-positive rates")
    if fpr is None:
        return None if threshold is None else float(threshold)
    if thresholds is not None:
        data = load_thresholds(thresholds)
        check_compatible(str(data["metric"]), str(data.get("fingerprint") or ""), index_metric=index.metric,
                         index_fingerprint=index.fingerprint, what=f"thresholds file '{thresholds}'",
                         index_dir=index_dir)
        return lookup_threshold(data["thresholds"], fpr, f"'{thresholds}'")
    return lookup_threshold(dict(index.thresholds or {}), fpr, f"the manifest of index '{index_dir}'")


def query_rows(ff, splits: Sequence[str] | None, name: str) -> np.ndarray:
    """The row numbers of ``ff`` to search with: all, or those of ``splits``."""
    if splits is None:
        rows = np.arange(len(ff))
    else:
        rows = np.flatnonzero(np.isin(ff.split, list(splits)))
    if rows.size == 0:
        found = ", ".join(repr(str(s)) for s in np.unique(ff.split)) or "none"
        what = "no rows" if splits is None else f"no rows with split {', '.join(splits)} (its splits: {found})"
        raise EditorReidError(f"{name} has {what}; nothing to search with")
    return rows


def _write_json(path: Path, value) -> None:
    write_json_atomically(path, value, indent=1)


def run_search(index: str | Path, out: str | Path | None, *, features: str | Path | None = None,
               weights: str | Path | None = None, config: Any = None, dataset: str | None = None,
               root: str | Path | None = None, manifest: str | Path | None = None, images: str | Path | None = None,
               splits: Sequence[str] | None = None, device: str | None = None, k: int = 10,
               exclude_same_camera: bool = False, threshold: float | None = None, fpr: float | None = None,
               thresholds: str | Path | None = None, quiet: bool = False, backend: str | None = None,
               uri: str | None = None, where: dict | None = None,
               time_range: tuple[int | None, int | None] | None = None) -> list[dict]:
    """Search the gallery ``index`` (an index directory, or with ``backend="milvus"`` a collection
    at ``uri``) with the queries of a feature file (``features``, all rows or ``splits``) or of an
    input extracted with ``weights`` (``dataset``/``manifest``: the ``splits``, default query;
    ``images``), keeping only the gallery items ``where`` and ``time_range`` allow
    (:func:`~editor_reid.deploy.gallery.check_filters`). Writes the result list (module
    docstring) to ``out`` unless None, prints a summary unless ``quiet``, and returns the list."""
    from editor_reid.deploy._inputs import load_or_extract
    from editor_reid.deploy.gallery import GalleryIndexError, gallery_name, open_gallery

    if k < 1:
        raise UsageError(f"-k must be at least 1, got {k}")
    gallery = open_gallery(index, backend=backend, uri=uri)
    index = gallery_name(gallery, index)
    limit = resolve_threshold(gallery, index, threshold=threshold, fpr=fpr, thresholds=thresholds)
    extract_splits = tuple(splits) if splits is not None else ("query",)
    ff, source = load_or_extract(features=features, weights=weights, config=config, dataset=dataset, root=root,
                                 manifest=manifest, images=images, device=device, splits=extract_splits,
                                 command="search")
    rows = query_rows(ff, splits if features is not None else None, source)
    if ff.fingerprint and gallery.fingerprint and ff.fingerprint != gallery.fingerprint:
        raise GalleryIndexError(f"the queries of {source} come from model {ff.fingerprint[:12]}, index '{index}' "
                                f"holds features of model {gallery.fingerprint[:12]}: features of different models "
                                "are not comparable")
    if ff.features.shape[1] != gallery.dim:
        raise GalleryIndexError(f"the queries of {source} are {ff.features.shape[1]}-d, index '{index}' holds "
                                f"{gallery.dim}-d features: search with features of the model the index was built "
                                "with")
    camids = ff.camid[rows]
    result = gallery.search(ff.features[rows], k=k, query_camids=camids, exclude_same_camera=exclude_same_camera,
                            threshold=limit, where=where, time_range=time_range)
    items = result.to_json()
    for item, row in zip(items, rows.tolist()):
        item["query"] = row
        item["pid"] = int(ff.pid[row])
        item["camid"] = int(ff.camid[row])
        item["split"] = str(ff.split[row])
        item["paths"] = {m: str(ff.paths[m][row]) for m in MODALITIES if m in ff.paths and str(ff.paths[m][row])}
        # Readers see the query first, then its verdict and matches.
        for key in ("unknown", "matches"):
            item[key] = item.pop(key)
    if out is not None:
        _write_json(Path(out), items)
    if not quiet:
        unknown = sum(item["unknown"] for item in items)
        how = ("closed set, no threshold" if limit is None else
               f"threshold {limit:.6g}" + (f" (FPR {fpr:g})" if fpr is not None else ""))
        wrote = f", wrote '{out}'" if out is not None else ""
        kept = ", other cameras only" if exclude_same_camera else ""
        for column, values in (where or {}).items():
            values = values if isinstance(values, (list, tuple)) else [values]
            kept += f", {column} in {','.join(str(v) for v in values)}"
        if time_range:
            bounds = [f"{time_range[0]} <= timestamp" if time_range[0] is not None else "",
                      f"timestamp < {time_range[1]}" if time_range[1] is not None else ""]
            kept += ", " + " and ".join(b for b in bounds if b)
        print(f"search: {len(items)} queries of {source} in index '{index}' ({gallery.size} items, {gallery.metric}), "
              f"k={k}{kept}; {unknown} unknown ({how}){wrote}")
    return items
