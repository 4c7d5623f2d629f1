"""check-data: every problem is reported with its path; CLI exit codes 0 / 1 / 2."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from editor_reid.cli import main
from editor_reid.data.layouts import DatasetSplits, LayoutError, Sample, load_dataset
from editor_reid.data.synthetic import make_synthetic
from editor_reid.data.validate import PreflightError, check_data, preflight
from editor_reid.errors import EditorReidError


def _make(tmp_path: Path, layout: str, ids: int = 6) -> Path:
    make_synthetic(layout, tmp_path, ids=ids, views=2, seed=0)
    return tmp_path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _mentions(problems: list[str], path: Path, kind: str) -> bool:
    return any(str(path) in p and p.startswith(kind) for p in problems)


def test_clean_tree_cli_exit_zero(tmp_path, capsys):
    root = _make(tmp_path, "rgbnt201")
    report = check_data("rgbnt201", root)
    assert report.ok and report.problems == []
    assert "train" in report.statistics and "gallery" in report.statistics
    assert main(["check-data", "--dataset", "rgbnt201", "--root", str(root)]) == 0
    assert "no problems" in capsys.readouterr().out


def test_truncated_jpeg_and_missing_ni_are_both_reported(tmp_path, capsys):
    root = _make(tmp_path, "rgbnt201")
    rgb_files = sorted((root / "RGBNT201" / "train_171" / "RGB").glob("*.jpg"))
    truncated = rgb_files[0]
    _truncate(truncated)
    deleted_ni = root / "RGBNT201" / "test" / "NI" / sorted((root / "RGBNT201" / "test" / "RGB").glob("*.jpg"))[1].name
    deleted_ni.unlink()

    report = check_data("rgbnt201", root)
    assert not report.ok
    assert _mentions(report.problems, truncated, "undecodable image")
    assert _mentions(report.problems, deleted_ni, "unpaired modality")
    assert main(["check-data", "--dataset", "rgbnt201", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert str(truncated) in out and str(deleted_ni) in out and "2 problem(s)" in out


def test_many_problems_reported_together(tmp_path):
    root = _make(tmp_path, "rgbnt201")
    base = root / "RGBNT201"
    train_rgb = sorted((base / "train_171" / "RGB").glob("*.jpg"))
    # An NI/TI pair whose RGB file is missing (the reverse direction of unpairing).
    lonely = train_rgb[0].name
    (base / "train_171" / "RGB" / lonely).unlink()
    # A name that does not parse, in all three modalities.
    for m in ("RGB", "NI", "TI"):
        shutil.copy(base / "train_171" / m / train_rgb[1].name, base / "train_171" / m / "snapshot.jpg")
    # A camera id out of range (RGBNT201 has cameras 1-4).
    for m in ("RGB", "NI", "TI"):
        shutil.copy(base / "train_171" / m / train_rgb[1].name, base / "train_171" / m / "099999_cam7_0_00.jpg")
    # A test identity that also appears in train.
    test_name = sorted((base / "test" / "RGB").glob("*.jpg"))[0].name
    for m in ("RGB", "NI", "TI"):
        shutil.copy(base / "test" / m / test_name, base / "train_171" / m / test_name)
    report = check_data("rgbnt201", root)
    problems = report.problems
    assert _mentions(problems, base / "train_171" / "NI" / lonely, "unpaired modality")
    assert _mentions(problems, base / "train_171" / "RGB" / "snapshot.jpg", "unparseable file name")
    assert _mentions(problems, base / "train_171" / "RGB" / "099999_cam7_0_00.jpg", "camera id out of range")
    assert any(p.startswith("train/test identity overlap") and str(int(test_name[:6])) in p for p in problems)
    assert len(problems) == 4, problems  # exactly the injected problems, nothing spurious


def test_rgbnt100_strip_geometry(tmp_path):
    root = _make(tmp_path, "rgbnt100")
    strip = sorted((root / "RGBNT100" / "rgbir" / "bounding_box_train").glob("*.jpg"))[0]
    Image.fromarray(np.zeros((128, 700, 3), np.uint8)).save(strip)
    report = check_data("rgbnt100", root)
    assert _mentions(report.problems, strip, "wrong geometry")
    assert "768" in next(p for p in report.problems if str(strip) in p)
    # One file holds all three modalities, so the strips are counted once, under one label.
    assert set(report.image_sizes) == {"RGB|NI|TI"} and report.image_sizes["RGB|NI|TI"]["700x128"] == 1


def test_query_without_match_same_camera(tmp_path):
    root = _make(tmp_path, "market1501mm")
    base = root / "Market1501-MM"
    query = sorted((base / "query" / "RGB").glob("*.jpg"))[0]
    pid = query.name.split("_")[0]
    for m in ("RGB", "NI", "TI"):
        for f in (base / "gallery" / m).glob(f"{pid}_*.jpg"):
            f.unlink()
    report = check_data("market1501mm", root)
    assert _mentions(report.problems, query, "query without gallery match")


def test_query_without_match_same_scene(tmp_path):
    """MSVR310: a gallery image of another camera but the same scene is not a valid match."""
    root = _make(tmp_path, "msvr310")
    base = root / "MSVR310"
    query = sorted((base / "query3").glob("*/vis/*.jpg"))[0]
    vid, scene = query.name[0:4], query.name[6:9]
    for f in list((base / "bounding_box_test" / vid).glob("*/*.jpg")):
        if f.name[6:9] != scene:
            f.unlink()
    report = check_data("msvr310", root)
    assert _mentions(report.problems, query, "query without gallery match")
    assert "same_scene" in next(p for p in report.problems if str(query) in p)


def test_misfiled_msvr_image(tmp_path):
    root = _make(tmp_path, "msvr310")
    base = root / "MSVR310" / "bounding_box_train"
    folders = sorted(p for p in base.iterdir())
    name = sorted((folders[0] / "vis").glob("*.jpg"))[0].name
    for sub in ("vis", "ni", "th"):
        shutil.move(folders[0] / sub / name, folders[1] / sub / name)
    report = check_data("msvr310", root)
    assert _mentions(report.problems, folders[1] / "vis" / name, "misfiled image")


def test_missing_split_directory_is_a_problem_but_missing_dataset_is_usage(tmp_path, capsys):
    root = _make(tmp_path, "market1501mm")
    shutil.rmtree(root / "Market1501-MM" / "query")
    report = check_data("market1501mm", root)
    assert _mentions(report.problems, root / "Market1501-MM" / "query", "missing directory")
    with pytest.raises(FileNotFoundError, match="RGBNT201"):
        check_data("rgbnt201", root)
    assert main(["check-data", "--dataset", "rgbnt201", "--root", str(root)]) == 2
    assert "RGBNT201" in capsys.readouterr().err


# ----------------------------------------------------------------------------- image modes and sizes


def test_image_modes_and_sizes_are_counted_per_modality(tmp_path):
    root = _make(tmp_path, "rgbnt201")
    base = root / "RGBNT201"
    names = sorted((base / "train_171" / "RGB").glob("*.jpg"))
    # A 16-bit thermal frame of another size under a .jpg name, and a LAB TIFF (refused).
    Image.fromarray(np.full((20, 10), 9000, np.uint16)).save(base / "train_171" / "TI" / names[0].name, format="PNG")
    lab = base / "train_171" / "NI" / names[1].name
    Image.new("LAB", (16, 32)).save(lab, format="TIFF")
    report = check_data("rgbnt201", root)
    assert report.problems == [next(p for p in report.problems if p.startswith("unsupported image mode"))]
    assert str(lab) in report.problems[0] and "LAB" in report.problems[0]
    files = len(names) + len(list((base / "test" / "RGB").glob("*.jpg")))  # test/ counted once
    assert sum(report.image_modes["RGB"].values()) == files
    assert report.image_modes["TI"]["I;16"] == 1 and report.image_sizes["TI"]["10x20"] == 1
    assert report.image_modes["NI"]["LAB"] == 1
    ti_line = next(line for line in report.statistics.splitlines() if line.strip().startswith("TI"))
    assert "I;16 1" in ti_line and "10x20 1" in ti_line


# ----------------------------------------------------------------------------- pre-flight


def _damage(base: Path):
    """A missing NI twin (train), an empty TI file (test), a directory in place of an RGB file."""
    train_rgb = sorted((base / "train_171" / "RGB").glob("*.jpg"))
    test_rgb = sorted((base / "test" / "RGB").glob("*.jpg"))
    missing = base / "train_171" / "NI" / train_rgb[0].name
    missing.unlink()
    empty = base / "test" / "TI" / test_rgb[0].name
    empty.write_bytes(b"")
    directory = train_rgb[1]
    directory.unlink()
    directory.mkdir()  # still matched by the *.jpg scan, as a real tree can be
    return train_rgb[0], missing, empty, directory


def test_preflight_reports_missing_empty_and_directory(tmp_path):
    root = _make(tmp_path, "rgbnt201")
    splits = load_dataset("rgbnt201", root)
    anchor, missing, empty, directory = _damage(root / "RGBNT201")
    with pytest.raises(PreflightError) as info:
        preflight(splits, ("train", "query", "gallery"), ("RGB", "NI", "TI"))
    error = info.value
    assert isinstance(error, LayoutError) and isinstance(error, EditorReidError) and error.exit_code == 1
    lines = str(error).splitlines()
    assert lines[0] == (
        f"rgbnt201: 3 problem(s) in the train, query and gallery split(s) at {root}; run "
        f"'editor-reid check-data --dataset rgbnt201 --root {root}' for a full check"
    )
    assert f"- missing file: {missing} (the NI twin of {anchor})" in lines
    assert any(line.startswith("- empty file: ") and str(empty) in line for line in lines)  # test/ once, not twice
    assert f"- a directory, not a file: {directory}" in lines
    # "- " items: the command line prints them, indented, under its "editor-reid: <first line>".
    assert len(lines) == 4 and [f"- {p}" for p in error.problems] == lines[1:]
    # Only what will be read is checked: the given splits and modalities.
    assert preflight(splits, ("query", "gallery"), ("RGB", "NI")) is None
    assert preflight(splits, ("train",), ("TI",)) is None
    with pytest.raises(PreflightError, match=r"^rgbnt201: 1 problem\(s\) in the query and gallery split\(s\)"):
        preflight(splits, ("query", "gallery"), ("TI",))


def test_preflight_lists_the_first_ten_problems(tmp_path):
    root = _make(tmp_path, "market1501mm")
    splits = load_dataset("market1501mm", root)
    for sample in splits.gallery[:7]:
        os.unlink(sample.paths["NI"])
        os.unlink(sample.paths["TI"])
    with pytest.raises(PreflightError) as info:
        preflight(splits, ("gallery",), ("RGB", "NI", "TI"))
    lines = str(info.value).splitlines()
    assert lines[0].startswith("market1501mm: 14 problem(s) in the gallery split(s)")
    assert len(lines) == 12 and lines[-1] == "- ... and 4 more" and len(info.value.problems) == 14
    assert all(line.startswith("- missing file: ") for line in lines[1:11])


def test_preflight_checks_an_rgbnt100_strip_once(tmp_path):
    root = _make(tmp_path, "rgbnt100")
    splits = load_dataset("rgbnt100", root)
    strip = Path(splits.query[0].paths["RGB"])
    strip.unlink()
    with pytest.raises(PreflightError) as info:
        preflight(splits, ("query", "gallery"), ("RGB", "NI", "TI"))
    assert info.value.problems == [f"missing file: {strip}"]  # one file for all modalities, no "twin"


def test_preflight_of_ten_thousand_samples_takes_well_under_a_second(tmp_path):
    for m in ("RGB", "NI", "TI"):
        (tmp_path / m).mkdir()
    samples = []
    for i in range(10_000):
        paths = {m: str(tmp_path / m / f"{i:05d}.jpg") for m in ("RGB", "NI", "TI")}
        for path in paths.values():
            fd = os.open(path, os.O_CREAT | os.O_WRONLY)
            os.write(fd, b"x")
            os.close(fd)
        samples.append(Sample(paths=paths, pid=i, camid=0))
    splits = DatasetSplits("rgbnt201", samples, [], [], 10_000, 1, "same_camera", str(tmp_path))
    start = time.perf_counter()
    preflight(splits, ("train", "query", "gallery"), ("RGB", "NI", "TI"))
    assert time.perf_counter() - start < 1.0  # about 0.05 s on one core: stat only, nothing decoded
