"""FeatureExtractor: every input kind gives the feature of ``editor-reid test``; subsets,
cameras (known, unknown), configs, and one clear error per bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _features import NUM_CAMERAS, tiny_weights  # noqa: E402

from editor_reid import FeatureExtractor
from editor_reid.config import ConfigError, config_from_dict, dump_config
from editor_reid.data.dataset import BadImageError, read_image
from editor_reid.data.layouts import load_dataset
from editor_reid.data.loaders import build_test_loader
from editor_reid.engine.checkpoint import load_checkpoint
from editor_reid.engine.evaluate import load_weights, model_for_checkpoint
from editor_reid.engine.inference import extract_features
from editor_reid.errors import UsageError
from editor_reid.features.extractor import SampleError
from editor_reid.model import UNKNOWN_CAMERA, to_official_state_dict

ATOL = 1e-6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extractor")
    data, weights = tiny_weights(tmp)
    query = load_dataset("rgbnt201", data, splits=("query",)).query
    return tmp, weights, query, FeatureExtractor(weights, device="cpu")


def _test_model(weights):
    """The model ``editor-reid test`` evaluates, and its config."""
    state = load_checkpoint(weights)
    cfg = config_from_dict(state["config"])
    model = model_for_checkpoint(cfg, state, 0, 0, weights)
    load_weights(model, weights, state)
    return cfg, model.eval()


def _paths(samples, *, modalities=("RGB", "NI", "TI")):
    return [{**{m: s.paths[m] for m in modalities}, "camid": s.camid} for s in samples]


def test_features_equal_those_of_editor_reid_test(setup):
    _, weights, query, extractor = setup
    cfg, model = _test_model(weights)
    expected = extract_features(model, build_test_loader(cfg, query), "cpu").feats.numpy()
    got = extractor(_paths(query), normalize=False)
    assert got.dtype == np.float32 and got.shape == (len(query), 3 * 64)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    unit = extractor(_paths(query))
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(unit, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=ATOL)


def test_every_input_kind_gives_the_same_feature(setup):
    _, _, query, extractor = setup
    samples = query[:6]
    by_path = extractor(_paths(samples))
    images = [{m: read_image(p) for m, p in s.paths.items()} for s in samples]
    kinds = {
        "pil": [{**{m: Image.open(p) for m, p in s.paths.items()}, "camid": s.camid} for s in samples],
        "path-object": [{**{m: Path(p) for m, p in s.paths.items()}, "camid": s.camid} for s in samples],
        "uint8 array": [{**{m: np.asarray(i) for m, i in im.items()}, "camera": s.camid}
                        for s, im in zip(samples, images)],
        "float tensor": [{**{m: TF.to_tensor(i) for m, i in im.items()}, "camid": s.camid}
                         for s, im in zip(samples, images)],
    }
    for name, inputs in kinds.items():
        np.testing.assert_array_equal(extractor(inputs), by_path, err_msg=name)
    mixed = [kinds[name][i] for i, name in enumerate(["pil", "uint8 array", "float tensor", "path-object", "pil",
                                                       "float tensor"])]
    np.testing.assert_array_equal(extractor(mixed), by_path)
    # A single mapping is one sample (in a batch of its own: equal up to float rounding).
    np.testing.assert_allclose(extractor(kinds["float tensor"][0]), by_path[:1], rtol=0, atol=ATOL)


def test_a_grey_tensor_is_a_grey_image(setup, tmp_path):
    _, _, _, extractor = setup
    grey = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 40), dtype=np.uint8))
    grey.save(tmp_path / "grey.png")
    from_file = extractor({"TI": tmp_path / "grey.png", "camid": 1})
    np.testing.assert_array_equal(extractor({"TI": TF.to_tensor(grey), "camid": 1}), from_file)  # [1, H, W]


def test_modality_subsets_per_sample_match_the_missing_modality_evaluation(setup):
    _, weights, query, extractor = setup
    cfg, model = _test_model(weights)
    subsets = [("RGB",), ("NI", "TI"), ("RGB", "NI", "TI"), ("TI",)]
    samples = query[:4]
    mixed = [_paths([s], modalities=subset)[0] for s, subset in zip(samples, subsets)]
    got = extractor(mixed, normalize=False)
    for row, (sample, subset) in enumerate(zip(samples, subsets)):
        expected = extract_features(model, build_test_loader(cfg, [sample]), "cpu", modalities=subset).feats.numpy()
        np.testing.assert_allclose(got[row], expected[0], rtol=0, atol=ATOL, err_msg=str(subset))
    # None stands for an absent modality.
    none = {"RGB": samples[0].paths["RGB"], "NI": None, "TI": None, "camid": samples[0].camid}
    np.testing.assert_allclose(extractor(none, normalize=False)[0], got[0], rtol=0, atol=ATOL)


def test_an_unknown_camera_uses_the_mean_sie_embedding(setup):
    _, _, query, extractor = setup
    path = query[0].paths["RGB"]
    unknown = extractor({"RGB": path}, normalize=False)
    assert extractor.num_cameras == NUM_CAMERAS
    np.testing.assert_array_equal(extractor({"RGB": path, "camid": None}, normalize=False), unknown)
    np.testing.assert_array_equal(extractor({"RGB": path, "camera": UNKNOWN_CAMERA}, normalize=False), unknown)
    # By hand: the model with every camera's SIE row replaced by their mean, fed camera 0.
    manual = FeatureExtractor(extractor.weights, device="cpu")
    sie = manual.model.backbone.sie_embed
    with torch.no_grad():
        sie.copy_(sie.mean(dim=0, keepdim=True).expand_as(sie))
    np.testing.assert_allclose(unknown, manual({"RGB": path, "camid": 0}, normalize=False), rtol=0, atol=ATOL)
    known = [extractor({"RGB": path, "camid": c}, normalize=False) for c in range(NUM_CAMERAS)]
    assert all(not np.allclose(k, unknown, atol=1e-4) for k in known)


def test_config_for_a_checkpoint_without_one(setup, tmp_path):
    _, weights, query, extractor = setup
    state = load_checkpoint(weights)
    plain = tmp_path / "plain.pt"
    torch.save(state["model"], plain)  # a bare state dict: no config inside
    with pytest.raises(ConfigError, match="carries no config.*--config on the command line, config= in Python"):
        FeatureExtractor(plain)
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(config_from_dict(state["config"])))
    inputs = _paths(query[:3])
    for given in (config, str(config), config_from_dict(state["config"])):
        np.testing.assert_array_equal(FeatureExtractor(plain, config=given, device="cpu")(inputs), extractor(inputs))
    # The official EDITOR layout: its sizes come from the shapes, the model from the config.
    official = tmp_path / "EDITORbest.pth"
    torch.save(to_official_state_dict(extractor.model), official)
    with pytest.raises(ConfigError, match="EDITORbest.pth' carries no config"):
        FeatureExtractor(official)
    from_official = FeatureExtractor(official, config=config, device="cpu")
    assert from_official.loaded.kind == "official" and from_official.num_cameras == NUM_CAMERAS
    np.testing.assert_allclose(from_official(inputs), extractor(inputs), rtol=0, atol=ATOL)


def test_amp_is_checked_before_the_model_is_built(setup):
    _, weights, query, extractor = setup
    with pytest.raises(UsageError, match="amp 'fp16' needs a CUDA device"):
        FeatureExtractor(weights, device="cpu", amp="fp16")
    with pytest.raises(UsageError, match="amp must be one of none, fp16, bf16"):
        FeatureExtractor(weights, device="cpu", amp="fp8")
    bf16 = FeatureExtractor(weights, device="cpu", amp="bf16")(_paths(query[:2]))
    assert bf16.dtype == np.float32 and np.allclose(bf16, extractor(_paths(query[:2])), atol=0.1)


def test_batch_size_and_empty_input(setup):
    _, _, query, extractor = setup
    small = FeatureExtractor(extractor.weights, device="cpu", batch_size=1)
    assert small.batch_size == 1
    np.testing.assert_allclose(small(_paths(query[:3])), extractor(_paths(query[:3])), rtol=0, atol=ATOL)
    assert extractor([]).shape == (0, extractor.feature_dim)


@pytest.mark.parametrize("bad, key, words", [
    ({"rgb": "x.jpg"}, "rgb", "unknown key"),
    ({}, None, "has no image"),
    ({"camid": 1, "RGB": None}, None, "has no image"),
    ({"RGB": np.zeros((8, 8), np.uint8)}, "RGB", r"HxWx3 uint8 array, got uint8 \[8, 8\]"),
    ({"NI": np.zeros((8, 8, 3), np.float32)}, "NI", "HxWx3 uint8 array, got float32"),
    ({"TI": torch.zeros(3, 8, 8, dtype=torch.uint8)}, "TI", "CxHxW float tensor"),
    ({"TI": torch.zeros(4, 8, 8)}, "TI", "CxHxW float tensor"),
    ({"RGB": torch.full((3, 8, 8), 255.0)}, "RGB", r"values must lie in \[0, 1\]"),
    ({"RGB": torch.full((3, 8, 8), float("nan"))}, "RGB", r"values must lie in \[0, 1\]"),
    ({"RGB": [[0, 1]]}, "RGB", "expected a path, a PIL image"),
    ({"RGB": "x.jpg", "camid": NUM_CAMERAS}, "camid", "not in the checkpoint's SIE table"),
    ({"RGB": "x.jpg", "camid": -2}, "camid", "not in the checkpoint's SIE table"),
    ({"RGB": "x.jpg", "camera": 1.0}, "camera", "integer id or None"),
    ({"RGB": "x.jpg", "camid": True}, "camid", "integer id or None"),
    ({"RGB": "x.jpg", "camid": 1, "camera": 1}, "camera", "camera twice"),
    ("x.jpg", None, "expected a mapping"),
])
def test_bad_samples_name_the_sample_and_key(setup, bad, key, words):
    _, _, query, extractor = setup
    with pytest.raises(SampleError, match=words) as info:
        extractor([_paths(query[:1])[0], bad])
    assert info.value.index == 1 and info.value.key == key
    assert str(info.value).startswith("sample 1" + (f", key {key!r}" if key else ""))


def test_a_missing_file_is_named(setup, tmp_path):
    _, _, _, extractor = setup
    with pytest.raises(BadImageError, match="missing.jpg' does not exist"):
        extractor({"RGB": tmp_path / "missing.jpg"})


def test_import_stays_light_and_exports_the_extractor():
    code = ("import sys, editor_reid; assert 'torch' not in sys.modules, 'torch imported'; "
            "from editor_reid import FeatureExtractor; from editor_reid.features import run_extract; "
            "print(FeatureExtractor.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "editor_reid.features.extractor"
