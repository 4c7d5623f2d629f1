"""Resident memory over a long EDITOR training run: does it stay flat?

The full EDITOR (SFTS + HMA + BCC + OCFR on, random weights) is trained for ``--steps`` optimiser
steps by the real training loop (:class:`editor_reid.engine.train.Trainer`, as ``editor-reid
train`` runs it) on a synthetic RGBNT201-layout dataset read through the real P×K loader and
train transform. SFTS keeps a data-dependent number of patches, so the kept-token shapes in
the last backbone block's selection, HMA and the losses change from batch to batch: the case in
which a long run could grow through allocator fragmentation rather than through a leak.

After every step (the Trainer's ``on_step`` hook; ``--loop plain`` runs the same step without the
Trainer's logging and checkpoints) the script samples:

* the process's resident set (``/proc/self/statm``) and its high-water mark within the step
  (``VmHWM``, reset through ``/proc/self/clear_refs`` after each sample);
* glibc's heap statistics (``mallinfo2``): bytes handed out and not yet freed ("in use", mmapped
  blocks included) and freed bytes glibc still holds ("free held"). A leak grows the first;
  allocator retention and fragmentation grow the second while the first stays flat;
* the number of patches SFTS kept per sample (``EDITOR.last_token_mask``).

It prints and writes (``--json``) the RSS after the first step, at the end of the warm-up
(``--warmup`` steps) and at the end, its peak, the slope in MiB per 100 steps of a robust
(Theil-Sen: median of pairwise slopes) linear fit over the second half of the run, the same
slopes for the heap figures and the in-step high-water mark, the kept-patch range and how many
distinct padded lengths and batch totals (the row count of HMA's packed layout) occurred, the
allocator setting and the time per step. No threshold is applied here: the numbers are for the
reader (benchmarks/RESULTS.md; docs/performance.md explains them).

Options:

* ``--allocator``: ``system`` (glibc defaults, as users get them); ``reuse`` (glibc never returns
  memory, as ``bench_model.py --allocator reuse``); ``mmap`` (every buffer over 64 KiB mmapped and
  unmapped when freed: RSS follows the live tensors, at the cost of page faults); ``trim``
  (``malloc_trim(0)`` after every step). Another allocator is measured by preloading it
  (``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2``); glibc's heap figures are then
  left out;
* ``--eval-every K``: also an evaluation pass on the test split (``evaluate_model``, as the
  Trainer runs it) every K steps; ``--trim-after-eval`` calls ``malloc_trim(0)`` after each
  (:func:`editor_reid.engine.acceleration.release_freed_memory`);
* ``--set KEY=VALUE``: a config override, e.g. ``model.sfts=false`` (every patch kept: constant
  shapes, the control run);
* ``--tracemalloc``: the Python allocations that grew between the end of the warm-up and the end.

Examples::

    python benchmarks/bench_memory.py                       # width 192, depth 4, 256x128, batch 8, 600 steps
    python benchmarks/bench_memory.py --loop plain --set model.sfts=false   # constant shapes
    python benchmarks/bench_memory.py --steps 1000 --eval-every 250 --trim-after-eval --json mem.json
    python benchmarks/bench_memory.py --tiny --steps 24     # quick check (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

# No per-epoch progress bars in the benchmark's output (tqdm reads this when it is imported).
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from torch import nn  # noqa: E402

from editor_reid.config import load_config  # noqa: E402
from editor_reid.data.layouts import load_dataset  # noqa: E402
from editor_reid.data.loaders import build_train_loader, seed_everything  # noqa: E402
from editor_reid.data.sampler import plan_epoch  # noqa: E402
from editor_reid.data.synthetic import make_synthetic  # noqa: E402
from editor_reid.engine.acceleration import release_freed_memory  # noqa: E402
from editor_reid.engine.distributed import unwrap_model  # noqa: E402
from editor_reid.engine.inference import batch_images, build_eval_loaders, evaluate_model  # noqa: E402
from editor_reid.engine.solver import autocast_context, build_optimizer, build_scheduler  # noqa: E402
from editor_reid.engine.train import Trainer  # noqa: E402
from editor_reid.losses import EditorCriterion, check_finite  # noqa: E402
from editor_reid.model import build_model  # noqa: E402

MIB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")

# Default: a small but real configuration; --tiny: a quick check.
DEFAULT = {"embed_dim": 192, "depth": 4, "num_heads": 4, "size": (256, 128), "ids": 60, "head_keep": 2,
           "frequency_keep": 10}
TINY = {"embed_dim": 64, "depth": 2, "num_heads": 4, "size": (128, 64), "ids": 12, "head_keep": 1,
        "frequency_keep": 2}


class _Done(Exception):
    """Raised from the step hook once the requested number of steps has run."""


# ------------------------------------------------------------------------------------ sampling


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = _libc()
_MALLINFO2 = getattr(LIBC, "mallinfo2", None)
if _MALLINFO2 is not None:
    _MALLINFO2.restype = _Mallinfo2


def heap_bytes() -> tuple[int, int] | None:
    """glibc heap: (in use, incl. mmapped blocks; freed but held), over all arenas. None off glibc."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd, info.fordblks


