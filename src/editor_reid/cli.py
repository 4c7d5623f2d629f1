"""The ``editor-reid`` command: parse arguments, then call the library. No logic lives here.

The subcommands import the library inside their functions: torch and the model take seconds
to import, and ``editor-reid --help`` or a configuration error should not wait for them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from editor_reid.config import ConfigError, load_config
from editor_reid.data.layouts import DATASET_NAMES, LayoutError

PRESET_DIR = Path(__file__).resolve().parent / "presets"


def resolve_config_path(value: str | None) -> Path | None:
    """A config argument is a YAML path or the name of a built-in preset (``rgbnt201``)."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{value}.yaml"
    if preset.is_file():
        return preset
    names = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config '{value}' is neither a file nor a built-in preset ({names})")


def _load(args: argparse.Namespace):
    return load_config(resolve_config_path(args.config), overrides=args.overrides)


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML file or preset name (rgbnt201, rgbnt100, msvr310, market1501mm, demo)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. solver.base_lr=0.002")


def _cmd_make_synthetic(args: argparse.Namespace) -> int:
    from editor_reid.data.synthetic import make_synthetic

    kwargs = {"ids": args.ids, "seed": args.seed}
    if args.views is not None:
        kwargs["views"] = args.views
    summary = make_synthetic(args.layout, Path(args.out), **kwargs)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_check_data(args: argparse.Namespace) -> int:
    from editor_reid.data.validate import check_data

    report = check_data(args.dataset, Path(args.root))
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    if report.statistics:
        print(report.statistics)
    if report.ok:
        print(f"check-data: {args.dataset} at {args.root}: no problems found")
        return 0
    print(f"check-data: {len(report.problems)} problem(s) found in {args.root}")
    return 1


def _cmd_info(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from editor_reid.engine.info import describe

    print(describe(cfg, root=args.root))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    if args.config is None:
        if not args.resume:
            raise ConfigError("train needs --config FILE (or --resume RUN_DIR, which reads RUN_DIR/config.yaml)")
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: no saved config at '{saved}'")
        cfg = load_config(saved, overrides=args.overrides)
    else:
        cfg = _load(args)
    if args.seeds:
        from editor_reid.engine.sweep import train_seeds

        train_seeds(cfg, [int(s) for s in args.seeds.split(",") if s.strip()])
    else:
        from editor_reid.engine.train import train

        train(cfg, resume=args.resume)
    return 0


def _cmd_test(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from editor_reid.engine.evaluate import run_test

    run_test(cfg, args.weights, rerank=args.rerank, missing=args.missing, json_out=args.json)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from editor_reid.engine.demo import run_demo

    run_demo(Path(args.out), seed=args.seed, json_out=args.json, epochs=args.epochs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editor-reid", description="Multi-modal object ReID with EDITOR (CVPR 2024)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="synthetic data -> train a tiny EDITOR on CPU -> evaluate -> token picture")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--seed", type=int, default=1111)
    p.add_argument("--epochs", type=int, default=None, help="override the demo's epoch count")
    p.add_argument("--json", default=None, help="write untrained/trained metrics as JSON")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", help="train EDITOR")
    _add_config_args(p, required=False)
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from checkpoints/last.pt")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 1111,2222,3333: report mean ± std")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("test", help="evaluate a checkpoint (ours or official)")
    _add_config_args(p)
    p.add_argument("--weights", required=True, help="checkpoint file (.pt from editor-reid or official .pth)")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
    p.add_argument("--missing", choices=["all"], default=None, help="evaluate all 7 non-empty modality subsets")
    p.add_argument("--json", default=None, help="write the metrics as JSON")
    p.set_defaults(func=_cmd_test)

    p = sub.add_parser("info", help="model summary (parameters counted as in the paper)")
    _add_config_args(p)
    p.add_argument("--root", default=None, help="dataset root to read the ID/camera counts from (default: known statistics)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("make-synthetic", help="write a synthetic dataset in a real layout")
    p.add_argument("--layout", required=True, choices=DATASET_NAMES)
    p.add_argument("--out", required=True, help="root directory (the dataset folder is created inside)")
    p.add_argument("--ids", type=int, default=100, help="number of identities")
    p.add_argument("--views", type=int, default=None, help="images per identity and camera")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_synthetic)

    p = sub.add_parser("check-data", help="validate a dataset tree and print its statistics")
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    p.add_argument("--root", required=True, help="directory that contains the dataset folder")
    p.set_defaults(func=_cmd_check_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"editor-reid: configuration error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError) as exc:
        print(f"editor-reid: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from editor_reid.data.dataset import BadImageError
        from editor_reid.losses import NonFiniteLossError

        # A loss that turned NaN/inf stops the run with a clear message; the last good checkpoint stays.
        if isinstance(exc, NonFiniteLossError):
            print(f"editor-reid: training stopped: {exc}", file=sys.stderr)
            return 1
        # Bad data names the file at fault; no traceback is needed to act on it.
        if isinstance(exc, (BadImageError, LayoutError)):
            print(f"editor-reid: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
