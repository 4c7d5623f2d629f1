"""Open-set thresholds: the distance below which a gallery match is trusted, chosen at a target FPR.

A search always returns the nearest gallery items, even for an object the gallery has never
seen. A threshold on the distance turns "nearest" into "known or unknown": a query whose best
match lies farther than the threshold is *unknown*. It is chosen on a labelled split
(``calibrate``) from two sets of pair distances:

* **pairs**: every (query, gallery) pair that the evaluation protocol keeps, as
  :mod:`editor_reid.metrics` defines it: a gallery item of the query's pid **and** camera
  (``same_camera``) or scene (``same_scene``) is removed, so a query is never matched with its
  own image or a near-copy from the same camera;
* **genuine** pairs have the same pid (cross-camera matches), **impostor** pairs different pids.

A pair is *accepted* when its distance is at most the threshold ``t``. FPR(t) is the share of
impostor pairs accepted, TPR(t) the share of genuine pairs accepted. For a target FPR ``f`` and
``N`` impostor pairs, at most ``k = floor(f * N)`` impostor pairs may be accepted. Let
``s_1 <= s_2 <= ... <= s_N`` be the impostor distances; the threshold is the largest impostor
distance that accepts at most ``k`` of them:

    t = max { s_j : j <= k and s_j < s_(k+1) }

so ties never push the FPR above ``f``: when ``s_k == s_(k+1)`` the whole tied run is rejected
and fewer than ``k`` impostors are accepted. When the first ``k + 1`` distances are all equal, no
impostor distance qualifies and ``t`` is the largest float32 below ``s_1`` (nothing accepted).
The point (FPR(t), TPR(t)) lies on the ROC of :func:`editor_reid.metrics.tpr_at_fpr`, but the
choice differs: ``tpr_at_fpr`` reports the ROC corner *nearest* the target (fast-reid's rule),
which may lie above it or at a lower TPR; a threshold here never exceeds the target FPR. A
target with ``f * N < 1`` cannot be measured on the split (an FPR of 1e-4 needs 10,000 impostor
pairs): it is an error that names the count needed.

Distances are those of the gallery index (:mod:`editor_reid.deploy.gallery`), computed by
:mod:`editor_reid.metrics.distance` on L2-normalised features: ``euclidean`` is the squared
Euclidean distance (``2 - 2 cos``, what ``editor-reid test`` ranks by), ``cosine`` is
``1 - cos``. A threshold belongs to one metric and one model (its fingerprint).

Memory: distances are computed ``chunk_size`` queries at a time. All genuine distances are kept
(about Q * G / #identities), and of the impostor distances only the smallest
``floor(max(f) * N) + 1``: 4 MB for a 10k x 10k split at FPR 1e-2 (the whole calibration of
such a split, 2304-d, takes about 10 s and 100 MB beyond the features on 2 CPU cores).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from editor_reid.errors import EditorReidError, UsageError
from editor_reid.fileio import write_json_atomically

__all__ = ["ThresholdError", "ThresholdPoint", "Calibration", "PairDistances", "DEFAULT_FPRS", "fpr_key",
           "parse_fprs", "pair_distances", "select_thresholds", "calibrate_distances", "calibrate_features",
           "calibrate_feature_file", "run_calibrate", "load_thresholds", "lookup_threshold", "check_compatible"]

DEFAULT_FPRS = (1e-2, 1e-3)
METRICS = ("euclidean", "cosine")
THRESHOLDS_FORMAT = "editor-reid/thresholds"


class ThresholdError(EditorReidError, ValueError):
    """A threshold cannot be chosen or found: too few pairs, an uncalibrated FPR, a thresholds
    file of another metric or model."""


def fpr_key(fpr: float) -> str:
    """The key of an FPR in a thresholds file or an index manifest: ``repr(float(fpr))``
    (``"0.01"``, ``"0.001"``, ``"1e-05"``)."""
    return repr(float(fpr))


def parse_fprs(text: str | Iterable[float]) -> tuple[float, ...]:
    """``"1e-2,1e-3"`` (or numbers) -> (0.01, 0.001); each must lie in (0, 1). Duplicates go."""
    items = [item.strip() for item in text.split(",")] if isinstance(text, str) else list(text)
    out: list[float] = []
    for item in items:
        if item == "":
            continue
        try:
            value = float(item)
        except (TypeError, ValueError):
            value = math.nan
        if not 0.0 < value < 1.0:
            raise UsageError(f"an FPR must be a number in (0, 1), e.g. 1e-3; got {item!r}")
        if value not in out:
            out.append(value)
    if not out:
        raise UsageError(f"expected comma-separated FPRs in (0, 1), e.g. 1e-2,1e-3; got {text!r}")
    return tuple(out)


def _allowed_impostors(fpr: float, num_impostor: int) -> int:
    """floor(fpr * N), where a product within float rounding of a whole number is that number:
    0.29 * 100 is 29, not 28.999..., and (17 / N) * N is 17."""
    product = float(fpr) * num_impostor
    nearest = round(product)
    return int(nearest) if abs(product - nearest) <= 1e-9 * max(1.0, product) else math.floor(product)


def _needed_impostors(fpr: float) -> int:
    """The smallest N with floor(fpr * N) >= 1 (by the rule of :func:`_allowed_impostors`)."""
    n = max(1, math.floor(1 / float(fpr)))
    while _allowed_impostors(fpr, n) < 1:
        n += 1
    while n > 1 and _allowed_impostors(fpr, n - 1) >= 1:
        n -= 1
    return n


# ------------------------------------------------------------------------------ pairs


@dataclass
class PairDistances:
    """The distances of a split's pairs: every genuine one, and the smallest impostor ones."""

    genuine: np.ndarray  # float32 [num_genuine], sorted
    impostor: np.ndarray  # float32 [<= num_impostor], sorted: the smallest impostor distances
    num_impostor: int  # all impostor pairs, kept or not

    @property
    def num_genuine(self) -> int:
        return int(self.genuine.size)