ALLOCATORS = {
    "system": "glibc defaults",
    "reuse": "glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1: freed memory is never returned to the system",
    "mmap": "glibc mallopt M_MMAP_THRESHOLD=64 KiB, M_TRIM_THRESHOLD=0: every tensor buffer mmapped and unmapped "
            "when freed (a fixed threshold also stops glibc's dynamic one)",
    "trim": "glibc defaults, and malloc_trim(0) after every step",
}


def configure_allocator(mode: str) -> str:
    """Apply ``--allocator`` to this process; returns what was done (for the report)."""
    if mode == "system":
        return f"system ({ALLOCATORS['system']})"
    if LIBC is None or not hasattr(LIBC, "mallopt"):
        return f"system (not glibc: --allocator {mode} has no effect)"
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4  # <malloc.h>
    settings = {"reuse": [(m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)],
                "mmap": [(m_mmap_threshold, 64 * 1024), (m_trim_threshold, 0)], "trim": []}[mode]
    if not all(LIBC.mallopt(option, value) for option, value in settings):
        return "system (mallopt refused)"
    return f"{mode} ({ALLOCATORS[mode]})"


def theil_sen(xs: list[float], ys: list[float], max_points: int = 400) -> float:
    """Median of the pairwise slopes (robust to a few outlying samples); evenly thinned to
    ``max_points`` points first."""
    if len(xs) < 2:
        return 0.0
    stride = max(1, math.ceil(len(xs) / max_points))
    xs, ys = xs[::stride], ys[::stride]
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[j] != xs[i]]
    return statistics.median(slopes)


# ------------------------------------------------------------------------------------ the run


def make_config(args, data_root: Path, out_dir: Path):
    arch = dict(TINY if args.tiny else DEFAULT)
    for key, value in (("embed_dim", args.embed_dim), ("depth", args.depth), ("num_heads", args.heads)):
        if value:
            arch[key] = value
    size = args.size or arch["size"]
    overrides = [
        "model.pretrain_choice=none",
        f"model.embed_dim={arch['embed_dim']}", f"model.depth={arch['depth']}", f"model.num_heads={arch['num_heads']}",
        f"model.head_keep={arch['head_keep']}", f"model.frequency_keep={arch['frequency_keep']}",
        "model.sfts=true", "model.hma=true", "model.bcc=true", "model.ocfr=true",
        f"input.size_train=[{size[0]},{size[1]}]", f"input.size_test=[{size[0]},{size[1]}]",
        "datasets.names=rgbnt201", f"datasets.root_dir={data_root}",
        f"dataloader.num_instance={args.num_instance}", f"dataloader.num_workers={args.workers}",
        f"solver.ims_per_batch={args.batch}", f"solver.amp={args.amp}", f"solver.seed={args.seed}",
        "solver.eval_period=0", "solver.checkpoint_period=0", "solver.log_period=10",
        f"test.ims_per_batch={args.test_batch}", f"output_dir={out_dir}",
        *args.overrides,
    ]
    return load_config(None, overrides)


def epochs_for(cfg, pids: list[int], steps: int) -> int:
    """The fewest epochs whose P×K plans hold ``steps`` batches (so the LR schedule is a real
    one; the run is stopped at ``steps`` inside the last epoch)."""
    batch, k, seed = cfg.solver.ims_per_batch, cfg.dataloader.num_instance, cfg.solver.seed
    total, epoch = 0, 0
    while total < steps:
        epoch += 1
        per_epoch = len(plan_epoch(pids, batch, k, seed, epoch)) // batch
        if per_epoch == 0:
            raise ValueError("the synthetic training split cannot fill one P×K batch; use more --ids")
        total += per_epoch
    return epoch


