"""Backbone (timm ViT + SIE + attention capture) and local pretrained-weight loading."""

from __future__ import annotations


import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from editor_reid.model.backbone import UNKNOWN_CAMERA, ViTBackbone, rollout_cls_row
from editor_reid.model.pretrained import PretrainedLoadError, filter_pretrained, load_pretrained
from _clip_files import openai_clip_state, write_torchscript_archive

TINY = dict(embed_dim=64, depth=3, num_heads=4)


def tiny_backbone(img_size=(64, 32), arch="vit_base_patch16_224", **kwargs) -> ViTBackbone:
    torch.manual_seed(0)
    options = dict(TINY, num_cameras=3, drop_path=0.0)
    options.update(kwargs)
    return ViTBackbone(arch, img_size, **options).eval()


def manual_forward(bb: ViTBackbone, images: torch.Tensor, cams: torch.Tensor):
    """Plain re-implementation of the ViT forward from the module weights (no timm code paths)."""
    vit = bb.vit
    x = F.conv2d(images, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([vit.cls_token.expand(len(x), -1, -1), x], dim=1) + vit.pos_embed
    if bb.sie_embed is not None:
        x = x + bb.sie_coe * bb.sie_embed[cams]
    if isinstance(vit.norm_pre, nn.LayerNorm):
        x = vit.norm_pre(x)
    maps = []
    for blk in vit.blocks:
        heads = blk.attn.num_heads
        b, n, d = x.shape
        h = F.layer_norm(x, (d,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        qkv = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(q @ k.transpose(-2, -1) / (d // heads) ** 0.5, dim=-1)
        maps.append(attn)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(out, blk.attn.proj.weight, blk.attn.proj.bias)
        h = F.layer_norm(x, (d,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        x = x + blk.mlp.fc2(blk.mlp.act(blk.mlp.fc1(h)))
    x = F.layer_norm(x, (x.shape[-1],), vit.norm.weight, vit.norm.bias, vit.norm.eps)
    return x, maps


@pytest.mark.parametrize("img_size", [(64, 32), (32, 64), (256, 128)])
def test_shapes_both_orientations(img_size):
    bb = tiny_backbone(img_size)
    rows, cols = img_size[0] // 16, img_size[1] // 16
    assert bb.grid_size == (rows, cols) and bb.num_patches == rows * cols
    out = bb(torch.randn(2, 3, *img_size), torch.tensor([0, 2]), return_attn=True)
    n = rows * cols
    assert out.tokens.shape == (2, 1 + n, 64)
    assert out.rollout.shape == (2, 4, n)
    assert len(out.attn) == 3 and out.attn[0].shape == (2, 4, 1 + n, 1 + n)


def test_fused_output_and_probabilities_match_manual_attention():
    bb = tiny_backbone((64, 32))
    assert all(blk.attn.fused_attn for blk in bb.vit.blocks)  # the block output uses timm's SDPA path
    images, cams = torch.randn(3, 3, 64, 32), torch.tensor([0, 1, 2])
    out = bb(images, cams, return_attn=True)
    tokens, maps = manual_forward(bb, images, cams)
    torch.testing.assert_close(out.tokens, tokens, atol=1e-5, rtol=1e-5)
    for got, want in zip(out.attn, maps):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)))


def test_streamed_rollout_equals_chain_and_full_product():
    bb = tiny_backbone((64, 32))
    out = bb(torch.randn(2, 3, 64, 32), torch.tensor([1, 0]), return_attn=True)
    full = out.attn[0]
    for a in out.attn[1:]:
        full = a @ full  # A_L ··· A_1
    torch.testing.assert_close(out.rollout, full[:, :, 0, 1:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rollout_cls_row(out.attn), full[:, :, 0, 1:], atol=1e-6, rtol=1e-5)


def test_attention_maps_stay_out_of_the_autograd_graph():
    bb = tiny_backbone((64, 32)).train()
    out = bb(torch.randn(2, 3, 64, 32), torch.tensor([0, 1]), return_attn=True)
    assert out.tokens.requires_grad
    assert not out.rollout.requires_grad and not any(a.requires_grad for a in out.attn)
    out.tokens.sum().backward()
    assert bb.vit.blocks[0].attn.qkv.weight.grad is not None
    assert all(x is None for x in bb._qkv)  # captured q/k released after the forward


def test_rollout_off_returns_no_maps_and_same_tokens():
    bb = tiny_backbone((64, 32))
    x, cams = torch.randn(2, 3, 64, 32), torch.tensor([0, 1])
    plain = bb(x, cams, rollout=False)
    assert plain.rollout is None and plain.attn is None
    torch.testing.assert_close(plain.tokens, bb(x, cams).tokens)


def test_sie_camera_embedding():
    bb = tiny_backbone((64, 32), num_cameras=4, sie_coe=3.0)
    assert bb.sie_embed.shape == (4, 1, 64)
    x = torch.randn(1, 3, 64, 32)
    base = bb.embed(x, torch.tensor([0]))
    other = bb.embed(x, torch.tensor([2]))
    # λ·(sie[2] - sie[0]) is added to every token, CLS included.
    diff = other - base
    torch.testing.assert_close(diff, (3.0 * (bb.sie_embed[2] - bb.sie_embed[0])).expand_as(diff), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="camera id out of range"):
        bb(x, torch.tensor([4]))
    with pytest.raises(ValueError, match="camera ids"):
        bb(x, None)
    assert tiny_backbone(num_cameras=1).sie_embed is None
    assert tiny_backbone(num_cameras=6, sie_camera=False).sie_embed is None


def test_unknown_camera_takes_the_mean_sie_embedding():
    bb = tiny_backbone((64, 32), num_cameras=4, sie_coe=3.0).eval()
    x = torch.randn(3, 3, 64, 32)
    cams = torch.tensor([UNKNOWN_CAMERA, 2, UNKNOWN_CAMERA])
    mean = bb.sie_embed.mean(dim=0)  # [1, D]
    sie = torch.stack([mean, bb.sie_embed[2], mean])  # [B, 1, D]
    expected = bb.vit.norm_pre(torch.cat([bb.vit.cls_token.expand(3, -1, -1), bb.vit.patch_embed(x)], dim=1)
                               + bb.vit.pos_embed + 3.0 * sie)
    torch.testing.assert_close(bb.embed(x, cams), expected, atol=1e-6, rtol=1e-5)
    # A known camera in the same batch is untouched (bit for bit).
    assert torch.equal(bb.embed(x, cams)[1], bb.embed(x[1:2], torch.tensor([2]))[0])
    bb(x, cams)  # -1 passes the range check; below it, or past the table, does not
    for bad in (-2, 4):
        with pytest.raises(ValueError, match="camera id out of range"):
            bb(x[:1], torch.tensor([bad]))


def test_architecture_details():
    bb = ViTBackbone("vit_base_patch16_224", (64, 32), embed_dim=64, depth=4, num_heads=4, drop_path=0.1)
    blk = bb.vit.blocks[0]
    assert blk.norm1.eps == 1e-6 and blk.attn.qkv.bias is not None
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in bb.vit.blocks]
    np.testing.assert_allclose(rates, np.linspace(0, 0.1, 4), atol=1e-6)
    assert bb.fc.weight.shape == (1000, 64)
    clip = ViTBackbone("vit_base_patch16_clip_224", (64, 32), **TINY)
    assert isinstance(clip.vit.norm_pre, nn.LayerNorm) and clip.vit.norm_pre.eps == 1e-5
    assert clip.vit.patch_embed.proj.bias is None
    assert type(clip.vit.blocks[0].mlp.act).__name__ == "QuickGELU"


def test_bad_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match="stride_size"):
        ViTBackbone("vit_base_patch16_224", (64, 32), stride_size=(12, 12), **TINY)
    with pytest.raises(ValueError, match="multiples of 16"):
        ViTBackbone("vit_base_patch16_224", (60, 32), **TINY)
    with pytest.raises(ValueError, match="transformer_type"):
        ViTBackbone("resnet50", (64, 32), **TINY)
    bb = tiny_backbone((64, 32))
    with pytest.raises(ValueError, match="differs"):
        bb(torch.randn(1, 3, 32, 64), torch.tensor([0]))


# ----------------------------------------------------------------------------- pretrained weights


def official_resize(table: torch.Tensor, old_grid, new_grid, mode="bilinear", antialias=False) -> torch.Tensor:
    """The official position-table resize written out: bilinear, align_corners=False, no antialias."""
    grid = table[:, 1:].reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, align_corners=False, antialias=antialias)
    return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1)], dim=1)


