"""EDITOR against its bare backbone: inference time, training-step time and memory, FLOPs.

One run measures, for each input size (default ViT-B/16 at 256x128 and 128x256):

* inference (eval mode, ``torch.inference_mode``): the bare backbone on the three modalities
  (one batch of 3B images, no attention probabilities) against the full EDITOR forward
  (backbone with attention probabilities -> SFTS -> HMA -> f_HMA); time per triplet and ratio;
* FLOPs per triplet actually performed by each (``torch.utils.flop_counter.FlopCounterMode``;
  the CPU flash-attention kernels, which it does not know, are counted with its SDPA formula),
  the achieved FLOP/s, and the same machine's large-matmul FLOP/s (2048x2048 matmuls of the
  compute dtype) measured in this run, as a fraction;
* one training step (forward, all losses, backward, optimiser step; SGD as the official recipe):
  the bare backbone with a plain ID + triplet head (BN neck + Linear on the concatenated CLS
  tokens; label-smoothed CE + soft-margin batch-hard triplet on the pre-BN feature) against
  the full EDITOR with :class:`editor_reid.losses.EditorCriterion`; time and peak memory, and
  their ratios.

Peak memory of a training step = the peak during one step minus the resident memory just
before it, in steady state: model and optimiser state exist (one warm-up step done) and the
gradients have been freed by ``zero_grad(set_to_none=True)``, as at the start of every step, so
activations, gradients and optimiser temporaries all count in the step's peak. On CUDA this is
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus
``memory_allocated()``. On CPU each variant runs in a fresh subprocess with glibc's mmap
threshold pinned at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so every tensor buffer is mmapped and
returned to the system when freed and the resident set follows the live tensors; the process's
high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` just before the measured
step and read after it. Times are the minimum over ``--repeats`` (training: ``--train-repeats``)
interleaved rounds (backbone and EDITOR alternate, in reverse order every other round, so slow
phases of a shared machine hit both); the table also gives the ratio of the median rounds and
the median of the per-round ratios (each EDITOR round divided by the backbone round next to it),
the steadiest of the three when the machine's speed drifts; every round's time is in the JSON.

Allocator (``--allocator``, CPU timings): ``system`` (default) keeps glibc's defaults, as a user
gets them. There, blocks over glibc's mmap threshold (at most 32 MiB; a ViT-B MLP activation at
batch 8 is 38 MiB) can be mapped and unmapped on every allocation, and each use page-faults them
back in; how often depends on the allocation history of the process, a source of round-to-round
variation. ``reuse`` tells glibc through ``mallopt`` never to hand memory back to the system (no
mmap for large blocks, no trimming), so freed tensor memory is reused and nothing page-faults
after the first round. Both models are timed under the same setting; the JSON records it.

Examples::

    python benchmarks/bench_model.py                         # ViT-B, 256x128 and 128x256, CPU fp32
    python benchmarks/bench_model.py --tiny --repeats 2      # quick check
    python benchmarks/bench_model.py --device cuda --amp bf16 --batch 32 --train-batch 16 --compile
    python benchmarks/bench_model.py --sizes 128x256 --json out.json
    python benchmarks/bench_model.py --sizes 128x256 --grad-checkpointing   # EDITOR with activation checkpointing
    python benchmarks/bench_model.py --sizes 128x256 --no-lean-mlp          # EDITOR's MLPs keep GELU outputs

Inputs (``--inputs``) are by default images of a synthetic dataset (``make_synthetic``: the
RGBNT201 person layout for portrait sizes, RGBNT100 vehicles for landscape ones) through the real
test transform, or N(0, 1) noise. The models have their initial weights with the LayerNorm affine
parameters perturbed. The number of patches SFTS keeps (and with it HMA's work and the work the
last backbone block skips) depends on weights and images, so it is reported with the FLOPs:
per triplet at ViT-B, each kept patch adds about 85 MFLOP in HMA (6 token-blocks) and each
dropped one saves about 37 MFLOP in the last backbone block (3 modalities).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from editor_reid.config import load_config
from editor_reid.engine.solver import autocast_context, build_optimizer, make_grad_scaler
from editor_reid.losses import EditorCriterion, cross_entropy_label_smooth, triplet_loss
from editor_reid.engine.acceleration import maybe_compile
from editor_reid.model import build_backbone, build_model

MODS = ("RGB", "NI", "TI")
NUM_CAMERAS = 4
TINY = {"embed_dim": 64, "depth": 2, "num_heads": 4}


# ------------------------------------------------------------------------------------ the models


class BackboneBaseline(nn.Module):
    """The bare shared backbone with a plain ReID head: BN neck + Linear on [CLS_R; CLS_N; CLS_T]."""

    def __init__(self, cfg, num_classes: int) -> None:
        super().__init__()
        self.backbone = build_backbone(cfg.model, tuple(cfg.input.size_train), NUM_CAMERAS)
        dim = 3 * self.backbone.embed_dim
        self.bn = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.head.weight, std=0.001)

    def forward(self, images: dict[str, torch.Tensor], cam_ids: torch.Tensor):
        batch = images["RGB"].shape[0]
        tokens = self.backbone(torch.cat([images[m] for m in MODS]), cam_ids.repeat(3), rollout=False).tokens
        feat = torch.cat(tokens[:, 0].split(batch), dim=-1)  # [B, 3D]
        if not self.training:
            return feat
        return self.head(self.bn(feat)), feat


def baseline_loss(cfg, out, targets):
    logits, feat = out
    eps = cfg.model.label_smooth_eps if cfg.model.if_labelsmooth else 0.0
    margin = None if cfg.model.no_margin else cfg.solver.margin
    return cross_entropy_label_smooth(logits, targets, eps) + triplet_loss(feat, targets, margin)


def make_config(args, size: tuple[int, int]):
    overrides = [f"input.size_train=[{size[0]},{size[1]}]", f"input.size_test=[{size[0]},{size[1]}]"]
    arch = dict(TINY) if args.tiny else {}
    for key, value in (("embed_dim", args.embed_dim), ("depth", args.depth), ("num_heads", args.heads)):
        if value:
            arch[key] = value
    overrides += [f"model.{k}={v}" for k, v in arch.items()]
    overrides.append(f"model.compile={'true' if args.compile else 'false'}")
    overrides.append(f"model.grad_checkpointing={'true' if args.grad_checkpointing else 'false'}")
    overrides.append(f"model.lean_mlp={'false' if getattr(args, 'no_lean_mlp', False) else 'true'}")
    return load_config(None, overrides)


def perturb_norms(model: nn.Module, seed: int = 0) -> None:
    """Move LayerNorm affine parameters off their constant init
    (docs/official-behaviour.md#quirk-patch-mean-divisor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) and module.weight is not None:
                module.weight.add_(0.1 * torch.randn(module.weight.shape, generator=g))
                module.bias.add_(0.1 * torch.randn(module.bias.shape, generator=g))


def build(args, variant: str, size, device):
    cfg = make_config(args, size)
    torch.manual_seed(0)
    if variant == "editor":
        model = build_model(cfg, num_classes=args.num_classes, num_cameras=NUM_CAMERAS)
    else:
        model = BackboneBaseline(cfg, args.num_classes)
    perturb_norms(model)
    model.to(device)
    return cfg, maybe_compile(model, cfg)


_SYNTHETIC: dict[str, tempfile.TemporaryDirectory] = {}  # removed when the process exits


def synthetic_batch(batch: int, size, offset: int) -> dict[str, torch.Tensor]:
    """``batch`` gallery triplets of a synthetic dataset through the real test transform.

    Person layout (RGBNT201) for portrait sizes, vehicle layout (RGBNT100) for landscape ones;
    the transform resizes to ``size`` and normalises as in evaluation.
    """
    from editor_reid.data.layouts import load_dataset
    from editor_reid.data.loaders import build_test_loader
    from editor_reid.data.synthetic import make_synthetic

    layout = "rgbnt201" if size[0] >= size[1] else "rgbnt100"
    if layout not in _SYNTHETIC:
        _SYNTHETIC[layout] = tempfile.TemporaryDirectory(prefix="bench_model_")
        make_synthetic(layout, _SYNTHETIC[layout].name, ids=20, views=4, seed=0)
    splits = load_dataset(layout, _SYNTHETIC[layout].name)
    samples = [splits.gallery[(offset + i) % len(splits.gallery)] for i in range(batch)]
    cfg = load_config(None, [f"input.size_test=[{size[0]},{size[1]}]", f"input.size_train=[{size[0]},{size[1]}]",
                             f"test.ims_per_batch={batch}", "dataloader.num_workers=0"])
    return next(iter(build_test_loader(cfg, samples)))


def make_inputs(batch: int, size, device, seed: int = 0, source: str = "synthetic"):
    """Images per modality [B, 3, H, W] (normalised), camera ids, labels (2 per identity)."""
    if source == "synthetic":
        images = {m: t.to(device) for m, t in synthetic_batch(batch, size, offset=seed * batch).items() if m in MODS}
    else:
        g = torch.Generator().manual_seed(seed)
        images = {m: torch.randn(batch, 3, *size, generator=g).to(device) for m in MODS}
    cams = (torch.arange(batch) % NUM_CAMERAS).to(device)
    targets = (torch.arange(batch) // 2).to(device)  # P x K with K = 2: every anchor has a positive
    return images, cams, targets


# -------------------------------------------------------------------------------- measurements


def configure_allocator(mode: str) -> str:
    """Apply ``--allocator`` to this process; returns what was done (for the report)."""
    if mode == "system":
        return "system (glibc defaults)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system (not glibc: --allocator reuse has no effect)"
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    if not (mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2**31 - 1)):
        return "system (mallopt refused)"
    return "reuse (glibc mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _sdpa_cpu_flops(q, k, v, *args, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _sdpa_cpu_backward_flops(grad_out, q, k, v, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


# FlopCounterMode knows the CUDA attention kernels but not the CPU flash-attention ones.
EXTRA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


def count_flops(fn) -> tuple[int, dict[str, int]]:
    """Total FLOPs of ``fn()`` and per top-level submodule (name -> FLOPs)."""
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOPS)
    with counter:
        fn()
    counts = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items() if name != "Global"}
    # Children of the called module: "EDITOR.x" when it was called, "x" when its forward was.
    roots = [name for name in counts if "." not in name]
    depth = 1 if len(roots) == 1 else 0
    per_module = {name.split(".", depth)[-1]: n for name, n in counts.items() if name.count(".") == depth}
    return int(counter.get_total_flops()), per_module


