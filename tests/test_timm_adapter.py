"""model/_timm.py: the timm internals the backbone and the pretrained loader rely on."""

from __future__ import annotations

import pytest
import timm
import timm.models.vision_transformer as timm_vit
import torch
from torch import nn

from editor_reid.model import _timm
from editor_reid.model.backbone import ARCHITECTURES, ViTBackbone, attention_with_probs

TINY = dict(embed_dim=64, depth=2, num_heads=4)


def tiny_vit(arch="vit_base_patch16_224") -> nn.Module:
    torch.manual_seed(0)
    return ViTBackbone(arch, (64, 32), num_cameras=0, drop_path=0.0, **TINY).vit.eval()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_installed_timm_passes_the_check(arch):
    _timm.check_vit(tiny_vit(arch))


def test_the_tested_range_is_the_pinned_one():
    assert _timm.TESTED_TIMM == "timm~=1.0.31"


def test_a_block_without_qkv_fails_with_a_clear_message():
    vit = tiny_vit()
    del vit.blocks[1].attn.qkv
    with pytest.raises(_timm.UnsupportedTimmError) as error:
        _timm.check_vit(vit)
    message = str(error.value)
    assert "blocks[1] attribute 'attn.qkv'" in message
    assert f"timm {timm.__version__}" in message and "timm~=1.0.31" in message
    assert "blocks[0]" not in message  # only what is missing is named


def test_a_replaced_qkv_or_a_missing_vit_attribute_is_named():
    vit = tiny_vit()
    vit.blocks[0].attn.qkv = nn.Identity()
    del vit.norm_pre
    with pytest.raises(_timm.UnsupportedTimmError, match=r"blocks\[0\]\.attn\.qkv as an nn\.Linear") as error:
        _timm.check_vit(vit)
    assert "VisionTransformer attribute 'norm_pre'" in str(error.value)


def test_a_missing_private_function_fails_when_the_backbone_is_built(monkeypatch):
    monkeypatch.delattr(timm_vit, "_convert_openai_clip")
    missing = r"function timm\.models\.vision_transformer\._convert_openai_clip"
    with pytest.raises(_timm.UnsupportedTimmError, match=missing):
        ViTBackbone("vit_tiny_test", (64, 32))
    with pytest.raises(_timm.UnsupportedTimmError, match="timm~=1.0.31"):
        _timm.convert_openai_clip({}, nn.Identity())


@pytest.mark.parametrize("arch", ["vit_base_patch16_224", "vit_base_patch16_clip_224"])
def test_accessors_reproduce_timms_own_forward(arch):
    vit = tiny_vit(arch)
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        tokens = _timm.final_norm(vit, _timm.run_blocks(vit, _timm.embed_tokens(vit, images)))
        torch.testing.assert_close(tokens, vit.forward_features(images), atol=0, rtol=0)
    assert _timm.grid_size(vit) == (4, 2) and _timm.embed_dim(vit) == 64 and len(_timm.blocks(vit)) == 2


@pytest.mark.parametrize("gated", [False, True])
def test_written_out_block_equals_timms_block(gated):
    vit = tiny_vit()
    block = _timm.blocks(vit)[0]
    if gated:  # timm's optional sigmoid gate on the attention output, read from norm1(x)
        block.attn.gate = nn.Linear(64, 64)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        parts = _timm.attention_parts(block)
        assert parts.qkv is _timm.qkv_layer(block) and parts.num_heads == 4
        h = parts.norm1(x)
        q, k, v = parts.qkv(h).reshape(2, 9, 3, 4, 16).permute(2, 0, 3, 1, 4)
        out, _ = attention_with_probs(parts.q_norm(q), parts.k_norm(k), v, parts.scale, parts.attn_drop)
        torch.testing.assert_close(_timm.finish_block(block, x, h, out), block(x), atol=1e-5, rtol=1e-5)
