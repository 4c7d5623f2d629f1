"""Tests for editor_reid.metrics: ranking metrics, protocols, distances, ROC."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from editor_reid.metrics import (
    evaluate_features,
    evaluate_rank,
    pairwise_distance,
    tpr_at_fpr,
)
from editor_reid.metrics.roc import roc_curve


# --- the slowest, most obvious implementation: one query at a time, full stable sort ----------
def slow_metrics(dist, q_pids, g_pids, q_keys, g_keys, max_rank):
    aps, inps, firsts = [], [], []
    skipped = 0
    for i in range(dist.shape[0]):
        order = sorted(range(dist.shape[1]), key=lambda j: (dist[i, j], j))
        kept = [j for j in order if not (g_pids[j] == q_pids[i] and g_keys[j] == q_keys[i])]
        rel = [g_pids[j] == q_pids[i] for j in kept]
        if not any(rel):
            skipped += 1
            continue
        hits, ap = 0, 0.0
        for k, r in enumerate(rel, start=1):
            if r:
                hits += 1
                ap += hits / k
                last = k
        aps.append(ap / hits)
        inps.append(hits / last)
        firsts.append(rel.index(True) + 1)
    n = len(aps)
    cmc = np.array([sum(f <= k for f in firsts) / n if n else 0.0 for k in range(1, max_rank + 1)])
    return {
        "mAP": float(np.mean(aps)) if n else 0.0,
        "mINP": float(np.mean(inps)) if n else 0.0,
        "cmc": cmc,
        "num_valid_queries": n,
        "num_skipped_queries": skipped,
    }


def assert_same(fast, slow, tol=1e-12):
    assert fast["num_valid_queries"] == slow["num_valid_queries"]
    assert fast["num_skipped_queries"] == slow["num_skipped_queries"]
    assert fast["mAP"] == pytest.approx(slow["mAP"], abs=tol)
    assert fast["mINP"] == pytest.approx(slow["mINP"], abs=tol)
    np.testing.assert_allclose(fast["cmc"], slow["cmc"], atol=tol)


# --- hand-computed cases --------------------------------------------------------------------
def test_hand_case_same_camera():
    # One query (pid 1, cam 0). Gallery ranked by distance: g0 (pid 1, cam 0: junk),
    # g1 (pid 2), g2 (pid 1, cam 1), g3 (pid 3), g4 (pid 1, cam 2).
    d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]], np.float32)
    res = evaluate_rank(d, [1], [1, 2, 1, 3, 1], [0], [0, 0, 1, 0, 2], max_rank=5)
    # Kept ranking: g1 (miss), g2 (hit @2), g3 (miss), g4 (hit @4).
    assert res["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert res["mINP"] == pytest.approx(2 / 4)
    np.testing.assert_allclose(res["cmc"], [0, 1, 1, 1, 1])
    assert res["rank1"] == 0.0 and res["rank5"] == 1.0 and res["rank10"] == 1.0
    assert res["num_valid_queries"] == 1 and res["num_skipped_queries"] == 0
    assert isinstance(res["cmc"], np.ndarray) and res["cmc"].shape == (5,)


def test_hand_case_same_scene_ignores_camera():
    # MSVR310: same pid + same scene is removed even from another camera; same pid in another
    # scene is kept even from the same camera.
    d = np.array([[0.1, 0.2, 0.3]], np.float32)
    g_pids, g_cams, g_scenes = [5, 5, 7], [1, 0, 0], [9, 4, 9]
    res = evaluate_rank(
        d, [5], g_pids, [0], g_cams, q_sceneids=[9], g_sceneids=g_scenes, protocol="same_scene",
        max_rank=3,
    )
    # g0 removed (scene 9), g1 kept although camera 0 = query camera -> hit at rank 1.
    assert res["mAP"] == 1.0 and res["rank1"] == 1.0
    # Under same_camera, g1 would be the junk one and g0 the hit.
    res_cam = evaluate_rank(d, [5], g_pids, [0], g_cams, max_rank=3)
    assert res_cam["rank1"] == 1.0
    res_cam = evaluate_rank(d, [5], g_pids, [1], g_cams, max_rank=3)  # query cam 1: g0 junk
    assert res_cam["mAP"] == pytest.approx(1 / 1) and res_cam["cmc"][0] == 1.0
    res_cam = evaluate_rank(d[:, ::-1].copy(), [5], g_pids, [1], g_cams, max_rank=3)
    # distances 0.3, 0.2, 0.1 -> g2 (miss) first, then g1 (hit @2); g0 removed
    assert res_cam["mAP"] == pytest.approx(1 / 2) and res_cam["rank1"] == 0.0


def test_same_scene_requires_sceneids():
    d = np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match="q_sceneids and g_sceneids"):
        evaluate_rank(d, [1], [1, 2], [0], [1, 1], protocol="same_scene")
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate_rank(d, [1], [1, 2], [0], [1, 1], protocol="cross_camera")


def test_ties_broken_by_gallery_index():
    # All distances equal: the ranking is the gallery order.
    d = np.zeros((1, 4), np.float32)
    res = evaluate_rank(d, [1], [2, 1, 3, 1], [0], [1, 1, 1, 1], max_rank=4)
    # hits at ranks 2 and 4
    assert res["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert res["mINP"] == pytest.approx(2 / 4)
    np.testing.assert_allclose(res["cmc"], [0, 1, 1, 1])
    # A tie between a hit and a miss: the lower index wins.
    d = np.array([[0.5, 0.5, 0.1]], np.float32)
    res = evaluate_rank(d, [1], [1, 2, 3], [0], [1, 1, 1], max_rank=3)
    assert res["cmc"].tolist() == [0.0, 1.0, 1.0]  # g2, then g0 (hit) before g1
    res = evaluate_rank(d, [1], [2, 1, 3], [0], [1, 1, 1], max_rank=3)
    assert res["cmc"].tolist() == [0.0, 0.0, 1.0]  # g2, g0, then g1 (hit)


def test_queries_without_valid_match_are_skipped():
    d = np.array([[0.1, 0.2], [0.3, 0.1], [0.2, 0.2]], np.float32)
    q_pids, g_pids = [1, 2, 9], [1, 2]
    q_cams, g_cams = [0, 0, 0], [0, 1]
    res = evaluate_rank(d, q_pids, g_pids, q_cams, g_cams, max_rank=2)
    # query 0: its only match is same camera -> skipped; query 2: pid absent -> skipped
    assert res["num_valid_queries"] == 1 and res["num_skipped_queries"] == 2
    assert res["mAP"] == 1.0 and res["cmc"].tolist() == [1.0, 1.0]


def test_no_valid_query_returns_zeros():
    d = np.array([[0.1, 0.2]], np.float32)
    res = evaluate_rank(d, [3], [1, 2], [0], [0, 1], max_rank=4)
    assert res["num_valid_queries"] == 0 and res["num_skipped_queries"] == 1
    assert res["mAP"] == 0.0 and res["mINP"] == 0.0 and res["rank1"] == 0.0
    assert res["cmc"].tolist() == [0.0] * 4
    empty = evaluate_rank(np.zeros((0, 3), np.float32), [], [1, 2, 3], [], [0, 0, 0])
    assert empty["num_valid_queries"] == 0 and empty["cmc"].shape == (50,)
    no_gallery = evaluate_rank(np.zeros((2, 0), np.float32), [1, 2], [], [0, 0], [])
    assert no_gallery["num_valid_queries"] == 0 and no_gallery["num_skipped_queries"] == 2


def test_rgbnt201_style_query_equals_gallery():
    # Query set = gallery set: the protocol removes each query itself (same pid, same camera).
    pids = np.array([0, 0, 1, 1, 0])
    cams = np.array([0, 1, 0, 1, 0])
    feats = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.8, 0.2]], np.float32)
    d = pairwise_distance(feats, feats)
    res = evaluate_rank(d, pids, pids, cams, cams, max_rank=5)
    slow = slow_metrics(d, pids, pids, cams, cams, 5)
    assert_same(res, slow)
    # Query 0 (pid 0, cam 0): itself and item 4 (pid 0, cam 0) are removed; item 1 is the hit.
    one = evaluate_rank(d[:1], pids[:1], pids, cams[:1], cams, max_rank=5)
    assert one["mAP"] == 1.0 and one["rank1"] == 1.0
    # Without the removal the query would trivially find itself at distance 0.
    assert d[0, 0] == pytest.approx(0.0, abs=1e-6)


def test_cmc_padded_when_gallery_shorter_than_max_rank():
    d = np.array([[0.2, 0.1, 0.3]], np.float32)
    res = evaluate_rank(d, [1], [2, 3, 1], [0], [1, 1, 1], max_rank=10)
    assert res["cmc"].shape == (10,)
    np.testing.assert_allclose(res["cmc"], [0, 0] + [1] * 8)
    assert res["rank10"] == 1.0


def test_torch_inputs_and_unmodified_input():
    rng = np.random.default_rng(0)
    d = rng.random((7, 11), dtype=np.float32)
    q_pids, g_pids = rng.integers(0, 3, 7), rng.integers(0, 3, 11)
    q_cams, g_cams = rng.integers(0, 2, 7), rng.integers(0, 2, 11)
    before = d.copy()
    ref = evaluate_rank(d, q_pids, g_pids, q_cams, g_cams)
    np.testing.assert_array_equal(d, before)
    res = evaluate_rank(
        torch.from_numpy(d).double(), torch.from_numpy(q_pids), torch.from_numpy(g_pids),
        torch.from_numpy(q_cams), torch.from_numpy(g_cams),
    )
    assert res["mAP"] == ref["mAP"] and np.array_equal(res["cmc"], ref["cmc"])
    qf, gf = torch.randn(7, 5), torch.randn(11, 5)
    d1 = pairwise_distance(qf, gf)
    d2 = pairwise_distance(qf.numpy(), gf.numpy())
    np.testing.assert_array_equal(d1, d2)


def test_input_errors_are_clear():
    d = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="g_pids has 2 entries but 3"):
        evaluate_rank(d, [1, 2], [1, 2], [0, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="non-finite value at \\(1, 2\\)"):
        bad = d.copy()
        bad[1, 2] = np.nan
        evaluate_rank(bad, [1, 2], [1, 2, 3], [0, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_rank(d, [1, 2], [1, 2, 3], [0, 0], [0, 0, 0], max_rank=0)
    with pytest.raises(ValueError, match="metric must be one of"):
        pairwise_distance(np.ones((1, 2)), np.ones((1, 2)), metric="manhattan")


# --- property-based: fast path == per-query loops -------------------------------------------
@st.composite
def problems(draw):
    nq = draw(st.integers(1, 12))
    ng = draw(st.integers(1, 30))
    ids = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["continuous", "ties", "negative", "constant"]))
    rng = np.random.default_rng(seed)
    if kind == "continuous":
        d = rng.random((nq, ng), dtype=np.float32)
    elif kind == "ties":
        d = rng.integers(0, 4, (nq, ng)).astype(np.float32)
    elif kind == "negative":
        d = (rng.standard_normal((nq, ng)) * 1e3).astype(np.float32)
        d[rng.random((nq, ng)) < 0.2] = -0.0
    else:
        d = np.full((nq, ng), 0.25, np.float32)
    return (
        d,
        rng.integers(0, ids, nq),
        rng.integers(0, ids, ng),
        rng.integers(0, 3, nq),
        rng.integers(0, 3, ng),
        draw(st.integers(1, 12)),
        draw(st.integers(1, 7)),
    )


@settings(max_examples=150, deadline=None)
@given(problems())
def test_fast_path_matches_per_query_loop(problem):
    d, q_pids, g_pids, q_keys, g_keys, max_rank, chunk = problem
    slow = slow_metrics(d, q_pids, g_pids, q_keys, g_keys, max_rank)
    fast = evaluate_rank(d, q_pids, g_pids, q_keys, g_keys, max_rank=max_rank, chunk_size=chunk)
    assert_same(fast, slow)
    scene = evaluate_rank(
        d, q_pids, g_pids, np.zeros_like(q_keys), np.zeros_like(g_keys), q_sceneids=q_keys,
        g_sceneids=g_keys, protocol="same_scene", max_rank=max_rank,
    )
    assert_same(scene, slow)
    for r in (1, 5, 10):
        assert 0.0 <= fast[f"rank{r}"] <= 1.0
    assert 0.0 <= fast["mAP"] <= 1.0 and 0.0 <= fast["mINP"] <= 1.0


def test_fast_path_matches_on_larger_random_problem():
    # Many relevant items per row exercise the histogram bins, not only the exact fallback.
    rng = np.random.default_rng(3)
    d = rng.random((40, 3000), dtype=np.float32)
    d[:, ::7] = np.round(d[:, ::7], 2)  # plenty of exact ties too
    q_pids, g_pids = rng.integers(0, 6, 40), rng.integers(0, 6, 3000)
    q_cams, g_cams = rng.integers(0, 4, 40), rng.integers(0, 4, 3000)
    fast = evaluate_rank(d, q_pids, g_pids, q_cams, g_cams)
    # Vectorised per-query reference (same definitions, numpy stable argsort).
    aps, inps, firsts = [], [], []
    for i in range(40):
        o = np.argsort(d[i], kind="stable")
        keep = ~((g_pids[o] == q_pids[i]) & (g_cams[o] == q_cams[i]))
        rel = (g_pids[o] == q_pids[i])[keep]
        hits = np.cumsum(rel)
        aps.append((hits / np.arange(1, rel.size + 1))[rel].mean())
        inps.append(rel.sum() / (np.flatnonzero(rel)[-1] + 1))
        firsts.append(np.flatnonzero(rel)[0] + 1)
    assert fast["mAP"] == pytest.approx(np.mean(aps), abs=1e-12)
    assert fast["mINP"] == pytest.approx(np.mean(inps), abs=1e-12)
    np.testing.assert_allclose(fast["cmc"], [np.mean(np.array(firsts) <= k) for k in range(1, 51)])


# --- distances --------------------------------------------------------------------------------
def test_pairwise_distance_definitions():
    qf = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
    gf = np.array([[6.0, 8.0], [0.0, 2.0]], np.float32)
    # squared Euclidean, unnormalised
    np.testing.assert_allclose(
        pairwise_distance(qf, gf, "euclidean", normalize=False), [[25, 13], [89, 5]], rtol=1e-6
    )
    # normalised: 2 - 2 cos
    cos = np.array([[1.0, 0.8], [0.6, 0.0]])
    np.testing.assert_allclose(pairwise_distance(qf, gf, "euclidean"), 2 - 2 * cos, atol=1e-6)
    np.testing.assert_allclose(pairwise_distance(qf, gf, "cosine"), 1 - cos, atol=1e-6)
    np.testing.assert_allclose(
        pairwise_distance(qf, gf, "cosine", normalize=False), 1 - cos, atol=1e-6
    )
    # normalisation is a real switch: it changes the ranking here
    un = pairwise_distance(qf, gf, "euclidean", normalize=False)
    assert np.argmin(un[0]) == 1 and np.argmin(pairwise_distance(qf, gf)[0]) == 0


def test_chunked_and_unchunked_agree():
    rng = np.random.default_rng(1)
    qf = rng.standard_normal((37, 16), dtype=np.float32)
    gf = rng.standard_normal((53, 16), dtype=np.float32)
    q_pids, g_pids = rng.integers(0, 5, 37), rng.integers(0, 5, 53)
    q_cams, g_cams = rng.integers(0, 3, 37), rng.integers(0, 3, 53)
    for metric in ("euclidean", "cosine"):
        for normalize in (True, False):
            full = pairwise_distance(qf, gf, metric, normalize, chunk_size=1000)
            for chunk in (1, 5, 37):
                part = pairwise_distance(qf, gf, metric, normalize, chunk_size=chunk)
                np.testing.assert_allclose(part, full, rtol=1e-5, atol=1e-5)
                res = evaluate_features(
                    qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric, normalize=normalize,
                    chunk_size=chunk,
                )
                ref = evaluate_rank(part, q_pids, g_pids, q_cams, g_cams)
                assert res["mAP"] == ref["mAP"] and np.array_equal(res["cmc"], ref["cmc"])
                ref_full = evaluate_rank(full, q_pids, g_pids, q_cams, g_cams)
                assert res["mAP"] == pytest.approx(ref_full["mAP"], abs=1e-6)


def test_evaluate_features_never_builds_the_full_matrix(monkeypatch):
    # 2,000 x 20,000 float32 would be 160 MB; chunks of 256 rows need a small fraction of it.
    # tracemalloc sees NumPy's buffers; torch's matmul output is not traced, so the distance
    # blocks are checked by recording their shapes.
    from editor_reid.metrics import distance

    shapes = []
    original_block = distance.DistanceBlocks.block

    def recording_block(self, start, stop):
        out = original_block(self, start, stop)
        shapes.append(out.shape)
        return out

    monkeypatch.setattr(distance.DistanceBlocks, "block", recording_block)
    rng = np.random.default_rng(2)
    nq, ng, dim = 2000, 20000, 8
    qf = rng.standard_normal((nq, dim), dtype=np.float32)
    gf = rng.standard_normal((ng, dim), dtype=np.float32)
    q_pids, g_pids = rng.integers(0, 200, nq), rng.integers(0, 200, ng)
    q_cams, g_cams = rng.integers(0, 6, nq), rng.integers(0, 6, ng)
    full_bytes = nq * ng * 4
    tracemalloc.start()
    try:
        res = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, chunk_size=256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res["num_valid_queries"] > 0
    assert max(rows for rows, _ in shapes) == 256 and sum(r for r, _ in shapes) == nq
    assert peak < full_bytes / 2, f"peak {peak / 2**20:.0f} MiB vs {full_bytes / 2**20:.0f} MiB"


# --- TPR@FPR --------------------------------------------------------------------------------
def test_tpr_at_fpr_hand_case():
    # One query (pid 1, cam 0); gallery: two positives, four negatives, one junk item.
    d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.05]], np.float32)
    g_pids = [1, 2, 1, 2, 2, 2, 1]
    g_cams = [1, 1, 1, 1, 1, 1, 0]  # the last one is junk: same pid, same camera
    res = tpr_at_fpr(d, [1], g_pids, [0], g_cams, fprs=(0.0, 0.25, 0.5, 1.0))
    # Accept d <= t. Sorted kept pairs: 0.1 P, 0.2 N, 0.3 P, 0.4 N, 0.5 N, 0.6 N.
    # Curve (fpr, tpr): (0,0) (0,.5) (.25,.5) (.25,1) (.5,1) (.75,1) (1,1); the collinear
    # (.5,1) and (.75,1) are dropped, as sklearn does. The nearest point (first on ties) wins.
    assert res[0.0] == 0.0  # (0, 0)
    assert res[0.25] == 0.5  # (.25, .5) comes before (.25, 1)
    assert res[0.5] == 0.5  # nearest are (.25, .5) and (.25, 1), 0.25 away; the first wins
    assert res[1.0] == 1.0
    # fast-reid's labels (different pid = 1, score = distance): "tpr" is the share of negatives
    # rejected when a share "fpr" of positives is rejected.
    fr = tpr_at_fpr(d, [1], g_pids, [0], g_cams, fprs=(0.0, 0.5), convention="fastreid")
    assert fr[0.0] == 0.0 and fr[0.5] == 0.75


def test_roc_curve_point_set():
    fpr, tpr = roc_curve(np.array([1, 0, 1, 0, 0, 0]), -np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))
    np.testing.assert_allclose(fpr, [0, 0, 0.25, 0.25, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    # ties: one point per distinct score
    fpr, tpr = roc_curve(np.array([1, 0, 1]), np.array([1.0, 1.0, 0.0]))
    np.testing.assert_allclose(fpr, [0, 1, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1])


def test_tpr_at_fpr_undefined_without_negatives():
    res = tpr_at_fpr(np.array([[0.1]], np.float32), [1], [1], [0], [1])
    assert np.isnan(res[1e-4])