MATMUL_N = 2048


def matmul_fn(device, dtype, n: int = MATMUL_N, reps: int = 10):
    """A function running ``reps`` n x n @ n x n matmuls, and the FLOPs it performs."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def run():
        for _ in range(reps):
            a @ b

    return run, 2 * n**3 * reps


def matmul_peak(device, dtype, n: int = MATMUL_N) -> float:
    """Best FLOP/s of large matmuls (3 rounds after a warm-up)."""
    run, flops = matmul_fn(device, dtype, n)
    return flops / time_interleaved({"matmul": run}, 3, device)["matmul"]


def time_rounds(fns: dict, repeats: int, device) -> dict[str, list[float]]:
    """Wall times of each fn over ``repeats`` rounds; within a round the fns run one after the
    other, in reverse order every other round."""
    for fn in fns.values():  # warm-up (allocator, kernels, compilation)
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for index in range(repeats):  # A B, B A, A B, ...: a steady drift of the machine hits both alike
        for name, fn in order if index % 2 == 0 else order[::-1]:
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def time_interleaved(fns: dict, repeats: int, device) -> dict[str, float]:
    """Minimum wall time of each fn over ``repeats`` interleaved rounds."""
    return {name: min(values) for name, values in time_rounds(fns, repeats, device).items()}


def paired_ratio(rounds: dict[str, list[float]]) -> float:
    """Median over rounds of EDITOR's time / the backbone's time in the same round."""
    return statistics.median(e / b for e, b in zip(rounds["editor"], rounds["backbone"]))


def train_step_fn(cfg, model, criterion, optimizer, scaler, images, cams, targets, device, amp: str):
    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, amp):
            out = model(images, cams)
            loss = criterion(out, targets)[0] if criterion is not None else baseline_loss(cfg, out, targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def training_setup(args, variant: str, size, device):
    cfg, model = build(args, variant, size, device)
    model.train()
    criterion = EditorCriterion(cfg, args.num_classes, model.embed_dim).to(device) if variant == "editor" else None
    optimizer = build_optimizer(cfg, model)
    scaler = make_grad_scaler(device, args.amp)
    images, cams, targets = make_inputs(args.train_batch, size, device, seed=1, source=args.inputs)
    return train_step_fn(cfg, model, criterion, optimizer, scaler, images, cams, targets, device, args.amp), optimizer


def _proc_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


def memory_worker(args) -> None:
    """Subprocess body: steady-state RSS before one training step and the step's peak (CPU)."""
    size = parse_size(args.sizes[0])
    step, optimizer = training_setup(args, args.memory_worker, size, "cpu")
    step()  # warm-up: the optimiser state exists from here on
    optimizer.zero_grad(set_to_none=True)  # as the step itself starts: gradients count in its peak
    before = _proc_status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step()
    peak = _proc_status()["VmHWM"]
    print(json.dumps({"before": before, "peak": peak}))


