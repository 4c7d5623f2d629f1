"""``ablate``: the EDITOR paper's module ablation (rows A-F) in one command.

Each row switches the four modules (SFTS, HMA, BCC, OCFR) with their config keys and trains
one run per seed with :func:`~editor_reid.engine.sweep.train_seeds` in
``output_dir/row_<R>/seed_<s>``. A finished run is not retrained and an interrupted one resumes,
so running the same command again continues the study. The result, every row's mean ± std over
the seeds at the final and at the best epoch beside the paper's row where the data is one of
the paper's, is returned, written to ``output_dir/ablation.json`` and shown by
:func:`format_ablation`.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import yaml

from editor_reid.config import Config, ConfigError, config_from_dict, config_to_dict, load_config
from editor_reid.data.layouts import MANIFEST
from editor_reid.engine.rundir import flat_keys, is_resumable
from editor_reid.errors import TrainingInterrupted

__all__ = ["ROWS", "SWITCHES", "PAPER_ROWS", "parse_rows", "check_overrides", "row_config", "run_ablation",
           "format_ablation"]

log = logging.getLogger(__name__)

#: The config keys that switch the four modules, in the paper's column order.
SWITCHES = ("model.sfts", "model.hma", "model.bcc", "model.ocfr")

#: Row -> (what it adds, the value of each of SWITCHES).
ROWS: dict[str, tuple[str, tuple[bool, bool, bool, bool]]] = {
    "A": ("plain shared ViT", (False, False, False, False)),
    "B": ("+HMA", (False, True, False, False)),
    "C": ("+SFTS", (True, True, False, False)),
    "D": ("+BCC", (True, True, True, False)),
    "E": ("+OCFR", (True, True, False, True)),
    "F": ("all (EDITOR)", (True, True, True, True)),
}

#: The paper's ablation (``Results/Main_Ablation_*.png`` of the official repository): dataset ->
#: row -> mAP, R-1, R-5, R-10 in percent. ViT-B from ImageNet weights, the BL setting
#: (model.al=0: row F on RGBNT201 is EDITOR (B) of the paper's Table 1), one run each.
PAPER_ROWS: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "rgbnt201": {
        "A": (54.0, 53.5, 70.2, 78.8),
        "B": (60.7, 62.4, 77.2, 83.6),
        "C": (62.2, 65.0, 79.3, 85.4),
        "D": (65.2, 65.9, 82.2, 87.1),
        "E": (64.8, 66.9, 82.3, 87.3),
        "F": (65.7, 68.8, 82.5, 89.1),
    },
    "rgbnt100": {
        "A": (75.1, 93.4, 95.0, 95.8),
        "B": (77.8, 94.0, 95.1, 96.0),
        "C": (79.1, 94.3, 95.3, 96.1),
        "D": (80.6, 95.5, 96.4, 97.2),
        "E": (80.4, 94.8, 95.5, 96.3),
        "F": (82.1, 96.4, 96.9, 97.4),
    },
}

#: The metrics the table shows (the keys of engine.inference.METRIC_KEYS the paper reports).
TABLE_KEYS = ("mAP", "rank1", "rank5", "rank10")
TABLE_HEADERS = ("mAP", "R-1", "R-5", "R-10")

#: Keys a finished or interrupted run may differ in from the command (what a resume may change);
#: everything else must match, or the table would mix recipes.


def parse_rows(text: str) -> list[str]:
    """``"A,C,F"`` -> ``["A", "C", "F"]`` (case-insensitive, in the order A-F); ConfigError on an
    unknown, repeated or missing row."""
    items = [item.strip().upper() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"ablate --rows {text!r}: expected comma-separated rows among {','.join(ROWS)}, e.g. A,C,F")
    unknown = [item for item in items if item not in ROWS]
    if unknown:
        raise ConfigError(f"ablate --rows {text!r}: unknown row {unknown[0]!r}: the rows are {','.join(ROWS)} "
                          f"({'; '.join(f'{r} {adds}' for r, (adds, _) in ROWS.items())})")
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        raise ConfigError(f"ablate --rows {text!r}: row {repeated[0]} is given more than once")
    return [row for row in ROWS if row in items]


def check_overrides(rows: list[str], overrides: list[str] | None) -> None:
    """ConfigError when a KEY=VALUE override sets a module switch that one of ``rows`` sets
    otherwise (``model.sfts=true`` with row A): the rows own those four keys."""
    for item in overrides or []:
        key = item.split("=", 1)[0].strip().lower()
        if key not in SWITCHES:
            continue
        value = _switch_value(item, key)
        for row in rows:
            wanted = ROWS[row][1][SWITCHES.index(key)]
            if value != wanted:
                raise ConfigError(f"ablate: override {item.strip()!r} contradicts row {row} ({ROWS[row][0]}), which "
                                  f"runs {key}={str(wanted).lower()}; the rows set {', '.join(SWITCHES)} themselves: "
                                  "leave them out of the overrides")


def _switch_value(item: str, key: str) -> bool:
    """The value an override gives a switch, parsed and checked as the config parses it."""
    return getattr(load_config(None, [item]).model, key.split(".", 1)[1])


def row_config(cfg: Config, row: str) -> Config:
    """A copy of ``cfg`` with row ``row``'s module switches and output_dir ``output_dir/row_<row>``."""
    out = copy.deepcopy(cfg)
    for key, value in zip(SWITCHES, ROWS[row][1]):
        setattr(out.model, key.split(".", 1)[1], value)
    out.output_dir = str(Path(cfg.output_dir) / f"row_{row}")
    return out