def _impostor_count(qp: np.ndarray, gp: np.ndarray) -> int:
    """Pairs with different pids, from the labels alone: Q * G minus the same-pid pairs."""
    pids, counts = np.unique(gp, return_counts=True)
    at = np.minimum(np.searchsorted(pids, qp), max(pids.size - 1, 0))
    same = np.where(pids[at] == qp, counts[at], 0) if pids.size else np.zeros_like(qp)
    return int(qp.size * gp.size - same.sum())


def _keep_for(fprs: Sequence[float], num_impostor: int) -> int:
    """How many of the smallest impostor distances the thresholds of ``fprs`` need: s_1..s_(k+1)."""
    return min(max(_allowed_impostors(f, num_impostor) for f in fprs) + 1, num_impostor)


def pair_distances(blocks: Iterable[tuple[int, int, np.ndarray]], q_pids: Any, g_pids: Any, q_camids: Any,
                   g_camids: Any, *, q_sceneids: Any = None, g_sceneids: Any = None, protocol: str = "same_camera",
                   keep_impostors: int | None = None) -> PairDistances:
    """Split the pairs of a distance matrix, given as row blocks ``(start, stop, [stop-start, G])``,
    into genuine and impostor distances under ``protocol`` (see the module docstring). Only the
    ``keep_impostors`` smallest impostor distances are kept (all when None)."""
    # editor_reid.metrics imports torch: reading a thresholds file for a search should not.
    from editor_reid.metrics._common import as_ids, check_distances, junk_keys

    qp, gp = as_ids(q_pids, "q_pids"), as_ids(g_pids, "g_pids")
    qc, gc = as_ids(q_camids, "q_camids", qp.size), as_ids(g_camids, "g_camids", gp.size)
    qk, gk = junk_keys(protocol, qc, gc, q_sceneids, g_sceneids)
    num_impostor = _impostor_count(qp, gp)
    keep = num_impostor if keep_impostors is None else min(int(keep_impostors), num_impostor)
    genuine: list[np.ndarray] = []
    best = np.zeros(0, np.float32)  # the smallest impostor distances so far, at most ``keep``
    for start, stop, block in blocks:
        if block.shape != (stop - start, gp.size):
            raise ValueError(f"distance block of rows {start}:{stop} has shape {block.shape}, expected "
                             f"({stop - start}, {gp.size})")
        check_distances(block)
        same = qp[start:stop, None] == gp[None, :]  # [c, G]
        genuine.append(block[same & (qk[start:stop, None] != gk[None, :])].astype(np.float32))
        if keep == 0:
            continue
        impostor = block[~same].astype(np.float32, copy=False)
        if best.size == keep:
            impostor = impostor[impostor < best.max()]
        candidates = np.concatenate((best, impostor))
        if candidates.size > keep:
            candidates = np.partition(candidates, keep - 1)[:keep]
        best = candidates
    return PairDistances(genuine=np.sort(np.concatenate(genuine)) if genuine else np.zeros(0, np.float32),
                         impostor=np.sort(best), num_impostor=num_impostor)


