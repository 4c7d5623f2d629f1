"""Feature-extraction throughput through the real test loader, num_workers 0 against 2.

A synthetic dataset (``editor_reid.data.synthetic.make_synthetic``) is written to a temporary
folder and read back with ``load_dataset``; its query (or gallery) split goes through
``editor_reid.data.loaders.build_test_loader`` (JPEG decoding, resizing and normalisation in the
DataLoader workers, pinned memory when CUDA is present) into
``editor_reid.engine.inference.extract_features`` (features accumulated on the device, one copy
to the host at the end). For each worker count it reports:

* ``loader``: triplets/s of the loader alone (decoding only);
* ``model``: triplets/s of the model alone on batches already in memory;
* ``extract``: triplets/s of the real extraction (loader + model);
* ``run_extract``: triplets/s of ``editor_reid.features.extract.run_extract``, the code behind
  ``editor-reid extract``, on the same samples and checkpoint: a fresh loader, chunked saving and
  the merge into the feature file included, and ``ratio``, that rate over the model's own
  (the target on CPU: at least 0.9). ``setup s`` is the part of its time spent loading the
  checkpoint and building the model (``FeatureExtractor``), which a large set amortises;
  ``ratio excl. setup`` leaves it out.

Every rate is the best of ``--repeats`` passes after a first pass (for the loader it starts the
persistent workers and is reported separately; the model's is measured once, on batches decoded
beforehand, and shared by the worker counts). Last, the
``FeatureExtractor`` on paths (decoding in the calling process, no workers) against the model.

With workers, decoding overlaps the model, so ``extract`` approaches ``min(loader, model)``;
without them it is about ``1 / (1/loader + 1/model)``. On a 2-core CPU the workers and the
model share the cores, so the overlap is partial.

Examples::

    python benchmarks/bench_extract.py                       # tiny ViT, rgbnt201 layout
    python benchmarks/bench_extract.py --vit-s --images 96 --workers 2   # a mid-size ViT-S/16
    python benchmarks/bench_extract.py --vit-b --images 32   # ViT-B/16 (slow on CPU)
    python benchmarks/bench_extract.py --device cuda --vit-b --images 2000 --batch 128 --amp fp16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from editor_reid.config import config_to_dict, load_config
from editor_reid.data.layouts import load_dataset
from editor_reid.data.loaders import build_test_loader
from editor_reid.data.synthetic import make_synthetic
from editor_reid.engine.checkpoint import save_checkpoint, weights_payload
from editor_reid.engine.inference import batch_images, extract_features
from editor_reid.engine.solver import autocast_context
from editor_reid.features.extract import ExtractInputs, run_extract
from editor_reid.features.extractor import FeatureExtractor
from editor_reid.model import build_model

SIZES = {"rgbnt201": (256, 128), "market1501mm": (256, 128), "rgbnt100": (128, 256), "msvr310": (128, 256)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def time_loader(loader) -> tuple[int, float]:
    start = time.perf_counter()
    count = sum(len(batch["pid"]) for batch in loader)
    return count, time.perf_counter() - start


def time_model(model, batches, device, amp, repeats: int) -> tuple[int, float]:
    """The model alone, on collated batches already in (device) memory: the best of ``repeats``
    passes after a warm-up pass (on CPU the first pass over a batch's shapes, which SFTS varies,
    is much slower; the extraction rates are measured warm too)."""
    inputs = [(batch_images(b, device), b["camid"].to(device)) for b in batches]
    times = []
    with torch.inference_mode(), autocast_context(device, amp):
        for _ in range(repeats + 1):
            sync(device)
            start = time.perf_counter()
            for images, cams in inputs:
                model(images, cams)
            sync(device)
            times.append(time.perf_counter() - start)
    return sum(len(b["pid"]) for b in batches), min(times[1:])


def time_extract(model, loader, device, amp) -> tuple[int, float]:
    start = time.perf_counter()
    feats = extract_features(model, loader, device, amp).feats
    sync(device)
    return feats.shape[0], time.perf_counter() - start


def time_run_extract(weights: Path, inputs: ExtractInputs, out: Path, *, workers: int, batch: int, chunk: int,
                     device: torch.device, amp: str) -> float:
    start = time.perf_counter()
    run_extract(weights, out, inputs=inputs, batch_size=batch, chunk_size=chunk, num_workers=workers,
                device=str(device), amp=amp, quiet=True)
    return time.perf_counter() - start


def time_setup(weights: Path, device: torch.device, batch: int, amp: str) -> float:
    start = time.perf_counter()
    FeatureExtractor(weights, device=device, batch_size=batch, amp=amp)
    return time.perf_counter() - start


def time_paths(weights: Path, samples, device: torch.device, batch: int, amp: str) -> float:
    """The FeatureExtractor on paths, after one warm-up batch."""
    extractor = FeatureExtractor(weights, device=device, batch_size=batch, amp=amp)
    inputs = [{**s.paths, "camid": s.camid} for s in samples]
    extractor(inputs[:batch])
    start = time.perf_counter()
    extractor(inputs)
    sync(device)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="rgbnt201", choices=sorted(SIZES))
    parser.add_argument("--vit-b", action="store_true", help="ViT-B/16 instead of the tiny test ViT")
    parser.add_argument("--vit-s", action="store_true", help="ViT-S/16 (DeiT-S: 384-d, 12 blocks), a mid-size model")
    parser.add_argument("--images", type=int, default=192, help="triplets to extract (taken from the split)")
    parser.add_argument("--split", default="gallery", choices=["query", "gallery"])
    parser.add_argument("--batch", type=int, default=32, help="test.ims_per_batch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=2, help="timed passes (best kept) after a first pass")
    parser.add_argument("--chunk", type=int, default=4096, help="run_extract's --chunk-size")
    parser.add_argument("--root", type=Path, default=None, help="reuse/keep the synthetic data here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        if not (args.root and (root / ".bench_extract").exists()):
            make_synthetic(args.layout, root, ids=60, views=4, seed=0)
            (root / ".bench_extract").write_text(args.layout)
        splits = load_dataset(args.layout, root)
        samples = getattr(splits, args.split)
        samples = (samples * (args.images // max(len(samples), 1) + 1))[: args.images]
        size = SIZES[args.layout]
        overrides = [
            f"input.size_train=[{size[0]},{size[1]}]",
            f"input.size_test=[{size[0]},{size[1]}]",
            f"test.ims_per_batch={args.batch}",
        ]
        if args.vit_s:
            overrides += ["model.transformer_type=deit_small_patch16_224"]
        elif not args.vit_b:
            overrides += ["model.embed_dim=64", "model.depth=2", "model.num_heads=4"]
        torch.manual_seed(0)
        cfg = load_config(None, overrides)
        num_classes = max(splits.num_train_pids, 1)
        model = build_model(cfg, num_classes=num_classes, num_cameras=splits.num_cameras).to(device).eval()
        weights = save_checkpoint(Path(tmp) / "weights.pt", weights_payload(
            model.state_dict(), {}, config=config_to_dict(cfg), epoch=0, metrics=None, num_classes=num_classes,
            num_cameras=splits.num_cameras))
        inputs = ExtractInputs(samples, [args.split] * len(samples), splits.protocol, f"the {args.split} split")
        setup_s = min(time_setup(weights, device, args.batch, args.amp) for _ in range(args.repeats))
        # The model alone, on batches decoded beforehand (the same for every worker count).
        batches = list(build_test_loader(load_config(None, overrides + ["dataloader.num_workers=0"]), samples))
        count, model_s = time_model(model, batches, device, args.amp, args.repeats)
        results = {}
        for workers in args.workers:
            cfg = load_config(None, overrides + [f"dataloader.num_workers={workers}"])
            loader = build_test_loader(cfg, samples)
            _, startup_s = time_loader(loader)  # first pass: starts the (persistent) workers
            loader_s = min(time_loader(loader)[1] for _ in range(args.repeats))
            extract_s = min(time_extract(model, loader, device, args.amp)[1] for _ in range(args.repeats))
            run_s = min(time_run_extract(weights, inputs, Path(tmp) / "feats.npz", workers=workers, batch=args.batch,
                                         chunk=args.chunk, device=device, amp=args.amp) for _ in range(args.repeats))
            results[workers] = {
                "triplets": count,
                "first_pass_s": startup_s,
                "loader_triplets_per_s": rate(count, loader_s),
                "model_triplets_per_s": rate(count, model_s),
                "extract_triplets_per_s": rate(count, extract_s),
                "extract_s": extract_s,
                "run_extract_triplets_per_s": rate(count, run_s),
                "run_extract_s": run_s,
                "run_extract_ratio_to_model": model_s / run_s,
                "setup_s": setup_s,
                "run_extract_ratio_to_model_excl_setup": model_s / max(run_s - setup_s, 1e-9),
            }
            del loader
            print(f"[num_workers={workers} done]", file=sys.stderr, flush=True)
        paths_s = min(time_paths(weights, samples, device, args.batch, args.amp) for _ in range(args.repeats))
        paths = {"triplets_per_s": rate(count, paths_s), "ratio_to_model": model_s / paths_s}

    arch = "ViT-S/16" if args.vit_s else "ViT-B/16" if args.vit_b else "tiny ViT (64-d, 2 blocks, 4 heads)"
    print(f"{arch}, layout {args.layout} ({size[0]}x{size[1]}), {count} triplets from the {args.split} split, "
          f"batch {args.batch}, device {args.device}, amp {args.amp}, torch threads {torch.get_num_threads()}")
    row = "{:<13}{:>16}{:>16}{:>16}{:>12}{:>14}"
    print(row.format("num_workers", "loader trip/s", "model trip/s", "extract trip/s", "extract s", "1st pass s"))
    for workers, r in results.items():
        print(row.format(workers, f"{r['loader_triplets_per_s']:.1f}", f"{r['model_triplets_per_s']:.1f}",
                         f"{r['extract_triplets_per_s']:.1f}", f"{r['extract_s']:.2f}", f"{r['first_pass_s']:.2f}"))
    print(f"\nrun_extract (editor-reid extract; chunk {args.chunk}) against the model alone")
    row = "{:<13}{:>16}{:>16}{:>10}{:>10}{:>20}"
    print(row.format("num_workers", "model trip/s", "run_ext trip/s", "ratio", "setup s", "ratio excl. setup"))
    for workers, r in results.items():
        print(row.format(workers, f"{r['model_triplets_per_s']:.1f}", f"{r['run_extract_triplets_per_s']:.1f}",
                         f"{r['run_extract_ratio_to_model']:.2f}", f"{r['setup_s']:.2f}",
                         f"{r['run_extract_ratio_to_model_excl_setup']:.2f}"))
    print(f"FeatureExtractor on paths (decoded in this process): {paths['triplets_per_s']:.1f} trip/s, "
          f"ratio to the model {paths['ratio_to_model']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"arch": arch, "layout": args.layout, "batch": args.batch, "chunk": args.chunk,
                                         "device": args.device, "amp": args.amp, "results": results,
                                         "feature_extractor_paths": paths}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
