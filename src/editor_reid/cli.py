"""The ``editor-reid`` command: parse arguments, then call the library. No logic lives here.

The subcommands import the library inside their functions: torch and the model take seconds
to import, and ``editor-reid --help`` or a configuration error should not wait for them.

How errors reach the user (docs/errors.md lists them):

* a wrong command line (argparse) or an :class:`~editor_reid.errors.EditorReidError` prints
  ``editor-reid: <message>`` on stderr and exits with the error's status (2 usage, 1 data and
  runtime, 128 + signal for an interrupted training);
* an error message is one line. When its further lines are all list items (``- ...``, as in a
  report of every bad file), they follow, indented; any other further lines are joined into
  the first with ``; ``;
* a missing, existing, unreadable or wrong-kind path (FileNotFoundError, FileExistsError,
  IsADirectoryError, NotADirectoryError, PermissionError) is a usage error: one line, status 2;
* Ctrl-C outside training prints one line and exits 130;
* anything else is a bug and keeps its traceback. ``--debug`` (or ``EDITOR_REID_DEBUG=1``)
  prints the traceback of every error, the user errors' included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import editor_reid
from editor_reid.config import MAX_SEED, PRESET_DIR, ConfigError, load_config, resolve_config_path
from editor_reid.data.layouts import LAYOUT_NAMES, SPLIT_NAMES
from editor_reid.errors import EditorReidError, UsageError

DEBUG_ENV = "EDITOR_REID_DEBUG"

# OS errors about a path the user named (--config, --weights, --out, --root, --resume).
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


# ----------------------------------------------------------------------------- argument types


def _integer(minimum: int, maximum: int | None = None):
    """An argparse ``type=`` for an integer in [minimum, maximum]; argparse turns the message
    into a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            expected = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {expected}")
        return value

    return parse


_seed = _integer(0, MAX_SEED)


def _real(minimum: float, *, strict: bool = False):
    """An argparse ``type=`` for a finite number >= minimum (> minimum when ``strict``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value > minimum if strict else value >= minimum) or value == float("inf"):
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: expected a finite number {'>' if strict else '>='} {minimum:g}")
        return value

    return parse


def _seed_list(text: str) -> str:
    """Check ``--seeds 1111,2222``; the text itself is kept (``_cmd_train`` splits it), so the
    namespace shows what was typed."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected comma-separated seeds, e.g. 1111,2222,3333")
    for item in items:
        try:
            _seed(item)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: {item!r} is not a seed (an integer in [0, {MAX_SEED}])"
            ) from None
    return text


def _split_list(text: str) -> tuple[str, ...]:
    """``--splits train,query`` -> ("train", "query"); each must be a split name."""
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    unknown = [item for item in items if item not in SPLIT_NAMES]
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected comma-separated splits among {','.join(SPLIT_NAMES)}")
    return items


def _where(text: str) -> tuple[str, tuple[str, ...]]:
    """``--where sceneid=3,4`` -> ("sceneid", ("3", "4")): a column and the values it may hold."""
    key, sep, values = text.partition("=")
    items = tuple(v.strip() for v in values.split(","))
    if not sep or not key.strip() or not any(items) or not all(items):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected COLUMN=VALUE[,VALUE...], e.g. sceneid=3,4")
    return key.strip(), items


def _time_window(text: str) -> tuple[int | None, int | None]:
    """``--time-window START,END`` (either may be empty): start <= timestamp < end."""
    start, sep, end = text.partition(",")
    try:
        bounds = tuple(None if not b.strip() else int(b.strip(), 10) for b in (start, end))
    except ValueError:
        bounds = ()
    if not sep or len(bounds) != 2 or bounds == (None, None):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected START,END integers (one may be empty), "
                                         "e.g. 1700000000,1700086400")
    return bounds


def _gallery_options(p: argparse.ArgumentParser, *, backend: bool = True) -> None:
    """``--backend`` and ``--uri``: which gallery backend a command's --index names."""
    if backend:
        p.add_argument("--backend", choices=["faiss", "milvus"], default=None,
                       help="faiss: --index is an index directory (the default); milvus: --index is a collection at "
                            "--uri")
    p.add_argument("--uri", default=None, metavar="URI",
                   help="the Milvus of --backend milvus: a server or cluster (http://HOST:19530; a token in "
                        "MILVUS_TOKEN) or a Milvus Lite file (gallery.db)")


