"""The CSV manifest: round trip with every layout, make-manifest and check-data --manifest, every
bad-manifest problem named by its line, empty cells as missing modalities, training on a manifest."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from editor_reid.cli import main
from editor_reid.config import ConfigError, load_config
from editor_reid.data.layouts import LAYOUT_NAMES, build_splits, load_dataset
from editor_reid.data.loaders import build_test_loader
from editor_reid.data.manifest import ManifestError, check_manifest, make_manifest, read_manifest
from editor_reid.data.sources import load_configured
from editor_reid.data.synthetic import make_synthetic
from editor_reid.data.validate import PreflightError, preflight
from editor_reid.engine.train import train
from editor_reid.model import build_model

from _tiny import assert_same_run, tiny_cfg, train_cfg


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """A small synthetic tree of every layout: layout -> root."""
    base = tmp_path_factory.mktemp("layouts")
    for name in LAYOUT_NAMES:
        make_synthetic(name, base / name, ids=4, views=1, seed=0)
    return {name: base / name for name in LAYOUT_NAMES}


def _assert_same_splits(a, b):
    assert (a.train, a.query, a.gallery) == (b.train, b.query, b.gallery)
    assert (a.num_train_pids, a.num_cameras, a.protocol) == (b.num_train_pids, b.num_cameras, b.protocol)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_the_manifest_of_a_layout_reads_back_as_the_layout(name, trees, tmp_path):
    root = trees[name]
    layout = load_dataset(name, root)
    # Outside the data ("../layouts0/<name>/..." paths), written with the original pids.
    written = make_manifest(name, root, tmp_path / "m.csv")
    assert written.train == build_splits(name, root, raw_pids=True).train
    _assert_same_splits(read_manifest(tmp_path / "m.csv"), layout)
    # Beside the data, where the paths are plain relative paths.
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    make_manifest(name, copy, copy / "m.csv")
    text = (copy / "m.csv").read_text()
    assert ",/" not in text and ",.." not in text
    _assert_same_splits(read_manifest(copy / "m.csv"), load_dataset(name, copy))


@pytest.mark.parametrize("name", ["rgbnt201", "msvr310"])
def test_a_test_only_manifest(name, trees, tmp_path):
    make_manifest(name, trees[name], tmp_path / "m.csv", splits=("query", "gallery"))
    splits = read_manifest(tmp_path / "m.csv", splits=("query", "gallery"))
    _assert_same_splits(splits, load_dataset(name, trees[name], splits=("query", "gallery")))
    with pytest.raises(ManifestError, match="has no train row"):
        read_manifest(tmp_path / "m.csv")


def test_cells_may_hold_absolute_paths_and_columns_any_order(trees, tmp_path):
    layout = load_dataset("rgbnt201", trees["rgbnt201"])
    lines = ["TI, Camid ,RGB,pid,notes,NI,split"]
    lines += [f"{s.paths['TI']},{s.camid},{s.paths['RGB']},{s.pid},my note,{s.paths['NI']},query" for s in layout.query]
    (tmp_path / "abs.csv").write_text("\n".join(lines) + "\n\n")
    splits = read_manifest(tmp_path / "abs.csv", splits=("query",))
    assert splits.query == layout.query
    assert (splits.name, splits.root, splits.protocol) == ("manifest", str(tmp_path), "same_camera")


def test_the_protocol_comes_from_the_config_the_column_or_same_camera(trees, tmp_path):
    make_manifest("msvr310", trees["msvr310"], tmp_path / "m.csv")
    assert read_manifest(tmp_path / "m.csv").protocol == "same_scene"  # the column
    assert read_manifest(tmp_path / "m.csv", protocol="same_camera").protocol == "same_camera"
    cfg = load_config(None, ["datasets.names=manifest", f"datasets.manifest={tmp_path / 'm.csv'}",
                             "datasets.protocol=same_camera"])
    assert load_configured(cfg.datasets).protocol == "same_camera"
    # A layout keeps its own protocol unless the config names one.
    layout = load_config(None, ["datasets.names=msvr310", f"datasets.root_dir={trees['msvr310']}"])
    assert load_configured(layout.datasets).protocol == "same_scene"
    layout.datasets.protocol = "same_camera"
    assert load_configured(layout.datasets).protocol == "same_camera"


# ----------------------------------------------------------------------------- the command line


def test_make_manifest_and_check_data_on_the_command_line(trees, tmp_path, capsys):
    root, out = trees["rgbnt201"], tmp_path / "m.csv"
    argv = ["make-manifest", "--dataset", "rgbnt201", "--root", str(root), "--out", str(out)]
    assert main(argv) == 0
    assert f"make-manifest: wrote {out}" in capsys.readouterr().out
    assert main(argv) == 2  # never replaces a manifest by accident
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--splits", "query,gallery"]) == 0
    assert {line.split(",")[0] for line in out.read_text().splitlines()[1:]} == {"query", "gallery"}
    with pytest.raises(SystemExit, match="2"):
        main([*argv, "--splits", "query,test"])
    assert "expected comma-separated splits among train,query,gallery" in capsys.readouterr().err

    assert main(["check-data", "--manifest", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "=> manifest statistics (protocol: same_camera" in printed and "no problems found" in printed
    assert "RGB       | modes: RGB" in printed

    lines = out.read_text().splitlines()
    lines[3] = lines[3].replace("query,", "querry,", 1)
    out.write_text("\n".join(lines) + "\n")
    assert main(["check-data", "--manifest", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "PROBLEM: line 4, column 'split': unknown split 'querry'" in printed and "1 problem(s)" in printed


def test_a_bad_manifest_stops_a_command_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("split,pid,camid,RGB\ntrain,1,0,a.jpg\ntrain,x1,0,b.jpg\n")
    assert main(["info", "--config", "rgbnt201", "datasets.names=manifest", f"datasets.manifest={bad}"]) == 1
    err = capsys.readouterr().err.strip()
    expected = f"manifest '{bad}', line 3, column 'pid': 'x1' is not an integer; expected an integer >= 0"
    assert err == f"editor-reid: {expected}"
    assert main(["info", "--config", "rgbnt201", "datasets.names=manifest"]) == 2
    assert "datasets.manifest" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad manifests


@pytest.fixture()
def images(tmp_path):
    """Four small images in ``img/`` beside the manifest, and a 3-block strip."""
    folder = tmp_path / "img"
    folder.mkdir()
    for name in ("a", "b", "c", "d"):
        Image.fromarray(np.full((8, 4, 3), 100, np.uint8)).save(folder / f"{name}.jpg")
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(folder / "strip.jpg")
    return tmp_path


HEADER = "split,pid,camid,sceneid,RGB,NI,TI"
GOOD = ["train,1,0,,img/a.jpg,img/b.jpg,img/c.jpg", "query,2,0,,img/a.jpg,,img/d.jpg",
        "gallery,2,1,,img/b.jpg,img/c.jpg,"]


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        (["split,pid,RGB", *GOOD], "line 1: missing column(s) camid"),
        (["split,pid,camid,path", *GOOD], "line 1: missing column(s) one of RGB, NI, TI"),
        (["split,pid,camid,RGB,rgb", *GOOD], "line 1: column 'RGB' appears twice"),
        ([HEADER, *GOOD, "Train,3,0,,img/a.jpg,,"], "line 5, column 'split': unknown split 'Train'"),
        ([HEADER, "train,one,0,,img/a.jpg,,", *GOOD], "line 2, column 'pid': 'one' is not an integer"),
        ([HEADER, *GOOD, "gallery,-1,0,,img/a.jpg,,"], "line 5, column 'pid': -1 is below 0 (a benchmark's junk"),
        ([HEADER, *GOOD, "gallery,2,,,img/a.jpg,,"], "line 5, column 'camid': empty; expected an integer >= 0"),
        ([HEADER, *GOOD, "gallery,2,1,s1,img/a.jpg,,"], "line 5, column 'sceneid': 's1' is not an integer"),
        ([HEADER, *GOOD, "gallery,2,1,,,,"], "line 5: no image: the RGB, NI, TI cell(s) are all empty"),
        ([HEADER, *GOOD, "gallery,2,1,,img/a.jpg"], "line 5: 5 cells, but the header has 7 columns"),
        ([HEADER, *GOOD, "query,1,1,,img/a.jpg,,"], "line 5, column 'pid': pid 1 is in query and in train (line 2)"),
        ([HEADER + ",protocol", *(g + ",same_camera" for g in GOOD[:2]), GOOD[2] + ",same_scene"],
         "line 4, column 'protocol': 'same_scene' differs from 'same_camera' (line 2)"),
        ([HEADER + ",protocol", *(g + ",same_person" for g in GOOD)], "line 2, column 'protocol': unknown protocol"),
        ([HEADER + ",protocol", *(g + ",same_scene" for g in GOOD)],
         "line 3, column 'sceneid': empty, but the same_scene protocol needs"),
        ([HEADER + ",crop", *(g + "," for g in GOOD), "gallery,2,1,,img/strip.jpg,img/a.jpg,,4"],
         "line 5, column 'NI': 'img/a.jpg' is not the strip 'img/strip.jpg' of column RGB"),
        ([HEADER + ",crop", *(g + "," for g in GOOD), "gallery,2,1,,img/strip.jpg,,img/strip.jpg,0"],
         "line 5, column 'crop': 0 is below 1"),
        ([], "line 1: empty file"),
    ],
)
def test_every_problem_is_named_with_its_line(images, lines, problem):
    path = images / "m.csv"
    path.write_text("".join(f"{line}\n" for line in lines))
    report = check_manifest(path)
    assert any(p.startswith(problem) for p in report.problems), report.problems
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert str(caught.value).startswith(f"manifest '{path}', {problem}")
    assert "\n" not in str(caught.value)


def test_loading_names_the_first_problem_and_counts_the_others(images):
    path = images / "m.csv"
    path.write_text("\n".join([HEADER, *GOOD, "gallery,2,,,img/a.jpg,,", "Train,3,0,,img/a.jpg,,"]) + "\n")
    assert len(check_manifest(path).problems) == 2
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert str(caught.value).endswith(f"(and 1 more problem(s); 'editor-reid check-data --manifest {path}' lists "
                                      "them all)")
    assert len(caught.value.problems) == 2


def test_check_data_opens_every_file(images):
    path = images / "m.csv"
    (images / "img" / "empty.jpg").write_bytes(b"")
    (images / "img" / "broken.jpg").write_bytes(b"not a jpeg")
    path.write_text("\n".join([HEADER + ",crop", *(g + "," for g in GOOD),
                               "gallery,2,1,,img/missing.jpg,img/empty.jpg,img/broken.jpg,",
                               "gallery,2,2,,img/strip.jpg,img/strip.jpg,img/strip.jpg,5",
                               "query,3,1,,img/a.jpg,,,"]) + "\n")
    report = check_manifest(path)
    assert report.problems[0] == f"line 5, column 'RGB': missing file: {images / 'img' / 'missing.jpg'}"
    assert report.problems[1] == f"line 5, column 'NI': empty file: {images / 'img' / 'empty.jpg'}"
    assert report.problems[2].startswith(f"line 5, column 'TI': undecodable image: {images / 'img' / 'broken.jpg'}")
    assert report.problems[3].startswith("line 6, column 'RGB': wrong geometry:")
    assert "must be 15 wide" in report.problems[3]
    assert report.problems[4].startswith("line 7: query without gallery match: pid 3, camera 1")
    assert len(report.problems) == 5
    # Loading checks the rows only; the pre-flight of a run finds the files and points at check-data.
    splits = read_manifest(path)
    with pytest.raises(PreflightError) as caught:
        preflight(splits, ("query", "gallery"), ("RGB", "NI", "TI"))
    assert str(caught.value).startswith(f"manifest {path}: 2 problem(s) in the query and gallery split(s); run "
                                        f"'editor-reid check-data --manifest {path}'")


def test_not_a_text_file(images):
    path = images / "m.csv"
    path.write_bytes(b"split,pid\xff\n")
    assert check_manifest(path).problems[0].startswith(f"manifest '{path}' is not a UTF-8 text file")
    with pytest.raises(ManifestError, match="is not a UTF-8 text file"):
        read_manifest(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_manifest(images / "none.csv")


def test_preflight_of_a_sample_with_none_of_the_modalities_read(images):
    path = images / "m.csv"
    path.write_text("\n".join([HEADER, *GOOD]) + "\n")
    splits = read_manifest(path)
    preflight(splits, ("train", "query", "gallery"), ("RGB", "NI", "TI"))  # partial samples are fine
    with pytest.raises(PreflightError, match="no image to read: the gallery sample pid 2, camera 1"):
        preflight(splits, ("gallery",), ("TI",))


def test_config_needs_the_manifest_key_and_only_with_names_manifest():
    with pytest.raises(ConfigError, match="^config key 'datasets.manifest': datasets.names is 'manifest'") as caught:
        load_config(None, ["datasets.names=manifest"])
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="set datasets.names=manifest"):
        load_config(None, ["datasets.manifest=m.csv"])
    with pytest.raises(ConfigError, match="'same' is not one of '', same_camera, same_scene"):
        load_config(None, ["datasets.protocol=same"])


# ----------------------------------------------------------------------------- model and training


def test_an_empty_ni_cell_is_the_missing_modality_of_the_evaluation(trees, tmp_path):
    make_manifest("rgbnt201", trees["rgbnt201"], tmp_path / "m.csv", splits=("query", "gallery"))
    lines = (tmp_path / "m.csv").read_text().splitlines()
    cells = lines[2].split(",")
    cells[5] = ""  # the NI cell of the second query
    lines[2] = ",".join(cells)
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    query = read_manifest(tmp_path / "m.csv", splits=("query", "gallery")).query
    assert "NI" not in query[1].paths and all("NI" in s.paths for s in query[:1] + query[2:4])

    cfg = tiny_cfg(**{"dataloader.num_workers": 0, "test.ims_per_batch": 4})
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=4, num_cameras=4).eval()

    def features(samples, modalities=None):
        (batch,) = build_test_loader(cfg, samples, modalities=modalities)
        images = {m: batch[m] for m in ("RGB", "NI", "TI") if m in batch}
        with torch.no_grad():
            return model(images, batch["camid"])

    mixed = features(query[:4])[1]  # NI filled per sample by collate
    alone = features(query[1:2])[0]  # NI absent from the whole batch: filled by the model
    without_ni = features([query[1]], modalities=("RGB", "TI"))[0]  # as --missing feeds RGB+TI
    torch.testing.assert_close(mixed, alone, rtol=0, atol=1e-5)
    assert torch.equal(alone, without_ni)


@pytest.mark.usefixtures("single_thread")
def test_training_on_the_manifest_is_training_on_the_layout(train_data, tmp_path):
    make_manifest("rgbnt201", train_data, tmp_path / "m.csv")
    short = ["solver.max_epochs=1", "solver.max_steps_per_epoch=2", "solver.checkpoint_period=1"]
    train(train_cfg(train_data, tmp_path / "layout", *short), quiet=True)
    train(train_cfg(train_data, tmp_path / "manifest", *short, "datasets.names=manifest",
                    f"datasets.manifest={tmp_path / 'm.csv'}"), quiet=True)
    assert_same_run(tmp_path / "layout", tmp_path / "manifest")