def peak_memory_cpu(args, variant: str, size) -> dict[str, int]:
    command = [sys.executable, __file__, "--memory-worker", variant, "--sizes", f"{size[0]}x{size[1]}"]
    command += ["--train-batch", str(args.train_batch), "--num-classes", str(args.num_classes), "--amp", args.amp]
    command += ["--inputs", args.inputs]
    command += ["--threads", str(torch.get_num_threads())]
    if args.tiny:
        command.append("--tiny")
    if args.grad_checkpointing:
        command.append("--grad-checkpointing")
    if args.no_lean_mlp:
        command.append("--no-lean-mlp")
    for flag, value in (("--embed-dim", args.embed_dim), ("--depth", args.depth), ("--heads", args.heads)):
        if value:
            command += [flag, str(value)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode:
        raise RuntimeError(f"memory worker for {variant} failed:\n{result.stderr[-3000:]}")
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    return {"step_peak": stats["peak"] - stats["before"], "total_peak": stats["peak"]}


def peak_memory_cuda(step, optimizer) -> dict[str, int]:
    step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"step_peak": peak - before, "total_peak": peak}


# ------------------------------------------------------------------------------------- a size


def bench_size(args, size, device, dtype) -> dict:
    result: dict = {"size": list(size)}
    _, editor = build(args, "editor", size, device)
    editor.eval()
    backbone = editor.backbone
    images, cams, _ = make_inputs(args.batch, size, device, source=args.inputs)
    stacked, cams3 = torch.cat([images[m] for m in MODS]), cams.repeat(3)
    amp = args.amp

    # With --compile (CUDA) the EDITOR is compiled in place by maybe_compile; its backbone, a
    # submodule, is compiled separately for its own timing. FLOPs are counted on the eager
    # forwards (``Module.forward`` bypasses the compiled call; module names then are class names).
    timed_backbone = torch.compile(backbone) if args.compile and torch.device(device).type == "cuda" else backbone

    def run_backbone(module=timed_backbone):
        with autocast_context(device, amp):
            return module(stacked, cams3, rollout=False).tokens

    def run_editor(call=editor):
        with autocast_context(device, amp):
            return call(images, cams)

    with torch.inference_mode():
        flops_backbone, _ = count_flops(lambda: run_backbone(backbone))
        flops_editor, parts = count_flops(lambda: run_editor(editor.forward if args.compile else editor))
        kept = editor.last_token_mask.sum(dim=1).float()
        # The matmul reference runs between the models' runs, so it sees the same machine state.
        run_matmul, matmul_flops = matmul_fn(device, dtype, args.matmul_size)
        fns = {"backbone": run_backbone, "matmul": run_matmul, "editor": run_editor}
        rounds = time_rounds(fns, args.repeats, device)
    times = {name: min(values) for name, values in rounds.items()}
    peak_flops = matmul_flops / times.pop("matmul")
    b = args.batch
    result["inference"] = {
        "batch_triplets": b,
        "time_per_triplet_s": {k: v / b for k, v in times.items()},
        "ratio": times["editor"] / times["backbone"],
        "median_ratio": statistics.median(rounds["editor"]) / statistics.median(rounds["backbone"]),
        "paired_ratio": paired_ratio(rounds),
        "round_times_s": rounds,
        "gflops_per_triplet": {"backbone": flops_backbone / b / 1e9, "editor": flops_editor / b / 1e9},
        "editor_gflops_by_module": {k: v / b / 1e9 for k, v in parts.items()},
        "achieved_gflops": {"backbone": flops_backbone / times["backbone"] / 1e9, "editor": flops_editor / times["editor"] / 1e9},
        "fraction_of_matmul_peak": {
            "backbone": flops_backbone / times["backbone"] / peak_flops,
            "editor": flops_editor / times["editor"] / peak_flops,
        },
        "matmul_peak_gflops": peak_flops / 1e9,
        "kept_patches_mean": float(kept.mean()),
        "kept_patches_max": int(kept.max()),
        "num_patches": editor.num_patches,
    }
    del editor, backbone
    if args.skip_train:
        return result
    setups = {v: training_setup(args, v, size, device) for v in ("backbone", "editor")}
    train_rounds = time_rounds({v: step for v, (step, _) in setups.items()}, args.train_repeats, device)
    train_times = {name: min(values) for name, values in train_rounds.items()}
    if torch.device(device).type == "cuda":
        memory = {v: peak_memory_cuda(*setup) for v, setup in setups.items()}
    else:
        del setups
        memory = {v: peak_memory_cpu(args, v, size) for v in ("backbone", "editor")}
    result["train"] = {
        "batch_triplets": args.train_batch,
        "step_time_s": train_times,
        "time_ratio": train_times["editor"] / train_times["backbone"],
        "median_time_ratio": statistics.median(train_rounds["editor"]) / statistics.median(train_rounds["backbone"]),
        "paired_time_ratio": paired_ratio(train_rounds),
        "round_times_s": train_rounds,
        "step_peak_bytes": {v: m["step_peak"] for v, m in memory.items()},
        "total_peak_bytes": {v: m["total_peak"] for v, m in memory.items()},
        "memory_ratio": memory["editor"]["step_peak"] / memory["backbone"]["step_peak"],
        "total_memory_ratio": memory["editor"]["total_peak"] / memory["backbone"]["total_peak"],
    }
    return result