def _fpr(text: str) -> float:
    """``--fpr 1e-3``: a false-positive rate, a number in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a false-positive rate in (0, 1), e.g. 1e-3")
    return value


def _fpr_list(text: str) -> tuple[float, ...]:
    """``--fpr 1e-2,1e-3`` -> (0.01, 0.001)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected comma-separated false-positive rates, "
                                         "e.g. 1e-2,1e-3")
    values: list[float] = []
    for item in items:
        try:
            value = _fpr(item)
        except argparse.ArgumentTypeError:
            if len(items) == 1:
                raise
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {item!r} is not a false-positive rate in "
                                             "(0, 1)") from None
        if value not in values:
            values.append(value)
    return tuple(values)


# ----------------------------------------------------------------------------- subcommands


def _load(args: argparse.Namespace, path: Path | None = None):
    cfg = load_config(path or resolve_config_path(args.config), overrides=args.overrides)
    # --root is the same as datasets.root_dir=DIR, set without YAML parsing (a path may look like a number).
    if args.root is not None:
        cfg.datasets.root_dir = args.root
    return cfg


def _cmd_make_synthetic(args: argparse.Namespace) -> int:
    from editor_reid.data.synthetic import make_synthetic

    kwargs = {"ids": args.ids, "seed": args.seed}
    if args.views is not None:
        kwargs["views"] = args.views
    summary = make_synthetic(args.dataset, Path(args.out), **kwargs)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_make_manifest(args: argparse.Namespace) -> int:
    from editor_reid.data.layouts import format_statistics
    from editor_reid.data.manifest import make_manifest

    written = make_manifest(args.dataset, Path(args.root), Path(args.out), splits=args.splits,
                            overwrite=args.overwrite)
    print(format_statistics(written))
    rows = len(written.train) + len(written.query) + len(written.gallery)
    print(f"make-manifest: wrote {args.out}: {rows} rows, the {','.join(args.splits)} split(s) of {args.dataset} "
          f"at {args.root}")
    return 0


def _cmd_check_data(args: argparse.Namespace) -> int:
    prog = "editor-reid check-data"
    if args.manifest is not None:
        if args.root is not None:
            _usage_error(prog, "--root goes with --dataset; the paths of a --manifest are relative to its own "
                               "folder")
        from editor_reid.data.manifest import check_manifest

        report, checked = check_manifest(Path(args.manifest)), args.manifest
    else:
        if args.root is None:
            _usage_error(prog, "the following arguments are required with --dataset: --root")
        from editor_reid.data.validate import check_data

        report, checked = check_data(args.dataset, Path(args.root)), args.root
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    if report.statistics:
        print(report.statistics)
    if report.ok:
        what = f"manifest {checked}" if args.manifest is not None else f"{args.dataset} at {checked}"
        print(f"check-data: {what}: no problems found")
        return 0
    print(f"check-data: {len(report.problems)} problem(s) found in {checked}")
    return 1