def _timm_source(arch="vit_base_patch16_224", **kwargs):
    torch.manual_seed(1)
    return timm.create_model(arch, pretrained=False, num_classes=10, **dict(TINY, **kwargs)).eval()


def _assert_loaded(bb: ViTBackbone, source: nn.Module, *, skip=("pos_embed",)):
    own = bb.vit.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith("head") or key in skip:
            continue
        torch.testing.assert_close(own[key], value, msg=key)
    expected = official_resize(source.pos_embed.detach(), (14, 14), bb.grid_size)
    torch.testing.assert_close(bb.vit.pos_embed.detach(), expected)


def test_resize_pos_embed_is_bilinear_like_the_official_code():
    bb = tiny_backbone((256, 128))  # grid 16 x 8: rows upsampled, columns downsampled
    table = torch.randn(1, 1 + 14 * 14, 64)
    out = filter_pretrained({"pos_embed": table}, bb)["vit.pos_embed"]
    torch.testing.assert_close(out, official_resize(table, (14, 14), (16, 8)), atol=0, rtol=0)
    bicubic = official_resize(table, (14, 14), (16, 8), mode="bicubic")
    assert not torch.allclose(out[:, 1:], bicubic[:, 1:])
    antialiased = official_resize(table, (14, 14), (16, 8), antialias=True)  # timm's default; not official
    assert not torch.allclose(out[:, 1:], antialiased[:, 1:])
    # A distilled (DeiT) table: both prefix positions kept through the resize, the distillation one dropped.
    distilled = torch.cat([table[:, :1], torch.randn(1, 1, 64), table[:, 1:]], dim=1)
    out = filter_pretrained({"pos_embed": distilled, "dist_token": torch.zeros(1, 1, 64)}, bb)
    assert list(out) == ["vit.pos_embed"]
    torch.testing.assert_close(out["vit.pos_embed"], official_resize(table, (14, 14), (16, 8)), atol=0, rtol=0)