# ---------------------------------------------------------------------------------- reporting


def machine_info(device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_model": "",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        match = re.search(r"Model name:\s*(.+)", lscpu)
        info["cpu_model"] = match.group(1).strip() if match else ""
    except OSError:
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def render(report: dict) -> str:
    m, cfg = report["machine"], report["config"]
    lines = [
        f"machine: {m['cpu_model'] or m['processor']} (processor '{m['processor']}', {m['cpu_count']} CPUs), "
        f"torch {m['torch']}, {m['torch_threads']} threads, device {m['device']}" + (f" ({m['gpu']})" if "gpu" in m else "")
        + f"; allocator {cfg['allocator']}",
        f"model: {cfg['arch']}; inputs {cfg['inputs']}; amp {cfg['amp']}; compile {cfg['compile']}; "
        f"grad checkpointing {cfg.get('grad_checkpointing', False)}; lean MLP {cfg.get('lean_mlp', False)}; "
        f"large-matmul reference: {cfg['matmul']} (best of the run's rounds; at the start of the run "
        f"{report['matmul_peak_gflops']:.1f} GFLOP/s)",
    ]
    row = "{:<48}{:>12}{:>12}{:>10}"
    for res in report["results"]:
        inf = res["inference"]
        h, w = res["size"]
        lines += ["", f"input {h}x{w} ({inf['num_patches']} patches; SFTS kept {inf['kept_patches_mean']:.1f} "
                  f"patches per sample on average, max {inf['kept_patches_max']})",
                  row.format("", "backbone", "EDITOR", "ratio")]
        t, f, a, frac = inf["time_per_triplet_s"], inf["gflops_per_triplet"], inf["achieved_gflops"], inf["fraction_of_matmul_peak"]
        lines.append(row.format(f"inference s/triplet (batch {inf['batch_triplets']}, best)", f"{t['backbone']:.3f}",
                                f"{t['editor']:.3f}", f"{inf['ratio']:.3f}"))
        lines.append(row.format("  ratio of the median rounds", "", "", f"{inf['median_ratio']:.3f}"))
        lines.append(row.format("  median of the per-round ratios", "", "", f"{inf['paired_ratio']:.3f}"))
        lines.append(row.format("inference triplets/s (best)", f"{1 / t['backbone']:.1f}", f"{1 / t['editor']:.1f}", ""))
        lines.append(row.format("inference GFLOPs/triplet", f"{f['backbone']:.2f}", f"{f['editor']:.2f}",
                                f"{f['editor'] / f['backbone']:.3f}"))
        lines.append(row.format("achieved GFLOP/s", f"{a['backbone']:.1f}", f"{a['editor']:.1f}", ""))
        lines.append(row.format("large-matmul GFLOP/s (same rounds)", f"{inf['matmul_peak_gflops']:.1f}", "", ""))
        lines.append(row.format("fraction of large-matmul FLOP/s", f"{frac['backbone']:.1%}", f"{frac['editor']:.1%}", ""))
        parts = ", ".join(f"{k} {v:.2f}" for k, v in inf["editor_gflops_by_module"].items())
        lines.append(f"  EDITOR GFLOPs/triplet by module: {parts}")
        if "train" in res:
            tr = res["train"]
            st, sp = tr["step_time_s"], tr["step_peak_bytes"]
            tp = tr["total_peak_bytes"]
            lines.append(row.format(f"train step s (batch {tr['batch_triplets']} triplets, best)", f"{st['backbone']:.3f}",
                                    f"{st['editor']:.3f}", f"{tr['time_ratio']:.3f}"))
            lines.append(row.format("  ratio of the median rounds", "", "", f"{tr['median_time_ratio']:.3f}"))
            lines.append(row.format("  median of the per-round ratios", "", "", f"{tr['paired_time_ratio']:.3f}"))
            b = tr["batch_triplets"]
            lines.append(row.format("train triplets/s (best step)", f"{b / st['backbone']:.1f}", f"{b / st['editor']:.1f}", ""))
            lines.append(row.format("train step peak memory MiB (over steady)", f"{sp['backbone'] / 2**20:.0f}",
                                    f"{sp['editor'] / 2**20:.0f}", f"{tr['memory_ratio']:.3f}"))
            lines.append(row.format("train process peak memory MiB (total)", f"{tp['backbone'] / 2**20:.0f}",
                                    f"{tp['editor'] / 2**20:.0f}", f"{tr['total_memory_ratio']:.3f}"))
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"size '{text}' is not HxW (e.g. 256x128)")
    return int(match.group(1)), int(match.group(2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["256x128", "128x256"], help="input sizes HxW")
    parser.add_argument("--tiny", action="store_true", help=f"tiny ViT {TINY} instead of ViT-B/16")
    parser.add_argument("--embed-dim", type=int, default=0)
    parser.add_argument("--depth", type=int, default=0)
    parser.add_argument("--heads", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8, help="triplets per inference forward")
    parser.add_argument("--train-batch", type=int, default=4, help="triplets per training step (2 per ID)")
    parser.add_argument("--num-classes", type=int, default=171)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="model.compile=true (maybe_compile)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="model.grad_checkpointing=true for EDITOR (the bare backbone stays plain)")
    parser.add_argument("--no-lean-mlp", action="store_true",
                        help="model.lean_mlp=false for EDITOR: its MLPs keep their GELU outputs for the backward pass")
    parser.add_argument("--inputs", default="synthetic", choices=["synthetic", "random"],
                        help="synthetic dataset images through the test transform, or N(0, 1) noise")
    parser.add_argument("--repeats", type=int, default=5, help="timed inference rounds (minimum kept)")
    parser.add_argument("--train-repeats", type=int, default=3, help="timed training rounds (minimum kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--allocator", default="system", choices=["system", "reuse"],
                        help="CPU memory: glibc's defaults, or reuse freed blocks (see the module doc)")
    parser.add_argument("--matmul-size", type=int, default=MATMUL_N,
                        help="side of the reference matmul (default %(default)s; smaller only for smoke tests)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.train_batch % 2:
        parser.error("--train-batch must be even (two samples per identity for the triplet loss)")
    sizes = [parse_size(s) for s in args.sizes]
    allocator = configure_allocator(args.allocator) if args.device == "cpu" else "n/a (CUDA caching allocator)"
    dtype = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    peak = matmul_peak(args.device, dtype, args.matmul_size)
    cfg = make_config(args, sizes[0])
    m = cfg.model
    arch = f"{m.transformer_type}" + (f" (embed_dim {m.embed_dim}, depth {m.depth}, heads {m.num_heads})" if m.embed_dim else "")
    report = {
        "machine": machine_info(args.device),
        "config": {"arch": arch, "amp": args.amp, "compile": args.compile,
                   "grad_checkpointing": args.grad_checkpointing, "lean_mlp": not args.no_lean_mlp, "batch": args.batch,
                   "train_batch": args.train_batch, "repeats": args.repeats, "train_repeats": args.train_repeats, "inputs": args.inputs, "allocator": allocator, "matmul": f"{MATMUL_N}x{MATMUL_N} {str(dtype).replace('torch.', '')}"},
        "matmul_peak_gflops": peak / 1e9,
        "results": [],
    }
    for size in sizes:
        report["results"].append(bench_size(args, size, args.device, dtype))
        print(f"[{size[0]}x{size[1]} done]", file=sys.stderr, flush=True)
    report["matmul_peak_gflops_end"] = matmul_peak(args.device, dtype, args.matmul_size) / 1e9
    print(render(report))
    print(f"(large-matmul peak at the end of the run: {report['matmul_peak_gflops_end']:.1f} GFLOP/s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
