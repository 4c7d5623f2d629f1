"""The demo's JSON schema, picture and reproducibility (on a shrunken demo), and the
token-selection helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from editor_reid.config import ConfigError, load_config
from editor_reid.engine.demo import DEMO_PRESET, demo_config, run_demo
from editor_reid.engine.visualize import (
    patch_object_fraction,
    render_token_selection,
    tensor_to_image,
    token_object_overlap,
)

SMALL = [
    "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "input.size_train=[64,32]", "input.size_test=[64,32]",
    "solver.ims_per_batch=8", "dataloader.num_instance=2", "solver.max_steps_per_epoch=2", "test.ims_per_batch=64",
]
METRICS = {"mAP", "rank1", "rank5", "rank10", "mINP"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(out, seed=7, json_out=out / "demo.json", epochs=1, ids=12, views=2, overrides=SMALL)
    return out, result


def test_demo_json_schema_and_outputs(demo_run, capsys):
    out, result = demo_run
    saved = json.loads((out / "demo.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("untrained", "trained"):
        assert set(saved[key]) == METRICS
        assert all(0.0 <= v <= 1.0 for v in saved[key].values())
    assert saved["run_dir"] == str(out / "run")
    assert (out / "run" / "checkpoints" / "last.pt").is_file()
    tokens = saved["token_selection"]
    assert 0.0 <= tokens["selected_on_object"] <= 1.0 and 0.0 <= tokens["random_on_object"] <= 1.0
    with Image.open(out / "token_selection.png") as picture:
        assert picture.format == "PNG" and picture.width > 3 * 64 and picture.height > 64


def test_demo_is_reproducible_and_reruns_in_place(demo_run, capsys):
    out, first = demo_run
    again = run_demo(out, seed=7, epochs=1, ids=12, views=2, overrides=SMALL)
    assert again == first
    printed = capsys.readouterr().out
    assert "untrained" in printed and "trained" in printed and "run directory" in printed


def test_demo_preset_loads():
    cfg = load_config(DEMO_PRESET)
    assert cfg.solver.deterministic and cfg.dataloader.num_workers == 0
    assert cfg.model.pretrain_choice == "none"


@pytest.mark.parametrize("kwargs, named", [({"epochs": 0}, "demo --epochs must be >= 1, got 0"),
                                           ({"seed": -1}, "'solver.seed': expected in [0, 4294967295], got -1")])
def test_bad_demo_arguments_are_config_errors(tmp_path, kwargs, named):
    with pytest.raises(ConfigError) as info:
        demo_config(tmp_path, **{"seed": 1, **kwargs})
    assert named in str(info.value)
    with pytest.raises(ConfigError):  # before any data is written
        run_demo(tmp_path, **{"seed": 1, **kwargs}, quiet=True)
    assert not any(tmp_path.iterdir())


def test_patch_object_fraction_is_row_major():
    mask = np.zeros((4, 4), dtype=bool)
    mask[0:2, 2:4] = True  # top-right patch fully object
    mask[2, 0] = True  # a quarter of the bottom-left patch
    frac = patch_object_fraction(mask, (2, 2))
    assert frac.tolist() == [0.0, 1.0, 0.25, 0.0]
    with pytest.raises(ValueError):
        patch_object_fraction(np.zeros((5, 4), dtype=bool), (2, 2))


def test_token_object_overlap_against_random():
    on_object = np.array([[True, True, False, False, False, False, False, False]] * 50)
    selected = np.array([[True, True, False, False, False, False, False, False]] * 50)
    stats = token_object_overlap(selected, on_object, seed=0)
    assert stats["selected_on_object"] == 1.0
    assert 0.15 < stats["random_on_object"] < 0.4  # 2 of 8 patches are object
    assert stats == token_object_overlap(selected, on_object, seed=0)
    assert stats["selected_per_image"] == 2.0 and stats["images"] == 50


def test_render_token_selection_dims_unselected(tmp_path):
    image = tensor_to_image(torch.zeros(3, 32, 16), [0.5] * 3, [0.5] * 3)  # mid-grey
    assert image.size == (16, 32) and image.getpixel((0, 0)) == (128, 128, 128)
    keep = np.array([True, False, False, False, False, False, False, False])  # 4x2 grid
    path = render_token_selection([{"RGB": image, "NI": image}], [keep], (4, 2), tmp_path / "t.png", scale=1)
    with Image.open(path) as picture:
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    grey = pixels[(pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])]
    assert (grey == 128).all(axis=1).any()  # a selected patch stays bright
    assert ((grey > 0) & (grey < 60)).all(axis=1).any()  # unselected ones are dimmed
