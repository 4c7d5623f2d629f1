"""Optional post-processing: k-reciprocal re-ranking and alpha query expansion.

Neither is part of the official EDITOR protocol (``TEST.RE_RANKING: 'no'``); both are offered as
switches. They follow the well-known formulations:

* `re_ranking`: Zhong et al., "Re-ranking Person Re-identification with k-reciprocal Encoding",
  CVPR 2017, as in their released code and TransReID's copy (which EDITOR vendors, unused).
* `query_expansion`: alpha query expansion as in fast-reid's ``aqe``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from ._common import check_distances, to_numpy
from .distance import as_features, check_chunk_size

# Default ceiling on (Q+G)^2 float32 entries for re-ranking: 2**30 entries = 4 GiB, i.e. about
# 32,000 images in total. Raise it explicitly for larger sets if the memory is there.
DEFAULT_MAX_RERANK_ENTRIES = 2**30


def _stable_topk(rows: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest entries of each row, ascending, ties by index."""
    return np.argsort(rows, axis=1, kind="stable")[:, :k]


def _reciprocal_sets(neighbours: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """[N, k+1] bool: is neighbours[i, a] a k-reciprocal neighbour of i (i in its top k+1)?"""
    n = neighbours.shape[0]
    fwd = neighbours[:, : k + 1]
    out = np.empty(fwd.shape, bool)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        back = fwd[fwd[s:e]]  # [c, k+1, k+1]: forward lists of each forward neighbour
        out[s:e] = (back == np.arange(s, e)[:, None, None]).any(axis=2)
    return out


def _check_inputs(
    q_g: Any, q_q: Any, g_g: Any, k1: int, k2: int, lambda_value: float, max_entries: int, chunk_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The three distance blocks as arrays and the chunk size, after every argument check of
    `re_ranking`."""
    qg = to_numpy(q_g, "q_g")
    qq = to_numpy(q_q, "q_q")
    gg = to_numpy(g_g, "g_g")
    if qg.ndim != 2:
        raise ValueError(f"q_g must be 2-D [Q, G], got shape {qg.shape}")
    nq, ng = qg.shape
    if qq.shape != (nq, nq) or gg.shape != (ng, ng):
        raise ValueError(
            f"re_ranking needs q_q [{nq}, {nq}] and g_g [{ng}, {ng}] for q_g [{nq}, {ng}]; "
            f"got q_q {qq.shape} and g_g {gg.shape}"
        )
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must lie in [0, 1], got {lambda_value}")
    chunk_size = check_chunk_size(chunk_size)
    n = nq + ng
    if n * n > max_entries:
        raise ValueError(
            f"re_ranking on {nq} queries + {ng} gallery needs a {n} x {n} float32 matrix "
            f"({n * n * 4 / 2**30:.1f} GiB), above max_entries={max_entries} "
            f"({max_entries * 4 / 2**30:.1f} GiB); raise max_entries if the memory is there"
        )
    for name, block in (("q_g", qg), ("q_q", qq), ("g_g", gg)):
        check_distances(block, name)
    return qg, qq, gg, chunk_size


def _joint_distance(qg: np.ndarray, qq: np.ndarray, gg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stacked [[q_q, q_g], [q_g^T, g_g]] matrix ([N, N] float32, N = Q + G), each row
    divided by its maximum, and those maxima ([N, 1])."""
    nq, n = qg.shape[0], qg.shape[0] + gg.shape[0]
    dist = np.empty((n, n), np.float32)
    dist[:nq, :nq] = qq
    dist[:nq, nq:] = qg
    dist[nq:, :nq] = qg.T
    dist[nq:, nq:] = gg
    row_max = dist.max(axis=1, keepdims=True)
    row_max[row_max == 0] = 1.0  # an all-zero row stays zero instead of becoming NaN
    dist /= row_max
    return dist, row_max


def _neighbour_lists(dist: np.ndarray, width: int, chunk_size: int) -> np.ndarray:
    """[N, width] indices of each row's nearest items, ascending (the row itself first)."""
    n = dist.shape[0]
    neighbours = np.empty((n, width), np.int64)
    for s in range(0, n, chunk_size):
        neighbours[s : s + chunk_size] = _stable_topk(dist[s : s + chunk_size], width)
    return neighbours


class _Encoding(NamedTuple):
    """A sparse [N, N] k-reciprocal encoding: V[rows[i], cols[i]] = vals[i], sorted by row."""

    rows: np.ndarray  # int64
    cols: np.ndarray  # int64
    vals: np.ndarray  # float64


def _k_reciprocal_encoding(dist: np.ndarray, neighbours: np.ndarray, k1: int, chunk_size: int) -> _Encoding:
    """V_i: weights exp(-d(i, j)) over the expanded k-reciprocal set of i, summing to 1.

    The set starts as R(i, k1), the forward neighbours of i that also have i in their own top
    k1+1; each c in R(i, k1) adds its R(c, k1/2) when more than 2/3 of that lies in R(i, k1).
    """
    n = dist.shape[0]
    k1c, khc = min(k1, n - 1), min(int(np.around(k1 / 2.0)), n - 1)
    recip = _reciprocal_sets(neighbours, k1c)  # [N, k1+1]
    recip_half = _reciprocal_sets(neighbours, khc)  # [N, k_half+1]
    fwd, fwd_half = neighbours[:, : k1c + 1], neighbours[:, : khc + 1]
    rows_v, cols_v, vals_v = [], [], []
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        c = e - s
        base = np.where(recip[s:e], fwd[s:e], -1)  # [c, k1+1], -1 = not in R(i, k1)
        cand_sets = np.where(recip_half[fwd[s:e]], fwd_half[fwd[s:e]], -2)  # [c, k1+1, kh+1]
        in_base = (cand_sets[:, :, :, None] == base[:, None, None, :]).any(axis=3)
        size = (cand_sets >= 0).sum(axis=2)
        accept = (in_base.sum(axis=2) > 2.0 / 3.0 * size) & (base >= 0)
        extra = np.where(accept[:, :, None], cand_sets, -1).reshape(c, -1)
        members = np.concatenate([base, extra], axis=1)
        members = np.sort(members, axis=1)
        first = np.concatenate(
            [np.ones((c, 1), bool), members[:, 1:] != members[:, :-1]], axis=1
        ) & (members >= 0)
        r, j = np.nonzero(first)
        cols = members[r, j]
        w = np.exp(-dist[s + r, cols].astype(np.float64))
        w /= np.bincount(r, weights=w, minlength=c)[r]
        rows_v.append(s + r)
        cols_v.append(cols)
        vals_v.append(w)
    return _Encoding(np.concatenate(rows_v), np.concatenate(cols_v), np.concatenate(vals_v))


def _local_query_expansion(v: _Encoding, neighbours: np.ndarray, k2: int) -> _Encoding:
    """V_i <- the mean of V over i's k2 nearest neighbours (i included), kept sparse."""
    n = neighbours.shape[0]
    row_ptr = np.concatenate(([0], np.cumsum(np.bincount(v.rows, minlength=n))))
    src = neighbours[:, :k2].reshape(-1)
    dst = np.repeat(np.arange(n), k2)
    counts = row_ptr[src + 1] - row_ptr[src]
    take = np.repeat(row_ptr[src], counts) + (
        np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    )
    key = np.repeat(dst, counts) * n + v.cols[take]
    uniq, inv = np.unique(key, return_inverse=True)
    return _Encoding(uniq // n, uniq % n, np.bincount(inv, weights=v.vals[take]) / k2)


def _jaccard_distance(
    v: _Encoding, nq: int, ng: int, chunk_size: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Jaccard distance 1 - m / (2 - m), m = sum_k min(V_ik, V_jk), of the query rows i < nq
    against the gallery rows j >= nq: yields (start, stop, [stop - start, G] float64) for each
    chunk of queries, visiting only the columns k where V_i is non-zero."""
    n = nq + ng
    by_col = np.lexsort((v.rows, v.cols))
    c_rows, c_vals = v.rows[by_col], v.vals[by_col]
    col_ptr = np.concatenate(([0], np.cumsum(np.bincount(v.cols, minlength=n))))
    is_gal = c_rows >= nq
    q_sel = v.rows < nq
    qr, qc, qv = v.rows[q_sel], v.cols[q_sel], v.vals[q_sel]
    q_ptr = np.concatenate(([0], np.cumsum(np.bincount(qr, minlength=nq))))
    for s in range(0, nq, chunk_size):
        e = min(s + chunk_size, nq)
        lo, hi = q_ptr[s], q_ptr[e]
        r, k, val = qr[lo:hi] - s, qc[lo:hi], qv[lo:hi]
        cnt = col_ptr[k + 1] - col_ptr[k]
        offset = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        at = np.repeat(col_ptr[k], cnt) + offset  # gallery-or-query rows sharing column k
        keep = is_gal[at]
        at = at[keep]
        rr = np.repeat(r, cnt)[keep]
        mins = np.minimum(np.repeat(val, cnt)[keep], c_vals[at])
        m = np.bincount(rr * ng + (c_rows[at] - nq), weights=mins, minlength=(e - s) * ng)
        m = m.reshape(e - s, ng)
        yield s, e, 1.0 - m / (2.0 - m)


def re_ranking(
    q_g: Any,
    q_q: Any,
    g_g: Any,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    max_entries: int = DEFAULT_MAX_RERANK_ENTRIES,
    chunk_size: int = 256,
) -> np.ndarray:
    """k-reciprocal re-ranked [Q, G] distances from the q_g [Q, G], q_q [Q, Q], g_g [G, G] blocks.

    final = (1 - lambda) * Jaccard(k-reciprocal sets) + lambda * original, where each row of the
    stacked [[q_q, q_g], [q_g^T, g_g]] matrix is divided by its maximum. Distances are used as
    given: pass this package's squared Euclidean (as TransReID / EDITOR do); Zhong et al.'s code
    squares plain Euclidean distances first. Neighbour lists break ties by index, and the
    encoding vectors are float64 (the reference code uses float16, which moves results ~1e-3).

    Memory: the stacked matrix is (Q+G)^2 float32; above ``max_entries`` entries a ValueError is
    raised instead of running out of memory. Everything else is sparse, O((Q+G) * k1 * k2), plus
    ``chunk_size x (Q+G)`` temporaries; time is O((Q+G)^2 log(Q+G)).
    """
    qg, qq, gg, chunk_size = _check_inputs(q_g, q_q, g_g, k1, k2, lambda_value, max_entries, chunk_size)
    nq, ng = qg.shape
    dist, row_max = _joint_distance(qg, qq, gg)
    neighbours = _neighbour_lists(dist, min(max(k1 + 1, k2), nq + ng), chunk_size)
    encoding = _k_reciprocal_encoding(dist, neighbours, k1, chunk_size)
    del dist  # the largest buffer; the Jaccard step needs only the sparse encoding
    if k2 != 1:
        encoding = _local_query_expansion(encoding, neighbours, k2)
    final = np.empty((nq, ng), np.float32)
    for s, e, jaccard in _jaccard_distance(encoding, nq, ng, chunk_size):
        orig = qg[s:e].astype(np.float64) / row_max[s:e]
        final[s:e] = jaccard * (1.0 - lambda_value) + orig * lambda_value
    return final


def query_expansion(
    qf: Any,
    gf: Any,
    qe_k: int = 5,
    alpha: float = 3.0,
    qe_times: int = 1,
    *,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alpha query expansion (fast-reid ``aqe``) of query and gallery features together.

    Each feature becomes the mean of ``f_j * sim_ij ** alpha`` over its ``qe_k`` most similar
    features j of the joint query+gallery set (itself included), with cosine similarities of the
    L2-normalised features; repeated ``qe_times`` times. The results are returned unnormalised,
    as fast-reid does; the evaluation's ``normalize`` switch decides. Neighbours break ties by
    index. For a non-integer alpha, negative similarities are clamped at 0 (a negative base has no
    real power). Memory: the features plus a ``chunk_size x (Q+G)`` similarity block.
    """
    q = as_features(qf, "qf")
    g = as_features(gf, "gf")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"qf and gf disagree on feature size: {q.shape[1]} vs {g.shape[1]}")
    if qe_k < 1 or qe_times < 1:
        raise ValueError(f"qe_k and qe_times must be >= 1, got qe_k={qe_k}, qe_times={qe_times}")
    chunk_size = check_chunk_size(chunk_size)
    feats = torch.cat([q, g]).to(torch.float64)
    n = feats.shape[0]
    k = min(qe_k, n)
    integer_alpha = float(alpha).is_integer()
    for _ in range(qe_times):
        unit = torch.nn.functional.normalize(feats, dim=1)
        out = torch.empty_like(feats)
        for s in range(0, n, chunk_size):
            sims = unit[s : s + chunk_size] @ unit.T  # [c, N]
            top = torch.from_numpy(_stable_topk(-sims.numpy(), k))  # [c, k]
            w = sims.gather(1, top)
            if not integer_alpha:
                w = w.clamp_min(0.0)
            w = w.pow(alpha)
            out[s : s + chunk_size] = (feats[top] * w[:, :, None]).mean(dim=1)
        feats = out
    return feats[: q.shape[0]].to(torch.float32), feats[q.shape[0] :].to(torch.float32)
