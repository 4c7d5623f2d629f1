"""MultiModalDataset: reading, strips, absent modalities, bad images (the loaders: test_loaders.py)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from editor_reid.config import load_config
from editor_reid.data.dataset import BadImageError, MultiModalDataset, read_image, read_sample_images
from editor_reid.data.layouts import Sample, load_dataset
from editor_reid.data.synthetic import make_synthetic
from editor_reid.data.transforms import build_transforms


def _cfg(*overrides):
    return load_config(
        None,
        overrides=[
            "input.size_train=[32,16]",
            "input.size_test=[32,16]",
            "solver.ims_per_batch=8",
            "dataloader.num_instance=2",
            "dataloader.num_workers=0",
            "test.ims_per_batch=5",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic("rgbnt201", root, ids=8, views=2, seed=0)
    make_synthetic("rgbnt100", root, ids=4, views=1, seed=0)
    return root


@pytest.fixture()
def copy_root(root, tmp_path):
    """A private copy of the RGBNT201 tree for tests that damage files."""
    shutil.copytree(root / "RGBNT201", tmp_path / "RGBNT201")
    return tmp_path


def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 3])


def test_item_layout(root):
    splits = load_dataset("rgbnt201", root)
    dataset = MultiModalDataset(splits.train, build_transforms(_cfg(), is_train=True))
    item = dataset[3]
    assert set(item) == {"RGB", "NI", "TI", "pid", "camid", "sceneid", "index"}
    for m in ("RGB", "NI", "TI"):
        assert item[m].shape == (3, 32, 16) and item[m].dtype == torch.float32
    s = splits.train[3]
    assert (item["pid"], item["camid"], item["sceneid"], item["index"]) == (s.pid, s.camid, -1, 3)
    assert len(dataset) == len(splits.train)


def test_strip_is_cut_into_modalities(root):
    splits = load_dataset("rgbnt100", root)
    sample = splits.train[0]
    strip = np.asarray(Image.open(sample.paths["RGB"]).convert("RGB"))
    images = read_sample_images(sample)
    for i, m in enumerate(("RGB", "NI", "TI")):
        assert images[m].size == (256, 128)
        assert np.array_equal(np.asarray(images[m]), strip[:, 256 * i : 256 * (i + 1)])


def test_absent_modalities_are_not_read(root):
    splits = load_dataset("rgbnt100", root)
    dataset = MultiModalDataset(splits.query, build_transforms(_cfg(), is_train=False), modalities=["TI"])
    item = dataset[0]
    assert "RGB" not in item and "NI" not in item  # the model fills absent modalities (test_editor.py)
    full = MultiModalDataset(splits.query, build_transforms(_cfg(), is_train=False))[0]
    assert torch.equal(item["TI"], full["TI"])
    with pytest.raises(ValueError, match="subset"):
        MultiModalDataset(splits.query, build_transforms(_cfg(), is_train=False), modalities=["IR"])


def test_bad_image_raises_naming_the_path(copy_root):
    splits = load_dataset("rgbnt201", copy_root)
    dataset = MultiModalDataset(splits.train, build_transforms(_cfg(), is_train=False))
    bad = splits.train[2].paths["NI"]
    _truncate(bad)
    with pytest.raises(BadImageError, match=bad) as info:
        dataset[2]
    assert info.value.path == bad
    missing = splits.train[4].paths["TI"]
    Path(missing).unlink()
    with pytest.raises(BadImageError, match="does not exist"):
        dataset[4]
    # The error survives the trip from a DataLoader worker.
    clone = pickle.loads(pickle.dumps(info.value))
    assert clone.path == bad and str(clone) == str(info.value)


def test_skip_bad_images_replaces_with_same_pid_and_counts(copy_root):
    splits = load_dataset("rgbnt201", copy_root)
    dataset = MultiModalDataset(splits.train, build_transforms(_cfg(), is_train=False), skip_bad_images=True)
    pid = splits.train[0].pid
    same = [i for i, s in enumerate(splits.train) if s.pid == pid]
    _truncate(splits.train[same[0]].paths["RGB"])
    item = dataset[same[0]]
    assert item["pid"] == pid and item["index"] == same[0]
    expected = MultiModalDataset(splits.train, build_transforms(_cfg(), is_train=False))[same[1]]
    assert torch.equal(item["RGB"], expected["RGB"])
    assert dataset.num_skipped == 1
    # Every image of the identity unreadable: a clear error instead of an endless retry.
    for i in same[1:]:
        _truncate(splits.train[i].paths["TI"])
    with pytest.raises(BadImageError, match=f"pid {pid}"):
        dataset[same[0]]


def test_grey_and_palette_files_are_converted_to_rgb(tmp_path):
    grey = tmp_path / "grey.jpg"
    Image.fromarray(np.full((8, 4), 90, np.uint8)).save(grey)
    palette = tmp_path / "palette.png"
    Image.fromarray(np.full((8, 4, 3), 30, np.uint8)).convert("P").save(palette)
    assert read_image(str(grey)).mode == "RGB" and read_image(str(palette)).mode == "RGB"


def test_narrow_strip_is_a_bad_image(tmp_path):
    path = tmp_path / "0001_c1_0.jpg"
    Image.fromarray(np.zeros((128, 700, 3), np.uint8)).save(path)
    sample = Sample(paths={m: str(path) for m in ("RGB", "NI", "TI")}, pid=1, camid=0, crop=256)
    with pytest.raises(BadImageError, match="768"):
        read_sample_images(sample)
