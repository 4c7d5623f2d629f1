"""Dataset layout parsers: official file-name parsing, tree reading, relabelling, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from editor_reid.data.layouts import (
    KNOWN_TRAIN_STATS,
    LAYOUTS,
    STRIP_WIDTH,
    LayoutError,
    format_statistics,
    load_dataset,
    parse_file_name,
    split_statistics,
)
from editor_reid.data.synthetic import make_synthetic


def _jpg(path: Path, size=(16, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 128, np.uint8)).save(path)


def _paired_tree(base: Path, names_by_split: dict[str, list[str]], modality_dirs=("RGB", "NI", "TI")) -> None:
    for split, names in names_by_split.items():
        for sub in modality_dirs:
            (base / split / sub).mkdir(parents=True, exist_ok=True)
            for name in names:
                _jpg(base / split / sub / name)


# ----------------------------------------------------------------------------- file names


@pytest.mark.parametrize(
    "layout, name, expected",
    [
        ("rgbnt201", "000123_cam3_0_02.jpg", (123, 2, -1)),
        ("rgbnt201", "000001_cam1_0_00.jpg", (1, 0, -1)),
        ("rgbnt201", "0001234_cam4_x.jpg", (123, 3, -1)),  # pid = first 6 characters of the first token
        ("rgbnt100", "0012_c003_000004.jpg", (12, 2, -1)),
        ("rgbnt100", "0600_c8_0001.jpg", (600, 7, -1)),
        ("rgbnt100", "-1_c1_0001.jpg", None),
        ("msvr310", "0012_s004_v3_001.jpg", (12, 3, 4)),  # camera not decremented, scene kept
        ("msvr310", "0310_s123_v0_999.jpg", (310, 0, 123)),
        ("market1501mm", "0012_c3s1_000451_00.jpg", (12, 2, -1)),
        ("market1501mm", "0000_c6s2_000001_01.jpg", (0, 5, -1)),
        ("market1501mm", "-1_c1s1_000000_00.jpg", None),  # junk, skipped
    ],
)
def test_official_file_name_parsing(layout, name, expected):
    assert parse_file_name(layout, name) == expected


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_format_name_round_trips_through_the_parser(layout):
    spec = LAYOUTS[layout]
    scenes = (1, 42, 999) if spec.protocol == "same_scene" else (-1,)
    names = set()
    for pid in (1, 12, 600):
        for camid in range(spec.max_cameras):
            for sceneid in scenes:
                for view in (0, 1, 7):
                    name = spec.image_key(pid, camid, sceneid, view)  # <vid>/<name> in per-identity layouts
                    assert parse_file_name(layout, name) == (pid, camid, sceneid), name
                    names.add(name)
    assert len(names) == 3 * spec.max_cameras * len(scenes) * 3  # views keep names apart


@pytest.mark.parametrize(
    "layout, name",
    [
        ("rgbnt201", "person.jpg"),
        ("rgbnt201", "000001_cam0_0_00.jpg"),  # camera 0 would become -1
        ("rgbnt100", "vehicle.jpg"),
        ("msvr310", "12_s4_v3.jpg"),
        ("market1501mm", "abc_c1s1_0.jpg"),
    ],
)
def test_unparseable_names_raise_naming_the_file(layout, name):
    with pytest.raises(LayoutError, match=name.replace(".", r"\.")):
        parse_file_name(layout, name)


def test_unknown_dataset_name():
    with pytest.raises(LayoutError, match="rgbnt201"):
        parse_file_name("market", "x.jpg")


# ----------------------------------------------------------------------------- hand-made trees


def test_rgbnt201_tree_relabels_sorted_and_query_is_gallery(tmp_path):
    base = tmp_path / "RGBNT201"
    _paired_tree(
        base,
        {
            "train_171": ["000009_cam1_0_00.jpg", "000002_cam2_0_00.jpg", "000005_cam4_0_00.jpg", "000002_cam3_0_01.jpg"],
            "test": ["000300_cam1_0_00.jpg", "000300_cam2_0_00.jpg"],
        },
    )
    splits = load_dataset("rgbnt201", tmp_path)
    # Sorted file order; labels by sorted original pid: 2 -> 0, 5 -> 1, 9 -> 2.
    assert [(s.pid, s.camid) for s in splits.train] == [(0, 1), (0, 2), (1, 3), (2, 0)]
    assert splits.num_train_pids == 3
    assert splits.query == splits.gallery
    assert [s.pid for s in splits.query] == [300, 300]
    assert splits.num_cameras == 4 and splits.protocol == "same_camera"
    s = splits.train[0]
    assert s.paths == {m: str(base / "train_171" / m / "000002_cam2_0_00.jpg") for m in ("RGB", "NI", "TI")}
    assert s.sceneid == -1 and s.crop is None


def test_market_tree_skips_junk(tmp_path):
    base = tmp_path / "Market1501-MM"
    _paired_tree(
        base,
        {
            "train": ["0002_c1s1_000100_00.jpg", "0007_c2s1_000100_00.jpg"],
            "query": ["0003_c1s1_000100_00.jpg"],
            "gallery": ["0003_c3s1_000100_00.jpg", "-1_c1s1_000001_00.jpg", "0000_c2s1_000001_00.jpg"],
        },
    )
    splits = load_dataset("market1501mm", tmp_path)
    assert [s.pid for s in splits.train] == [0, 1]
    assert sorted((s.pid, s.camid) for s in splits.gallery) == [(0, 1), (3, 2)]
    assert splits.num_cameras == 3


def test_msvr310_tree_keeps_scene_and_camera(tmp_path):
    base = tmp_path / "MSVR310"
    for split, names in {
        "bounding_box_train": ["0005_s001_v0_000.jpg", "0005_s002_v7_000.jpg", "0001_s003_v2_000.jpg"],
        "query3": ["0100_s010_v1_000.jpg"],
        "bounding_box_test": ["0100_s011_v1_000.jpg"],
    }.items():
        for name in names:
            for sub in ("vis", "ni", "th"):
                _jpg(base / split / name[:4] / sub / name)
    splits = load_dataset("msvr310", tmp_path)
    assert [(s.pid, s.camid, s.sceneid) for s in splits.train] == [(0, 2, 3), (1, 0, 1), (1, 7, 2)]
    assert splits.protocol == "same_scene"
    assert splits.num_cameras == 8
    q = splits.query[0]
    assert (q.pid, q.camid, q.sceneid) == (100, 1, 10)
    assert q.paths["TI"] == str(base / "query3" / "0100" / "th" / "0100_s010_v1_000.jpg")


def test_rgbnt100_strip_samples(tmp_path):
    base = tmp_path / "RGBNT100" / "rgbir"
    for split, name in (("bounding_box_train", "0001_c001_000000.jpg"), ("query", "0002_c2_0.jpg"), ("bounding_box_test", "0002_c3_0.jpg")):
        _jpg(base / split / name, size=(768, 128))
    splits = load_dataset("rgbnt100", tmp_path)
    s = splits.train[0]
    assert s.crop == STRIP_WIDTH
    assert len(set(s.paths.values())) == 1 and s.paths["RGB"].endswith("0001_c001_000000.jpg")
    assert (splits.query[0].pid, splits.query[0].camid) == (2, 1)
    assert splits.num_cameras == 3


def test_rgbnt100_regex_reads_the_file_name_not_the_directory(tmp_path):
    root = tmp_path / "run_7_c9"  # a parent that would match the regex on the full path
    base = root / "RGBNT100" / "rgbir"
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        _jpg(base / split / "0004_c2_0.jpg", size=(768, 128))
    assert (load_dataset("rgbnt100", root).query[0].pid, load_dataset("rgbnt100", root).query[0].camid) == (4, 1)


def test_missing_directories_name_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "RGBNT201")):
        load_dataset("rgbnt201", tmp_path)
    (tmp_path / "RGBNT201" / "test").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="train_171"):
        load_dataset("rgbnt201", tmp_path)


def test_evaluation_splits_load_without_the_train_directory(tmp_path):
    base = tmp_path / "Market1501-MM"
    _paired_tree(base, {"query": ["0003_c1s1_000100_00.jpg"],
                        "gallery": ["0003_c5s1_000100_00.jpg", "0004_c2s1_0_00.jpg"]})
    with pytest.raises(FileNotFoundError, match="train"):  # the default still needs train
        load_dataset("market1501mm", tmp_path)
    splits = load_dataset("market1501mm", tmp_path, splits=("query", "gallery"))
    assert splits.train == [] and splits.num_train_pids == 0
    assert [s.pid for s in splits.query] == [3] and len(splits.gallery) == 2
    assert splits.num_cameras == 5  # from the loaded splits: camera c5 -> id 4
    assert splits.root == str(tmp_path)
    only_query = load_dataset("market1501mm", tmp_path, splits=["query"])
    assert only_query.gallery == [] and only_query.num_cameras == 1
    with pytest.raises(ValueError, match="subset"):
        load_dataset("market1501mm", tmp_path, splits=("test",))
    with pytest.raises(ValueError, match="subset"):
        load_dataset("market1501mm", tmp_path, splits=())


def test_requested_train_split_must_not_be_empty(tmp_path):
    _paired_tree(tmp_path / "RGBNT201", {"train_171": [], "test": ["000002_cam1_0_00.jpg"]})
    with pytest.raises(LayoutError, match="no training images"):
        load_dataset("rgbnt201", tmp_path)
    assert load_dataset("rgbnt201", tmp_path, splits=("query", "gallery")).train == []


def test_unparseable_name_in_tree_raises_with_path(tmp_path):
    _paired_tree(tmp_path / "RGBNT201", {"train_171": ["000001_cam1_0_00.jpg", "badname.jpg"], "test": ["000002_cam1_0_00.jpg"]})
    with pytest.raises(LayoutError, match="badname.jpg"):
        load_dataset("rgbnt201", tmp_path)


def test_statistics_table(tmp_path, capsys):
    _paired_tree(
        tmp_path / "RGBNT201",
        {"train_171": ["000001_cam1_0_00.jpg", "000001_cam2_0_00.jpg", "000004_cam3_0_00.jpg"], "test": ["000009_cam1_0_00.jpg"]},
    )
    splits = load_dataset("rgbnt201", tmp_path, verbose=True)
    printed = capsys.readouterr().out
    assert printed.strip() == format_statistics(splits).strip()
    assert split_statistics(splits)["train"] == {"ids": 2, "images": 3, "cameras": 3}
    train_row = next(line for line in printed.splitlines() if "train" in line and "|" in line)
    assert [int(x) for x in train_row.split("|")[1:]] == [2, 3, 3]


def test_known_camera_counts_are_the_layouts_camera_ranges():
    # `info` sizes the SIE camera embedding from these without the data; the parsers bound the
    # camera ids by max_cameras. The two sources must agree for every layout.
    # RGBN300 and WMVeID863 have no statistics we could verify: `info` asks for --root there.
    assert set(KNOWN_TRAIN_STATS) == set(LAYOUTS) - {"rgbn300", "wmveid863"}
    assert all(KNOWN_TRAIN_STATS[name][1] == LAYOUTS[name].max_cameras for name in KNOWN_TRAIN_STATS)


# ----------------------------------------------------------------------------- generated trees


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parsers_read_generated_trees(tmp_path, layout):
    summary = make_synthetic(layout, tmp_path, ids=6, views=1, seed=3)
    splits = load_dataset(layout, tmp_path)
    assert split_statistics(splits) == summary["splits"]
    assert sorted({s.pid for s in splits.train}) == list(range(splits.num_train_pids))
    assert splits.num_cameras <= LAYOUTS[layout].max_cameras
    assert splits.protocol == ("same_scene" if layout == "msvr310" else "same_camera")
    assert {s.pid for s in splits.query} <= {s.pid for s in splits.gallery}
    assert all(Path(p).is_file() for s in splits.train for p in s.paths.values())
    if layout == "msvr310":
        assert all(s.sceneid > 0 for s in splits.train)
    else:
        assert all(s.sceneid == -1 for s in splits.query)
