"""Time and size of the HTML report (``editor-reid report``) on an RGBNT201-sized test split.

A synthetic RGBNT201-layout dataset is written with ``--ids 60 --views 10``: its test half has 30
identities seen by 3 of the 4 cameras (on average) x 10 views, about 900 triplets, query =
gallery, like RGBNT201's 836 (30 identities). A model
with random weights (the tiny test ViT by default; ``--vit-s`` / ``--vit-b`` for the real sizes)
is saved as a checkpoint and evaluated by ``run_test``; then:

* ``features s``: extracting the query/gallery features of the 7 modality subsets the report
  shows (the part a ``test --missing all`` run has already done; model-bound);
* ``report s``: ``write_report`` once those features exist: the tables, distance matrix, per-query
  AP, ROC, per-camera mAP, rank lists (images decoded again), token picture (a few forward
  passes with the attention rollout), object share, t-SNE and the HTML (target: under 60 s);
* ``size MB``: the HTML file (target: under 25 MB).

``--random-features`` puts random unit vectors of the model's feature width in place of the
extracted features (the report's own work does not depend on their values, only on their number
and width), so the report of a ViT-B-sized model can be timed without the half hour its 7
extraction passes take on a 2-core CPU; the token picture still runs the real model.

Each ratio is the figure over its target (below 1 meets it). Example::

    python benchmarks/bench_report.py             # tiny ViT, 840 test triplets
    python benchmarks/bench_report.py --vit-b --random-features   # ViT-B/16 model, 2304-d features
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from editor_reid.config import config_to_dict, load_config
from editor_reid.data.layouts import load_dataset
from editor_reid.data.synthetic import make_synthetic
from editor_reid.engine.checkpoint import save_checkpoint, weights_payload
from editor_reid.engine.evaluate import run_test
from editor_reid.model import build_model
from editor_reid.modalities import modality_subsets
from editor_reid.report import write_report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name  # noqa: E402

TARGET_SECONDS = 60.0
TARGET_MB = 25.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vit-b", action="store_true", help="ViT-B/16 instead of the tiny test ViT")
    parser.add_argument("--vit-s", action="store_true", help="ViT-S/16 (DeiT-S: 384-d, 12 blocks)")
    parser.add_argument("--ids", type=int, default=60, help="identities (half of them in the test split)")
    parser.add_argument("--views", type=int, default=10, help="images per identity and camera")
    parser.add_argument("--random-features", action="store_true",
                        help="random unit features of the model's width instead of extracting them")
    parser.add_argument("--batch", type=int, default=64, help="test.ims_per_batch")
    parser.add_argument("--max-queries", type=int, default=8, help="rank lists in the report")
    parser.add_argument("--root", type=Path, default=None, help="reuse/keep the synthetic data here")
    parser.add_argument("--out", type=Path, default=None, help="keep the report here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        marker = root / ".bench_report"
        if not (args.root and marker.exists() and marker.read_text() == f"{args.ids},{args.views}"):
            make_synthetic("rgbnt201", root, ids=args.ids, views=args.views, seed=0)
            marker.write_text(f"{args.ids},{args.views}")
        overrides = ["input.size_train=[256,128]", "input.size_test=[256,128]", f"test.ims_per_batch={args.batch}",
                     f"datasets.root_dir={root}", "dataloader.num_workers=0"]
        if args.vit_s:
            overrides += ["model.transformer_type=deit_small_patch16_224"]
            model_name = "ViT-S/16"
        elif args.vit_b:
            model_name = "ViT-B/16"
        else:
            overrides += ["model.embed_dim=64", "model.depth=2", "model.num_heads=4"]
            model_name = "tiny ViT (64-d, 2 blocks)"
        cfg = load_config(None, overrides)
        splits = load_dataset("rgbnt201", root)
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=splits.num_train_pids, num_cameras=splits.num_cameras)
        weights = save_checkpoint(Path(tmp) / "weights.pt", weights_payload(
            model.state_dict(), {}, config=config_to_dict(cfg), epoch=0, metrics=None,
            num_classes=splits.num_train_pids, num_cameras=splits.num_cameras))
        out = args.out or Path(tmp) / "report.html"
        timings: dict[str, float] = {}

        def report(run) -> None:
            started = time.perf_counter()
            full = run.features.get("query", tuple(cfg.datasets.modalities))
            generator = torch.Generator().manual_seed(0)
            for subset in modality_subsets(tuple(cfg.datasets.modalities)):
                if args.random_features:
                    feats = torch.nn.functional.normalize(torch.randn(full.feats.shape, generator=generator), dim=1)
                    run.features.put("query", subset, dataclasses.replace(full, feats=feats))
                run.features.get("query", subset)
                run.features.get("gallery", subset)
            timings["features"] = time.perf_counter() - started
            started = time.perf_counter()
            write_report(run, out, max_queries=args.max_queries)
            timings["report"] = time.perf_counter() - started

        run_test(cfg, weights, device="cpu", quiet=True, then=report)
        size_mb = out.stat().st_size / 2**20
        result = {
            "machine": f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "model": model_name,
            "test split": f"{len(splits.query)} query = gallery triplets, {len({s.pid for s in splits.query})} IDs",
            "features": "random (--random-features)" if args.random_features else "extracted, 7 subsets",
            "features s": round(timings["features"], 2),
            "report s": round(timings["report"], 2),
            "report s / 60 s target": round(timings["report"] / TARGET_SECONDS, 3),
            "size MB": round(size_mb, 2),
            "size / 25 MB target": round(size_mb / TARGET_MB, 3),
        }
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
