"""Input coercion and protocol handling shared by the metric functions.

Every public metric accepts NumPy arrays, torch tensors (any device) or plain sequences;
they are converted once here so the algorithms only ever see NumPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

PROTOCOLS = ("same_camera", "same_scene")


def to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - message only
        raise TypeError(f"{name}: cannot convert {type(x).__name__} to an array ({exc})") from exc


def as_ids(x: Any, name: str, length: int | None = None) -> np.ndarray:
    """1-D int64 identity / camera / scene labels, with the length checked."""
    a = to_numpy(x, name)
    if a.ndim > 1 and a.size == max(a.shape):
        a = a.reshape(-1)  # a column or row vector, e.g. [N, 1] from a collate
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(a.shape)}")
    if a.size and not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_)):
        if not np.all(np.asarray(a, dtype=np.float64) == np.round(np.asarray(a, dtype=np.float64))):
            raise ValueError(f"{name} must hold integer labels, got dtype {a.dtype} with fractions")
    a = a.astype(np.int64, copy=False)
    if length is not None and a.shape[0] != length:
        raise ValueError(f"{name} has {a.shape[0]} entries but {length} were expected")
    return a


def junk_keys(
    protocol: str,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    q_sceneids: Any,
    g_sceneids: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """The per-item key that, together with an equal pid, removes a gallery item for a query.

    same_camera (RGBNT201, RGBNT100, Market1501-MM): the camera id;
    same_scene  (MSVR310): the scene id, whatever the camera.
    """
    if protocol == "same_camera":
        return q_camids, g_camids
    if protocol == "same_scene":
        if q_sceneids is None or g_sceneids is None:
            raise ValueError(
                "protocol='same_scene' (MSVR310) needs q_sceneids and g_sceneids; "
                f"got q_sceneids={'None' if q_sceneids is None else 'given'}, "
                f"g_sceneids={'None' if g_sceneids is None else 'given'}"
            )
        return (
            as_ids(q_sceneids, "q_sceneids", q_camids.shape[0]),
            as_ids(g_sceneids, "g_sceneids", g_camids.shape[0]),
        )
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def query_gallery_labels(num_q: int, num_g: int, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
                         q_sceneids: Any, g_sceneids: Any, protocol: str):
    """The checked pids of query and gallery and their junk keys under ``protocol``
    (:func:`junk_keys`): ``(q_pids, g_pids, q_keys, g_keys)`` as int64 arrays."""
    qp = as_ids(q_pids, "q_pids", num_q)
    gp = as_ids(g_pids, "g_pids", num_g)
    qc = as_ids(q_camids, "q_camids", num_q)
    gc = as_ids(g_camids, "g_camids", num_g)
    qk, gk = junk_keys(protocol, qc, gc, q_sceneids, g_sceneids)
    return qp, gp, qk, gk


def check_distances(d: np.ndarray, name: str = "distmat") -> None:
    # min/max propagate NaN and expose +-inf without allocating a [Q, G] mask.
    if d.size and not (np.isfinite(d.min()) and np.isfinite(d.max())):
        bad = np.argwhere(~np.isfinite(d))[0]
        raise ValueError(
            f"{name} holds a non-finite value at {tuple(int(i) for i in bad)} "
            f"({d[tuple(bad)]!r}); distances must be finite"
        )
