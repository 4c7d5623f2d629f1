"""Benchmark `editor_reid.metrics.evaluate_rank` against a straightforward reference evaluator.

Default run (one random problem, both evaluators, results must agree to 1e-6):

    python benchmarks/bench_metrics.py                      # 10,000 x 50,000, 500 IDs, 6 cameras

The reference follows the official EDITOR / torchreid evaluator: a Python loop over queries, each
ranking the whole gallery with a full argsort (stable, so ties resolve like ours), removing the
same-pid-same-camera items, then AP / INP / CMC from cumulative sums.

Memory check at full scale (20,000 queries x 200,000 gallery x 2,304-d features; minutes on two
cores; prints the peak resident set size, which must stay under 8 GB):

    python benchmarks/bench_metrics.py --scale
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np

from editor_reid.metrics import evaluate_features, evaluate_rank


def reference_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """Per-query loop over a full argsort, as the official evaluator does."""
    all_ap, all_inp, all_cmc = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        matches = g_pids[order] == q_pids[i]
        remove = matches & (g_camids[order] == q_camids[i])
        raw = matches[~remove]
        if not raw.any():
            continue
        hits = raw.cumsum()
        last = np.flatnonzero(raw)[-1]
        all_inp.append(hits[last] / (last + 1.0))
        cmc = np.minimum(hits, 1)[:max_rank].astype(np.float64)
        if cmc.size < max_rank:
            cmc = np.concatenate([cmc, np.full(max_rank - cmc.size, cmc[-1])])
        all_cmc.append(cmc)
        precision = hits / np.arange(1, raw.size + 1)
        all_ap.append(precision[raw].sum() / raw.sum())
    return {
        "mAP": float(np.mean(all_ap)),
        "mINP": float(np.mean(all_inp)),
        "cmc": np.mean(all_cmc, axis=0),
        "num_valid_queries": len(all_ap),
    }


def peak_rss_gib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def run_compare(args) -> None:
    rng = np.random.default_rng(args.seed)
    q, g = args.queries, args.gallery
    print(
        f"problem: {q:,} queries x {g:,} gallery, {args.ids} IDs, {args.cameras} cameras, "
        f"float32 distances ({q * g * 4 / 2**30:.2f} GiB)"
    )
    distmat = rng.random((q, g), dtype=np.float32)
    q_pids = rng.integers(0, args.ids, q)
    g_pids = rng.integers(0, args.ids, g)
    q_camids = rng.integers(0, args.cameras, q)
    g_camids = rng.integers(0, args.cameras, g)

    t0 = time.perf_counter()
    fast = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=args.max_rank)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, args.max_rank)
    t_ref = time.perf_counter() - t0

    print(f"evaluate_rank: {t_fast:8.2f} s   mAP={fast['mAP']:.6f} mINP={fast['mINP']:.6f} "
          f"R1={fast['cmc'][0]:.6f} valid={fast['num_valid_queries']}")
    print(f"reference:     {t_ref:8.2f} s   mAP={ref['mAP']:.6f} mINP={ref['mINP']:.6f} "
          f"R1={ref['cmc'][0]:.6f} valid={ref['num_valid_queries']}")
    assert fast["num_valid_queries"] == ref["num_valid_queries"]
    assert abs(fast["mAP"] - ref["mAP"]) <= 1e-6, (fast["mAP"], ref["mAP"])
    assert abs(fast["mINP"] - ref["mINP"]) <= 1e-6, (fast["mINP"], ref["mINP"])
    assert np.max(np.abs(fast["cmc"] - ref["cmc"])) <= 1e-6
    print("results identical (|diff| <= 1e-6 for mAP, mINP, CMC)")
    print(f"speed-up: {t_ref / t_fast:.1f}x")


def run_scale(args) -> None:
    q, g, dim = args.scale_queries, args.scale_gallery, args.dim
    print(f"scale check: {q:,} queries x {g:,} gallery x {dim}-d, chunk {args.chunk_size}")
    rng = np.random.default_rng(args.seed)
    qf = rng.standard_normal((q, dim), dtype=np.float32)
    gf = rng.standard_normal((g, dim), dtype=np.float32)
    q_pids = rng.integers(0, args.ids, q)
    g_pids = rng.integers(0, args.ids, g)
    q_camids = rng.integers(0, args.cameras, q)
    g_camids = rng.integers(0, args.cameras, g)
    print(f"features: {(qf.nbytes + gf.nbytes) / 2**30:.2f} GiB; "
          f"full distance matrix would be {q * g * 4 / 2**30:.1f} GiB")
    t0 = time.perf_counter()
    res = evaluate_features(
        qf, gf, q_pids, g_pids, q_camids, g_camids, chunk_size=args.chunk_size
    )
    elapsed = time.perf_counter() - t0
    print(f"evaluate_features: {elapsed:.1f} s, mAP={res['mAP']:.6f}, "
          f"valid={res['num_valid_queries']}")
    print(f"peak RSS: {peak_rss_gib():.2f} GiB")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--gallery", type=int, default=50_000)
    p.add_argument("--ids", type=int, default=500)
    p.add_argument("--cameras", type=int, default=6)
    p.add_argument("--max-rank", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", action="store_true",
                   help="run the 20k x 200k x 2304 evaluate_features memory check instead")
    p.add_argument("--scale-queries", type=int, default=20_000)
    p.add_argument("--scale-gallery", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=2304)
    p.add_argument("--chunk-size", type=int, default=256)
    args = p.parse_args(argv)
    if args.scale:
        run_scale(args)
    else:
        run_compare(args)


if __name__ == "__main__":
    main()