def run_ablation(cfg: Config, rows: list[str], seeds: list[int], *, json_out: str | Path | None = None,
                 **options) -> dict | None:
    """Train ``rows`` x ``seeds`` (finished runs are reused, interrupted ones resume) and return
    the result that :func:`format_ablation` shows; also written to ``output_dir/ablation.json``
    and to ``json_out``; under torchrun only rank 0 returns it (the others get None).
    ``options`` are :class:`~editor_reid.engine.train.Trainer`'s keyword arguments."""
    # Imported here: torch and the model load in seconds, and a usage error should not wait for them.
    from editor_reid.engine.distributed import context_from_env
    from editor_reid.engine.sweep import format_seeds, train_seeds

    rows = parse_rows(",".join(rows))
    _check_seeds(seeds)
    if json_out is not None and (Path(json_out).is_dir() or not Path(json_out).parent.is_dir()):
        raise ConfigError(f"ablate --json {json_out}: expected a file path in an existing folder (checked before "
                          "training, so the result is not lost at the end)")
    _check_weights(cfg, rows)
    planned = {row: row_config(cfg, row) for row in rows}
    for row_cfg in planned.values():
        for seed in seeds:
            _check_reusable(row_cfg, seed)
    results = {}
    for row, row_cfg in planned.items():
        log.info("ablation row %s (%s): %s", row, ROWS[row][0], row_cfg.output_dir)
        try:
            summary = train_seeds(row_cfg, seeds, quiet=True, **options)
        except TrainingInterrupted as stop:
            where = str(stop).partition(". Continue with")[0]
            raise TrainingInterrupted(f"row {row}: {where}. Run the same ablate command again to continue: finished "
                                      "rows and seeds are skipped, this one resumes", stop.signum) from None
        log.info("ablation row %s over seeds %s:\n%s", row, ",".join(map(str, seeds)), format_seeds(summary))
        results[row] = _row_result(row, row_cfg, summary, cfg.datasets.names)
    result = {
        "dataset": cfg.datasets.names,
        "data": cfg.datasets.manifest if cfg.datasets.names == MANIFEST else cfg.datasets.root_dir,
        "model_al": cfg.model.al,
        "output_dir": cfg.output_dir,
        "seeds": list(seeds),
        "rows": results,
    }
    if context_from_env()[0] != 0:  # under torchrun, rank 0 writes and returns the result
        return None
    text = json.dumps(result, indent=2) + "\n"
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "ablation.json").write_text(text)
    if json_out is not None:
        Path(json_out).write_text(text)
    return result


def _check_seeds(seeds: list[int]) -> None:
    if not seeds:
        raise ConfigError("ablate --seeds: give at least one seed, e.g. --seeds 1111,2222,3333")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"ablate --seeds: seed {repeated[0]} is given more than once")


def _check_weights(cfg: Config, rows: list[str]) -> None:
    """A zero loss weight switches a loss off behind its row's back (row D would equal row C)."""
    for key, weight_key in (("model.bcc", "bcc_weight"), ("model.ocfr", "ocfr_weight")):
        using = [row for row in rows if ROWS[row][1][SWITCHES.index(key)]]
        if using and getattr(cfg.model, weight_key) == 0:
            raise ConfigError(f"ablate: model.{weight_key} is 0, which switches {key.split('.')[1].upper()} off in "
                              f"row(s) {','.join(using)} that the ablation runs with it; set model.{weight_key} > 0")


