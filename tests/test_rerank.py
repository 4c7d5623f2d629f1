"""k-reciprocal re-ranking and alpha query expansion against direct, loop-by-loop versions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from editor_reid.metrics import evaluate_rank, pairwise_distance, query_expansion, re_ranking


def direct_re_ranking(q_g, q_q, g_g, k1, k2, lambda_value):
    """Zhong et al.'s reference formulation, loop by loop (float64, stable neighbour order)."""
    original = np.concatenate(
        [np.concatenate([q_q, q_g], axis=1), np.concatenate([q_g.T, g_g], axis=1)], axis=0
    ).astype(np.float64)
    original = np.transpose(original / np.max(original, axis=0))
    n, nq = original.shape[0], q_g.shape[0]
    V = np.zeros_like(original)
    initial_rank = np.argsort(original, axis=1, kind="stable")
    for i in range(n):
        forward = initial_rank[i, : k1 + 1]
        backward = initial_rank[forward, : k1 + 1]
        k_recip = forward[np.where(backward == i)[0]]
        expansion = k_recip
        for cand in k_recip:
            kh = int(np.around(k1 / 2.0))
            c_forward = initial_rank[cand, : kh + 1]
            c_backward = initial_rank[c_forward, : kh + 1]
            c_recip = c_forward[np.where(c_backward == cand)[0]]
            if len(np.intersect1d(c_recip, k_recip)) > 2.0 / 3 * len(c_recip):
                expansion = np.append(expansion, c_recip)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        V[i, expansion] = weight / np.sum(weight)
    if k2 != 1:
        V_qe = np.zeros_like(V)
        for i in range(n):
            V_qe[i] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    inv_index = [np.where(V[:, j] != 0)[0] for j in range(n)]
    jaccard = np.zeros((nq, n))
    for i in range(nq):
        temp_min = np.zeros(n)
        nonzero = np.where(V[i] != 0)[0]
        for j in nonzero:
            temp_min[inv_index[j]] += np.minimum(V[i, j], V[inv_index[j], j])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    final = jaccard * (1 - lambda_value) + original[:nq] * lambda_value
    return final[:, nq:]


def direct_aqe(qf, gf, qe_k, alpha, qe_times=1):
    """fast-reid's aqe, one feature at a time (float64, stable neighbour order)."""
    feats = np.concatenate([qf, gf]).astype(np.float64)
    for _ in range(qe_times):
        unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        new = []
        for row in unit @ unit.T:
            top = np.argsort(-row, kind="stable")[:qe_k]
            w = row[top] ** alpha
            new.append(np.mean(feats[top] * w[:, None], axis=0))
        feats = np.stack(new)
    return feats[: len(qf)], feats[len(qf) :]


def _clustered(rng, n, ids, dim=8):
    centres = rng.standard_normal((ids, dim))
    labels = rng.integers(0, ids, n)
    return (centres[labels] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)


@pytest.mark.parametrize(
    "nq,ng,k1,k2,lam", [(6, 30, 20, 6, 0.3), (9, 25, 5, 3, 0.5), (4, 15, 6, 1, 0.0)]
)
def test_re_ranking_matches_direct(nq, ng, k1, k2, lam):
    rng = np.random.default_rng(nq * 100 + ng)
    feats = _clustered(rng, nq + ng, 4)
    qf, gf = feats[:nq], feats[nq:]
    q_g = pairwise_distance(qf, gf).astype(np.float64)
    q_q = pairwise_distance(qf, qf).astype(np.float64)
    g_g = pairwise_distance(gf, gf).astype(np.float64)
    # exact symmetry and zero diagonal, as the reference's transposed normalisation assumes
    q_q = (q_q + q_q.T) / 2
    g_g = (g_g + g_g.T) / 2
    np.fill_diagonal(q_q, 0)
    np.fill_diagonal(g_g, 0)
    expected = direct_re_ranking(q_g, q_q, g_g, k1, k2, lam)
    got = re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam, chunk_size=4)
    assert got.shape == (nq, ng) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-6)
    got_t = re_ranking(
        torch.from_numpy(q_g), torch.from_numpy(q_q), torch.from_numpy(g_g), k1, k2, lam
    )
    np.testing.assert_allclose(got_t, expected, atol=2e-6)


