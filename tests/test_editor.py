"""EDITOR assembly: forward contract, switches, missing modalities, parameter count, `info`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from editor_reid.config import load_config
from editor_reid.model import EditorTrainOutput, build_model, count_parameters, rollout_cls_row
from editor_reid.model.sfts import frequency_mask, spatial_mask

from _tiny import tiny_cfg

MODS = ("RGB", "NI", "TI")


def tiny_model(size=(64, 32), num_classes=5, num_cameras=3, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(size, **overrides), num_classes=num_classes, num_cameras=num_cameras)


def batch(size=(64, 32), n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = {m: torch.randn(n, 3, *size, generator=g) for m in MODS}
    cams = torch.arange(n) % 3
    return images, cams


@pytest.mark.parametrize("size", [(64, 32), (32, 64)])
@pytest.mark.parametrize("al", [0, 1])
def test_train_and_eval_shapes_both_orientations(size, al):
    model = tiny_model(size, **{"model.al": al})
    images, cams = batch(size)
    n = (size[0] // 16) * (size[1] // 16)
    model.train()
    out = model(images, cams)
    assert isinstance(out, EditorTrainOutput)
    assert out.fused_logits.shape == (4, 5) and out.fused_feat.shape == (4, 192)
    if al == 1:
        assert [t.shape for t in out.backbone_logits] == [(4, 5)]
        assert [t.shape for t in out.backbone_feats] == [(4, 192)]
    else:
        assert [t.shape for t in out.backbone_logits] == [(4, 5)] * 3
        assert [t.shape for t in out.backbone_feats] == [(4, 64)] * 3
    assert set(out.backbone_tokens) == set(MODS) and out.backbone_tokens["NI"].shape == (4, 1 + n, 64)
    assert out.token_mask.shape == (4, n) and out.token_mask.dtype == torch.bool
    assert set(out.hma_cls) == set(MODS) and out.hma_cls["TI"].shape == (4, 64)
    model.eval()
    with torch.no_grad():
        feature = model(images, cams)
    assert feature.shape == (4, 192)
    assert model.last_token_mask.shape == (4, n)


def test_person_resolution_shapes():
    model = tiny_model((256, 128), **{"model.head_keep": 2, "model.frequency_keep": 10}).eval()
    images, cams = batch((256, 128), n=2)
    with torch.no_grad():
        out = model.forward_features(images, cams)
    assert out.feature.shape == (2, 192) and out.token_mask.shape == (2, 128)
    # At most head_keep·heads per modality (3 modalities) plus frequency_keep patches are kept.
    counts = out.token_mask.sum(1)
    assert torch.all(counts >= 10) and torch.all(counts <= 2 * 4 * 3 + 10)


def test_model_mask_is_the_official_selection_from_the_attention_maps():
    model = tiny_model((128, 64)).eval()
    images, cams = batch((128, 64))
    with torch.no_grad():
        feature = model(images, cams)
        stacked = torch.cat([images[m] for m in MODS])
        out = model.backbone(stacked, cams.repeat(3), return_attn=True)
    rows = rollout_cls_row(out.attn).split(4)
    want = spatial_mask(list(rows), 1) | frequency_mask([images[m] for m in MODS], 2, 16)
    assert torch.equal(model.last_token_mask, want)
    assert feature.shape == (4, 192)


@pytest.mark.parametrize("ties", ["torch", "lower_index"])
def test_selection_maps_explain_the_forward_selection(ties):
    torch.manual_seed(0)
    model = build_model(tiny_cfg((128, 64), **{"model.sfts_ties": ties}), num_classes=5, num_cameras=3).eval()
    images, cams = batch((128, 64), n=3)
    maps = model.selection_maps(images, cams)
    with torch.no_grad():
        mask = model.forward_features(images, cams).token_mask
    assert torch.equal(maps.mask, mask)
    assert torch.equal(maps.mask, maps.spatial | maps.frequency)
    assert maps.rollout.shape == (3, 3, 4, model.num_patches)  # modalities, batch, heads, patches
    assert (maps.frequency.sum(dim=1) == 2).all() and maps.frequency_scores.shape == (3, model.num_patches)
    # One modality missing: its zero image goes through the backbone like in forward_features.
    partial = {m: images[m] for m in ("RGB", "TI")}
    with torch.no_grad():
        assert torch.equal(model.selection_maps(partial, cams).mask, model.forward_features(partial, cams).token_mask)


def test_forward_features_matches_eval_forward_and_is_deterministic():
    model = tiny_model().eval()
    images, cams = batch()
    with torch.no_grad():
        a = model(images, cams)
        b = model.forward_features(images, cams)
    assert torch.equal(a, b.feature) and torch.equal(model.last_token_mask, b.token_mask)


def test_sfts_off_keeps_every_token_and_hma_off_uses_backbone_cls():
    model = tiny_model(**{"model.sfts": False}).train()
    images, cams = batch()
    out = model(images, cams)
    assert out.token_mask.all()
    model = tiny_model(**{"model.hma": False}).train()
    out = model(images, cams)
    assert model.hma is None and out.hma_cls is None
    torch.testing.assert_close(out.fused_feat, torch.cat([out.backbone_tokens[m][:, 0] for m in MODS], dim=1))
    assert out.fused_logits.shape == (4, 5)


def test_missing_modalities_are_zero_images():
    model = tiny_model().eval()
    images, cams = batch()
    with torch.no_grad():
        subset = model({"RGB": images["RGB"]}, cams)
        zeros = model({"RGB": images["RGB"], "NI": torch.zeros_like(images["NI"]), "TI": torch.zeros_like(images["TI"])}, cams)
    assert subset.shape == (4, 192)
    torch.testing.assert_close(subset, zeros)
    with pytest.raises(ValueError, match="unknown modality"):
        model({"IR": images["RGB"]}, cams)
    with pytest.raises(ValueError, match="no input images"):
        model({}, cams)


def test_training_step_gradients_reach_every_trainable_part():
    model = tiny_model(**{"model.al": 0}).train()
    images, cams = batch()
    out = model(images, cams)
    loss = out.fused_logits.sum() + sum(t.sum() for t in out.backbone_logits) + out.fused_feat.pow(2).mean()
    loss = loss + sum(c.sum() for c in out.hma_cls.values())
    loss.backward()
    unused = {"backbone.fc.weight", "backbone.fc.bias"}
    for name, p in model.named_parameters():
        if name not in unused:
            assert p.grad is not None, name
    assert model.backbone.fc.weight.grad is None


def test_heads_and_necks_follow_the_official_setup():
    model = tiny_model(**{"model.al": 1}, num_classes=7)
    assert model.fuse_bn.num_features == 192 and model.fuse_bn.bias.requires_grad
    assert model.fuse_head.bias is None and model.fuse_head.weight.shape == (7, 192)
    assert abs(float(model.fuse_head.weight.detach().std()) - 0.001) < 0.0003
    assert model.backbone_bn.num_features == 64 and model.backbone_head.weight.shape == (7, 64)  # always built
    assert model.al_head.weight.shape == (7, 192)
    assert tiny_model(**{"model.al": 0}).al_head is None
    delta = count_parameters(tiny_model(**{"model.al": 1})) - count_parameters(tiny_model(**{"model.al": 0}))
    assert delta == 2 * 192 + 5 * 192


def test_rgbnt100_preset_counts_118_55_million_parameters():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "rgbnt100.yaml")
    with torch.device("meta"):
        model = build_model(cfg, num_classes=50, num_cameras=8)
    assert round(count_parameters(model) / 1e6, 2) == 118.55
    from editor_reid.engine.info import describe

    text = describe(cfg)
    assert "118.55" in text and "50 train IDs" in text and "8 cameras" in text
    assert "85.75" in text and "28.33" in text and "3.54" in text


def test_model_package_does_not_import_upper_layers():
    code = (
        "import sys, editor_reid.model; "
        "bad = [m for m in sys.modules if m.startswith(('editor_reid.engine', 'editor_reid.data', 'editor_reid.cli', "
        "'editor_reid.losses', 'logging_utils'))]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_model_validates_inputs():
    with pytest.raises(ValueError, match="num_classes"):
        build_model(tiny_cfg(), num_classes=0, num_cameras=3)
    model = tiny_model()
    images, _ = batch()
    with pytest.raises(ValueError, match="camera"):
        model.eval()(images, torch.tensor([0, 1, 2, 3]))


def test_grad_checkpointing_gives_the_plain_gradients():
    """model.grad_checkpointing recomputes the backbone and HMA blocks in the backward pass; with
    drop path on (its RNG is replayed) the loss and every gradient equal the plain model's."""
    from editor_reid.losses import EditorCriterion

    cfgs = [tiny_cfg((64, 32), **{"model.drop_path": 0.2, "model.grad_checkpointing": flag}) for flag in (False, True)]
    images, cams = batch(n=4)
    targets = torch.tensor([0, 0, 1, 1])
    grads, losses = [], []
    for cfg in cfgs:
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=5, num_cameras=3).train()
        criterion = EditorCriterion(cfg, 5, model.embed_dim)
        torch.manual_seed(1)  # the same drop-path draws
        loss, _ = criterion(model(images, cams), targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert model.backbone.grad_checkpointing and model.hma.grad_checkpointing
    assert torch.allclose(losses[0], losses[1], rtol=0, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7), name
    # Checkpointing changes nothing at evaluation (no step was taken: the weights are the initial ones).
    torch.manual_seed(0)
    plain = build_model(cfgs[0], num_classes=5, num_cameras=3).eval()
    with torch.no_grad():
        assert torch.equal(plain(images, cams), model.eval()(images, cams))
