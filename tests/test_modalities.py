"""Any set of modalities (issue 16): the modality set comes from ``datasets.modalities``; EDITOR
runs with 2, 3 or 4 of them (HMA blocks, SFTS union, the M·D feature, BCC pairs, OCFR centres,
the missing-modality sweep); three stay what they were."""

from __future__ import annotations

import pytest
import torch

from _tiny import tiny_cfg, train_cfg
from editor_reid.config import ConfigError, load_config
from editor_reid.losses import EditorCriterion, bcc_loss
from editor_reid.modalities import MODALITIES, canonical_order, check_modalities, modality_subsets
from editor_reid.model import build_model
from editor_reid.model.sfts import frequency_mask, spatial_mask


def _model(modalities, seed=0, **overrides):
    torch.manual_seed(seed)
    items = {"datasets.modalities": "[" + ",".join(modalities) + "]", **overrides}
    cfg = tiny_cfg((64, 32), **items)
    return cfg, build_model(cfg, num_classes=5, num_cameras=3)


def _images(modalities, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, 3, 64, 32, generator=g) for m in modalities}, torch.arange(n) % 3


def test_names_order_and_checks():
    assert canonical_order(["TI", "DEPTH", "RGB"]) == ("RGB", "TI", "DEPTH")
    assert canonical_order(MODALITIES) == MODALITIES
    assert check_modalities(["RGB", "NI", "TI", "DEPTH"]) is None
    assert "named twice" in check_modalities(["RGB", "RGB"])
    assert "not a modality name" in check_modalities(["RGB", "depth"])
    assert "at least one" in check_modalities([])
    assert "at most 8" in check_modalities([f"M{i}" for i in range(9)])


def test_config_puts_the_modalities_in_the_model_order():
    cfg = load_config(None, ["datasets.modalities=[DEPTH,TI,RGB]"])
    assert cfg.datasets.modalities == ["RGB", "TI", "DEPTH"]
    with pytest.raises(ConfigError, match="'datasets.modalities'.*named twice"):
        load_config(None, ["datasets.modalities=[RGB,RGB]"])


@pytest.mark.parametrize("modalities", [("RGB", "NI"), ("RGB", "NI", "TI", "DEPTH")])
def test_model_follows_the_modality_set(modalities):
    cfg, model = _model(modalities)
    m = len(modalities)
    assert model.modalities == modalities
    assert set(model.hma.modal_blocks) == set(modalities) and set(model.hma.reduce) == set(modalities)
    assert model.fuse_bn.num_features == m * 64 and model.al_bn.num_features == m * 64
    images, cams = _images(modalities)
    model.eval()
    with torch.no_grad():
        out = model.forward_features(images, cams)
        # SFTS unions the per-head top-k of every modality's rollout with the frequency mask.
        stacked = torch.cat([images[x] for x in modalities])
        rows = model.backbone(stacked, cams.repeat(m), return_attn=True).rollout.split(4)
    want = spatial_mask(list(rows), 1) | frequency_mask([images[x] for x in modalities], 2, 16)
    assert torch.equal(out.token_mask, want)
    assert out.feature.shape == (4, m * 64)
    # A missing modality is a zero image, the feature keeps its M·D width.
    partial = {x: images[x] for x in modalities[:-1]}
    with torch.no_grad():
        zero = dict(partial, **{modalities[-1]: torch.zeros_like(images[modalities[0]])})
        assert torch.equal(model.forward_features(partial, cams).feature, model.forward_features(zero, cams).feature)
    with pytest.raises(ValueError, match="unknown modality"):
        model.forward_features({"XX": images[modalities[0]]}, cams)


@pytest.mark.parametrize("modalities", [("RGB", "NI"), ("RGB", "NI", "TI", "DEPTH")])
def test_losses_follow_the_modality_set(modalities):
    cfg, model = _model(modalities)
    criterion = EditorCriterion(cfg, 5, 64)
    assert criterion.ocfr.modalities == modalities
    assert {f"ocfr.{x}_centers" for x in modalities} == set(dict(criterion.named_buffers()))
    images, cams = _images(modalities)
    targets = torch.tensor([0, 0, 1, 1])
    model.train()
    out = model(images, cams)
    assert len(out.backbone_feats) == 1 and out.backbone_feats[0].shape == (4, len(modalities) * 64)  # AL=1
    assert set(out.hma_cls) == set(modalities)
    loss, terms = criterion(out, targets)
    loss.backward()
    assert torch.isfinite(loss) and terms["bcc"] > 0 and terms["ocfr"] != 0
    assert model.hma.modal_blocks[modalities[-1]].attn.qkv.weight.grad is not None
    # BCC: one MSE term per pair of modalities, M(M-1)/2 of them.
    tokens = {x: torch.randn(2, 9, 4) for x in modalities}
    mask = torch.zeros(2, 8, dtype=torch.bool)
    pairs = [(a, b) for i, a in enumerate(modalities) for b in modalities[i + 1:]]
    want = sum(torch.nn.functional.mse_loss(tokens[a][:, 1:], tokens[b][:, 1:]) for a, b in pairs)
    assert bcc_loss(tokens, mask) == pytest.approx(float(want), rel=1e-6)