def test_re_ranking_lambda_one_is_normalised_original():
    rng = np.random.default_rng(0)
    feats = _clustered(rng, 20, 3)
    qf, gf = feats[:5], feats[5:]
    q_g, q_q, g_g = (pairwise_distance(a, b) for a, b in ((qf, gf), (qf, qf), (gf, gf)))
    got = re_ranking(q_g, q_q, g_g, lambda_value=1.0)
    row_max = np.maximum(q_g.max(1), q_q.max(1))[:, None]
    np.testing.assert_allclose(got, q_g / row_max, rtol=1e-6)


def test_re_ranking_refuses_oversized_problem():
    q_g, q_q, g_g = np.zeros((3, 5)), np.zeros((3, 3)), np.zeros((5, 5))
    with pytest.raises(ValueError, match="8 x 8 float32 matrix.*max_entries=50"):
        re_ranking(q_g, q_q, g_g, max_entries=50)
    with pytest.raises(ValueError, match="g_g"):
        re_ranking(q_g, q_q, np.zeros((4, 4)))


def test_re_ranking_demotes_a_near_neighbour_that_is_not_reciprocal():
    # 1-D features. The query q = 0 is of identity A = {-1.05, -1.15, -1.28}, but the gallery item
    # nearest to it, b1 = 1.0, is of the tight cluster B = {1.0, 1.1, 1.2, 1.3}. With k1 = 3, b1's
    # own 4 nearest items are B, so b1 is no k-reciprocal neighbour of q, while q is among the
    # 4 nearest of a1 = -1.05: q's encoding overlaps A's and not B's.
    q = np.array([[0.0]], np.float32)
    g = np.array([[1.0], [1.1], [1.2], [1.3], [-1.05], [-1.15], [-1.28]], np.float32)
    g_pids, g_cams = [2, 2, 2, 2, 1, 1, 1], [1] * 7
    q_g, q_q, g_g = (pairwise_distance(a, b, normalize=False) for a, b in ((q, g), (q, q), (g, g)))
    before = evaluate_rank(q_g, [1], g_pids, [0], g_cams)
    assert np.argmin(q_g[0]) == 0 and before["rank1"] == 0.0
    assert before["mAP"] == pytest.approx((1 / 2 + 2 / 4 + 3 / 6) / 3)

    rr = re_ranking(q_g, q_q, g_g, k1=3, k2=1, lambda_value=0.3)
    assert np.argsort(rr[0], kind="stable").tolist() == [4, 5, 6, 0, 1, 2, 3]
    # Jaccard distance 1 (nothing shared) for B, below 1 for A; q_g.max() normalises q's row.
    no_overlap = 0.7 + 0.3 * q_g[0] / q_g.max()
    np.testing.assert_allclose(rr[0, :4], no_overlap[:4], rtol=1e-6)
    assert (rr[0, 4:] < no_overlap[4:] - 0.1).all()
    after = evaluate_rank(rr, [1], g_pids, [0], g_cams)
    assert after["rank1"] == 1.0 and after["mAP"] == 1.0


@pytest.mark.parametrize("qe_k,alpha,times", [(5, 3.0, 1), (3, 1.0, 2), (4, 2.5, 1)])
def test_query_expansion_matches_direct(qe_k, alpha, times):
    rng = np.random.default_rng(qe_k)
    feats = _clustered(rng, 23, 3)
    qf, gf = feats[:7], feats[7:]
    exp_q, exp_g = direct_aqe(qf, gf, qe_k, alpha, times)
    got_q, got_g = query_expansion(qf, gf, qe_k=qe_k, alpha=alpha, qe_times=times, chunk_size=5)
    np.testing.assert_allclose(got_q.numpy(), exp_q, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_g.numpy(), exp_g, rtol=1e-5, atol=1e-6)
    tq, tg = query_expansion(torch.from_numpy(qf), torch.from_numpy(gf), qe_k, alpha, times)
    np.testing.assert_allclose(tq.numpy(), got_q.numpy(), rtol=1e-6)


def test_query_expansion_with_k1_is_scaled_identity():
    # With one neighbour (itself, similarity 1) every feature is unchanged.
    rng = np.random.default_rng(1)
    qf, gf = rng.standard_normal((3, 4)), rng.standard_normal((5, 4))
    q, g = query_expansion(qf, gf, qe_k=1, alpha=3.0)
    np.testing.assert_allclose(q.numpy(), qf, rtol=1e-5)
    np.testing.assert_allclose(g.numpy(), gf, rtol=1e-5)
