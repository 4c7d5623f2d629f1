"""Query-gallery distances, computed in query chunks so memory stays bounded.

Conventions (shared with `evaluate_features` and the re-ranking helpers):

* ``metric="euclidean"`` is the **squared** Euclidean distance ``|q|^2 + |g|^2 - 2 q.g``, as the
  official EDITOR / TransReID evaluator computes it. It ranks exactly like the true Euclidean
  distance (sqrt is monotone) and saves a square root per entry. Values are clamped at 0 because
  cancellation can make near-duplicates slightly negative.
* ``metric="cosine"`` is ``1 - cos(q, g)``; it is scale-invariant, so ``normalize`` changes nothing.
* ``normalize=True`` L2-normalises every feature first (the official protocol: with it the squared
  Euclidean distance equals ``2 - 2 cos``). It is applied by rescaling the dot products with the
  inverse norms, so no normalised copy of a large gallery is ever made.

Everything is float32, like the features; one chunk of distances is ``chunk_size x G x 4`` bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ._common import to_numpy

METRICS = ("euclidean", "cosine")
DEFAULT_CHUNK_SIZE = 256

_EPS = 1e-12  # norm floor, so an all-zero feature gives finite distances instead of NaN


def as_features(x: Any, name: str) -> torch.Tensor:
    """[N, D] float32 CPU tensor, sharing memory with a float32 NumPy input."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu", torch.float32)
    else:
        a = to_numpy(x, name)
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] feature matrix, got shape {tuple(t.shape)}")
    return t


class DistanceBlocks:
    """Produces rows of the query-gallery distance matrix, chunk by chunk.

    Holds only the two feature matrices and their norms; each call to `block` allocates one
    [rows, G] float32 result.
    """

    def __init__(self, qf: Any, gf: Any, metric: str = "euclidean", normalize: bool = True):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.qf = as_features(qf, "qf")
        self.gf = as_features(gf, "gf")
        if self.qf.shape[1] != self.gf.shape[1]:
            raise ValueError(
                f"qf and gf disagree on feature size: {self.qf.shape[1]} vs {self.gf.shape[1]}"
            )
        self.metric = metric
        self.normalize = bool(normalize)
        self.num_query = self.qf.shape[0]
        self.num_gallery = self.gf.shape[0]
        g_sq = (self.gf * self.gf).sum(dim=1)  # [G]
        q_sq = (self.qf * self.qf).sum(dim=1)  # [Q]
        if metric == "cosine" or self.normalize:
            self._g_inv = g_sq.sqrt().clamp_min(_EPS).reciprocal()
            self._q_inv = q_sq.sqrt().clamp_min(_EPS).reciprocal()
        else:
            self._g_sq, self._q_sq = g_sq, q_sq

    def block(self, start: int, stop: int) -> np.ndarray:
        """Distances of queries [start, stop) to the whole gallery: [stop-start, G] float32."""
        dot = self.qf[start:stop] @ self.gf.T  # [c, G]
        if self.metric == "cosine" or self.normalize:
            dot.mul_(self._q_inv[start:stop, None]).mul_(self._g_inv[None, :])  # cosine
            if self.metric == "cosine":
                dist = dot.neg_().add_(1.0)
            else:
                dist = dot.mul_(-2.0).add_(2.0)
        else:
            dist = dot.mul_(-2.0).add_(self._q_sq[start:stop, None]).add_(self._g_sq[None, :])
        if self.metric == "euclidean":
            dist.clamp_min_(0.0)
        return dist.numpy()

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, int, np.ndarray]]:
        for start in range(0, self.num_query, chunk_size):
            stop = min(start + chunk_size, self.num_query)
            yield start, stop, self.block(start, stop)


def check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def pairwise_distance(
    qf: Any,
    gf: Any,
    metric: str = "euclidean",
    normalize: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> np.ndarray:
    """[Q, G] float32 distance matrix between query features qf [Q, D] and gallery gf [G, D].

    See the module docstring for the metric conventions. Peak memory is the result plus one
    ``chunk_size x G`` block; to rank a query set whose full matrix would not fit, use
    `evaluate_features`, which never materialises it.
    """
    chunk_size = check_chunk_size(chunk_size)
    blocks = DistanceBlocks(qf, gf, metric, normalize)
    out = np.empty((blocks.num_query, blocks.num_gallery), dtype=np.float32)
    for start, stop, dist in blocks.chunks(chunk_size):
        out[start:stop] = dist
    return out
