"""The ``editor-reid`` command: argument handling and exit codes (0 ok, 1 bad data, 2 usage).

Everything runs in-process through ``main``, except the checks that need a fresh interpreter.
No subcommand here trains a model: ``train`` and ``demo`` are only parsed or stopped at a
usage error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import editor_reid
from editor_reid import cli
from editor_reid.cli import build_parser, main, parse_args
from editor_reid.config import dump_config, load_config
from editor_reid.data.layouts import LAYOUT_NAMES, LayoutError
from editor_reid.errors import EditorReidError, TrainingInterrupted, UsageError

SUBCOMMANDS = ("demo", "train", "ablate", "test", "info", "make-synthetic", "check-data", "make-manifest", "extract",
               "calibrate", "search", "index", "serve", "export", "report")


def _exit_code(argv: list[str]) -> int:
    """``main``'s exit status, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("editor-reid:"), err
    assert "Traceback" not in err
    return lines[0]


def _python(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120, check=False)


# ----------------------------------------------------------------------------- help and parsing


def test_top_level_help_lists_every_subcommand(capsys):
    assert _exit_code(["--help"]) == 0
    listed = re.search(r"\{([a-z,-]+)\}", capsys.readouterr().out).group(1).split(",")
    assert sorted(listed) == sorted(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_exits_zero(command, capsys):
    assert _exit_code([command, "--help"]) == 0
    assert f"usage: editor-reid {command}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["test", "--config", "rgbnt201"],  # no --weights
        ["test", "--weights", "w.pt"],  # no --config
        ["info"],
        ["make-synthetic", "--out", "x"],  # no --dataset
        ["make-synthetic", "--dataset", "rgbnt201"],  # no --out
        ["check-data", "--dataset", "rgbnt201"],  # no --root
        ["check-data", "--root", "x"],  # no --dataset
        ["extract", "--weights", "w.pt", "--images", "x"],  # no --out
        ["extract", "--images", "x", "--out", "f.npz"],  # no --weights
    ],
)
def test_missing_required_arguments_exit_two(argv, capsys):
    assert _exit_code(argv) == 2
    assert "required" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["make-synthetic", "--layout", "market", "--out", "x"],
        ["check-data", "--dataset", "RGBNT201", "--root", "x"],
        ["test", "--config", "rgbnt201", "--weights", "w.pt", "--missing", "some"],
        ["make-synthetic", "--dataset", "rgbnt201", "--out", "x", "--ids", "four"],
        ["extract", "--weights", "w.pt", "--dataset", "manifest", "--root", "x", "--out", "f.npz"],
        ["extract", "--weights", "w.pt", "--images", "x", "--out", "f.npz", "--chunk-size", "0"],
        ["extract", "--weights", "w.pt", "--images", "x", "--out", "f.npz", "--amp", "fp8"],
    ],
)
def test_invalid_choices_and_types_exit_two(argv, capsys):
    assert _exit_code(argv) == 2
    assert "invalid" in capsys.readouterr().err


def test_every_dataset_name_is_accepted_where_a_layout_is_named():
    parser = build_parser()
    for name in LAYOUT_NAMES:
        assert parser.parse_args(["make-synthetic", "--dataset", name, "--out", "x"]).dataset == name
        # --layout, the option's old name, still works (hidden from --help).
        assert parser.parse_args(["make-synthetic", "--layout", name, "--out", "x"]).dataset == name
        assert parser.parse_args(["check-data", "--dataset", name, "--root", "x"]).dataset == name


def test_train_and_demo_arguments_parse():
    parser = build_parser()
    args = parser.parse_args(["train", "--config", "demo", "--seeds", "1,2", "solver.base_lr=0.1", "model.sfts=false"])
    assert (args.config, args.resume, args.seeds) == ("demo", None, "1,2")
    assert args.overrides == ["solver.base_lr=0.1", "model.sfts=false"]
    assert parser.parse_args(["train", "--resume", "runs/x"]).resume == "runs/x"
    args = parser.parse_args(["demo", "--out", "d", "--epochs", "2", "--json", "m.json"])
    assert (args.out, args.epochs, args.json) == ("d", 2, "m.json")
    args = parser.parse_args(["test", "--config", "rgbnt201", "--weights", "w.pt", "--rerank", "--missing", "all"])
    assert args.rerank and args.missing == "all"


