"""Retrieval metrics for re-identification; knows nothing about models or data loading.

Public API:
    evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, *, protocol=...)  mAP/CMC/mINP
    evaluate_features(qf, gf, ...)      the same, from features, memory-bounded
    pairwise_distance(qf, gf, metric, normalize, chunk_size)
    tpr_at_fpr(distmat, ...)            verification TPR at fixed FPRs (fast-reid ROC protocol)
    pair_roc(distmat, ...)              the (fpr, tpr) curve those TPRs are read from
    re_ranking(q_g, q_q, g_g, k1, k2, lambda_value)   k-reciprocal re-ranking (Zhong et al. 2017)
    query_expansion(qf, gf, qe_k, alpha)   alpha query expansion (fast-reid aqe)
"""

from .distance import pairwise_distance
from .rank import evaluate_features, evaluate_rank
from .rerank import query_expansion, re_ranking
from .roc import pair_roc, tpr_at_fpr

__all__ = [
    "evaluate_features",
    "evaluate_rank",
    "pair_roc",
    "pairwise_distance",
    "query_expansion",
    "re_ranking",
    "tpr_at_fpr",
]