class Sampler:
    """Called after every optimiser step: samples memory and the kept-patch counts, runs the
    optional evaluation, and raises :class:`_Done` after the last step."""

    def __init__(self, args, evaluate) -> None:
        self.args = args
        self.evaluate = evaluate  # () -> metrics dict, restores the training mode itself
        self.step = 0
        self.series: dict[str, list[float]] = {"rss_mib": [], "step_peak_rss_mib": [], "heap_in_use_mib": [],
                                               "heap_free_held_mib": []}
        self.peak_resets = reset_peak_rss()
        self.kept: list[int] = []  # patches kept per sample, every step
        self.lengths: set[int] = set()  # padded kept length (1 + max kept) per batch
        self.totals: set[int] = set()  # kept patches in the batch: the row count of HMA's packed layout
        self.evals: list[dict] = []
        self.warmup_time = 0.0
        self.snapshot = None

    def __call__(self, model) -> None:
        self.step += 1
        n, args = self.step, self.args
        counts = model.last_token_mask.sum(dim=1).tolist()
        self.kept.extend(counts)
        self.lengths.add(1 + max(counts))
        self.totals.add(sum(counts))
        if args.eval_every and n % args.eval_every == 0:
            t0 = time.perf_counter()
            metrics = self.evaluate()
            self.evals.append({"step": n, "seconds": round(time.perf_counter() - t0, 3), "mAP": metrics["mAP"]})
            if args.trim_after_eval:
                release_freed_memory()
        if args.allocator == "trim":
            release_freed_memory()
        self.series["rss_mib"].append(rss_bytes() / MIB)
        if self.peak_resets:  # the RSS high-water mark of this step (and its evaluation)
            self.series["step_peak_rss_mib"].append(peak_rss_bytes() / MIB)
            reset_peak_rss()
        heap = heap_bytes()
        if heap is not None:
            self.series["heap_in_use_mib"].append(heap[0] / MIB)
            self.series["heap_free_held_mib"].append(heap[1] / MIB)
        if n == args.warmup:
            self.warmup_time = time.perf_counter()
            if args.tracemalloc:
                self.snapshot = tracemalloc.take_snapshot()
        if args.print_every and n % args.print_every == 0:
            print(f"step {n:5d}  RSS {self.series['rss_mib'][-1]:8.1f} MiB", file=sys.stderr, flush=True)
        if n >= args.steps:
            raise _Done


def train_with_trainer(cfg, sampler: Sampler) -> nn.Module:
    """The real training loop: :class:`Trainer` with the sampler as its ``on_step`` hook."""
    trainer = None

    def on_step(epoch: int, step: int) -> None:
        sampler(unwrap_model(trainer.model))

    trainer = Trainer(cfg, device="cpu", on_step=on_step)
    sampler.evaluate = lambda: evaluate_model(trainer.cfg, trainer.model, trainer.splits, "cpu",
                                              loaders=trainer.eval_loaders)
    try:
        trainer.fit()
    except _Done:
        pass
    return unwrap_model(trainer.model)


def train_plain(cfg, splits, sampler: Sampler) -> nn.Module:
    """The same step as ``Trainer.train_step`` (forward and losses under autocast, backward,
    optimiser step; per-epoch loader seeding and LR), without the Trainer's logging and
    checkpoints."""
    seed_everything(cfg.solver.seed)
    loader = build_train_loader(cfg, splits)
    model = build_model(cfg, splits.num_train_pids, splits.num_cameras)
    criterion = EditorCriterion(cfg, splits.num_train_pids, model.embed_dim)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(optimizer, cfg)
    eval_loaders = build_eval_loaders(cfg, splits)
    sampler.evaluate = lambda: evaluate_model(cfg, model, splits, "cpu", loaders=eval_loaders)
    try:
        for epoch in range(1, cfg.solver.max_epochs + 1):
            loader.set_epoch(epoch)
            scheduler.step(epoch)
            model.train()
            criterion.train()
            for batch in loader:
                images = batch_images(batch, "cpu")
                with autocast_context("cpu", cfg.solver.amp):
                    out = model(images, batch["camid"])
                    total, terms = criterion(out, batch["pid"])
                check_finite(terms, epoch, sampler.step + 1)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                sampler(model)
    except _Done:
        pass
    return model


