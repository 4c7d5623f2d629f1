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

from editor_reid.cli import build_parser, main
from editor_reid.data.layouts import DATASET_NAMES

SUBCOMMANDS = ("demo", "train", "test", "info", "make-synthetic", "check-data")


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
        ["make-synthetic", "--out", "x"],  # no --layout
        ["make-synthetic", "--layout", "rgbnt201"],  # no --out
        ["check-data", "--dataset", "rgbnt201"],  # no --root
        ["check-data", "--root", "x"],  # no --dataset
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
        ["make-synthetic", "--layout", "rgbnt201", "--out", "x", "--ids", "four"],
    ],
)
def test_invalid_choices_and_types_exit_two(argv, capsys):
    assert _exit_code(argv) == 2
    assert "invalid" in capsys.readouterr().err


def test_every_dataset_name_is_accepted_where_a_layout_is_named():
    parser = build_parser()
    for name in DATASET_NAMES:
        assert parser.parse_args(["make-synthetic", "--layout", name, "--out", "x"]).layout == name
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
    assert main(["make-synthetic", "--layout", "rgbnt201", "--out", str(tmp_path), "--ids", "4", "--views", "1"]) == 0
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
    assert main(["make-synthetic", "--layout", "rgbnt201", "--out", str(tmp_path), "--ids", "4"]) == 2
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


# ----------------------------------------------------------------------------- fresh interpreter


def test_python_dash_m_entry_point():
    result = _python("-m", "editor_reid", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: editor-reid")


def test_importing_the_cli_does_not_import_torch():
    # `editor-reid --help` and the usage errors must answer without paying torch's import time.
    result = _python("-c", "import sys, editor_reid.cli; print('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