def _check_reusable(row_cfg: Config, seed: int) -> None:
    """ConfigError when ``row_<R>/seed_<s>`` holds a run of another recipe: a resume would keep
    the run's own config, and the table would compare different recipes."""
    run_dir = Path(row_cfg.output_dir) / f"seed_{seed}"
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    try:
        data = yaml.safe_load(saved_path.read_text())
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"ablate: {saved_path} is not valid YAML ({exc.__class__.__name__}); move the run "
                          "directory away or choose a new output_dir=...") from exc
    saved = flat_keys(config_to_dict(config_from_dict(data, source=str(saved_path))))
    wanted = copy.deepcopy(row_cfg)
    wanted.solver.seed = seed
    for key, value in flat_keys(config_to_dict(wanted)).items():
        if key == "output_dir" or is_resumable(key) or saved.get(key) == value:
            continue
        raise ConfigError(f"ablate: {run_dir} was trained with {key}={saved.get(key)!r} but this command asks for "
                          f"{value!r}: choose a new output_dir=... for another recipe (or restore the run's value)")


def _row_result(row: str, row_cfg: Config, summary: dict, dataset: str) -> dict:
    runs = summary["runs"]
    paper = PAPER_ROWS.get(dataset, {}).get(row)
    return {
        "adds": ROWS[row][0],
        "switches": {key.split(".", 1)[1]: value for key, value in zip(SWITCHES, ROWS[row][1])},
        "run_dir": row_cfg.output_dir,
        "final": summary["final"],
        "best": summary["best"],
        "final_epochs": [run["final"]["epoch"] if run["final"] else None for run in runs.values()],
        "best_epochs": [run["best"]["epoch"] if run["best"] else None for run in runs.values()],
        "paper": dict(zip(TABLE_KEYS, paper)) if paper else None,
    }


def _epochs(epochs: list[int | None]) -> str:
    if len(set(epochs)) == 1:
        return f"epoch {epochs[0]}"
    return "epochs " + ",".join(str(e) for e in epochs)


def _cell(aggregate: dict | None, key: str) -> str:
    if aggregate is None:
        return "-"
    return f"{100 * aggregate[key]['mean']:.1f} ± {100 * aggregate[key]['std']:.1f}"


def format_ablation(result: dict) -> str:
    """The ablation table: per row its modules, then final, best and (where known) the paper's
    figures, in percent; mean ± std over the seeds; notes on what each line means below."""
    seeds = result["seeds"]
    lines_in: list[tuple[str, str, list[str]]] = []  # (row cell, what, metric cells)
    marks = {True: "✓", False: "×"}
    for row, r in result["rows"].items():
        modules = "  ".join(f"{marks[r['switches'][key.split('.', 1)[1]]]:^{len(_short(key))}}" for key in SWITCHES)
        first = f"{row:<3}  {modules}"
        lines_in.append((first, f"final ({_epochs(r['final_epochs'])})",
                         [_cell(r["final"], k) for k in TABLE_KEYS]))
        lines_in.append(("", f"best ({_epochs(r['best_epochs'])}, test)", [_cell(r["best"], k) for k in TABLE_KEYS]))
        if r["paper"]:
            lines_in.append(("", "paper", [f"{r['paper'][k]:.1f}" for k in TABLE_KEYS]))
    head_row = "row  " + "  ".join(_short(key) for key in SWITCHES)
    widths = [max([len(head_row), *(len(a) for a, _, _ in lines_in)]),
              max([len("epoch"), *(len(b) for _, b, _ in lines_in)])]
    widths += [max([len(h), *(len(c[i]) for _, _, c in lines_in)]) for i, h in enumerate(TABLE_HEADERS)]

    def line(cells: list[str]) -> str:
        text = f"{cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}  "
        return (text + "  ".join(f"{c:>{w}}" for c, w in zip(cells[2:], widths[2:]))).rstrip()

    head = line([head_row, "epoch", *TABLE_HEADERS])
    out = [f"module ablation on {result['dataset']} ({result['data']}): mean ± std over {len(seeds)} seed(s) "
           f"({','.join(map(str, seeds))}), in percent", head, "-" * len(head)]
    for i, (first, what, cells) in enumerate(lines_in):
        if first and i:
            out.append("")
        out.append(line([first, what, *cells]))
    out.append("-" * len(head))
    out.append("final: the last epoch, the honest figure. best: each seed's best-mAP epoch, selected on the test "
               "split as the official code reports.")
    if any(r["paper"] for r in result["rows"].values()):
        out.append(f"paper: EDITOR's ablation on {result['dataset'].upper()} (the official repository's "
                   "Results/Main_Ablation_*.png): ViT-B from ImageNet weights, BL setting (model.al=0), one run each "
                   "(the official code reports the best epoch).")
        if result["model_al"] != 0:
            out.append(f"note: this ablation ran model.al={result['model_al']}; the paper's rows used model.al=0.")
    out.append(f"runs: {result['output_dir']}/row_<R>/seed_<s>; the same command continues an interrupted study.")
    return "\n".join(out)


def _short(key: str) -> str:
    return key.split(".", 1)[1].upper()
