"""Verification TPR at fixed FPRs over all query-gallery pairs (fast-reid's ROC evaluation).

Pairs: every (query, gallery) pair left after the protocol's removal of same-pid-same-camera
(or same-scene) items. Same-pid pairs are positives, different-pid pairs negatives, and the
distance is the score. Like fast-reid, the ROC is the one ``sklearn.metrics.roc_curve`` builds
(one point per distinct score, collinear points dropped, an initial (0, 0) point) and the
reported TPR is that of the curve point whose FPR is nearest to the target.

``convention`` chooses what "positive" means:

* ``"verification"`` (default): accept a pair when its distance is at most the threshold; TPR =
  accepted same-pid pairs / same-pid pairs, FPR = accepted different-pid pairs / different-pid
  pairs. This is the usual reading of "TPR@FPR".
* ``"fastreid"``: fast-reid's code labels same-pid pairs 0 and different-pid pairs 1 and scores
  them by distance, so its "TPR" is the share of different-pid pairs *rejected* at the threshold
  where a share FPR of same-pid pairs is rejected. Use it to reproduce fast-reid's numbers.

Memory: all kept pair distances are gathered and sorted, O(Q * G).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._common import check_distances, query_gallery_labels, to_numpy

DEFAULT_FPRS = (1e-4, 1e-3, 1e-2)
CONVENTIONS = ("verification", "fastreid")


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of a binary ROC, scores higher = more positive, with sklearn's point set."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    y = labels[order].astype(np.int64)
    # One point per distinct score: the last index of each run of equal scores.
    last = np.concatenate((np.flatnonzero(np.diff(s)), [s.size - 1]))
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    if tps.size > 2:
        # Keep the first and last points and every corner; interior collinear points go.
        corner = np.logical_or(np.diff(fps, 2) != 0, np.diff(tps, 2) != 0)
        keep = np.concatenate(([True], corner, [True]))
        tps, fps = tps[keep], fps[keep]
    tps = np.concatenate(([0], tps))
    fps = np.concatenate(([0], fps))
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
        tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr


def pair_roc(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    *,
    q_sceneids: Any = None,
    g_sceneids: Any = None,
    protocol: str = "same_camera",
    convention: str = "verification",
) -> tuple[np.ndarray, np.ndarray]:
    """The ROC ``(fpr, tpr)`` over the kept query-gallery pairs of a [Q, G] distmat (see the
    module docstring for the pair set and ``convention``); NaN arrays when there is no positive
    or no negative pair."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    d = to_numpy(distmat, "distmat")
    if d.ndim != 2:
        raise ValueError(f"distmat must be 2-D [num_query, num_gallery], got shape {d.shape}")
    check_distances(d)
    qp, gp, qk, gk = query_gallery_labels(*d.shape, q_pids, g_pids, q_camids, g_camids, q_sceneids, g_sceneids,
                                          protocol)

    same = qp[:, None] == gp[None, :]  # [Q, G]
    kept = ~(same & (qk[:, None] == gk[None, :]))
    dist = d[kept].astype(np.float64)
    positive = same[kept]
    if convention == "verification":
        return roc_curve(positive, -dist)
    return roc_curve(~positive, dist)


def tpr_at_fpr(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    *,
    q_sceneids: Any = None,
    g_sceneids: Any = None,
    protocol: str = "same_camera",
    fprs: Sequence[float] = DEFAULT_FPRS,
    convention: str = "verification",
) -> dict[float, float]:
    """``{fpr: tpr}`` for each target FPR (default 1e-4, 1e-3, 1e-2) from a [Q, G] distmat.

    See the module docstring for the pair set, the ROC and ``convention``. Returns NaN TPRs when
    there is no positive or no negative pair (the ROC is undefined then).
    """
    fpr, tpr = pair_roc(distmat, q_pids, g_pids, q_camids, g_camids, q_sceneids=q_sceneids, g_sceneids=g_sceneids,
                        protocol=protocol, convention=convention)
    return {target: point_at(fpr, tpr, target) for target in fprs}


def point_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The TPR of the ROC point whose FPR is nearest to ``target`` (NaN for an undefined ROC)."""
    if not 0.0 <= float(target) <= 1.0:
        raise ValueError(f"target FPRs must lie in [0, 1], got {target!r}")
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return float("nan")
    return float(tpr[np.argmin(np.abs(fpr - target))])
