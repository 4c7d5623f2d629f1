"""Synthetic data: real layouts, clean check-data, masks, determinism, learnable identities."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from editor_reid.cli import main
from editor_reid.modalities import MODALITIES
from editor_reid.data.dataset import read_sample_images
from editor_reid.data.layouts import LAYOUTS, load_dataset, split_statistics
from editor_reid.data.synthetic import (
    DEFAULT_VIEWS,
    MARKER_FILE,
    SyntheticArgumentError,
    load_mask,
    make_synthetic,
    mask_path_for,
)
from editor_reid.errors import UsageError
from editor_reid.data.validate import check_data


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return root, {layout: make_synthetic(layout, root, ids=8, views=2, seed=5) for layout in LAYOUTS}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_generated_tree_is_clean_and_matches_summary(trees, layout):
    root, summaries = trees
    report = check_data(layout, root)
    assert report.ok, report.problems
    splits = load_dataset(layout, root)
    assert split_statistics(splits) == summaries[layout]["splits"]
    stats = summaries[layout]["splits"]
    assert stats["train"]["ids"] == 4 and stats["query"]["ids"] == 4 and stats["gallery"]["ids"] == 4
    assert stats["query"]["images"] > 0
    # The summary travels as JSON (CLI output) and the statistics table shows the same numbers.
    assert f"{stats['train']['images']:8d}" in report.statistics


def test_rgbnt201_query_is_gallery_and_market_has_junk(trees):
    root, summaries = trees
    assert summaries["rgbnt201"]["splits"]["query"] == summaries["rgbnt201"]["splits"]["gallery"]
    assert summaries["market1501mm"]["junk_images"] == 2
    junk = sorted((root / "Market1501-MM" / "gallery" / "RGB").glob("-1_*.jpg"))
    assert len(junk) == 2
    assert all(s.pid != -1 for s in load_dataset("market1501mm", root).gallery)


def test_file_geometry(trees):
    root, _ = trees
    strip = next((root / "RGBNT100" / "rgbir" / "bounding_box_train").glob("*.jpg"))
    assert Image.open(strip).size == (768, 128)
    person = next((root / "RGBNT201" / "train_171" / "TI").glob("*.jpg"))
    assert Image.open(person).size == (64, 128)
    vehicle = next((root / "MSVR310" / "bounding_box_train").glob("*/vis/*.jpg"))
    assert Image.open(vehicle).size == (256, 128)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_masks_mirror_every_image(trees, layout):
    root, _ = trees
    splits = load_dataset(layout, root)
    folder = LAYOUTS[layout].dataset_folder
    for sample in splits.train[:6] + splits.query[:3]:
        images = read_sample_images(sample)
        assert tuple(sample.paths) == LAYOUTS[layout].modalities
        for m in LAYOUTS[layout].modalities:
            mask_file = mask_path_for(sample.paths[m])
            assert mask_file.is_file()
            assert f"{folder}_masks" in mask_file.parts and mask_file.suffix == ".png"
            mask = load_mask(sample, m)
            assert mask.shape == (images[m].height, images[m].width)
            assert 0.03 < mask.mean() < 0.8  # an object is there and does not fill the frame
    if layout in ("rgbnt100", "rgbn300"):  # strip masks, as wide as the strips
        width = 256 * len(LAYOUTS[layout].modalities)
        assert Image.open(mask_path_for(splits.train[0].paths["RGB"])).size == (width, 128)


def test_mask_path_for_mirrors_the_relative_path(tmp_path):
    image = tmp_path / "RGBNT201" / "test" / "NI" / "000001_cam1_0_00.jpg"
    assert mask_path_for(image) == tmp_path / "RGBNT201_masks" / "test" / "NI" / "000001_cam1_0_00.png"
    strip = tmp_path / "RGBNT100" / "rgbir" / "query" / "0001_c001_000000.jpg"
    assert mask_path_for(strip) == tmp_path / "RGBNT100_masks" / "rgbir" / "query" / "0001_c001_000000.png"
    with pytest.raises(ValueError, match="dataset folder"):
        mask_path_for(tmp_path / "elsewhere" / "x.jpg")


def test_modalities_look_like_their_sensors(trees):
    root, _ = trees
    splits = load_dataset("rgbnt201", root)
    rgb_std, ni_std = [], []
    for sample in splits.train[:8]:
        images = {m: np.asarray(img, dtype=np.float64) for m, img in read_sample_images(sample).items()}
        mask = load_mask(sample, "TI")
        ni = images["NI"]
        assert np.abs(ni - ni.mean(axis=-1, keepdims=True)).max() < 8  # grey (up to JPEG noise)
        rgb_std.append(images["RGB"].std())
        ni_std.append(ni.std())
        heat = images["TI"].sum(axis=-1)  # the iron-bow palette brightens with temperature
        assert heat[mask].mean() > heat[~mask].mean() + 60  # the object is warm
    assert np.mean(ni_std) < np.mean(rgb_std)  # NI is low contrast


def test_identities_are_learnable_but_not_trivial(tmp_path):
    make_synthetic("rgbnt201", tmp_path, ids=10, views=2, seed=1)
    splits = load_dataset("rgbnt201", tmp_path)
    samples = splits.train + splits.gallery
    pids = np.array([s.pid + (1000 if i >= len(splits.train) else 0) for i, s in enumerate(samples)])
    object_colour, raw_pixels = [], []
    for s in samples:
        images = read_sample_images(s)
        object_colour.append(
            np.concatenate([np.asarray(images[m], np.float64)[load_mask(s, m)].mean(0) for m in MODALITIES])
        )
        raw_pixels.append(np.asarray(images["RGB"].resize((16, 32)), np.float64).ravel())

    def nn_accuracy(features):
        f = np.asarray(features)
        d = ((f[:, None] - f[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        return float((pids[d.argmin(1)] == pids).mean())

    # The object's appearance identifies it; whole images (background, lighting, pose) do much worse.
    assert nn_accuracy(object_colour) > 0.8
    assert nn_accuracy(raw_pixels) < nn_accuracy(object_colour) - 0.2


def _digest(root: Path, folder: str) -> str:
    h = hashlib.sha256()
    for path in sorted((root / folder).rglob("*.jpg")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_deterministic_under_seed(tmp_path):
    a = make_synthetic("market1501mm", tmp_path / "a", ids=4, views=1, seed=7)
    b = make_synthetic("market1501mm", tmp_path / "b", ids=4, views=1, seed=7)
    c = make_synthetic("market1501mm", tmp_path / "c", ids=4, views=1, seed=8)
    assert a["splits"] == b["splits"]
    assert _digest(tmp_path / "a", "Market1501-MM") == _digest(tmp_path / "b", "Market1501-MM")
    assert _digest(tmp_path / "a", "Market1501-MM") != _digest(tmp_path / "c", "Market1501-MM")


def test_regenerating_replaces_a_synthetic_tree_but_never_real_data(tmp_path):
    make_synthetic("rgbnt201", tmp_path, ids=4, views=1, seed=0)
    summary = make_synthetic("rgbnt201", tmp_path, ids=6, views=1, seed=0)
    assert summary["splits"] == split_statistics(load_dataset("rgbnt201", tmp_path))
    assert (tmp_path / "RGBNT201" / MARKER_FILE).is_file()
    real = tmp_path / "real"
    (real / "MSVR310").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="MSVR310"):
        make_synthetic("msvr310", real, ids=4)


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="ids"):
        make_synthetic("rgbnt100", tmp_path, ids=601)
    with pytest.raises(ValueError, match="views"):
        make_synthetic("rgbnt201", tmp_path, ids=4, views=0)


@pytest.mark.parametrize(
    "kwargs, named",
    [({"ids": 1}, "ids must be in [2, 999999]"), ({"ids": 0}, "got 0"), ({"ids": 4, "views": -1}, "views must be >= 1"),
     ({"ids": 4, "seed": -1}, "seed must be >= 0, got -1")],
)
def test_bad_arguments_are_usage_errors_and_write_nothing(tmp_path, kwargs, named):
    # A UsageError, so the command line prints one line and exits 2; still a ValueError for Python callers.
    with pytest.raises(SyntheticArgumentError) as info:
        make_synthetic("rgbnt201", tmp_path, **kwargs)
    assert isinstance(info.value, UsageError) and isinstance(info.value, ValueError)
    assert named in str(info.value)
    assert not any(tmp_path.iterdir())


def test_cli_help_states_the_default_views(capsys):
    with pytest.raises(SystemExit):
        main(["make-synthetic", "--help"])
    assert f"(default: {DEFAULT_VIEWS})" in " ".join(capsys.readouterr().out.split())


def test_cli_make_synthetic(tmp_path, capsys):
    assert main(["make-synthetic", "--layout", "msvr310", "--out", str(tmp_path), "--ids", "4", "--views", "1"]) == 0
    assert '"layout": "msvr310"' in capsys.readouterr().out
    assert check_data("msvr310", tmp_path).ok