# ------------------------------------------------------------------------------ thresholds


@dataclass
class ThresholdPoint:
    """One row of a calibration: the threshold of a target FPR and what it achieves."""

    fpr: float  # the target
    threshold: float  # accept a pair when distance <= threshold
    tpr: float  # genuine pairs accepted / genuine pairs
    measured_fpr: float  # impostor pairs accepted / impostor pairs (<= fpr)


def select_thresholds(genuine: Any, impostor: Any, fprs: Sequence[float] = DEFAULT_FPRS, *,
                      num_impostor: int | None = None) -> list[ThresholdPoint]:
    """The threshold, TPR and measured FPR of each target in ``fprs`` (see the module docstring
    for the rule), from genuine and impostor pair distances. ``impostor`` may hold only the
    smallest impostor distances when ``num_impostor`` gives how many there are in all.

    Raises ThresholdError when there is no genuine pair, or too few impostor pairs for a target
    (``f * N < 1``)."""
    gen = np.sort(np.asarray(genuine, dtype=np.float32).reshape(-1))
    imp = np.sort(np.asarray(impostor, dtype=np.float32).reshape(-1))
    total = imp.size if num_impostor is None else int(num_impostor)
    if total < imp.size:
        raise ValueError(f"num_impostor={total} is smaller than the {imp.size} impostor distances given")
    if gen.size == 0:
        raise ThresholdError("no genuine pair (same identity, another camera under the protocol) to measure a TPR "
                             "on; calibrate needs identities seen by at least two cameras")
    points = []
    for f in parse_fprs(fprs):
        k = _allowed_impostors(f, total)
        if k < 1:
            raise ThresholdError(f"FPR {f:g} needs at least {_needed_impostors(f)} impostor pairs (different "
                                 f"identities) to be measured, the split has {total}; use a larger split or a "
                                 "larger FPR")
        if k >= imp.size:  # k < N since f < 1: only a truncated list can fall short
            raise ValueError(f"FPR {f:g} needs the {k + 1} smallest impostor distances, only {imp.size} were given")
        j = int(np.searchsorted(imp, imp[k], side="left"))  # impostors strictly below s_(k+1)
        t = imp[j - 1] if j > 0 else np.nextafter(imp[0], np.float32(-np.inf))
        accepted = int(np.searchsorted(imp, t, side="right"))
        points.append(ThresholdPoint(fpr=f, threshold=float(t), tpr=int(np.searchsorted(gen, t, side="right")) / gen.size,
                                     measured_fpr=accepted / total))
    return points