def _cmd_info(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from editor_reid.engine.info import describe

    print(describe(cfg, root=args.root))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    if args.config is None:
        if args.resume == "auto":
            raise ConfigError("train --resume auto needs --config FILE (it continues the run in the config's output_dir)")
        if not args.resume:
            raise ConfigError("train needs --config FILE (or --resume RUN_DIR, which reads RUN_DIR/config.yaml)")
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: no saved config at '{saved}'")
        cfg = _load(args, saved)
    else:
        cfg = _load(args)
    if args.seeds:
        from editor_reid.engine.sweep import train_seeds

        result = train_seeds(cfg, [int(s) for s in args.seeds.split(",") if s.strip()])
        summaries = list(result.get("runs", {}).values())
    else:
        from editor_reid.engine.train import train

        summaries = [train(cfg, resume=args.resume)]
    run_dirs = [Path(summary["run_dir"]) for summary in summaries if summary.get("run_dir")]
    if args.report:
        from editor_reid.engine.distributed import context_from_env

        if context_from_env()[0] == 0:  # under torchrun, rank 0 writes it
            for run_dir in run_dirs:
                _run_report(lambda: _build_run_report(run_dir))
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from editor_reid.engine.ablate import check_overrides, format_ablation, parse_rows, run_ablation

    rows = parse_rows(args.rows)
    check_overrides(rows, args.overrides)
    result = run_ablation(_load(args), rows, [int(s) for s in args.seeds.split(",") if s.strip()], json_out=args.json)
    if result is not None:  # under torchrun, rank 0 has it
        print(format_ablation(result))
    return 0


def _build_run_report(run_dir: Path) -> Path:
    from editor_reid.report import build_report

    return build_report(run_dir)


def _run_report(build) -> None:
    """Write a report after a finished job and print its path; without the report extra, say
    so in one line and go on (the job itself succeeded)."""
    from editor_reid.report.figures import MissingExtraError

    try:
        out = build()
    except MissingExtraError as exc:
        print(f"editor-reid: report skipped: {exc}", file=sys.stderr)
        return
    print(f"report: {out}")


def _cmd_test(args: argparse.Namespace) -> int:
    prog = "editor-reid test"
    pair = args.query_modalities if args.query_modalities is not None else args.gallery_modalities
    row_options = [name for name, value in (("--missing", args.missing), ("--cross", args.cross),
                                            ("--query-modalities/--gallery-modalities", pair)) if value is not None]
    if args.features is not None:
        if args.report is not None:
            _usage_error(prog, "--report needs --weights: the report looks at the model's token selection and "
                               "the images, which a feature file does not hold")
        if row_options:
            _usage_error(prog, f"{row_options[0]} needs --weights: --features evaluates the file's features "
                               "as they are")
        from editor_reid.engine.evaluate import evaluate_feature_file

        evaluate_feature_file(_load(args), args.features, rerank=args.rerank, json_out=args.json)
        return 0
    if args.config is None:
        _usage_error(prog, "the following arguments are required with --weights: --config (only --features may go "
                           "without it)")
    if len(row_options) > 1:
        _usage_error(prog, f"{row_options[0]} and {row_options[1]} cannot be combined: each chooses the rows "
                           "to evaluate")
    cfg = _load(args)
    from editor_reid.engine.evaluate import run_test

    then = None
    if args.report is not None:
        from editor_reid.report import require_report_extra, run_dir_of, write_report

        require_report_extra()  # before the evaluation, not after it
        then = lambda run: print(f"report: {write_report(run, args.report, run_dir=run_dir_of(args.weights))}")  # noqa: E731
    run_test(cfg, args.weights, rerank=args.rerank, missing=args.missing, cross=args.cross,
             query_modalities=args.query_modalities, gallery_modalities=args.gallery_modalities, json_out=args.json,
             then=then, amp=args.amp)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from editor_reid.features.extract import run_extract

    sink = None
    if args.to_gallery is not None:
        from editor_reid.deploy.sink import gallery_sink

        sink = gallery_sink(args.to_gallery, uri=args.uri)
    elif args.uri is not None:
        raise UsageError("--uri is the Milvus of --to-gallery; give --to-gallery COLLECTION too")
    run_extract(args.weights, args.out, config=args.config, dataset=args.dataset, root=args.root,
                manifest=args.manifest, images=args.images, splits=args.splits, batch_size=args.batch_size,
                chunk_size=args.chunk_size, num_workers=args.workers, normalize=not args.no_normalize,
                device=args.device, amp=args.amp, backend=args.backend, onnx=args.onnx, sink=sink)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from editor_reid.deploy.export import export_onnx

    export_onnx(args.weights, args.out, config=args.config, opset=args.opset, sfts_ties=args.sfts_ties)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from editor_reid.engine.demo import run_demo

    result = run_demo(Path(args.out), seed=args.seed, json_out=args.json, epochs=args.epochs)
    if args.report:
        _run_report(lambda: _build_run_report(Path(result["run_dir"])))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from editor_reid.report import build_report

    out = build_report(args.run_dir, weights=args.weights, out=args.out, max_queries=args.max_queries,
                       queries=args.query, device=args.device)
    print(f"report: {out}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.onnx is not None and args.config is not None:
        _usage_error("editor-reid serve", "--config goes with --weights; an --onnx model carries its own settings")
    from editor_reid.deploy.service import ServiceSettings, run_server

    settings = ServiceSettings(k=args.k, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                               max_upload_mb=args.max_upload_mb, threshold=args.threshold, fpr=args.fpr)
    run_server(args.index, weights=args.weights, config=args.config, onnx=args.onnx, device=args.device,
               host=args.host, port=args.port, settings=settings, access_log=args.access_log,
               backend=args.backend, uri=args.uri)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from editor_reid.deploy.thresholds import run_calibrate

    run_calibrate(fprs=args.fpr, metric=args.metric, features=args.features, weights=args.weights,
                  config=args.config, dataset=args.dataset, root=args.root, manifest=args.manifest,
                  device=args.device, out=args.out, index=args.index, backend=args.backend, uri=args.uri)
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from editor_reid.deploy.search import run_search

    run_search(args.index, args.out, features=args.features, weights=args.weights, config=args.config,
               dataset=args.dataset, root=args.root, manifest=args.manifest, images=args.images, splits=args.splits,
               device=args.device, k=args.k, exclude_same_camera=args.exclude_same_camera,
               threshold=args.threshold, fpr=args.fpr, thresholds=args.thresholds, backend=args.backend, uri=args.uri,
               where=dict(args.where or []), time_range=args.time_window)
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from editor_reid.deploy import gallery

    target = dict(backend=args.backend, uri=args.uri)
    if args.index_command == "build":
        gallery.run_index_build(args.features, args.out, kind=args.kind, metric=args.metric, splits=args.splits,
                                overwrite=args.overwrite, **target)
    elif args.index_command == "add":
        gallery.run_index_add(args.index, args.features, splits=args.splits, compact=args.compact, **target)
    else:
        print(json.dumps(gallery.gallery_info(args.index, **target), indent=2))
    return 0


# ----------------------------------------------------------------------------- the parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" where a default says something (not for None or a switch's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _usage_error(prog: str, message: str) -> None:
    """Exit 2 with the command line's mistake in one line (no usage block: ``--help`` has it)."""
    command = prog.removeprefix("editor-reid").strip()
    where = f"{command}: " if command else ""
    sys.stderr.write(f"editor-reid: {where}{message} (see '{prog} --help')\n")
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        _usage_error(self.prog, message)


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    presets = ", ".join(sorted(path.stem for path in PRESET_DIR.glob("*.yaml")))
    p.add_argument("--config", required=required, help=f"YAML file or preset name ({presets})")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="dotted config overrides, anywhere after the subcommand, e.g. solver.base_lr=0.002",
    )


def _add_root(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument("--root", default=None, metavar="DIR",
                   help=f"directory that contains the dataset folder: the same as datasets.root_dir=DIR{extra}")


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `train --seed 3` would otherwise silently mean `--seeds 3`.
    parser = _Parser(prog="editor-reid", description="Multi-modal object ReID with EDITOR (CVPR 2024)",
                     formatter_class=_HelpFormatter, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {editor_reid.__version__}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of every error, user errors included; may also follow the "
                             f"subcommand (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str):  # noqa: A002 (argparse's own word)
        return sub.add_parser(name, help=help, formatter_class=_HelpFormatter, allow_abbrev=False)

    p = command("demo", "synthetic data -> train a tiny EDITOR on CPU -> evaluate -> token picture")
    p.add_argument("--out", default="runs/demo", help="directory for the data, the run and the picture")
    p.add_argument("--seed", type=_seed, default=1111, help="seed of the data and of the training")
    p.add_argument("--epochs", type=_integer(1), default=None, help="override the demo's epoch count")
    p.add_argument("--json", default=None, help="write untrained/trained metrics as JSON")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip the HTML report (OUT/run/report.html, needs editor-reid[report])")
    p.set_defaults(func=_cmd_demo)

    p = command("train", "train EDITOR")
    _add_config_args(p, required=False)
    p.add_argument("--resume", default=None, metavar="RUN_DIR|auto",
                   help="continue the run in RUN_DIR from checkpoints/last.pt (its config.yaml is used); "
                        "'auto' (needs --config) continues the run in output_dir if there is one, else starts a new run there")
    p.add_argument("--seeds", type=_seed_list, default=None,
                   help="comma-separated seeds, e.g. 1111,2222,3333: report mean ± std")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip the HTML report written to RUN_DIR/report.html at the end (needs editor-reid[report])")
    _add_root(p)
    p.set_defaults(func=_cmd_train)

    p = command("ablate", "the paper's module ablation: rows A-F (SFTS, HMA, BCC, OCFR) x seeds, one table of "
                          "mean ± std; re-running the same command continues it")
    _add_config_args(p)
    p.add_argument("--rows", default="A,B,C,D,E,F", metavar="R[,R]",
                   help="comma-separated rows: A plain shared ViT, B +HMA, C +SFTS, D +BCC, E +OCFR (no BCC), F all")
    p.add_argument("--seeds", type=_seed_list, default="1111,2222,3333", metavar="S[,S]",
                   help="comma-separated seeds; every row trains one run per seed in OUTPUT_DIR/row_R/seed_S")
    p.add_argument("--json", default=None, metavar="FILE.json",
                   help="also write the result as JSON to this file (it always goes to OUTPUT_DIR/ablation.json)")
    _add_root(p)
    p.set_defaults(func=_cmd_ablate)

    p = command("test", "evaluate a checkpoint (ours or official), or a feature file")
    _add_config_args(p, required=False)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="checkpoint file (.pt from editor-reid or official .pth); needs --config")
    source.add_argument("--features", metavar="FEATS.npz",
                        help="evaluate a feature file without the model: its query rows against its gallery rows "
                             "(--config optional: its test.* settings)")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
    p.add_argument("--missing", choices=["all"], default=None, help="evaluate all 7 non-empty modality subsets")
    p.add_argument("--cross", choices=["all"], default=None,
                   help="evaluate the 12 standard cross-modality pairs (RGB->NI, ..., RGB+NI->RGB+TI, ...), their "
                        "average and all modalities")
    p.add_argument("--query-modalities", metavar="M[,M]", default=None,
                   help="feed the queries only these modalities, e.g. RGB or RGB,TI; the others are zero images "
                        "(default: all)")
    p.add_argument("--gallery-modalities", metavar="M[,M]", default=None,
                   help="feed the gallery only these modalities, e.g. NI,TI (default: all)")
    p.add_argument("--json", default=None, help="write the metrics as JSON")
    p.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"], default="none",
                   help="autocast for the feature extraction (fp16: CUDA only; auto: bf16 where the device computes "
                        "it natively, else fp32 on CPU)")
    p.add_argument("--report", default=None, metavar="REPORT.html",
                   help="also write the HTML report of these weights on this test split (needs editor-reid[report])")
    _add_root(p)
    p.set_defaults(func=_cmd_test)

    p = command("report", "a self-contained HTML report of a training run (needs editor-reid[report])")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (config.yaml, metrics.jsonl, checkpoints/)")
    p.add_argument("--weights", default=None, help="checkpoint to evaluate (default: checkpoints/last.pt, else best.pt)")
    p.add_argument("--out", default=None, help="HTML file to write (default: RUN_DIR/report.html)")
    p.add_argument("--max-queries", type=_integer(0), default=8,
                   help="rank lists shown: half the hardest queries, half random ones")
    p.add_argument("--query", action="append", default=[], metavar="INDEX|FILE",
                   help="also show this query's rank list: its index in the query split, or an image path or file "
                        "name of it (repeatable)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=_cmd_report)

    p = command("info", "model summary (parameters counted as in the paper)")
    _add_config_args(p)
    _add_root(p, "; the ID and camera counts are read from it (without it: the known statistics)")
    p.set_defaults(func=_cmd_info)

    p = command("make-synthetic", "write a synthetic dataset in a real layout")
    name = p.add_mutually_exclusive_group(required=True)
    name.add_argument("--dataset", choices=LAYOUT_NAMES, help="dataset layout to write")
    name.add_argument("--layout", dest="dataset", choices=LAYOUT_NAMES, help=argparse.SUPPRESS)  # the old name
    p.add_argument("--out", required=True, help="root directory (the dataset folder is created inside)")
    p.add_argument("--ids", type=_integer(2), default=100, help="number of identities (half train, half test)")
    # The default lives in data.synthetic (DEFAULT_VIEWS); importing it here would pull NumPy and PIL into --help.
    p.add_argument("--views", type=_integer(1), default=None, help="images per identity and camera (default: 3)")
    p.add_argument("--seed", type=_seed, default=0, help="the same seed writes the same files")
    p.set_defaults(func=_cmd_make_synthetic)

    p = command("check-data", "validate a dataset tree or a manifest and print its statistics")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=LAYOUT_NAMES, help="dataset layout to check (with --root)")
    source.add_argument("--manifest", metavar="M.csv", help="manifest to check: its rows and every file it names")
    p.add_argument("--root", default=None, metavar="DIR", help="directory that contains the dataset folder")
    p.set_defaults(func=_cmd_check_data)

    p = command("make-manifest", "write the CSV manifest of a dataset layout, to edit or subset and train on")
    p.add_argument("--dataset", required=True, choices=LAYOUT_NAMES, help="dataset layout to list")
    p.add_argument("--root", required=True, metavar="DIR", help="directory that contains the dataset folder")
    p.add_argument("--out", required=True, metavar="M.csv",
                   help="manifest file to write (paths relative to its folder)")
    p.add_argument("--splits", type=_split_list, default=",".join(SPLIT_NAMES), metavar="S[,S]",
                   help="comma-separated splits to list")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_cmd_make_manifest)

    p = command("extract", "write the features of dataset splits, a manifest or a folder of images to a .npz file")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--weights", help="checkpoint file (.pt from editor-reid or official .pth)")
    model.add_argument("--onnx", metavar="MODEL.onnx",
                       help="an ONNX file of 'editor-reid export', run with onnxruntime instead of a checkpoint")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default=None,
                   help="torch (with --weights) or onnxruntime (with --onnx); default: the one the model file needs")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=LAYOUT_NAMES, help="a dataset layout, read from --root")
    source.add_argument("--manifest", metavar="M.csv", help="a CSV manifest of samples")
    source.add_argument("--images", metavar="DIR",
                        help="a folder of images: RGB/, NI/, TI/ sub-folders paired by relative path, else every "
                             "image an RGB-only sample; cameras unknown")
    p.add_argument("--root", default=None, metavar="DIR", help="directory that contains the dataset folder (--dataset)")
    p.add_argument("--config", default=None,
                   help="YAML file or preset name; needed for an official .pth (default: the checkpoint's own)")
    p.add_argument("--splits", type=_split_list, default="query,gallery", metavar="S[,S]",
                   help="comma-separated splits of --dataset or --manifest, written in this order")
    p.add_argument("--batch-size", type=_integer(1), default=None, help="default: the config's test.ims_per_batch")
    p.add_argument("--chunk-size", type=_integer(1), default=4096,
                   help="samples per saved chunk: a rerun after an interruption continues from the finished chunks")
    p.add_argument("--workers", type=_integer(0), default=None, help="DataLoader workers (default: the config's)")
    p.add_argument("--no-normalize", action="store_true", help="write the features without L2 normalisation")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"], default="none",
                   help="autocast (fp16: CUDA only; auto: bf16 where the device computes it natively, else fp32)")
    p.add_argument("--out", required=True, metavar="FEATS.npz", help="the feature file to write")
    p.add_argument("--to-gallery", default=None, metavar="INDEX",
                   help="also add the gallery rows (all rows without a gallery split) to this gallery, as each chunk "
                        "is done: an index directory, or with --uri a Milvus collection, created if absent; under "
                        "torchrun every rank writes its own chunks to Milvus")
    _gallery_options(p, backend=False)
    p.set_defaults(func=_cmd_extract)

    p = command("export", "export a checkpoint as an ONNX graph with a dynamic batch, for onnxruntime")
    p.add_argument("--weights", required=True, help="checkpoint file (.pt from editor-reid or official .pth)")
    p.add_argument("--config", default=None,
                   help="YAML file or preset name; needed for an official .pth (default: the checkpoint's own)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="the export format")
    p.add_argument("--opset", type=_integer(18, 22), default=None,
                   help="ONNX opset version, 18 to 22 (default: the exporter's choice)")
    p.add_argument("--sfts-ties", choices=["torch", "lower_index"], default=None,
                   help="model.sfts_ties of the exported model (default: the checkpoint's); lower_index makes the "
                        "graph agree with PyTorch on tied SFTS scores too")
    p.add_argument("--out", required=True, metavar="MODEL.onnx", help="the file to write (replaced if it exists)")
    p.set_defaults(func=_cmd_export)

    p = command("calibrate", "open-set thresholds: the distances that keep false positives at target rates, "
                             "measured on a labelled query/gallery split")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", metavar="FEATS.npz",
                        help="a feature file: its query rows against its gallery rows, under its protocol")
    source.add_argument("--weights", help="checkpoint: extract the query and gallery splits of --dataset or --manifest")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--dataset", choices=LAYOUT_NAMES, help="a dataset layout, read from --root (with --weights)")
    data.add_argument("--manifest", metavar="M.csv", help="a CSV manifest with query and gallery rows (with --weights)")
    p.add_argument("--root", default=None, metavar="DIR", help="directory that contains the dataset folder (--dataset)")
    p.add_argument("--config", default=None,
                   help="YAML file or preset name; needed for an official .pth (default: the checkpoint's own)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.add_argument("--fpr", type=_fpr_list, default="1e-2,1e-3", metavar="F[,F]",
                   help="comma-separated target false-positive rates")
    p.add_argument("--metric", choices=["euclidean", "cosine"], default=None,
                   help="squared Euclidean or 1 - cosine on L2-normalised features (default: the --index's, else "
                        "euclidean)")
    p.add_argument("--out", default=None, metavar="thresholds.json", help="write the thresholds to this JSON file")
    p.add_argument("--index", default=None, metavar="INDEX",
                   help="store the thresholds with this gallery (same metric and model only): in an index "
                        "directory's manifest, or a Milvus collection's description")
    _gallery_options(p)
    p.set_defaults(func=_cmd_calibrate)

    p = command("search", "search a gallery index with query features or images; open set: a query whose best "
                          "match is beyond a threshold is unknown")
    p.add_argument("--index", required=True, metavar="INDEX",
                   help="the gallery: an index directory, or a Milvus collection with --backend milvus")
    _gallery_options(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", metavar="Q.npz", help="a feature file of queries (all rows, or --splits)")
    source.add_argument("--weights", help="checkpoint: extract the queries of --manifest, --images or --dataset")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--dataset", choices=LAYOUT_NAMES, help="a dataset layout, read from --root (with --weights)")
    data.add_argument("--manifest", metavar="M.csv", help="a CSV manifest of queries (with --weights)")
    data.add_argument("--images", metavar="DIR",
                      help="a folder of images, as extract --images reads it (with --weights); cameras unknown")
    p.add_argument("--root", default=None, metavar="DIR", help="directory that contains the dataset folder (--dataset)")
    p.add_argument("--config", default=None,
                   help="YAML file or preset name; needed for an official .pth (default: the checkpoint's own)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.add_argument("--splits", type=_split_list, default=None, metavar="S[,S]",
                   help="the rows to search with: of --features (default: all rows) or of --dataset/--manifest "
                        "(default: query)")
    p.add_argument("-k", type=_integer(1), default=10, help="matches per query")
    p.add_argument("--exclude-same-camera", action="store_true",
                   help="skip gallery items from the query's own camera (cameras unknown, -1, exclude nothing)")
    p.add_argument("--where", type=_where, action="append", default=None, metavar="COLUMN=V[,V]",
                   help="keep only gallery items whose column holds one of the values, e.g. sceneid=3,4 or "
                        "split=gallery (repeat for more columns; Milvus filters on the server)")
    p.add_argument("--time-window", type=_time_window, default=None, metavar="START,END",
                   help="keep only gallery items with START <= timestamp < END (either may be empty)")
    openset = p.add_mutually_exclusive_group()
    openset.add_argument("--threshold", type=_real(0), default=None,
                         help="open-set threshold as a distance: a query whose best match is farther is unknown")
    openset.add_argument("--fpr", type=_fpr, default=None,
                         help="open-set threshold calibrated for this false-positive rate (editor-reid calibrate), "
                              "from the index's manifest or --thresholds")
    p.add_argument("--thresholds", default=None, metavar="thresholds.json",
                   help="with --fpr: read the threshold from this calibrate --out file instead of the index")
    p.add_argument("--out", required=True, metavar="results.json", help="the search results, one object per query")
    p.set_defaults(func=_cmd_search)

    p = command("index", "build, extend and describe a gallery of a feature file (a FAISS index directory or a "
                         "Milvus collection)")
    index_sub = p.add_subparsers(dest="index_command", metavar="{build,add,info}", required=True,
                                 parser_class=_Parser)

    def index_command(name: str, help: str):  # noqa: A002 (argparse's own word)
        q = index_sub.add_parser(name, help=help, formatter_class=_HelpFormatter, allow_abbrev=False)
        q.set_defaults(func=_cmd_index)
        return q

    splits_help = ("comma-separated splits of --features to index (default: its gallery rows if it has any, else "
                   "all rows)")
    q = index_command("build", "index the gallery rows of a feature file into a new gallery")
    q.add_argument("--features", required=True, metavar="FEATS.npz", help="the feature file (editor-reid extract)")
    q.add_argument("--out", required=True, metavar="INDEX",
                   help="the index directory to write, or the Milvus collection to create with --backend milvus")
    _gallery_options(q)
    q.add_argument("--kind", choices=["auto", "flat", "ivfpq", "ivf", "hnsw"], default="auto",
                   help="flat: exact; ivfpq (faiss), ivf (milvus), hnsw: approximate; auto: flat up to 100,000 "
                        "entries, else ivfpq (faiss) or hnsw (milvus)")
    q.add_argument("--metric", choices=["euclidean", "cosine"], default="euclidean",
                   help="squared Euclidean (as editor-reid test ranks) or 1 - cosine, on L2-normalised features")
    q.add_argument("--splits", type=_split_list, default=None, metavar="S[,S]", help=splits_help)
    q.add_argument("--overwrite", action="store_true",
                   help="write into INDEX even if it is not empty (replaces a Milvus collection of that name)")
    q = index_command("add", "add the rows of a feature file to a gallery (durable at once; samples held already are "
                             "not added again)")
    q.add_argument("--index", required=True, metavar="INDEX", help="the index directory or Milvus collection")
    _gallery_options(q)
    q.add_argument("--features", required=True, metavar="MORE.npz", help="the feature file to add")
    q.add_argument("--splits", type=_split_list, default=None, metavar="S[,S]", help=splits_help)
    q.add_argument("--compact", action="store_true",
                   help="then fold the journal into a new generation of the index files")
    q = index_command("info", "print what a gallery is as JSON (entries, width, metric, kind, model, thresholds)")
    q.add_argument("--index", required=True, metavar="INDEX", help="the index directory or Milvus collection")
    _gallery_options(q)

    p = command("serve", "serve a gallery index over HTTP: POST /search, POST /gallery, GET /healthz")
    p.add_argument("--index", required=True, metavar="INDEX",
                   help="the gallery to search and add to: an index directory, or a Milvus collection with "
                        "--backend milvus")
    _gallery_options(p)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--weights", help="checkpoint file (.pt from editor-reid or official .pth with --config)")
    model.add_argument("--onnx", metavar="MODEL.onnx", help="an exported ONNX model instead of a checkpoint")
    p.add_argument("--config", default=None,
                   help="YAML file or preset name; needed for an official .pth (default: the checkpoint's own)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_integer(0, 65535), default=8000, help="port to listen on (0: a free one)")
    p.add_argument("--max-batch", type=_integer(1), default=16, help="samples per model call, at most")
    p.add_argument("--max-wait-ms", type=_real(0), default=5.0,
                   help="how long a request may wait for others to share its model call")
    p.add_argument("--max-upload-mb", type=_real(0, strict=True), default=20.0,
                   help="the largest request body, in MiB (larger: 413)")
    p.add_argument("-k", type=_integer(1), default=10, help="matches per search unless the request gives k")
    openset = p.add_mutually_exclusive_group()
    openset.add_argument("--fpr", type=_fpr, default=None,
                         help="open-set threshold: the index's threshold calibrated for this false-positive rate")
    openset.add_argument("--threshold", type=_real(0), default=None,
                         help="open-set threshold as a distance: a query whose best match is farther is unknown")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    p.set_defaults(func=_cmd_serve)
    return parser


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse ``argv``. KEY=VALUE overrides may stand anywhere after the subcommand
    (``test --config C a=1 --weights W b=2``); an unknown ``--option`` is still an error."""
    parser = parser or build_parser()
    # argparse gives a nargs="*" positional only its first run of values; the later runs come
    # back as extras, in order, and are overrides too.
    args, extras = parser.parse_known_args(argv)
    if "--debug" in extras:  # a top-level flag, but typed after the subcommand just as often
        args.debug = True
        extras = [a for a in extras if a != "--debug"]
    options = [a for a in extras if a.startswith("-")]
    if options or (extras and not hasattr(args, "overrides")):
        _usage_error(f"editor-reid {args.command}", f"unrecognized arguments: {' '.join(options or extras)}")
    if extras:
        args.overrides = [*args.overrides, *extras]
    return args


def _message_lines(message: str) -> list[str]:
    """The lines to print for an error message (see the module docstring for the rule)."""
    first, *rest = [line.strip() for line in str(message).strip().splitlines() if line.strip()] or [""]
    if rest and all(line.startswith("- ") for line in rest):
        return [first] + [f"  {line}" for line in rest]
    for line in rest:
        first += (" " if first.endswith((":", ",")) else "; ") + line
    return [first]


def _path_message(exc: OSError) -> str:
    """``No such file or directory: 'x'`` for an OS-raised error; the library's own text otherwise."""
    if exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: '{exc.filename}'"
    return str(exc)


def _report(exc: BaseException, debug: bool) -> int | None:
    """Print a user error as the module docstring says and return its exit status; None for a bug."""
    if isinstance(exc, EditorReidError):
        status, lines = exc.exit_code, _message_lines(str(exc))
        if isinstance(exc, FloatingPointError):  # NonFiniteLossError: the run ends, its checkpoints stay
            lines[0] = f"training stopped: {lines[0]}"
    elif isinstance(exc, PATH_ERRORS):
        status, lines = 2, _message_lines(_path_message(exc))
    elif isinstance(exc, KeyboardInterrupt):
        status, lines = INTERRUPTED_STATUS, ["interrupted"]
    else:
        return None
    if debug:
        traceback.print_exception(exc)
    print(f"editor-reid: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(line, file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as exc:
        status = _report(exc, debug)
        if status is None:
            raise  # a bug: its traceback is what a report needs
        return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