def test_al0_gives_one_backbone_head_input_per_modality():
    _, model = _model(("RGB", "NI", "TI", "DEPTH"), **{"model.al": 0})
    images, cams = _images(model.modalities)
    out = model.train()(images, cams)
    assert len(out.backbone_logits) == 4 and all(f.shape == (4, 64) for f in out.backbone_feats)


def test_three_modalities_are_the_default_model():
    torch.manual_seed(0)
    default = build_model(tiny_cfg((64, 32)), num_classes=5, num_cameras=3)
    _, named = _model(MODALITIES)
    assert default.state_dict().keys() == named.state_dict().keys()
    for key, value in default.state_dict().items():
        assert torch.equal(value, named.state_dict()[key]), key


def test_two_modalities_train_and_test_end_to_end(train_data, tmp_path):
    from editor_reid.engine.evaluate import run_test
    from editor_reid.engine.train import train

    out = tmp_path / "run"
    cfg = train_cfg(train_data, out, "solver.max_epochs=1", "datasets.modalities=[RGB,NI]")
    summary = train(cfg, quiet=True)
    assert summary["final"]["epoch"] == 1
    result = run_test(cfg, out / "checkpoints" / "last.pt", missing="all", quiet=True)
    assert list(result) == ["RGB", "NI", "RGB+NI", "average"]
    assert [len(s) for s in modality_subsets(cfg.datasets.modalities)] == [1, 1, 2]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["model"]["fuse_bn.weight"].shape == (2 * 64,)
    assert not any(".TI." in k or k.endswith(".TI") for k in state["model"])


def test_a_modality_the_data_lacks_is_one_clear_error(train_data, tmp_path):
    from editor_reid.data.sources import load_configured

    cfg = train_cfg(train_data, tmp_path / "run", "datasets.modalities=[RGB,NI,TI,DEPTH]")
    with pytest.raises(ConfigError, match=r"names DEPTH, but no sample of rgbnt201 has that modality \(it has RGB, "
                                          r"NI, TI\)"):
        load_configured(cfg.datasets)


def test_four_modalities_train_and_test_end_to_end_from_a_manifest(train_data, tmp_path):
    """A fourth sensor: a manifest with a DEPTH column (here a blurred grey copy of the NI image)."""
    import csv

    from PIL import Image, ImageFilter

    from editor_reid.data.manifest import make_manifest, read_manifest
    from editor_reid.engine.evaluate import run_test
    from editor_reid.engine.train import train

    three = tmp_path / "three.csv"
    make_manifest("rgbnt201", train_data, three)
    rows = list(csv.DictReader(three.open()))
    depth_dir = tmp_path / "depth"
    depth_dir.mkdir()
    for i, row in enumerate(rows):
        source = (three.parent / row["NI"]).resolve()
        target = depth_dir / f"{i:04d}.png"
        Image.open(source).convert("L").filter(ImageFilter.GaussianBlur(2)).convert("RGB").save(target)
        row["DEPTH"] = str(target)
    four = tmp_path / "four.csv"
    with four.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*rows[0].keys()])
        writer.writeheader()
        writer.writerows(rows)
    # Without DEPTH among the modalities, the column is a note; with it, an image column.
    assert "DEPTH" not in read_manifest(four).train[0].paths
    assert read_manifest(four, modalities=["RGB", "NI", "TI", "DEPTH"]).train[0].paths["DEPTH"].endswith(".png")

    out = tmp_path / "run"
    cfg = train_cfg(train_data, out, "solver.max_epochs=1", "datasets.names=manifest", f"datasets.manifest={four}",
                    "datasets.modalities=[DEPTH,RGB,NI,TI]")
    assert cfg.datasets.modalities == ["RGB", "NI", "TI", "DEPTH"]
    train(cfg, quiet=True)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["model"]["fuse_bn.weight"].shape == (4 * 64,)
    assert "hma.modal_blocks.DEPTH.attn.qkv.weight" in state["model"]
    assert "ocfr.DEPTH_centers" in state["criterion"]
    result = run_test(cfg, out / "checkpoints" / "last.pt", missing="all", quiet=True)
    assert len(result) == 15 + 1 and "RGB+NI+TI+DEPTH" in result and "DEPTH" in result
    assert all(0 <= row["mAP"] <= 1 for row in result.values())