@dataclass
class Calibration:
    """The thresholds of a split, with what they were measured on; ``to_json`` is the file."""

    metric: str
    protocol: str
    points: list[ThresholdPoint]
    num_genuine: int
    num_impostor: int
    num_query: int = 0
    num_gallery: int = 0
    fingerprint: str = ""
    source: str = ""

    @property
    def thresholds(self) -> dict[str, float]:
        """FPR key (:func:`fpr_key`) -> threshold, the form ``GalleryIndex.set_thresholds`` takes."""
        return {fpr_key(p.fpr): p.threshold for p in self.points}

    def to_json(self) -> dict:
        return {
            "format": THRESHOLDS_FORMAT,
            "version": 1,
            "metric": self.metric,
            "fingerprint": self.fingerprint,
            "thresholds": self.thresholds,
            "tpr": {fpr_key(p.fpr): p.tpr for p in self.points},
            "measured_fpr": {fpr_key(p.fpr): p.measured_fpr for p in self.points},
            "pairs": {"genuine": self.num_genuine, "impostor": self.num_impostor},
            "protocol": self.protocol,
            "rows": {"query": self.num_query, "gallery": self.num_gallery},
            "source": self.source,
        }

    def table(self) -> str:
        """The fixed-width table ``calibrate`` prints."""
        head = ("FPR", "threshold", "TPR", "measured FPR", "genuine pairs", "impostor pairs")
        rows = [(f"{p.fpr:g}", f"{p.threshold:.6g}", f"{100 * p.tpr:.2f}%", f"{p.measured_fpr:.3g}",
                 str(self.num_genuine), str(self.num_impostor)) for p in self.points]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
        return "\n".join([line(head), "-" * len(line(head)), *map(line, rows)])


def calibrate_distances(distmat: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any, *,
                        q_sceneids: Any = None, g_sceneids: Any = None, protocol: str = "same_camera",
                        fprs: Sequence[float] = DEFAULT_FPRS, metric: str = "euclidean") -> Calibration:
    """Thresholds from a ready [Q, G] distance matrix (``metric`` only labels the result)."""
    from editor_reid.metrics._common import to_numpy

    d = to_numpy(distmat, "distmat")
    if d.ndim != 2:
        raise ValueError(f"distmat must be 2-D [num_query, num_gallery], got shape {d.shape}")
    return _calibrate(iter([(0, d.shape[0], d)]), q_pids, g_pids, q_camids, g_camids, q_sceneids, g_sceneids,
                      protocol, fprs, metric, d.shape)


def calibrate_features(qf: Any, gf: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any, *,
                       q_sceneids: Any = None, g_sceneids: Any = None, protocol: str = "same_camera",
                       fprs: Sequence[float] = DEFAULT_FPRS, metric: str = "euclidean",
                       chunk_size: int = 256) -> Calibration:
    """Thresholds from query and gallery features [Q, D] / [G, D], L2-normalised here, their
    distances computed ``chunk_size`` queries at a time (see the module docstring)."""
    from editor_reid.metrics.distance import DistanceBlocks, check_chunk_size

    if metric not in METRICS:
        raise UsageError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    blocks = DistanceBlocks(qf, gf, metric, normalize=True)
    chunks = blocks.chunks(check_chunk_size(chunk_size))
    return _calibrate(chunks, q_pids, g_pids, q_camids, g_camids, q_sceneids, g_sceneids, protocol, fprs, metric,
                      (blocks.num_query, blocks.num_gallery))