@pytest.mark.parametrize("fmt", ["pth", "pth_2d_patch", "safetensors"])
def test_timm_layout_checkpoint_loads(tmp_path, fmt):
    source = _timm_source()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "vit.safetensors"
        save_file(state, str(path))
    else:
        if fmt == "pth_2d_patch":  # old timm checkpoints: manual patchify + linear projection
            state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].reshape(64, -1)
        path = tmp_path / "vit.pth"
        torch.save({"model": state}, path)
    bb = tiny_backbone((64, 32))
    report = load_pretrained(bb, path, "imagenet")
    _assert_loaded(bb, source)
    assert set(report.ignored_keys) == {"head.weight", "head.bias"}
    assert report.missing_keys == ["fc.bias", "fc.weight", "sie_embed"]
    assert report.resized["pos_embed"] == ((1, 197, 64), (1, 9, 64))


def _npz_from_timm(model: nn.Module) -> dict[str, np.ndarray]:
    """Google ViT .npz layout (the format timm's _load_weights reads), written from a timm model."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        p = f"Transformer/encoderblock_{i}/"
        b = f"blocks.{i}."
        mha = p + "MultiHeadDotProductAttention_1/"
        out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        out[p + "LayerNorm_2/scale"], out[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            out[mha + f"{name}/kernel"] = qkv_w[j * d : (j + 1) * d].T.reshape(d, heads, d // heads)
            out[mha + f"{name}/bias"] = qkv_b[j * d : (j + 1) * d].reshape(heads, d // heads)
        out[mha + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(d, heads, d // heads).transpose(1, 2, 0)
        out[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            out[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            out[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    return out


def test_npz_checkpoint_loads(tmp_path):
    source = _timm_source()
    path = tmp_path / "ViT-B_16.npz"
    np.savez(path, **_npz_from_timm(source))
    bb = tiny_backbone((32, 64))
    report = load_pretrained(bb, path, "imagenet")
    assert report.layout == "npz"
    _assert_loaded(bb, source)
    deeper = tiny_backbone((32, 64), depth=4)
    with pytest.raises(PretrainedLoadError, match="depth 3"):
        load_pretrained(deeper, path, "imagenet")


@pytest.mark.parametrize("container", ["state_dict", "torchscript"])
def test_openai_clip_checkpoint_loads(tmp_path, container):
    source = _timm_source("vit_base_patch16_clip_quickgelu_224")
    state = openai_clip_state(source, dtype=torch.float32)
    path = tmp_path / "ViT-B-16.pt"
    if container == "torchscript":
        write_torchscript_archive(state, path)
    else:
        torch.save(state, path)
    bb = tiny_backbone((64, 32), arch="vit_base_patch16_clip_224")
    report = load_pretrained(bb, path, "clip")
    assert report.layout == "clip" and "head.weight" in report.ignored_keys
    _assert_loaded(bb, source)
    with pytest.raises(PretrainedLoadError, match="pretrain_choice"):
        load_pretrained(bb, path, "imagenet")


def test_missing_and_mismatched_files_give_clear_errors(tmp_path):
    bb = tiny_backbone((64, 32))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_pretrained(bb, tmp_path / "nowhere.pth", "imagenet")
    wide = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, embed_dim=96, depth=3, num_heads=4)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(PretrainedLoadError, match=r"shape mismatches: .*vit\.blocks\.0\.attn\.qkv\.weight"):
        load_pretrained(bb, tmp_path / "wide.pth", "imagenet")
    deep = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **dict(TINY, depth=4))
    torch.save(deep.state_dict(), tmp_path / "deep.pth")
    with pytest.raises(PretrainedLoadError, match=r"keys not in the model: .*vit\.blocks\.3"):
        load_pretrained(bb, tmp_path / "deep.pth", "imagenet")
    clip = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=0, **TINY)
    torch.save(clip.state_dict(), tmp_path / "clip_timm.pth")
    with pytest.raises(PretrainedLoadError, match="norm_pre"):  # CLIP-architecture weights into an ImageNet ViT
        load_pretrained(bb, tmp_path / "clip_timm.pth", "imagenet")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedLoadError, match="garbage.pth"):
        load_pretrained(bb, tmp_path / "garbage.pth", "imagenet")
    assert load_pretrained(bb, tmp_path / "nowhere.pth", "none").loaded_keys == []


def test_failed_pretrained_load_leaves_the_backbone_untouched(tmp_path):
    bb = tiny_backbone((64, 32))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    deep = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **dict(TINY, depth=4))
    torch.save({"module." + k: v for k, v in deep.state_dict().items()}, tmp_path / "deep_ddp.pth")
    with pytest.raises(PretrainedLoadError, match=r"keys not in the model: .*vit\.blocks\.3"):
        load_pretrained(bb, tmp_path / "deep_ddp.pth", "imagenet")
    assert all(torch.equal(bb.state_dict()[k], v) for k, v in before.items())
