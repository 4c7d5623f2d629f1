"""The exported ONNX graph on onnxruntime against PyTorch eager: speed and parity, on the CPU.

One run builds EDITOR from the RGBNT201 preset (ViT-B/16, 256x128; ``model.pretrain_choice=none``:
random weights, LayerNorm affine parameters perturbed as in ``bench_model.py``; ``--tiny``: width
64, depth 2, 64x32 for a smoke test), exports it with :func:`editor_reid.deploy.export.export_model`
and reports:

* ``export``: seconds to export, file size;
* ``parity``: for each batch size, triplets of a synthetic RGBNT201 dataset through the real test
  transform (``bench_model.synthetic_batch``), cameras cycling through -1 (unknown), 0, 1, ...,
  and the first triplet's NI replaced by the zero image of an absent modality (batches of 2 or
  more). Per triplet the relative error ``max|f_ort - f_torch| / max|f_torch|``, its maximum over
  the batch, and how many triplets' SFTS selections (``token_mask`` against
  ``model.last_token_mask``) differ; ``kept`` gives the patches kept per triplet (min-max), to show
  that the selection varies from triplet to triplet. ``tied`` counts the triplets with a tie at
  an SFTS top-k boundary (equal frequency counts, or rollout scores within 1e-5 relative): there
  ``torch.topk`` breaks the tie in its own, implementation-defined way and onnxruntime's ``TopK``
  keeps the lower index, so the two may keep different patches (docs/export.md). The maximum
  error is reported over the other triplets (``untied``) and over all; the script exits 1 when an
  untied triplet differs by 1e-4 or more or selects other patches;
* ``speed``: for each batch size, triplets/s of ``model(images, cams)`` (PyTorch eager, eval,
  ``torch.inference_mode``) and of the onnxruntime session (CPU provider, inputs as NumPy arrays),
  the best of ``--repeats`` interleaved rounds after one warm-up each, and ``ratio`` =
  onnxruntime over PyTorch (> 1: onnxruntime is faster); ``median ratio`` compares the median
  rounds (steadier on a busy machine).

Both use ``--threads`` threads (0: each library's default, all cores).

Examples::

    python benchmarks/bench_onnx.py                          # ViT-B/16, batches 1 and 8
    python benchmarks/bench_onnx.py --tiny --repeats 1       # smoke test
    python benchmarks/bench_onnx.py --batches 1,8,32 --threads 2 --json onnx.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_model import machine_info, perturb_norms, synthetic_batch  # the same inputs and weights
from editor_reid.config import load_config, resolve_config_path
from editor_reid.deploy.export import export_model
from editor_reid.deploy.onnx_runtime import OnnxModel
from editor_reid.model import build_model
from editor_reid.model.sfts import frequency_scores

MODS = ("RGB", "NI", "TI")
NUM_CLASSES = 171  # RGBNT201's training identities
NUM_CAMERAS = 4
TINY = ["model.embed_dim=64", "model.depth=2", "model.num_heads=4", "model.head_keep=1", "model.frequency_keep=2",
        "input.size_train=[64,32]", "input.size_test=[64,32]"]


def build(tiny: bool, ties: str = "torch"):
    cfg = load_config(resolve_config_path("rgbnt201"),
                      ["model.pretrain_choice=none", f"model.sfts_ties={ties}", *(TINY if tiny else [])])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=NUM_CLASSES, num_cameras=NUM_CAMERAS)
    perturb_norms(model)
    return cfg, model.eval()


def inputs(batch: int, size, offset: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    collated = synthetic_batch(batch, size, offset)
    images = {m: collated[m] for m in MODS}
    if batch > 1:
        images["NI"][0] = 0.0  # an absent modality, as the data layer feeds it
    cams = torch.arange(batch) % (NUM_CAMERAS + 1) - 1  # -1 = unknown camera first
    return images, cams


def boundary_ties(model, images: dict[str, torch.Tensor], cams: torch.Tensor) -> torch.Tensor:
    """[B] bool: the triplet has a tie at a top-k boundary of SFTS, where ``torch.topk`` and
    onnxruntime's ``TopK`` may keep different patches: equal frequency counts at the
    ``frequency_keep`` boundary, or rollout scores within 1e-5 relative at a ``head_keep`` one."""
    stack = [images[m] for m in MODS]
    counts = frequency_scores(stack).topk(model.sfts.frequency_keep + 1, dim=-1).values  # [B, k+1]
    with torch.inference_mode():
        row = model.backbone(torch.cat(stack), cams.repeat(len(MODS))).rollout  # [M·B, h, N]
    top = row.topk(model.sfts.head_keep + 1, dim=-1).values
    near = ((top[..., -2] - top[..., -1]) <= 1e-5 * top[..., -2]).unflatten(0, (len(MODS), -1))  # [M, B, h]
    return (counts[:, -2] == counts[:, -1]) | near.any(dim=2).any(dim=0)


def parity(model, graph: OnnxModel, batch: int, size) -> dict:
    images, cams = inputs(batch, size, offset=batch)
    with torch.inference_mode():
        ref = model(images, cams)
    mask = model.last_token_mask
    out = graph(images, cams)
    rel = ((out - ref).abs().amax(dim=1) / ref.abs().amax(dim=1))
    differ = (graph.last_token_mask != mask).any(dim=1)
    tied = boundary_ties(model, images, cams)
    kept = mask.sum(dim=1)
    return {"batch": batch, "max_rel_error": float(rel[~tied].max()) if (~tied).any() else None,
            "rel_error": rel.tolist(), "tied": tied.tolist(), "masks_differ": int(differ.sum()),
            "masks_differ_untied": int((differ & ~tied).sum()), "max_rel_error_all": float(rel.max()),
            "kept_min": int(kept.min()), "kept_max": int(kept.max()), "num_patches": int(mask.shape[1])}


def speed(model, graph: OnnxModel, batch: int, size, repeats: int) -> dict:
    images, cams = inputs(batch, size, offset=0)
    feed = {m: images[m].numpy() for m in MODS}
    feed["cam_ids"] = cams.numpy()

    def run_torch():
        with torch.inference_mode():
            model(images, cams)

    def run_ort():
        graph.session.run(None, feed)

    fns = {"torch": run_torch, "onnxruntime": run_ort}
    rounds: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for index in range(repeats):
        order = list(fns) if index % 2 == 0 else list(reversed(fns))
        for name in order:
            start = time.perf_counter()
            fns[name]()
            rounds[name].append(time.perf_counter() - start)
    rates = {name: batch / min(times) for name, times in rounds.items()}
    medians = {name: batch / statistics.median(times) for name, times in rounds.items()}
    return {"batch": batch, "triplets_per_s": rates, "median_triplets_per_s": medians, "round_times_s": rounds,
            "ratio": rates["onnxruntime"] / rates["torch"],
            "median_ratio": medians["onnxruntime"] / medians["torch"]}


def render(report: dict) -> str:
    m, e = report["machine"], report["export"]
    lines = [f"machine: {m['cpu_model'] or m['processor']} ({m['cpu_count']} CPUs), torch {m['torch']}, "
             f"onnxruntime {report['onnxruntime']}, threads {report['threads'] or 'default'}",
             f"model: {report['model']} at {report['size'][0]}x{report['size'][1]}; export {e['seconds']:.1f} s, "
             f"{e['mib']:.1f} MiB, opset {e['opset']}",
             "", "parity   batch  tied  max rel err (untied)  masks differ (untied)  max rel err (all)  kept patches"]
    for p in report["parity"]:
        untied = "-" if p["max_rel_error"] is None else f"{p['max_rel_error']:.2e}"
        lines.append(f"         {p['batch']:>5}  {sum(p['tied']):>4}  {untied:>20}  "
                     f"{p['masks_differ']:>6} ({p['masks_differ_untied']}){'':>8}  {p['max_rel_error_all']:17.2e}  "
                     f"{p['kept_min']}-{p['kept_max']} of {p['num_patches']}")
    lines += ["", "speed    batch  torch trip/s  onnxruntime trip/s  ratio (ort/torch)  median ratio"]
    for s in report["speed"]:
        rate = s["triplets_per_s"]
        lines.append(f"         {s['batch']:>5}  {rate['torch']:12.2f}  {rate['onnxruntime']:18.2f}  {s['ratio']:17.2f}"
                     f"  {s['median_ratio']:12.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny ViT (width 64, depth 2) at 64x32: a smoke test")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (triplets)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per batch size (best kept)")
    parser.add_argument("--threads", type=int, default=0, help="threads of both libraries (0: their defaults)")
    parser.add_argument("--ties", choices=("torch", "lower_index"), default="torch",
                        help="model.sfts_ties: lower_index makes tied SFTS boundaries match ONNX's TopK")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime

    cfg, model = build(args.tiny, args.ties)
    size = tuple(cfg.input.size_test)
    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as tmp:
        path = Path(tmp) / "editor.onnx"
        start = time.perf_counter()
        export_model(model, cfg, path)
        seconds = time.perf_counter() - start
        graph = OnnxModel(path, threads=args.threads or None)
        import onnx

        report = {
            "machine": machine_info("cpu"),
            "onnxruntime": onnxruntime.__version__,
            "threads": args.threads,
            "model": "tiny ViT (64-d, depth 2)" if args.tiny else "ViT-B/16 (rgbnt201 preset, random weights)",
            "size": list(size),
            "export": {"seconds": seconds, "mib": path.stat().st_size / 2**20,
                       "opset": onnx.load(path, load_external_data=False).opset_import[0].version},
            "parity": [parity(model, graph, b, size) for b in batches],
            "speed": [speed(model, graph, b, size, args.repeats) for b in batches],
        }
        del graph
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    ok = all((p["max_rel_error"] or 0.0) < 1e-4 and p["masks_differ_untied"] == 0 for p in report["parity"])
    if not ok:
        print("parity: on a triplet without a top-k tie, onnxruntime differs from PyTorch by more than 1e-4 or "
              "selects other tokens", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