def run(args) -> dict:
    allocator = configure_allocator(args.allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = TINY if args.tiny else DEFAULT
    ids = args.ids or arch["ids"]
    work = tempfile.TemporaryDirectory(prefix="bench_memory_")
    root = Path(work.name)
    make_synthetic("rgbnt201", root / "data", ids=ids, views=args.views, seed=args.seed)
    cfg = make_config(args, root / "data", root / "run")
    splits = load_dataset(cfg.datasets.names, cfg.datasets.root_dir)
    cfg.solver.max_epochs = epochs_for(cfg, [s.pid for s in splits.train], args.steps)
    # A short run keeps the official warm-up shape at a smaller scale instead of skipping it.
    cfg.solver.warmup_iters = min(cfg.solver.warmup_iters, max(1, cfg.solver.max_epochs // 2))

    sampler = Sampler(args, evaluate=None)
    if args.tracemalloc:
        tracemalloc.start(8)
    started = time.perf_counter()
    if args.loop == "trainer":
        model = train_with_trainer(cfg, sampler)
    else:
        model = train_plain(cfg, splits, sampler)
    ended = time.perf_counter()
    steps = sampler.step
    growth = None
    if args.tracemalloc and sampler.snapshot is not None:
        stats = tracemalloc.take_snapshot().compare_to(sampler.snapshot, "traceback")
        tracemalloc.stop()
        growth = [{"kib": round(s.size_diff / 1024, 1), "blocks": s.count_diff,
                   "where": [f"{f.filename}:{f.lineno}" for f in s.traceback][-4:]}
                  for s in stats[:8] if s.size_diff > 0]
    work.cleanup()
    if steps < args.steps:
        raise RuntimeError(f"training stopped after {steps} of {args.steps} steps")

    report = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg())},
        "config": {"loop": args.loop, "embed_dim": cfg.model.embed_dim, "depth": cfg.model.depth,
                   "num_heads": cfg.model.num_heads, "size": list(cfg.input.size_train),
                   "batch_triplets": cfg.solver.ims_per_batch, "num_instance": cfg.dataloader.num_instance,
                   "head_keep": cfg.model.head_keep, "frequency_keep": cfg.model.frequency_keep,
                   "amp": cfg.solver.amp, "ids": ids, "train_samples": len(splits.train),
                   "epochs": cfg.solver.max_epochs, "workers": args.workers, "eval_every": args.eval_every,
                   "trim_after_eval": args.trim_after_eval, "allocator": allocator, "ld_preload": os.environ.get("LD_PRELOAD", "")},
        "steps": steps,
        "warmup_steps": args.warmup,
        "seconds_per_step": (ended - sampler.warmup_time) / (steps - args.warmup),
        "seconds_total": ended - started,
    }
    report.update(summarise(sampler.series, args.warmup, steps))
    k = sampler.kept
    report["num_patches"] = model.num_patches
    report["kept_patches"] = {"min": min(k), "max": max(k), "mean": statistics.fmean(k),
                              "distinct_padded_lengths": len(sampler.lengths),
                              "distinct_batch_totals": len(sampler.totals)}
    report["evaluations"] = sampler.evals
    if growth is not None:
        report["tracemalloc_growth"] = growth
    report["samples"] = {key: [round(v, 2) for v in vs] for key, vs in sampler.series.items() if vs}
    return report


def summarise(samples: dict[str, list[float]], warmup: int, steps: int) -> dict:
    """RSS at the first step / the warm-up end / the end, peak, and the second-half slopes."""
    rss, peaks = samples["rss_mib"], samples["step_peak_rss_mib"]
    half = steps // 2
    xs = list(range(half + 1, steps + 1))  # step numbers (1-based) of the second half
    at_warmup = min(warmup, steps) - 1

    def slope(series: list[float]) -> float:
        return 100 * theil_sen(xs, series[half:steps])

    out = {
        "rss_mib": {"first_step": rss[0], "warmup_end": rss[at_warmup], "end": rss[-1],
                    "peak": max(peaks) if peaks else peak_rss_bytes() / MIB},
        "slope_mib_per_100_steps": slope(rss),
        "slope_window": [half + 1, steps],
    }
    if peaks:  # the high-water mark within each step: what the step needed on top of the rest
        out["step_peak_rss_mib"] = {"warmup_end": peaks[at_warmup], "end": peaks[-1],
                                    "max_after_warmup": max(peaks[warmup:] or peaks),
                                    "slope_per_100_steps": slope(peaks)}
    # Under a preloaded allocator (LD_PRELOAD=libjemalloc.so.2, ...) glibc's heap stays empty.
    if samples["heap_in_use_mib"] and max(samples["heap_in_use_mib"]) >= 1:
        out["heap_mib"] = {key: {"warmup_end": series[at_warmup], "end": series[-1],
                                 "slope_per_100_steps": slope(series)}
                           for key, series in (("in_use", samples["heap_in_use_mib"]),
                                               ("free_held", samples["heap_free_held_mib"]))}
    return out