# ----------------------------------------------------------------------------- usage errors: one line


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config", "nope"], "neither a file nor a built-in preset"),
        (["--config", "rgbnt201", "solver.base_lrr=1"], "did you mean 'solver.base_lr'"),
        (["--config", "rgbnt201", "solver.base_lr"], "expected KEY=VALUE"),
        (["--config", "rgbnt201", "solver.max_epochs=ten"], "solver.max_epochs"),
    ],
)
def test_config_errors_exit_two_with_one_line(overrides, message, capsys):
    assert main(["info", *overrides]) == 2
    assert message in _one_error_line(capsys.readouterr().err)


def test_train_without_config_or_run_directory_exits_two(tmp_path, capsys):
    assert main(["train"]) == 2
    assert "--config" in _one_error_line(capsys.readouterr().err)
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert str(tmp_path / "config.yaml") in _one_error_line(capsys.readouterr().err)


def test_test_with_a_missing_weights_file_exits_two(tmp_path, capsys):
    weights = tmp_path / "missing.pt"
    assert main(["test", "--config", "rgbnt201", "--weights", str(weights)]) == 2
    assert str(weights) in _one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- data commands


@pytest.fixture()
def tree(tmp_path, capsys):
    """A tiny synthetic RGBNT201 tree written through the CLI."""
    assert main(["make-synthetic", "--dataset", "rgbnt201", "--out", str(tmp_path), "--ids", "4", "--views", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout"] == "rgbnt201" and summary["ids"] == 4 and summary["views"] == 1
    assert Path(summary["dataset_dir"]) == tmp_path / "RGBNT201"
    return tmp_path


def test_make_synthetic_writes_a_tree(tree):
    for split in ("train_171", "test"):
        for modality in ("RGB", "NI", "TI"):
            assert any((tree / "RGBNT201" / split / modality).glob("*.jpg"))


def test_make_synthetic_refuses_to_overwrite_real_data(tmp_path, capsys):
    (tmp_path / "RGBNT201").mkdir()
    assert main(["make-synthetic", "--dataset", "rgbnt201", "--out", str(tmp_path), "--ids", "4"]) == 2
    assert "refusing to overwrite" in _one_error_line(capsys.readouterr().err)


def test_check_data_exit_codes(tree, tmp_path, capsys):
    argv = ["check-data", "--dataset", "rgbnt201", "--root", str(tree)]
    assert main(argv) == 0
    assert "no problems found" in capsys.readouterr().out

    deleted = sorted((tree / "RGBNT201" / "train_171" / "TI").glob("*.jpg"))[0]
    deleted.unlink()
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "PROBLEM: unpaired modality" in out and str(deleted) in out and "1 problem(s)" in out

    missing_root = tmp_path / "nowhere"
    assert main(["check-data", "--dataset", "rgbnt201", "--root", str(missing_root)]) == 2
    assert str(missing_root / "RGBNT201") in _one_error_line(capsys.readouterr().err)


def test_info_prints_the_parameter_count(capsys):
    assert main(["info", "--config", "rgbnt201"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^Parameters: \d+\.\d+ M", out, re.MULTILINE), out
    assert "171 train IDs, 4 cameras (known statistics)" in out


# ----------------------------------------------------------------------------- command-line shape


def test_version(capsys):
    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"editor-reid {editor_reid.__version__}"


def test_overrides_may_stand_anywhere_after_the_subcommand():
    args = parse_args(["test", "--config", "C", "a.b=1", "--weights", "W", "c.d=2", "--rerank", "e.f=[1, 2]"])
    assert (args.config, args.weights, args.rerank) == ("C", "W", True)
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=[1, 2]"]
    args = parse_args(["train", "x.y=1", "--config", "demo", "--seeds", "1,2", "z.w=2"])
    assert args.overrides == ["x.y=1", "z.w=2"] and args.seeds == "1,2"


@pytest.mark.parametrize(
    "argv, named",
    [
        (["test", "--config", "C", "a=1", "--weights", "W", "--frobnicate", "b=2"], "--frobnicate"),
        (["train", "--config", "demo", "--seed", "3"], "--seed"),
        (["demo", "solver.base_lr=1"], "solver.base_lr=1"),  # demo takes no overrides
    ],
)
def test_unknown_options_are_still_an_error(argv, named, capsys):
    assert _exit_code(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"unrecognized arguments: {named}" in line and f"editor-reid {argv[0]} --help" in line


def test_help_shows_defaults_and_resume_auto(capsys):
    assert _exit_code(["make-synthetic", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 100)" in out and "(default: 0)" in out and "--layout" not in out
    assert _exit_code(["demo", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: runs/demo)" in out and "(default: 1111)" in out
    assert _exit_code(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "'auto' (needs --config)" in out and "datasets.root_dir=DIR" in out


def test_dataset_and_its_old_name_layout_are_one_option(capsys):
    assert _exit_code(["make-synthetic", "--dataset", "rgbnt201", "--layout", "rgbnt201", "--out", "x"]) == 2
    assert "not allowed with" in _one_error_line(capsys.readouterr().err)


@pytest.fixture()
def calls(monkeypatch):
    """Replace the library calls of train / test / info by recorders (no model, no torch work)."""
    import editor_reid.engine.evaluate
    import editor_reid.engine.info
    import editor_reid.engine.sweep
    import editor_reid.engine.train

    seen: dict = {}

    def record(name):
        def fake(cfg, *args, **kwargs):
            seen[name] = (cfg, args, kwargs)
            return "" if name == "describe" else {}
        return fake

    monkeypatch.setattr(editor_reid.engine.train, "train", record("train"))
    monkeypatch.setattr(editor_reid.engine.sweep, "train_seeds", record("train_seeds"))
    monkeypatch.setattr(editor_reid.engine.evaluate, "run_test", record("run_test"))
    monkeypatch.setattr(editor_reid.engine.info, "describe", record("describe"))
    return seen


def test_root_means_datasets_root_dir_everywhere(calls, tmp_path):
    root = str(tmp_path / "2024")  # a name YAML would read as a number
    assert main(["train", "--config", "demo", "--root", root, f"output_dir={tmp_path / 'run'}"]) == 0
    assert calls["train"][0].datasets.root_dir == root
    assert main(["test", "--config", "demo", "--weights", "w.pt", "--root", root]) == 0
    assert calls["run_test"][0].datasets.root_dir == root
    assert main(["info", "--config", "demo", "--root", root]) == 0
    cfg, _, kwargs = calls["describe"]
    assert cfg.datasets.root_dir == root and kwargs["root"] == root


def test_resume_auto_and_resume_run_dir(calls, tmp_path, capsys):
    assert main(["train", "--config", "demo", "--resume", "auto", f"output_dir={tmp_path}"]) == 0
    assert calls["train"][2]["resume"] == "auto"
    assert main(["train", "--resume", "auto"]) == 2
    assert "--resume auto needs --config" in _one_error_line(capsys.readouterr().err)
    # --resume RUN_DIR without --config reads RUN_DIR/config.yaml, as before.
    (tmp_path / "config.yaml").write_text(dump_config(load_config(cli.resolve_config_path("demo"))))
    assert main(["train", "--resume", str(tmp_path), "solver.max_epochs=2"]) == 0
    cfg, _, kwargs = calls["train"]
    assert kwargs["resume"] == str(tmp_path) and cfg.solver.max_epochs == 2
    assert main(["train", "--config", "demo", "--seeds", "3, 4,", f"output_dir={tmp_path}"]) == 0
    assert calls["train_seeds"][1] == ([3, 4],)


# ----------------------------------------------------------------------------- bad counts and seeds


@pytest.mark.parametrize(
    "argv, named",
    [
        (["make-synthetic", "--dataset", "rgbnt201", "--out", "x", "--ids", "0"], "--ids: invalid value '0': expected an integer >= 2"),
        (["make-synthetic", "--dataset", "rgbnt201", "--out", "x", "--ids", "-3"], "--ids: invalid value '-3'"),
        (["make-synthetic", "--dataset", "rgbnt201", "--out", "x", "--views", "0"], "--views: invalid value '0': expected an integer >= 1"),
        (["make-synthetic", "--dataset", "rgbnt201", "--out", "x", "--seed", "-1"], "--seed: invalid value '-1'"),
        (["demo", "--epochs", "0"], "--epochs: invalid value '0': expected an integer >= 1"),
        (["demo", "--epochs", "1.5"], "--epochs: invalid value '1.5'"),
        (["demo", "--seed", "-1"], "--seed: invalid value '-1': expected an integer in [0, 4294967295]"),
        (["train", "--config", "demo", "--seeds", ""], "--seeds: invalid value '': expected comma-separated seeds"),
        (["train", "--config", "demo", "--seeds", " , "], "--seeds: invalid value ' , '"),
        (["train", "--config", "demo", "--seeds", "a,b"], "--seeds: invalid value 'a,b': 'a' is not a seed"),
        (["train", "--config", "demo", "--seeds", "1,-2"], "--seeds: invalid value '1,-2': '-2' is not a seed"),
    ],
)
def test_bad_counts_and_seeds_exit_two_with_one_line(argv, named, capsys):
    assert _exit_code(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"editor-reid: {argv[0]}: argument ") and named in line


def test_count_out_of_the_layout_range_exits_two(tmp_path, capsys):
    assert main(["make-synthetic", "--dataset", "rgbnt100", "--out", str(tmp_path), "--ids", "601"]) == 2
    assert "ids must be in [2, 600] for rgbnt100, got 601" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "RGBNT100").exists()


# ----------------------------------------------------------------------------- configuration values


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["input.size_train=[100,50]", "input.size_test=[100,50]"], "nearest valid: [96, 48] or [112, 64]"),
        (["solver.ims_per_batch=0"], "'solver.ims_per_batch': expected >= 1, got 0"),
        (["dataloader.num_instance=0"], "'dataloader.num_instance': expected >= 1, got 0"),
        (["solver.base_lr=.nan"], "'solver.base_lr': expected a finite number, got nan"),
        (["solver.base_lr=-1"], "'solver.base_lr': expected > 0, got -1.0"),
        (["solver.max_epochs=0"], "'solver.max_epochs': expected >= 1, got 0"),
        (["model.base_lr=0.1"], "unknown config key 'model.base_lr'; did you mean 'solver.base_lr'?"),
    ],
)
def test_train_refuses_bad_values_before_creating_the_run_directory(overrides, named, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", "demo", f"output_dir={run}", *overrides]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert named in line and "must be a multiple of" not in line
    assert not run.exists()


# ----------------------------------------------------------------------------- how each kind of error is reported


def _raising(monkeypatch, exc: BaseException):
    """Make `check-data` raise ``exc`` (check-data imports no model, so this is quick)."""
    import editor_reid.data.validate

    def fake(*args, **kwargs):
        raise exc

    monkeypatch.setattr(editor_reid.data.validate, "check_data", fake)
    return ["check-data", "--dataset", "rgbnt201", "--root", "x"]


@pytest.mark.parametrize(
    "exc, status, line",
    [
        (EditorReidError("bad thing"), 1, "editor-reid: bad thing"),
        (UsageError("bad usage"), 2, "editor-reid: bad usage"),
        (LayoutError("rgbnt201: file name 'x.jpg' does not parse"), 1, "editor-reid: rgbnt201: file name 'x.jpg' does not parse"),
        (TrainingInterrupted("stopped by SIGTERM; resume with --resume runs/x", 15), 143, "editor-reid: stopped by SIGTERM"),
        (TrainingInterrupted("stopped by SIGINT", 2), 130, "editor-reid: stopped by SIGINT"),
        (FileNotFoundError(2, "No such file or directory", "/data/x"), 2, "editor-reid: No such file or directory: '/data/x'"),
        (FileNotFoundError("cannot resume: runs/x/checkpoints/last.pt does not exist"), 2, "editor-reid: cannot resume"),
        (FileExistsError("'runs/demo/run' exists and is not a run directory"), 2, "editor-reid: 'runs/demo/run' exists"),
        (IsADirectoryError(21, "Is a directory", "runs"), 2, "editor-reid: Is a directory: 'runs'"),
        (NotADirectoryError(20, "Not a directory", "/etc/passwd/x"), 2, "editor-reid: Not a directory: '/etc/passwd/x'"),
        (PermissionError(13, "Permission denied", "/root/x"), 2, "editor-reid: Permission denied: '/root/x'"),
        (KeyboardInterrupt(), 130, "editor-reid: interrupted"),
        (EditorReidError("first line\nwhile parsing\n  in line 2"), 1, "editor-reid: first line; while parsing; in line 2"),
        (EditorReidError("problems:\ncolumn 3"), 1, "editor-reid: problems: column 3"),
    ],
)
def test_user_errors_are_one_line_with_their_exit_status(exc, status, line, monkeypatch, capsys):
    assert main(_raising(monkeypatch, exc)) == status
    assert _one_error_line(capsys.readouterr().err).startswith(line)


def test_non_finite_loss_keeps_its_training_stopped_prefix(monkeypatch, capsys):
    from editor_reid.losses import NonFiniteLossError

    assert main(_raising(monkeypatch, NonFiniteLossError({"id": float("nan")}, 3, 7))) == 1
    assert _one_error_line(capsys.readouterr().err) == "editor-reid: training stopped: non-finite loss at epoch 3, step 7: 'id' = nan"


def test_list_style_reports_keep_their_items_indented(monkeypatch, capsys):
    exc = EditorReidError("pre-flight: 2 problems in /data/RGBNT201:\n- a.jpg: not an image\n- b.png: 16-bit")
    assert main(_raising(monkeypatch, exc)) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "editor-reid: pre-flight: 2 problems in /data/RGBNT201:", "  - a.jpg: not an image", "  - b.png: 16-bit",
    ]
    assert "Traceback" not in err


def test_the_data_preflight_report_prints_one_finding_per_line(monkeypatch, capsys):
    from editor_reid.data.validate import PreflightError

    message = ("rgbnt201: 2 problem(s) in the train split(s) at data\n"
               "  - missing file: data/RGBNT201/train_171/NI/a.jpg\n  - empty file: data/RGBNT201/train_171/TI/b.jpg")
    assert main(_raising(monkeypatch, PreflightError(message, ["missing file: ...", "empty file: ..."]))) == 1
    assert capsys.readouterr().err.splitlines() == [
        "editor-reid: rgbnt201: 2 problem(s) in the train split(s) at data",
        "  - missing file: data/RGBNT201/train_171/NI/a.jpg",
        "  - empty file: data/RGBNT201/train_171/TI/b.jpg",
    ]


def test_a_bug_keeps_its_traceback(monkeypatch):
    with pytest.raises(ZeroDivisionError):
        main(_raising(monkeypatch, ZeroDivisionError("a bug")))


@pytest.mark.parametrize("how", ["flag", "flag after the subcommand", "environment"])
def test_debug_shows_the_traceback_of_user_errors_too(how, monkeypatch, capsys):
    argv = _raising(monkeypatch, UsageError("bad usage"))
    if how == "flag":
        argv = ["--debug", *argv]
    elif how == "flag after the subcommand":
        argv = [*argv, "--debug"]
    else:
        monkeypatch.setenv("EDITOR_REID_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UsageError: bad usage" in err
    assert err.rstrip().splitlines()[-1] == "editor-reid: bad usage"


def test_without_debug_user_errors_show_no_traceback(monkeypatch, capsys):
    monkeypatch.setenv("EDITOR_REID_DEBUG", "0")
    assert main(_raising(monkeypatch, UsageError("bad usage"))) == 2
    assert "Traceback" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- fresh interpreter


def test_python_dash_m_entry_point():
    result = _python("-m", "editor_reid", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: editor-reid")


def test_console_errors_in_a_fresh_interpreter():
    result = _python("-m", "editor_reid", "info", "--config", "rgbnt201", "model.base_lr=1")
    assert result.returncode == 2
    assert result.stderr == "editor-reid: unknown config key 'model.base_lr'; did you mean 'solver.base_lr'?\n"
    result = _python("-m", "editor_reid", "make-synthetic", "--dataset", "rgbnt201", "--out", "x", "--ids", "0")
    assert result.returncode == 2 and result.stderr.count("\n") == 1


def test_importing_the_cli_does_not_import_torch():
    # `editor-reid --help` and the usage errors must answer without paying torch's import time.
    result = _python("-c", "import sys, editor_reid.cli; print('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
