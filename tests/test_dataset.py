"""MultiModalDataset: reading, strips, absent modalities, bad images (the loaders: test_loaders.py)."""

from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from editor_reid.config import load_config
from editor_reid.data.dataset import BadImageError, MultiModalDataset, read_image, read_sample_images, to_rgb
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
    with pytest.raises(ValueError, match="'ir' is not a modality name"):
        MultiModalDataset(splits.query, build_transforms(_cfg(), is_train=False), modalities=["ir"])


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


# ----------------------------------------------------------------------------- image modes
# Each file is written in another format under a .jpg name, as happens in real trees; Pillow
# reads the content, not the extension.

_GREY = np.array([[0, 40], [200, 255]], np.uint8)


def _save(tmp_path: Path, image: Image.Image, fmt: str, expected_mode: str) -> str:
    path = tmp_path / f"{expected_mode.replace(';', '_')}.jpg"
    image.save(path, format=fmt)
    with Image.open(path) as reopened:
        assert reopened.mode == expected_mode  # the file really decodes in the mode under test
    return str(path)


def _read(path: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's "palette images with transparency" warning
        image = read_image(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=-1)


def _stretched(values: np.ndarray) -> np.ndarray:
    """The documented mapping of 16/32-bit and float images: own [min, max] -> [0, 255]."""
    lo, hi = values.min(), values.max()
    return np.rint((values.astype(np.float64) - lo) * 255 / (hi - lo)).astype(np.uint8)


def test_8bit_grey_bilevel_and_colour_modes(tmp_path):
    assert np.array_equal(_read(_save(tmp_path, Image.fromarray(_GREY), "PNG", "L")), _grey(_GREY))
    bilevel = np.array([[True, False], [False, True]])
    assert np.array_equal(_read(_save(tmp_path, Image.fromarray(bilevel), "PNG", "1")), _grey(bilevel * np.uint8(255)))
    colour = np.arange(12, dtype=np.uint8).reshape(2, 2, 3) * 20
    assert np.array_equal(_read(_save(tmp_path, Image.fromarray(colour), "PNG", "RGB")), colour)
    cmyk = _save(tmp_path, Image.new("CMYK", (2, 2), (10, 20, 30, 40)), "TIFF", "CMYK")
    expected = np.rint([(255 - c) * (255 - 40) / 255 for c in (10, 20, 30)])  # Pillow's formula, no profile
    assert np.array_equal(_read(cmyk), np.broadcast_to(expected, (2, 2, 3)))


def test_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (2, 2))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.putdata([0, 1, 2, 1])
    colours = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [0, 255, 0]]], np.uint8)
    assert np.array_equal(_read(_save(tmp_path, palette, "PNG", "P")), colours)
    palette.info["transparency"] = bytes([255, 0, 128])  # per-entry alpha, as a tRNS chunk holds it
    path = tmp_path / "trns.jpg"
    palette.save(path, format="PNG")
    assert "transparency" in Image.open(path).info
    assert np.array_equal(_read(str(path)), colours)  # alpha dropped, colours kept, no warning


def test_alpha_is_dropped_keeping_the_stored_colour(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = [[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [100, 110, 120]]]
    rgba[..., 3] = [[255, 0], [128, 255]]  # a fully transparent pixel keeps its colour too
    assert np.array_equal(_read(_save(tmp_path, Image.fromarray(rgba), "PNG", "RGBA")), rgba[..., :3])
    la = np.stack([_GREY, np.full_like(_GREY, 7)], axis=-1)
    assert np.array_equal(_read(_save(tmp_path, Image.fromarray(la), "PNG", "LA")), _grey(_GREY))


@pytest.mark.parametrize("mode, fmt, dtype", [
    ("I;16", "PNG", np.uint16),  # a 16-bit thermal frame saved as PNG
    ("I;16B", "TIFF", ">u2"),
    ("I", "TIFF", np.int32),
])
def test_16_and_32_bit_integer_images_are_stretched_over_their_own_range(tmp_path, mode, fmt, dtype):
    # Raw thermal counts: a few thousand levels well inside the 16-bit range. Pillow's own
    # convert("RGB") clips them at 255 (an all-white picture); the type's range would leave
    # values 27..70 of 255. The image's own range keeps all the contrast.
    raw = np.array([[7000, 7500, 8000], [9000, 12000, 18000]]).astype(dtype)
    if mode == "I":
        raw = raw - 20000  # signed values work too
    out = _read(_save(tmp_path, Image.fromarray(raw), fmt, mode))
    assert np.array_equal(out, _grey(_stretched(raw)))
    assert out.min() == 0 and out.max() == 255


def test_float_images_are_stretched_and_non_finite_values_clamped(tmp_path):
    values = np.array([[-1.5, 0.0, np.nan], [np.inf, 2.5, -np.inf]], np.float32)
    out = _read(_save(tmp_path, Image.fromarray(values), "TIFF", "F"))[..., 0]
    assert out.tolist() == [[0, 96, 0], [255, 255, 0]]  # (v + 1.5) * 255 / 4; NaN and -inf -> 0, inf -> 255


def test_constant_high_depth_image_is_black(tmp_path):
    flat = np.full((2, 3), 30000, np.uint16)
    assert not _read(_save(tmp_path, Image.fromarray(flat), "PNG", "I;16")).any()


def test_modes_no_file_format_writes_here(tmp_path):
    """Modes Pillow can decode but not write in these formats, converted in memory."""
    path = "in-memory.jpg"
    cases = {
        "PA": (Image.new("PA", (1, 1)), None),
        "La": (Image.new("La", (1, 1), (90, 255)), [90, 90, 90]),
        "RGBa": (Image.new("RGBa", (1, 1), (100, 50, 20, 255)), [100, 50, 20]),
        "RGBX": (Image.new("RGBX", (1, 1), (1, 2, 3, 0)), [1, 2, 3]),
        "YCbCr": (Image.new("YCbCr", (1, 1), (100, 128, 128)), [100, 100, 100]),
        "HSV": (Image.new("HSV", (1, 1), (85, 255, 255)), [0, 255, 0]),
    }
    for mode, (image, expected) in cases.items():
        out = to_rgb(image, path)
        assert out.mode == "RGB", mode
        if expected is not None:
            assert np.asarray(out)[0, 0].tolist() == expected, mode


def test_a_mode_without_a_faithful_conversion_is_refused_naming_file_and_mode(tmp_path):
    # Pillow's convert would treat LAB's L, a, b as if they were R, G, B.
    path = _save(tmp_path, Image.new("LAB", (2, 2), (50, 128, 128)), "TIFF", "LAB")
    with pytest.raises(BadImageError, match="LAB") as info:
        read_image(path)
    assert info.value.path == path and path in str(info.value)
