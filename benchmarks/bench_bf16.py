"""fp32 against bf16 autocast for EDITOR on one device, in one run (issue 19).

For one input size (default ViT-B/16 at 256x128, CPU), with the weights of ``bench_model.py``
(initial weights, LayerNorm affine perturbed) and its synthetic inputs:

* inference: triplets/s of the EDITOR forward (``torch.inference_mode``) in fp32 and under bf16
  autocast, interleaved rounds, best kept; their ratio (bf16 / fp32; target >= 1.6 where the CPU
  computes bf16 natively);
* what bf16 changes: the share of patches whose SFTS keep/drop decision agrees with fp32's on the
  same batch (target >= 0.98), and the cosine between the fp32 and bf16 retrieval features (target
  >= 0.999, min and mean over the batch);
* one training step (EDITOR + all losses, SGD) in fp32 and bf16; time ratio;
* the CPU's bf16 capability (``editor_reid.engine.acceleration.cpu_bf16_native``) and what
  ``amp: auto`` picks on it.

``--weights CKPT`` measures a trained model instead (an editor-reid checkpoint, at its own input
size; inference only), with the agreement and cosines over ``--batches`` batches.

Example::

    python benchmarks/bench_bf16.py                    # ViT-B, 256x128, batch 8, CPU
    python benchmarks/bench_bf16.py --tiny --repeats 1 # smoke test
    python benchmarks/bench_bf16.py --weights runs/demo/run/checkpoints/last.pt --batches 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model as bm  # noqa: E402
from _machine import cpu_name  # noqa: E402

from editor_reid.engine.acceleration import cpu_bf16_native, resolve_amp  # noqa: E402
from editor_reid.engine.solver import autocast_context  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256x128", help="input size HxW")
    parser.add_argument("--tiny", action="store_true", help=f"tiny ViT {bm.TINY} instead of ViT-B/16")
    parser.add_argument("--batch", type=int, default=8, help="triplets per inference forward")
    parser.add_argument("--train-batch", type=int, default=4, help="triplets per training step")
    parser.add_argument("--repeats", type=int, default=5, help="timed inference rounds (best kept)")
    parser.add_argument("--train-repeats", type=int, default=3, help="timed training rounds (best kept)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--weights", type=Path, default=None,
                        help="a trained editor-reid checkpoint instead of initial weights (inference only)")
    parser.add_argument("--batches", type=int, default=1, help="batches the agreement and cosines are measured on")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    # bench_model's helpers read these attributes.
    args.embed_dim = args.depth = args.heads = 0
    args.compile = False
    args.grad_checkpointing = False
    args.num_classes = 171
    args.inputs = "synthetic"
    device = torch.device("cpu")
    size = bm.parse_size(args.size)

    native, what = cpu_bf16_native()
    if args.weights is not None:
        from editor_reid.features.extractor import FeatureExtractor

        extractor = FeatureExtractor(args.weights, device="cpu")
        model, size = extractor.model, tuple(extractor.cfg.input.size_test)
        args.skip_train = True
    else:
        _, model = bm.build(args, "editor", size, device)
    model.eval()
    batches = [bm.make_inputs(args.batch, size, device, seed=seed, source="synthetic")[:2]
               for seed in range(args.batches)]
    images, cams = batches[0]

    def forward(amp: str, images=images, cams=cams):
        with torch.inference_mode(), autocast_context(device, amp):
            out = model.forward_features(images, cams)
        return out.feature.float(), out.token_mask

    pairs = [(forward("none", *batch), forward("bf16", *batch)) for batch in batches]
    f32, m32 = (torch.cat([p[0][i] for p in pairs]) for i in (0, 1))
    f16, m16 = (torch.cat([p[1][i] for p in pairs]) for i in (0, 1))
    cosine = torch.nn.functional.cosine_similarity(f32, f16, dim=1)
    rounds = bm.time_rounds({"fp32": lambda: forward("none"), "bf16": lambda: forward("bf16")}, args.repeats, device)
    best = {k: min(v) for k, v in rounds.items()}
    result = {
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "bf16": f"{'native' if native else 'emulated'} ({what}); amp auto -> {resolve_amp('auto', device)}",
        "model": str(args.weights) if args.weights else "tiny ViT" if args.tiny else "ViT-B/16",
        "size": f"{size[0]}x{size[1]}",
        "samples compared": len(f32),
        "inference batch": args.batch,
        "fp32 triplets/s": round(args.batch / best["fp32"], 2),
        "bf16 triplets/s": round(args.batch / best["bf16"], 2),
        "inference bf16/fp32 throughput": round(best["fp32"] / best["bf16"], 3),
        "token-mask agreement": round(float((m32 == m16).float().mean()), 4),
        "kept patches fp32 / bf16": f"{int(m32.sum())} / {int(m16.sum())}",
        "feature cosine min": round(float(cosine.min()), 5),
        "feature cosine mean": round(float(cosine.mean()), 5),
    }
    if not args.skip_train:
        steps = {}
        for amp in ("none", "bf16"):
            args.amp = amp
            step, _ = bm.training_setup(args, "editor", size, device)
            steps["fp32" if amp == "none" else "bf16"] = step
        train = {k: min(v) for k, v in bm.time_rounds(steps, args.train_repeats, device).items()}
        result.update({
            "train batch": args.train_batch,
            "fp32 train step s": round(train["fp32"], 3),
            "bf16 train step s": round(train["bf16"], 3),
            "train step fp32/bf16 time": round(train["fp32"] / train["bf16"], 3),
        })
    for key, value in result.items():
        print(f"{key:>32}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