def _calibrate(blocks: Iterator, q_pids, g_pids, q_camids, g_camids, q_sceneids, g_sceneids, protocol, fprs,
               metric, shape) -> Calibration:
    from editor_reid.metrics._common import as_ids

    fprs = parse_fprs(fprs)
    qp, gp = as_ids(q_pids, "q_pids", shape[0]), as_ids(g_pids, "g_pids", shape[1])
    num_impostor = _impostor_count(qp, gp)
    for f in fprs:  # before any distance is computed
        if _allowed_impostors(f, num_impostor) < 1:
            raise ThresholdError(f"FPR {f:g} needs at least {_needed_impostors(f)} impostor pairs (different "
                                 f"identities) to be measured, the split has {num_impostor} ({shape[0]} queries x "
                                 f"{shape[1]} gallery items); use a larger split or a larger FPR")
    pairs = pair_distances(blocks, qp, gp, q_camids, g_camids, q_sceneids=q_sceneids, g_sceneids=g_sceneids,
                           protocol=protocol, keep_impostors=_keep_for(fprs, num_impostor))
    points = select_thresholds(pairs.genuine, pairs.impostor, fprs, num_impostor=pairs.num_impostor)
    return Calibration(metric=metric, protocol=protocol, points=points, num_genuine=pairs.num_genuine,
                       num_impostor=pairs.num_impostor, num_query=shape[0], num_gallery=shape[1])


def calibrate_feature_file(ff, *, fprs: Sequence[float] = DEFAULT_FPRS, metric: str = "euclidean",
                           chunk_size: int = 256, name: str = "the feature file") -> Calibration:
    """Thresholds from a :class:`~editor_reid.features.store.FeatureFile`: its ``query`` rows
    against its ``gallery`` rows, under its protocol, every row labelled (pid >= 0)."""
    parts = {}
    for split in ("query", "gallery"):
        rows = ff.select(ff.split == split)
        if not len(rows):
            found = ", ".join(repr(str(s)) for s in np.unique(ff.split)) or "none"
            raise ThresholdError(f"{name} has no rows with split '{split}' (its splits: {found}); calibrate "
                                 "measures the query rows against the gallery rows of a labelled split")
        unlabelled = int((rows.pid < 0).sum())
        if unlabelled:
            raise ThresholdError(f"{name}: {unlabelled} {split} row(s) have pid -1 (no identity, e.g. from "
                                 "extract --images); calibrate needs labelled query and gallery rows")
        if ff.protocol == "same_scene" and (rows.sceneid < 0).any():
            raise ThresholdError(f"{name}: protocol same_scene needs the sceneid of every {split} row, but "
                                 f"{int((rows.sceneid < 0).sum())} have -1")
        parts[split] = rows
    q, g = parts["query"], parts["gallery"]
    cal = calibrate_features(q.features, g.features, q.pid, g.pid, q.camid, g.camid, q_sceneids=q.sceneid,
                             g_sceneids=g.sceneid, protocol=ff.protocol, fprs=fprs, metric=metric,
                             chunk_size=chunk_size)
    cal.fingerprint = ff.fingerprint
    return cal


# ------------------------------------------------------------------------------ files


def _write_json(path: Path, value) -> None:
    write_json_atomically(path, value, indent=2)


def load_thresholds(path: str | Path) -> dict:
    """Read a thresholds file that ``calibrate --out`` wrote; ThresholdError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ThresholdError(f"thresholds file '{path}' is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("thresholds"), dict) or "metric" not in data:
        raise ThresholdError(f"thresholds file '{path}' lacks 'metric' or 'thresholds'; write one with "
                             "editor-reid calibrate --out")
    try:
        data["thresholds"] = {fpr_key(float(k)): float(v) for k, v in data["thresholds"].items()}
    except (TypeError, ValueError):
        raise ThresholdError(f"thresholds file '{path}': 'thresholds' must map FPRs to distances") from None
    return data


def lookup_threshold(thresholds: dict[str, float], fpr: float, where: str) -> float:
    """The threshold calibrated for ``fpr`` in ``thresholds`` (FPR key -> distance); a missing
    one is a ThresholdError that lists the calibrated FPRs."""
    for key, value in thresholds.items():
        if math.isclose(float(key), float(fpr), rel_tol=1e-9, abs_tol=0.0):
            return float(value)
    have = ", ".join(sorted(thresholds, key=float)) or "none"
    raise ThresholdError(f"no threshold calibrated for FPR {float(fpr):g} in {where} (calibrated FPRs: {have}); "
                         f"run editor-reid calibrate --fpr {float(fpr):g}, or pass --threshold T")


def check_compatible(metric: str, fingerprint: str, *, index_metric: str, index_fingerprint: str,
                     what: str, index_dir: str | Path) -> None:
    """Refuse thresholds of another metric or another model than the index's."""
    if metric != index_metric:
        raise ThresholdError(f"{what} holds {metric} distances but index '{index_dir}' uses {index_metric}; "
                             f"calibrate with --metric {index_metric}")
    if fingerprint and index_fingerprint and fingerprint != index_fingerprint:
        raise ThresholdError(f"{what} is from model {fingerprint[:12]}, index '{index_dir}' holds features of model "
                             f"{index_fingerprint[:12]}; thresholds hold only for the model they were measured on")