def render(report: dict) -> str:
    c, r = report["config"], report["rss_mib"]
    k = report["kept_patches"]
    lines = [
        f"EDITOR width {c['embed_dim']}, depth {c['depth']}, {c['num_heads']} heads, {c['size'][0]}x{c['size'][1]}, "
        f"batch {c['batch_triplets']} triplets, amp {c['amp']}, {report['machine']['torch_threads']} threads; "
        f"allocator {c['allocator']}" + (f" under LD_PRELOAD={c['ld_preload']}" if c["ld_preload"] else "")
        + f"; eval every {c['eval_every'] or 'never'}" + (" (malloc_trim after each)" if c["trim_after_eval"] else ""),
        f"steps {report['steps']} (warm-up {report['warmup_steps']}), {report['seconds_per_step']:.3f} s/step; "
        f"kept patches per sample {k['min']}-{k['max']} of {report['num_patches']} (mean {k['mean']:.1f}), "
        f"{k['distinct_padded_lengths']} distinct padded lengths, {k['distinct_batch_totals']} distinct batch totals",
        f"RSS MiB: first step {r['first_step']:.1f}, warm-up end {r['warmup_end']:.1f}, end {r['end']:.1f}, "
        f"peak {r['peak']:.1f}",
        f"RSS slope over steps {report['slope_window'][0]}-{report['slope_window'][1]}: "
        f"{report['slope_mib_per_100_steps']:+.2f} MiB per 100 steps",
    ]
    if "step_peak_rss_mib" in report:
        p = report["step_peak_rss_mib"]
        lines.append(f"RSS high-water within a step MiB: warm-up end {p['warmup_end']:.1f}, end {p['end']:.1f}, "
                     f"max after warm-up {p['max_after_warmup']:.1f}, slope {p['slope_per_100_steps']:+.2f} per 100 steps")
    for key, label in (("in_use", "glibc heap in use"), ("free_held", "glibc heap freed but held")):
        if "heap_mib" in report:
            h = report["heap_mib"][key]
            lines.append(f"{label} MiB: warm-up end {h['warmup_end']:.1f}, end {h['end']:.1f}, "
                         f"slope {h['slope_per_100_steps']:+.2f} per 100 steps")
    for item in report.get("tracemalloc_growth", []):
        lines.append(f"  python allocations +{item['kib']} KiB ({item['blocks']:+d} blocks) at {' <- '.join(item['where'][::-1])}")
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    if not (h.isdigit() and w.isdigit()):
        raise argparse.ArgumentTypeError(f"size '{text}' is not HxW (e.g. 256x128)")
    return int(h), int(w)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loop", default="trainer", choices=["trainer", "plain"],
                        help="the Trainer (default), or the same step without its logging and checkpoints")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=0, help="warm-up steps (default: a tenth of --steps, >= 5)")
    parser.add_argument("--tiny", action="store_true", help=f"tiny model {TINY} for a quick check")
    parser.add_argument("--embed-dim", type=int, default=0)
    parser.add_argument("--depth", type=int, default=0)
    parser.add_argument("--heads", type=int, default=0)
    parser.add_argument("--size", type=parse_size, default=None, help="input HxW (default 256x128; --tiny 128x64)")
    parser.add_argument("--batch", type=int, default=8, help="triplets per step (default %(default)s)")
    parser.add_argument("--num-instance", type=int, default=2, help="K of the P×K batches (default %(default)s)")
    parser.add_argument("--ids", type=int, default=0, help="identities in the synthetic dataset (half train)")
    parser.add_argument("--views", type=int, default=3, help="synthetic images per identity and camera")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--allocator", default="system", choices=list(ALLOCATORS),
                        help="; ".join(f"{k}: {v}" for k, v in ALLOCATORS.items()).replace("%", "%%"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override applied last (e.g. model.sfts=false for constant shapes); repeatable")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate on the test split every K steps")
    parser.add_argument("--trim-after-eval", action="store_true",
                        help="malloc_trim(0) after each evaluation pass: hand its freed heap memory back")
    parser.add_argument("--test-batch", type=int, default=64, help="triplets per evaluation forward")
    parser.add_argument("--workers", type=int, default=0, help="data workers (default 0: all memory in this process)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tracemalloc", action="store_true", help="report Python allocations that grew")
    parser.add_argument("--print-every", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    if args.steps < 4:
        parser.error("--steps must be at least 4")
    args.warmup = min(args.warmup or max(5, args.steps // 10), args.steps // 2)
    # The Trainer logs its epochs to the package logger; show only warnings (a handler of the
    # application's own makes the Trainer leave the console alone).
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(console)
    report = run(args)
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
