"""Official EDITOR checkpoint layout (docs/official-behaviour.md#checkpoint-layout): export, import, round trip,
errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from editor_reid.config import load_config
from editor_reid.model import (
    OfficialCheckpointError,
    build_model,
    is_official_state_dict,
    load_official_checkpoint,
    official_key,
    official_model_sizes,
    official_to_ours,
    to_official_state_dict,
)

from _tiny import tiny_cfg

MODS = ("RGB", "NI", "TI")


def tiny_model(al=1, num_classes=5, num_cameras=3, seed=0, size=(64, 32)):
    cfg = tiny_cfg(size, **{"model.al": al})
    torch.manual_seed(seed)
    model = build_model(cfg, num_classes=num_classes, num_cameras=num_cameras)
    with torch.no_grad():  # move norms/BN statistics off their constant init
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and ("norm" in name or "_bn" in name):
                tensor.add_(0.1 * torch.randn_like(tensor)).abs_()
    return model.eval()


def official_checkpoint(model, prefix="module."):
    centers = {m: torch.randn(model.num_classes, model.embed_dim) for m in MODS}
    state = to_official_state_dict(model, ocfr_centers=centers)
    return {prefix + k: v for k, v in state.items()}, centers


def inputs(size=(64, 32)):
    g = torch.Generator().manual_seed(7)
    return {m: torch.randn(3, 3, *size, generator=g) for m in MODS}, torch.tensor([0, 2, 1])


def test_exported_keys_follow_the_official_layout():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "rgbnt201.yaml")  # AL=1
    with torch.device("meta"):
        model = build_model(cfg, num_classes=171, num_cameras=4)
    state = to_official_state_dict(model)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    expected = {
        "BACKBONE.base.cls_token": (1, 1, 768),
        "BACKBONE.base.pos_embed": (1, 129, 768),
        "BACKBONE.base.sie_embed": (4, 1, 768),
        "BACKBONE.base.patch_embed.proj.weight": (768, 3, 16, 16),
        "BACKBONE.base.blocks.11.attn.qkv.weight": (2304, 768),
        "BACKBONE.base.blocks.11.attn.qkv.bias": (2304,),
        "BACKBONE.base.blocks.0.mlp.fc1.weight": (3072, 768),
        "BACKBONE.base.norm.weight": (768,),
        "BACKBONE.base.fc.weight": (1000, 768),
        "BACKBONE.base.fc.bias": (1000,),
        "FREQ_INDEX.DWT.h0_col": (1, 1, 2, 1),
        "FREQ_INDEX.IDWT.g1_row": (1, 1, 1, 2),
        "FUSE_block.normR.weight": (768,),
        "FUSE_block.attnN.qkv.weight": (2304, 768),
        "FUSE_block.attnT.proj.weight": (768, 768),
        "FUSE_block.normT_.bias": (768,),
        "FUSE_block.mlpR.fc1.weight": (3072, 768),
        "FUSE_block.mlpN.fc2.weight": (768, 3072),
        "FUSE_block.norm1.weight": (768,),
        "FUSE_block.attn1.qkv.weight": (2304, 768),
        "FUSE_block.norm2.bias": (768,),
        "FUSE_block.mlp.fc1.weight": (3072, 768),
        "FUSE_block.out_norm.weight": (768,),
        "FUSE_block.memory_cls.RGB_centers": (171, 768),
        "FUSE_block.memory_cls.TIR_centers": (171, 768),
        "RGB_REDUCE.weight": (768, 1536),
        "NIR_REDUCE.bias": (768,),
        "TIR_REDUCE.weight": (768, 1536),
        "FUSE_HEAD.weight": (171, 2304),
        "FUSE_BN.running_var": (2304,),
        "FUSE_BN.num_batches_tracked": (),
        "BACKBONE_HEAD.weight": (171, 768),
        "BACKBONE_BN.weight": (768,),
        "AL_HEAD.weight": (171, 2304),
        "AL_BN.bias": (2304,),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    # No biases in HMA; no stray names outside the official top-level modules.
    assert "FUSE_block.attnR.qkv.bias" not in state and "FUSE_block.mlp.fc1.bias" not in state
    tops = {k.split(".")[0] for k in state}
    assert tops == {
        "BACKBONE", "FREQ_INDEX", "FUSE_block", "RGB_REDUCE", "NIR_REDUCE", "TIR_REDUCE",
        "FUSE_HEAD", "FUSE_BN", "BACKBONE_HEAD", "BACKBONE_BN", "AL_HEAD", "AL_BN",
    }


@pytest.mark.parametrize("al", [0, 1])
def test_round_trip_reproduces_weights_and_features(tmp_path, al):
    source = tiny_model(al=al, seed=0)
    state, centers = official_checkpoint(source)
    path = tmp_path / "EDITORbest.pth"
    torch.save(state, path)
    target = tiny_model(al=al, seed=123)
    images, cams = inputs()
    with torch.no_grad():
        before = target(images, cams)
    report = load_official_checkpoint(target, path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    with torch.no_grad():
        want, got = source(images, cams), target(images, cams)
    assert torch.equal(want, got) and not torch.allclose(before, got)
    assert torch.equal(source.last_token_mask, target.last_token_mask)
    assert report.missing_keys == []
    assert any(k.startswith("FREQ_INDEX.DWT.") for k in report.ignored_keys)
    for m in MODS:
        assert torch.equal(report.extra["ocfr_centers"][m], centers[m])
    assert len(report.loaded_keys) == len(source.state_dict())


def test_state_dict_input_without_prefix_and_head_mismatches():
    source = tiny_model(al=1)
    state, _ = official_checkpoint(source, prefix="")
    # AL=1 checkpoint into an AL=0 model: the AL head is reported as ignored.
    target = tiny_model(al=0, seed=5)
    report = load_official_checkpoint(target, state)
    assert {"AL_HEAD.weight", "AL_BN.weight"} <= set(report.ignored_keys)
    # AL=0 checkpoint into an AL=1 model: the AL head stays at its init and is listed as missing.
    state0, _ = official_checkpoint(tiny_model(al=0), prefix="")
    report = load_official_checkpoint(tiny_model(al=1, seed=9), state0)
    assert "al_head.weight" in report.missing_keys and "al_bn.running_mean" in report.missing_keys


def test_shape_and_key_errors_name_the_keys(tmp_path):
    state, _ = official_checkpoint(tiny_model(num_classes=5))
    with pytest.raises(OfficialCheckpointError, match=r"FUSE_HEAD\.weight -> fuse_head\.weight: file \(5, 192\) vs model \(9, 192\)"):
        load_official_checkpoint(tiny_model(num_classes=9), state)
    broken = dict(state)
    broken["module.FUSE_block.extra.weight"] = torch.zeros(1)
    with pytest.raises(OfficialCheckpointError, match=r"keys not in the model: FUSE_block\.extra\.weight"):
        load_official_checkpoint(tiny_model(), broken)
    partial = {k: v for k, v in state.items() if "attnR.qkv" not in k}
    with pytest.raises(OfficialCheckpointError, match=r"model keys not in the file: FUSE_block\.attnR\.qkv\.weight"):
        load_official_checkpoint(tiny_model(), partial)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_official_checkpoint(tiny_model(), tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(OfficialCheckpointError, match="junk.pth"):
        load_official_checkpoint(tiny_model(), tmp_path / "junk.pth")


def test_official_key_mapping():
    assert official_key("backbone.vit.blocks.3.norm1.weight") == "BACKBONE.base.blocks.3.norm1.weight"
    assert official_key("backbone.sie_embed") == "BACKBONE.base.sie_embed"
    assert official_key("hma.modal_blocks.NI.norm2.bias") == "FUSE_block.normN_.bias"
    assert official_key("hma.fusion_block.attn.proj.weight") == "FUSE_block.attn1.proj.weight"
    assert official_key("hma.reduce.TI.weight") == "TIR_REDUCE.weight"
    assert official_key("backbone_bn.running_mean") == "BACKBONE_BN.running_mean"
    with pytest.raises(KeyError):
        official_key("something.else")


def test_failed_load_leaves_the_model_untouched():
    state, _ = official_checkpoint(tiny_model(seed=1))
    state["module.FUSE_block.extra.weight"] = torch.zeros(1)
    target = tiny_model(seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(OfficialCheckpointError):
        load_official_checkpoint(target, state)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


def test_official_to_ours_splits_weights_centres_and_ignored_keys():
    model = tiny_model(al=0)
    state, centers = official_checkpoint(tiny_model(al=1), prefix="")
    state["FUSE_block.extra.weight"] = torch.zeros(1)
    ours, centres, ignored = official_to_ours(state, model)
    assert set(ours) == set(model.state_dict()) | {"FUSE_block.extra.weight"}  # unknown keys kept for the report
    assert torch.equal(ours["hma.modal_blocks.NI.norm2.bias"], state["FUSE_block.normN_.bias"])
    assert all(torch.equal(centres[m], centers[m]) for m in MODS)
    assert {"AL_HEAD.weight", "FREQ_INDEX.DWT.h0_col", "FUSE_block.memory_cls.RGB_centers"} <= set(ignored)
    assert not set(ignored) & set(ours)


def test_official_state_dict_detection_and_sizes():
    state, _ = official_checkpoint(tiny_model(num_classes=5, num_cameras=3))
    assert next(iter(state)).startswith("module.")
    assert is_official_state_dict(state)
    assert is_official_state_dict({k[len("module."):]: v for k, v in state.items()})
    assert is_official_state_dict({"FUSE_block.norm1.weight": torch.zeros(1)})
    assert official_model_sizes(state) == (5, 3)
    ours = tiny_model().state_dict()
    assert not is_official_state_dict(ours) and official_model_sizes(ours) == (None, None)
    assert not is_official_state_dict({}) and not is_official_state_dict(None) and not is_official_state_dict([1])
    assert not is_official_state_dict({"BACKBONE_HEAD.weight": torch.zeros(1)})  # heads alone are not enough
    assert official_model_sizes({"FUSE_HEAD.weight": torch.zeros(7, 4)}) == (7, None)
    assert official_model_sizes({"module.BACKBONE.base.sie_embed": torch.zeros(6, 1, 4)}) == (None, 6)
