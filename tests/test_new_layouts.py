"""The RGBN300 (R | N strips) and WMVeID863 (per-vehicle folders, day/night flag) layouts: parsing,
synthetic trees read back, check-data naming each bad file, manifests, and a tiny training run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from editor_reid.cli import main
from editor_reid.data.dataset import BadImageError, read_sample_images
from editor_reid.data.layouts import LAYOUTS, LayoutError, Sample, load_dataset, parse_file_name, split_statistics
from editor_reid.data.manifest import check_manifest, make_manifest, read_manifest
from editor_reid.data.synthetic import load_mask, make_synthetic, mask_path_for
from editor_reid.data.validate import check_data
from editor_reid.engine.evaluate import run_test
from editor_reid.engine.train import train

from _tiny import train_cfg

METRICS = {"mAP", "rank1", "rank5", "rank10", "mINP"}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """A clean synthetic tree of each new layout (not to be modified: tests copy it first)."""
    root = tmp_path_factory.mktemp("new_layouts")
    return root, {name: make_synthetic(name, root, ids=8, views=2, seed=3) for name in ("rgbn300", "wmveid863")}


@pytest.fixture
def copy(trees, tmp_path):
    """A private copy of the synthetic trees, to break."""
    root, _ = trees
    for folder in ("RGBN300", "WMVEID863"):
        shutil.copytree(root / folder, tmp_path / folder)
    return tmp_path


def _problem_lines(report, kind: str) -> list[str]:
    return [p for p in report.problems if p.startswith(kind)]


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "layout, key, expected",
    [
        ("rgbn300", "0012_c003_000004.jpg", (12, 2, -1)),
        ("rgbn300", "-1_c1_0001.jpg", None),
        ("wmveid863", "0012/v3_n1_s001.jpg", (12, 3, -1)),  # pid = the folder, camera as is
        ("wmveid863", "863/v0_n0_s017_x.jpg", (863, 0, -1)),  # the folder need not have 4 digits
        ("wmveid863", "0005/v7n0.jpg", (5, 7, -1)),
    ],
)
def test_file_names(layout, key, expected):
    assert parse_file_name(layout, key) == expected


@pytest.mark.parametrize(
    "key, reason",
    [
        ("v3_n1_s001.jpg", "no vehicle folder"),
        ("car/v3_n1_s001.jpg", "vehicle folder 'car' is not a number"),
        ("0012/x3_n1_s001.jpg", "v<camera digit>"),
        ("0012/v3_s001.jpg", "day/night flag"),
        ("0012/v3_n2_s001.jpg", "day/night flag"),
    ],
)
def test_bad_wmveid863_names_name_the_key_and_the_reason(key, reason):
    with pytest.raises(LayoutError) as info:
        parse_file_name("wmveid863", key)
    message = str(info.value)
    assert f"'{key}'" in message and reason in message and "e.g. '0012/v3_n1_s001.jpg'" in message


def test_layout_modalities():
    assert LAYOUTS["rgbn300"].modalities == ("RGB", "NI")
    assert LAYOUTS["rgbn300"].strip_label == "RGB|NI"
    assert LAYOUTS["wmveid863"].modalities == ("RGB", "NI", "TI")
    assert LAYOUTS["rgbnt100"].modalities == ("RGB", "NI", "TI")
    assert LAYOUTS["wmveid863"].splits["gallery"] == "test"
    assert {LAYOUTS[n].protocol for n in ("rgbn300", "wmveid863")} == {"same_camera"}


# ----------------------------------------------------------------------------- strips


def test_strip_order_comes_from_the_sample():
    two = Sample(paths={"RGB": "a.jpg", "NI": "a.jpg"}, pid=1, camid=0, crop=256, strip=("RGB", "NI"))
    assert two.strip_columns("NI") == (256, 512)
    three = Sample(paths={"NI": "a.jpg"}, pid=1, camid=0, crop=10)  # no strip given: R|N|T
    assert three.strip == ("RGB", "NI", "TI") and three.strip_columns("TI") == (20, 30)
    assert Sample(paths={"RGB": "a.jpg"}, pid=1, camid=0).strip is None
    with pytest.raises(ValueError, match="not blocks of the strip RGB|NI"):
        Sample(paths={"TI": "a.jpg"}, pid=1, camid=0, crop=256, strip=("RGB", "NI"))
    with pytest.raises(ValueError, match="needs a crop"):
        Sample(paths={"RGB": "a.jpg"}, pid=1, camid=0, strip=("RGB",))


def test_read_sample_images_cuts_a_strip_in_its_own_order(tmp_path):
    # A strip whose blocks are N | R: the sample's order decides, not MODALITIES.
    strip = np.zeros((8, 20, 3), np.uint8)
    strip[:, :10] = 40
    strip[:, 10:] = 200
    path = tmp_path / "s.png"
    Image.fromarray(strip).save(path)
    sample = Sample(paths={"NI": str(path), "RGB": str(path)}, pid=1, camid=0, crop=10, strip=("NI", "RGB"))
    images = read_sample_images(sample, ("RGB", "NI"))
    assert np.asarray(images["NI"]).max() == 40 and np.asarray(images["RGB"]).min() == 200
    wide = Sample(paths={"RGB": str(path)}, pid=1, camid=0, crop=5, strip=("RGB", "NI"))
    with pytest.raises(BadImageError, match="is 20 wide; a RGB\\|NI strip must be 10 wide"):
        read_sample_images(wide, ("RGB",))


# ----------------------------------------------------------------------------- synthetic round trips


def test_rgbn300_round_trip(trees):
    root, summaries = trees
    splits = load_dataset("rgbn300", root)
    assert split_statistics(splits) == summaries["rgbn300"]["splits"]
    assert splits.num_train_pids == 4 and splits.protocol == "same_camera"
    assert [s.pid for s in splits.train] and {s.pid for s in splits.train} == set(range(4))
    assert {s.pid for s in splits.query} <= {s.pid for s in splits.gallery}
    base = root / "RGBN300" / "rgbir"
    for sample in splits.train + splits.query + splits.gallery:
        assert tuple(sample.paths) == ("RGB", "NI")  # no TI path at all
        assert sample.paths["RGB"] == sample.paths["NI"] and sample.crop == 256 and sample.strip == ("RGB", "NI")
        assert 0 <= sample.camid < 8
        assert Path(sample.paths["RGB"]).parent.parent == base
    sample = splits.query[0]
    strip = np.asarray(Image.open(sample.paths["RGB"]).convert("RGB"))
    assert strip.shape == (128, 512, 3)
    images = read_sample_images(sample)
    assert set(images) == {"RGB", "NI"}
    assert np.array_equal(np.asarray(images["NI"]), strip[:, 256:512])
    assert np.array_equal(np.asarray(images["RGB"]), strip[:, :256])
    # NI is the grey rendering: the R, G and B of its block agree (up to JPEG noise), RGB's do not.
    def colourfulness(block):
        return np.abs(block.astype(float) - block.mean(-1, keepdims=True)).mean()
    assert colourfulness(strip[:, 264:]) < 1.0 < colourfulness(strip[:, :248])
    assert Image.open(mask_path_for(sample.paths["RGB"])).size == (512, 128)
    assert load_mask(sample, "NI").shape == (128, 256)


def test_wmveid863_round_trip(trees):
    root, summaries = trees
    splits = load_dataset("wmveid863", root)
    assert split_statistics(splits) == summaries["wmveid863"]["splits"]
    assert splits.num_train_pids == 4 and splits.protocol == "same_camera"
    base = root / "WMVEID863"
    for split, folder in (("query", "query"), ("gallery", "test")):
        for sample in getattr(splits, split):
            rgb = Path(sample.paths["RGB"])
            assert rgb.parent.name == "vis" and rgb.parent.parent.parent == base / folder
            assert int(rgb.parent.parent.name) == sample.pid  # the pid is the vehicle folder
            assert sample.paths == {m: str(rgb.parent.parent / sub / rgb.name)
                                    for m, sub in (("RGB", "vis"), ("NI", "ni"), ("TI", "th"))}
            assert rgb.name.startswith(f"v{sample.camid}_n") and sample.crop is None and sample.sceneid == -1
    # Day and night images both occur, and every query has a gallery match from another camera.
    flags = {Path(s.paths["RGB"]).name[4] for s in splits.train}
    assert flags == {"0", "1"}
    for q in splits.query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in splits.gallery)
    assert all(0 <= s.camid < 8 for s in splits.train + splits.query + splits.gallery)
    assert set(read_sample_images(splits.train[0])) == {"RGB", "NI", "TI"}


@pytest.mark.parametrize("layout", ["rgbn300", "wmveid863"])
def test_cli_make_synthetic_then_check_data(layout, tmp_path, capsys):
    assert main(["make-synthetic", "--dataset", layout, "--out", str(tmp_path), "--ids", "4", "--views", "1"]) == 0
    capsys.readouterr()
    assert main(["check-data", "--dataset", layout, "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no problems" in out
    assert ("RGB|NI " in out) == (layout == "rgbn300")  # the image table counts R|N strips as such


# ----------------------------------------------------------------------------- check-data


def test_check_data_names_each_bad_rgbn300_file(copy, capsys):
    base = copy / "RGBN300" / "rgbir"
    train = sorted((base / "bounding_box_train").glob("*.jpg"))
    renamed = train[0].rename(train[0].with_name("vehicle.jpg"))
    three_wide = train[1]
    Image.fromarray(np.zeros((128, 768, 3), np.uint8)).save(three_wide)

    report = check_data("rgbn300", copy)
    unparseable = _problem_lines(report, "unparseable file name")
    geometry = _problem_lines(report, "wrong geometry")
    assert len(unparseable) == 1 and str(renamed) in unparseable[0] and "([-\\d]+)_c([-\\d]+)" in unparseable[0]
    assert len(geometry) == 1 and str(three_wide) in geometry[0]
    assert "768x128" in geometry[0] and "RGB|NI strip of 256-wide blocks must be 512 wide" in geometry[0]
    assert len(report.problems) == 2, report.problems
    assert main(["check-data", "--dataset", "rgbn300", "--root", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "2 problem(s)" in out and str(renamed) in out and str(three_wide) in out
    assert all("\n" not in p for p in report.problems)
    with pytest.raises(LayoutError, match="vehicle.jpg"):
        load_dataset("rgbn300", copy)


def test_check_data_names_each_bad_wmveid863_file(copy, capsys):
    base = copy / "WMVEID863"
    vehicle = sorted(p for p in (base / "train").iterdir())[0]
    names = sorted(p.name for p in (vehicle / "vis").glob("*.jpg"))
    lonely_ni = vehicle / "ni" / names[0]
    (vehicle / "vis" / names[0]).unlink()  # the NI and TI files lose their RGB twin
    (vehicle / "th" / names[0]).unlink()
    # Renamed: still a good name, but the files are paired by name, not by listing position.
    moved_th = (vehicle / "th" / names[1]).rename(vehicle / "th" / names[1].replace("_s", "_s9"))
    query_vehicle = sorted(p for p in (base / "query").iterdir())[0]
    query_name = next((query_vehicle / "vis").glob("*.jpg")).name
    no_flag = query_name.replace("_n", "_d")
    for sub in ("vis", "ni", "th"):
        (query_vehicle / sub / query_name).rename(query_vehicle / sub / no_flag)
    odd_folder = base / "test" / "car7"
    shutil.copytree(sorted((base / "test").iterdir())[0], odd_folder)

    report = check_data("wmveid863", copy)
    unpaired = _problem_lines(report, "unpaired modality")
    assert any(str(lonely_ni) in p and "no RGB twin" in p for p in unpaired)
    assert any(str(lonely_ni) in p and "no TI twin" in p for p in unpaired)
    assert any(str(vehicle / "vis" / names[1]) in p and f"expected {vehicle / 'th' / names[1]}" in p for p in unpaired)
    assert any(str(moved_th) in p and "no RGB twin" in p for p in unpaired)
    bad_name = _problem_lines(report, "unparseable file name")
    assert len(bad_name) == 1 and "day/night flag" in bad_name[0]
    assert str(query_vehicle / "vis" / no_flag) in bad_name[0]
    folders = _problem_lines(report, "bad vehicle folder name")
    assert folders == [f"bad vehicle folder name: {odd_folder} (expected the vehicle id, a number)"]
    assert all("\n" not in p for p in report.problems)
    assert main(["check-data", "--dataset", "wmveid863", "--root", str(copy)]) == 1
    assert str(moved_th) in capsys.readouterr().out


# ----------------------------------------------------------------------------- manifests


def test_rgbn300_manifest_keeps_the_two_block_strip(trees, tmp_path):
    root, _ = trees
    out = tmp_path / "rgbn300.csv"
    written = make_manifest("rgbn300", root, out)
    header = out.read_text().splitlines()[0].split(",")
    assert header == ["split", "pid", "camid", "sceneid", "RGB", "NI", "crop", "protocol"]  # no TI column
    back = read_manifest(out)
    layout = load_dataset("rgbn300", root)
    assert [s.strip for s in back.query] == [("RGB", "NI")] * len(layout.query)
    assert [(s.pid, s.camid, s.crop) for s in back.gallery] == [(s.pid, s.camid, s.crop) for s in layout.gallery]
    assert back.num_train_pids == layout.num_train_pids == written.num_train_pids
    images = read_sample_images(back.query[0])
    assert np.array_equal(np.asarray(images["NI"]), np.asarray(read_sample_images(layout.query[0])["NI"]))
    report = check_manifest(out)
    assert report.ok, report.problems
    assert "RGB|NI" in report.statistics


def test_rgbnt100_manifest_strips_are_unchanged(tmp_path):
    make_synthetic("rgbnt100", tmp_path, ids=4, views=1, seed=0)
    out = tmp_path / "m.csv"
    make_manifest("rgbnt100", tmp_path, out)
    assert out.read_text().splitlines()[0] == "split,pid,camid,sceneid,RGB,NI,TI,crop,protocol"
    back = read_manifest(out)
    assert all(s.strip == ("RGB", "NI", "TI") and s.crop == 256 for s in back.train)
    assert back.train == load_dataset("rgbnt100", tmp_path).train
    assert check_manifest(out).ok


# ----------------------------------------------------------------------------- training


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("layout, extra", [("rgbn300", ["datasets.modalities=[RGB,NI]"]), ("wmveid863", [])])
def test_two_epoch_training_and_test(layout, extra, trees, tmp_path):
    root, _ = trees
    cfg = train_cfg(root, tmp_path / "run", f"datasets.names={layout}", "solver.max_epochs=2",
                    "solver.max_steps_per_epoch=2", "solver.eval_period=2", *extra)
    summary = train(cfg, quiet=True)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    assert last.is_file()
    result = run_test(cfg, last, quiet=True)
    assert set(result) == METRICS and all(0.0 <= v <= 1.0 for v in result.values())
    assert result == pytest.approx(summary["final"]["metrics"])
