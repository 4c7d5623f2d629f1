"""Ranking metrics: mAP, CMC, mINP under the RGBNT201/RGBNT100/MSVR310 protocols.

Definitions (those of the official EDITOR evaluator and of fast-reid / torchreid):

* For a query, gallery items with the same pid **and** the same camera (``same_camera``) or the
  same scene (``same_scene``, MSVR310) are removed before ranking ("junk"). On RGBNT201 query =
  gallery, so this removes the query itself.
* The gallery is ranked by ascending distance; equal distances are broken by gallery index, i.e.
  the order of a stable sort. Results are therefore exactly reproducible.
* The remaining same-pid items are the relevant ones. A query with none is *skipped*: it counts in
  ``num_skipped_queries`` and in no average.
* AP = sum_k precision@k * rel_k / #rel.  CMC@k = fraction of valid queries whose first relevant
  item is within the top k.  INP = #rel / (rank of the last relevant item)  (AGW paper).

How it is fast: ranking a row in full costs O(G log G), but the metrics only need the rank of each
relevant item, i.e. how many kept items lie before it. Per row we cut the interval between the
easiest and the hardest relevant distance into K equal bins and histogram all gallery items into
them (one vectorised pass, no sort). Items in a bin below a relevant item's bin are before it,
items in a bin above are after it; only the few items that share a bin with a relevant item are
ordered exactly (a small lexicographic sort on (bin, distance, index)). The bin index is a monotone
function of the distance, so the result equals that of a full stable argsort, ties included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._common import check_distances, query_gallery_labels, to_numpy
from .distance import DEFAULT_CHUNK_SIZE, DistanceBlocks, check_chunk_size

# Rows ranked together: small enough that the [rows, G] scratch buffers stay cache-friendly.
_RANK_ROWS = 64

# Histogram bins per relevant item. More bins leave fewer items to order exactly (about G/64 per
# row at 64) at the price of a larger [rows, K] histogram.
_BINS_PER_RELEVANT = 64
# float32 holds every integer below 2**24 exactly; staying below 2**23 leaves rounding slack.
_EXACT_FLOAT_INT = 2**23


@dataclass
class _RowStats:
    """Per-query results of one chunk; rows without a relevant item have valid=False."""

    valid: np.ndarray  # [c] bool
    ap: np.ndarray  # [c] float64
    inp: np.ndarray  # [c] float64
    first_rank: np.ndarray  # [c] int64, 1-based rank of the first relevant item (0 if invalid)


class _GalleryIndex:
    """Gallery labels grouped by pid, plus scratch buffers reused by every chunk.

    Grouping turns "which gallery items share the query's pid" into a slice lookup, so no
    [rows, G] comparison is needed. Reusing the [rows, G] buffers matters: a fresh allocation of
    that size costs more in page faults than the arithmetic done on it.
    """

    def __init__(self, g_pids: np.ndarray, g_keys: np.ndarray):
        self.num_gallery = g_pids.shape[0]
        self.g_keys = g_keys
        # Stable, so each pid's slice lists gallery indices in increasing order.
        self.by_pid = np.argsort(g_pids, kind="stable")
        sorted_pids = g_pids[self.by_pid]
        self.pids, self.pid_start, self.pid_count = np.unique(
            sorted_pids, return_index=True, return_counts=True
        )
        self._rows = 0
        self._t = self._bins = self._hot = np.empty(0)

    def same_pid(self, q_pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, gallery index) of every same-pid pair, sorted by row then index."""
        if self.pids.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        at = np.minimum(np.searchsorted(self.pids, q_pids), self.pids.size - 1)
        count = np.where(self.pids[at] == q_pids, self.pid_count[at], 0)
        rows = np.repeat(np.arange(q_pids.shape[0]), count)
        offset = np.arange(rows.size) - np.repeat(np.cumsum(count) - count, count)
        cols = self.by_pid[np.repeat(self.pid_start[at], count) + offset]
        return rows, cols

    def buffers(self, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if rows > self._rows:
            n = rows * self.num_gallery
            self._t = np.empty(n, np.float32)
            self._bins = np.empty(n, np.int64)
            self._hot = np.empty(n, bool)
            self._rows = rows
        n = rows * self.num_gallery
        return self._t[:n], self._bins[:n], self._hot[:n]


def _bin_distance_key(bins: np.ndarray, d: np.ndarray) -> np.ndarray:
    """uint64 keys ordered like (bin, distance): bin in the high word, float bits in the low one.

    The float32 bit pattern is mapped to an unsigned integer with the same order (negative values
    bit-flipped); adding 0.0 first turns -0.0 into +0.0 so the two compare equal, as in a sort.
    """
    u = (d + np.float32(0.0)).view(np.uint32)
    ordered = np.where(u >= np.uint32(0x80000000), ~u, u | np.uint32(0x80000000))
    return (bins.astype(np.uint64) << np.uint64(32)) | ordered


def _relevant_and_junk(
    q_pids: np.ndarray, q_keys: np.ndarray, gallery: _GalleryIndex
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and flat index (row * G + gallery index) of every relevant item, sorted by (row,
    gallery index), and the flat indices of the junk items (same pid, same protocol key).

    Same-pid pairs are sparse (about G / #ids per row), so they are handled as coordinates.
    """
    num_g = gallery.num_gallery
    rows_m, cols_m = gallery.same_pid(q_pids)
    junk = gallery.g_keys[cols_m] == q_keys[rows_m]
    rows_p = rows_m[~junk]
    lin_p = rows_p * num_g + cols_m[~junk]
    lin_j = rows_m[junk] * num_g + cols_m[junk]
    return rows_p, lin_p, lin_j


def _assign_bins(
    dist: np.ndarray,
    lin_p: np.ndarray,
    lin_j: np.ndarray,
    n_rel: np.ndarray,
    row_start: np.ndarray,
    t: np.ndarray,
    bins: np.ndarray,
) -> int:
    """Write every item's global bin id (row * stride + bin) into ``bins`` (flat [c * G]) and
    return the stride; ``t`` is float32 scratch of the same size.

    Bin layout of a row: 0 = before the easiest relevant item, 1..K+1 = the [lo, hi] range of
    its relevant distances, K+2 = after the hardest one (its contents never matter, so junk goes
    there too). Only three properties are needed for exactness, and float32 rounding keeps all
    of them while row * stride + K + 3 < 2**23: the bin never decreases as the distance grows,
    bin 0 holds only items closer than lo, and no relevant item reaches bin K+2. A degenerate
    width (lo == hi, or so small that K / width overflows) gets scale 0: the row becomes one
    bin, ordered exactly (slow but correct).
    """
    c, num_g = dist.shape
    valid = n_rel > 0
    d_rel = dist.reshape(-1)[lin_p]
    lo = np.zeros(c, np.float32)
    hi = np.zeros(c, np.float32)
    lo[valid] = np.minimum.reduceat(d_rel, row_start[valid])
    hi[valid] = np.maximum.reduceat(d_rel, row_start[valid])
    n_bins = int(min(max(_BINS_PER_RELEVANT * int(n_rel.max()), 16), max(num_g, 16)))
    n_bins = min(n_bins, _EXACT_FLOAT_INT // c - 3)
    width = hi - lo
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        scale = (np.float32(n_bins) / width).astype(np.float32)
    scale[~np.isfinite(scale)] = 0.0
    stride = n_bins + 3
    t2 = t.reshape(c, num_g)
    np.subtract(dist, lo[:, None], out=t2)
    t2 *= scale[:, None]
    np.clip(t, -1.0, n_bins + 1, out=t)
    # Shift to [0, K+2] plus the row's offset, so truncation is floor and ids are global.
    t2 += (np.arange(c, dtype=np.float32) * stride + 1)[:, None]
    np.copyto(bins, t, casting="unsafe")
    bins[lin_j] = lin_j // num_g * stride + (n_bins + 2)  # junk never counts
    return stride


def _relevant_ranks(
    d_flat: np.ndarray, bins: np.ndarray, lin_p: np.ndarray, c: int, stride: int, hot_item: np.ndarray
) -> np.ndarray:
    """1-based rank among the kept items of each relevant item, in ``lin_p`` order.

    Kept items in the row's lower bins come before it (a histogram count); the items that
    share a bin with a relevant item are ordered exactly by (bin, distance, index).
    ``hot_item`` is bool scratch of ``bins``' size.
    """
    bin_rel = bins[lin_p]
    hist = np.bincount(bins, minlength=c * stride)
    in_bin = hist[bin_rel]
    np.cumsum(hist.reshape(c, stride), axis=1, out=hist.reshape(c, stride))
    before = hist[bin_rel] - in_bin

    hot_bin = np.zeros(c * stride, bool)
    hot_bin[bin_rel] = True
    np.take(hot_bin, bins, out=hot_item)
    lin_h = np.flatnonzero(hot_item)  # ascending, i.e. by (row, gallery index)
    bin_h = bins[lin_h]
    order = np.argsort(_bin_distance_key(bin_h, d_flat[lin_h]), kind="stable")
    bins_sorted = bin_h[order]
    pos = np.arange(order.size)
    group_start = np.maximum.accumulate(
        np.where(np.concatenate(([True], bins_sorted[1:] != bins_sorted[:-1])), pos, 0)
    )
    within = np.empty_like(pos)
    within[order] = pos - group_start
    return 1 + before + within[np.searchsorted(lin_h, lin_p)]


def _row_stats(rank: np.ndarray, rows_p: np.ndarray, n_rel: np.ndarray, row_start: np.ndarray) -> _RowStats:
    """AP, INP and first-hit rank per row from the ranks of its relevant items."""
    c = n_rel.shape[0]
    valid = n_rel > 0
    # Sort each row's relevant items by rank: the j-th one has precision j / rank.
    rank = rank[np.lexsort((rank, rows_p))]
    j = np.arange(rank.size) - np.repeat(row_start, n_rel) + 1
    ap = np.bincount(rows_p, weights=j / rank, minlength=c)
    ap[valid] /= n_rel[valid]
    first_rank = np.zeros(c, np.int64)
    first_rank[valid] = rank[row_start[valid]]
    last_rank = rank[row_start[valid] + n_rel[valid] - 1]
    inp = np.zeros(c)
    inp[valid] = n_rel[valid] / last_rank
    return _RowStats(valid=valid, ap=ap, inp=inp, first_rank=first_rank)


def _rank_rows(
    dist: np.ndarray, q_pids: np.ndarray, q_keys: np.ndarray, gallery: _GalleryIndex
) -> _RowStats:
    """AP / INP / first-hit rank of every query row of ``dist`` ([c, G] float32, C-contiguous)."""
    c, num_g = dist.shape
    zeros = _RowStats(
        valid=np.zeros(c, bool), ap=np.zeros(c), inp=np.zeros(c), first_rank=np.zeros(c, np.int64)
    )
    if c == 0 or num_g == 0:
        return zeros
    rows_p, lin_p, lin_j = _relevant_and_junk(q_pids, q_keys, gallery)
    if rows_p.size == 0:
        return zeros
    n_rel = np.bincount(rows_p, minlength=c)
    row_start = np.concatenate(([0], np.cumsum(n_rel)[:-1]))  # first relevant entry of each row
    t, bins, hot_item = gallery.buffers(c)
    stride = _assign_bins(dist, lin_p, lin_j, n_rel, row_start, t, bins)
    rank = _relevant_ranks(dist.reshape(-1), bins, lin_p, c, stride, hot_item)
    return _row_stats(rank, rows_p, n_rel, row_start)


class _Accumulator:
    """Collects per-query results over chunks and turns them into the metric dict.

    Per-query values are kept (Q floats) and summed once at the end, so the result does not
    depend on the chunking.
    """

    def __init__(self, max_rank: int, per_query: bool = False):
        self.max_rank = max_rank
        self.per_query = per_query
        self.query_aps: list[np.ndarray] = []  # every row's AP, NaN where skipped (per_query only)
        self.aps: list[np.ndarray] = []
        self.inps: list[np.ndarray] = []
        self.first_ranks: list[np.ndarray] = []
        self.num_skipped = 0

    def add(self, s: _RowStats) -> None:
        self.aps.append(s.ap[s.valid])
        self.inps.append(s.inp[s.valid])
        self.first_ranks.append(s.first_rank[s.valid])
        self.num_skipped += int((~s.valid).sum())
        if self.per_query:
            self.query_aps.append(np.where(s.valid, s.ap, np.nan))

    def result(self) -> dict[str, Any]:
        first = np.concatenate(self.first_ranks) if self.first_ranks else np.zeros(0, np.int64)
        n = int(first.size)
        if n == 0:
            cmc = np.zeros(self.max_rank)
            hit = lambda k: 0.0  # noqa: E731
        else:
            counts = np.bincount(np.minimum(first, self.max_rank + 1), minlength=self.max_rank + 2)
            cmc = np.cumsum(counts[1 : self.max_rank + 1]) / n
            hit = lambda k: float(np.count_nonzero(first <= k)) / n  # noqa: E731
        out = {
            "mAP": float(np.concatenate(self.aps).sum() / n) if n else 0.0,
            "mINP": float(np.concatenate(self.inps).sum() / n) if n else 0.0,
            "cmc": cmc,
            "rank1": hit(1),
            "rank5": hit(5),
            "rank10": hit(10),
            "num_valid_queries": n,
            "num_skipped_queries": self.num_skipped,
        }
        if self.per_query:
            out["query_ap"] = np.concatenate(self.query_aps) if self.query_aps else np.zeros(0)
        return out


def _rank_block(
    dist: np.ndarray,
    q_pids: np.ndarray,
    q_keys: np.ndarray,
    gallery: _GalleryIndex,
    acc: _Accumulator,
) -> None:
    for s in range(0, dist.shape[0], _RANK_ROWS):
        e = s + _RANK_ROWS
        acc.add(_rank_rows(dist[s:e], q_pids[s:e], q_keys[s:e], gallery))


def _check_max_rank(max_rank: int) -> int:
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    return int(max_rank)


def evaluate_rank(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    *,
    q_sceneids: Any = None,
    g_sceneids: Any = None,
    protocol: str = "same_camera",
    max_rank: int = 50,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    per_query: bool = False,
) -> dict[str, Any]:
    """mAP / CMC / mINP of a [Q, G] distance matrix (NumPy array or torch tensor).

    Returns a dict: ``mAP``, ``mINP`` (floats in [0, 1]), ``cmc`` (float64 array of length
    ``max_rank``; ``cmc[k-1]`` is Rank-k), ``rank1``, ``rank5``, ``rank10`` (floats, computed
    even when ``max_rank < 10``), ``num_valid_queries`` and ``num_skipped_queries`` (queries with
    no relevant item left after the protocol's removal). With no valid query every metric is 0
    and ``num_valid_queries`` is 0; nothing raises.

    When the gallery has fewer than ``max_rank`` items the CMC is still ``max_rank`` long: Rank-k
    for k beyond the gallery equals the last reachable value (padding with the last value, which
    is what "hit within the top k" means there).

    ``protocol``: ``"same_camera"`` (RGBNT201, RGBNT100, Market1501-MM) or ``"same_scene"``
    (MSVR310; needs ``q_sceneids`` and ``g_sceneids``). Distances must be finite. Rows are
    processed ``chunk_size`` at a time; float32 inputs are not copied.

    ``per_query=True`` adds ``query_ap``: float64 [Q], the AP of every query row, NaN for the
    skipped ones (their mean over the valid rows is ``mAP``).
    """
    max_rank = _check_max_rank(max_rank)
    chunk_size = check_chunk_size(chunk_size)
    d = to_numpy(distmat, "distmat")
    if d.ndim != 2:
        raise ValueError(f"distmat must be 2-D [num_query, num_gallery], got shape {d.shape}")
    num_q, num_g = d.shape
    qp, gp, qk, gk = query_gallery_labels(
        num_q, num_g, q_pids, g_pids, q_camids, g_camids, q_sceneids, g_sceneids, protocol
    )
    acc = _Accumulator(max_rank, per_query)
    gallery = _GalleryIndex(gp, gk)
    for start in range(0, num_q, chunk_size):
        stop = min(start + chunk_size, num_q)
        block = np.ascontiguousarray(d[start:stop], dtype=np.float32)
        check_distances(block)
        _rank_block(block, qp[start:stop], qk[start:stop], gallery, acc)
    return acc.result()


def evaluate_features(
    qf: Any,
    gf: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    *,
    q_sceneids: Any = None,
    g_sceneids: Any = None,
    protocol: str = "same_camera",
    metric: str = "euclidean",
    normalize: bool = True,
    max_rank: int = 50,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    per_query: bool = False,
) -> dict[str, Any]:
    """`evaluate_rank` straight from features, never holding the full distance matrix.

    Distances (see `pairwise_distance` for ``metric`` / ``normalize``) are computed for
    ``chunk_size`` queries at a time and ranked at once, so peak memory is the features plus a
    few ``chunk_size x G`` buffers (about 20 bytes per entry at most). The result equals
    ``evaluate_rank(pairwise_distance(qf, gf, metric, normalize, chunk_size), ...)`` exactly.
    """
    max_rank = _check_max_rank(max_rank)
    chunk_size = check_chunk_size(chunk_size)
    blocks = DistanceBlocks(qf, gf, metric, normalize)
    qp, gp, qk, gk = query_gallery_labels(
        blocks.num_query,
        blocks.num_gallery,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        q_sceneids,
        g_sceneids,
        protocol,
    )
    acc = _Accumulator(max_rank, per_query)
    gallery = _GalleryIndex(gp, gk)
    for start, stop, block in blocks.chunks(chunk_size):
        check_distances(block, "distances computed from qf/gf")
        _rank_block(block, qp[start:stop], qk[start:stop], gallery, acc)
    return acc.result()