# ------------------------------------------------------------------------------ the command


def run_calibrate(*, fprs: Sequence[float] = DEFAULT_FPRS, metric: str | None = None,
                  features: str | Path | None = None, weights: str | Path | None = None,
                  config: Any = None, dataset: str | None = None, root: str | Path | None = None,
                  manifest: str | Path | None = None, device: str | None = None, out: str | Path | None = None,
                  index: str | Path | None = None, chunk_size: int = 256, quiet: bool = False,
                  backend: str | None = None, uri: str | None = None) -> Calibration:
    """``editor-reid calibrate``: thresholds from a feature file's query/gallery rows, or from
    the query and gallery splits of ``dataset``/``manifest`` extracted with ``weights``.
    Writes them to ``out`` (JSON, :meth:`Calibration.to_json`) and/or into the manifest of the
    gallery index ``index`` (whose metric is the default; another metric or model is refused).
    Prints the table unless ``quiet``; returns the calibration."""
    if out is None and index is None:
        raise UsageError("calibrate needs somewhere to put the thresholds: --out thresholds.json and/or "
                         "--index INDEX_DIR")
    fprs = parse_fprs(fprs)
    gallery = None
    if index is not None:
        from editor_reid.deploy.gallery import gallery_name, open_gallery

        gallery = open_gallery(index, backend=backend, uri=uri)
        index = gallery_name(gallery, index)
        if metric is None:
            metric = gallery.metric
    metric = metric or "euclidean"
    if metric not in METRICS:
        raise UsageError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if gallery is not None and metric != gallery.metric:
        raise ThresholdError(f"--metric {metric} differs from the metric of index '{index}' ({gallery.metric}); "
                             "thresholds are distances in the index's metric")

    from editor_reid.deploy._inputs import load_or_extract

    ff, source = load_or_extract(features=features, weights=weights, config=config, dataset=dataset, root=root,
                                 manifest=manifest, device=device, splits=("query", "gallery"), command="calibrate")
    if gallery is not None:
        check_compatible(metric, ff.fingerprint, index_metric=gallery.metric,
                         index_fingerprint=gallery.fingerprint, what=source, index_dir=index)
    cal = calibrate_feature_file(ff, fprs=fprs, metric=metric, chunk_size=chunk_size, name=source)
    cal.source = source
    if out is not None:
        _write_json(Path(out), cal.to_json())
    if gallery is not None:  # written into the index's manifest at once
        gallery.set_thresholds(cal.thresholds, source=source)
    if not quiet:
        print(f"calibrate: {cal.num_query} query x {cal.num_gallery} gallery rows of {source}, protocol "
              f"{cal.protocol}, {metric} distance")
        print(cal.table())
        where = [f"'{out}'"] if out is not None else []
        if gallery is not None:
            where += [f"the description of Milvus collection '{gallery.collection}' at {gallery.uri}"
                      if gallery.backend == "milvus" else f"the manifest of index '{index}'"]
        print(f"calibrate: wrote the thresholds to {' and '.join(where)}")
    return cal
