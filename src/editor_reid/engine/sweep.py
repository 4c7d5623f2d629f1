"""``train --seeds``: one run per seed and the mean ± std of their metrics.

Papers in this field report a single run; a few seeds show how much of a difference is noise.
Each seed trains in ``output_dir/seed_<s>``; ``seeds_summary.json`` holds every run's final
and best metrics and their aggregates (sample standard deviation).
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
from pathlib import Path

from editor_reid.config import Config, ConfigError
from editor_reid.engine import distributed as du
from editor_reid.engine.inference import METRIC_KEYS
from editor_reid.engine.rundir import last_state_path
from editor_reid.engine.tables import format_metrics_table
from editor_reid.engine.train import train
from editor_reid.errors import TrainingInterrupted

__all__ = ["train_seeds", "aggregate", "format_seeds"]

log = logging.getLogger(__name__)


def train_seeds(cfg: Config, seeds: list[int], *, quiet: bool = False, **options) -> dict:
    """Train one run per seed in ``output_dir/seed_<s>`` and report mean ± std (printed unless
    ``quiet``; ``seeds_summary.json`` is written either way).

    A seed whose run directory already holds ``checkpoints/last.pt`` is resumed (and so
    skipped when it is finished), which makes an interrupted sweep restartable. ``options``
    are :class:`~editor_reid.engine.train.Trainer`'s keyword arguments.
    """
    if not seeds:
        raise ConfigError("train --seeds: give at least one seed, e.g. --seeds 1111,2222,3333")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"train --seeds: seeds repeat: {seeds}")
    root = Path(cfg.output_dir)
    runs = {}
    # Under torchrun the seeds' runs share one process group (a Trainer leaves a group it did not create).
    ctx = du.init_distributed(options.get("device"))
    try:
        for seed in seeds:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.solver.seed = seed
            run_cfg.output_dir = str(root / f"seed_{seed}")
            resume = run_cfg.output_dir if last_state_path(run_cfg.output_dir).exists() else None
            log.info("seed %d: %s%s", seed, run_cfg.output_dir, " (resuming)" if resume else "")
            try:
                runs[seed] = train(run_cfg, resume=resume, quiet=True, **options)
            except TrainingInterrupted as stop:
                raise TrainingInterrupted(f"{stop}. For the whole sweep, run the same train --seeds command again: "
                                          "finished seeds are skipped, this one resumes", stop.signum) from None
    finally:
        du.shutdown_distributed(ctx)
    result = {"seeds": seeds, "runs": {str(s): r for s, r in runs.items()},
              "final": aggregate([r["final"] for r in runs.values()]),
              "best": aggregate([r["best"] for r in runs.values()])}
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        (root / "seeds_summary.json").write_text(json.dumps(result, indent=2) + "\n")
        if not quiet:
            print(format_seeds(result))
    return result


def aggregate(records: list[dict | None]) -> dict | None:
    """``{metric: {"mean", "std", "values"}}`` over runs' ``{"epoch", "metrics"}`` records."""
    if not records or any(r is None for r in records):
        return None
    out = {}
    for k in METRIC_KEYS:
        values = [r["metrics"][k] for r in records]
        out[k] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                  "values": values}
    return out


def format_seeds(result: dict) -> str:
    """Every seed's final and best epoch, then mean ± std over the seeds."""
    rows, notes, rules = {}, {}, []
    for label in ("final", "best"):
        for seed, run in result["runs"].items():
            if run[label] is not None:
                rows[f"seed {seed}: {label} (epoch {run[label]['epoch']})"] = run[label]["metrics"]
    count = len(result["seeds"])
    for label, note in (("final", "the honest figure"),
                        ("best", "best epoch per seed, selected on the test split as the official code reports")):
        if result[label] is not None:
            row = f"{label}: mean ± std over {count} seeds"
            rows[row], notes[row] = result[label], note
            rules.append(row)
    return format_metrics_table(rows, notes=notes, rule_before=rules[:1])
