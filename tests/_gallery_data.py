"""Synthetic gallery features shared by the gallery tests of both backends."""

from __future__ import annotations

import numpy as np


def gaussian(n: int, seed: int, dim: int) -> np.ndarray:
    """``n`` float32 rows of standard normal noise."""
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def clustered(n: int, seed: int, dim: int = 64, clusters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Gallery views of ``clusters`` identities and 50 fresh query views of them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    gallery = centres[np.arange(n) % clusters] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    queries = centres[rng.integers(0, clusters, 50)] + 0.5 * rng.standard_normal((50, dim)).astype(np.float32)
    return gallery, queries
