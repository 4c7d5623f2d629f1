"""The optimised EDITOR forward against a plain, direct implementation of the official computation.

The reference below is written from the spec (docs/official-behaviour.md#backbone, #sfts, #hma), independently of the
model code: three separate backbone passes (one per modality) with the attention maps taken by a manual attention
loop over the timm block weights; the full-matrix per-head rollout ``A_L ··· A_1``; the literal
frequency path with PyWavelets (4-level Haar DWT, mean of every band over the modalities, inverse
DWT, mean over colour channels, pixels > 0 per patch); HMA over all 1+N (stage 1) and 3(1+N)
(stage 2) tokens with the official masked attention (pairwise mask filled with -65504, row mask)
and masked MLP; CLS + masked mean (the official non-zero-row count) + per-modality REDUCE.

The model's optimisations it checks: the modalities as one batch, probabilities without the
maps in the autograd graph, the vector-matrix rollout chain, the last backbone block and HMA
computed on the kept tokens only, and (at inference) each attention map computed once.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import pywt
import torch
import torch.nn.functional as F

from editor_reid.config import load_config
from editor_reid.engine.solver import autocast_context
from editor_reid.losses import EditorCriterion
from editor_reid.engine.acceleration import maybe_compile
from editor_reid.model import build_model

MODS = ("RGB", "NI", "TI")
HEAD_KEEP, FREQUENCY_KEEP = 1, 4


def make_model(size, seed=0, **overrides):
    items = [
        "model.embed_dim=64",
        "model.depth=3",
        "model.num_heads=4",
        "model.drop_path=0.0",
        f"model.head_keep={HEAD_KEEP}",
        f"model.frequency_keep={FREQUENCY_KEEP}",
        f"input.size_train=[{size[0]},{size[1]}]",
        f"input.size_test=[{size[0]},{size[1]}]",
    ]
    items += [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config(None, items)
    torch.manual_seed(seed)
    model = build_model(cfg, num_classes=6, num_cameras=3)
    g = torch.Generator().manual_seed(seed + 100)
    # LayerNorm affine parameters off their constant init (docs/official-behaviour.md#quirk-patch-mean-divisor)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1.0 + 0.2 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=g))
    return cfg, model


# ------------------------------------------------------------------------- direct reference


def ref_backbone(bb, images, cams):
    """One modality through the ViT, attention written out: (tokens [B, L, D], maps [B, h, L, L])."""
    vit = bb.vit
    x = F.conv2d(images, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([vit.cls_token.expand(len(x), -1, -1), x], dim=1) + vit.pos_embed
    x = x + bb.sie_coe * bb.sie_embed[cams]
    maps = []
    for blk in vit.blocks:
        b, n, d = x.shape
        heads = blk.attn.num_heads
        h = F.layer_norm(x, (d,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        qkv = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) / (d // heads) ** 0.5, dim=-1)
        maps.append(attn)
        x = x + F.linear((attn @ qkv[2]).transpose(1, 2).reshape(b, n, d), blk.attn.proj.weight, blk.attn.proj.bias)
        h = F.layer_norm(x, (d,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        x = x + F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return F.layer_norm(x, (x.shape[-1],), vit.norm.weight, vit.norm.bias, vit.norm.eps), maps


def ref_rollout(maps):
    """Per-head full-matrix product A_L ··· A_1, CLS row without the CLS column: [B, h, N]."""
    product = maps[0]
    for a in maps[1:]:
        product = a @ product
    return product[:, :, 0, 1:]


def ref_frequency_scores(images, patch=16):
    """Official Frequency.py path with PyWavelets: DWT per modality, band means, IDWT, > 0 counts."""
    coeffs = [pywt.wavedec2(img.double().numpy(), "haar", mode="zero", level=4, axes=(-2, -1)) for img in images]
    mean = [np.mean([c[0] for c in coeffs], axis=0)]
    for level in range(1, 5):
        mean.append(tuple(np.mean([c[level][band] for c in coeffs], axis=0) for band in range(3)))
    image = pywt.waverec2(mean, "haar", mode="zero", axes=(-2, -1)).mean(axis=1)  # [B, H, W]
    b, h, w = image.shape
    bright = (image > 0).reshape(b, h // patch, patch, w // patch, patch).sum(axis=(2, 4))
    return torch.from_numpy(bright.reshape(b, -1).astype(np.float32))


def ref_topk_mask(scores, k):
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)


def ref_attention(attn, x, m):
    """Official AttentionMask: x⊙m, no biases, pairwise mask filled with -65504, row mask."""
    b, n, d = x.shape
    x = x * m
    qkv = F.linear(x, attn.qkv.weight).reshape(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
    scores = (qkv[0] @ qkv[1].transpose(-2, -1)) * attn.scale
    scores = scores.masked_fill((m @ m.transpose(1, 2)).unsqueeze(1) == 0, -65504.0)
    probs = scores.softmax(dim=-1) * m.unsqueeze(1)
    return F.linear((probs @ qkv[2]).transpose(1, 2).reshape(b, n, d), attn.proj.weight)


def ref_block(block, x, m):
    x = x + ref_attention(block.attn, block.norm1(x), m)
    h = block.norm2(x) * m
    return x + F.linear(F.gelu(F.linear(h, block.mlp.fc1.weight)), block.mlp.fc2.weight)


def ref_editor(model, images, cams):
    """Direct official computation: (feature [B, 3D], mask [B, N], tokens per modality, stage-1 CLS)."""
    tokens, rollouts = {}, []
    for m in MODS:  # three separate backbone passes
        tokens[m], maps = ref_backbone(model.backbone, images[m], cams)
        rollouts.append(ref_rollout(maps))
    spatial = torch.stack([ref_topk_mask(r, HEAD_KEEP).any(dim=1) for r in rollouts]).any(dim=0)
    frequency = ref_topk_mask(ref_frequency_scores([images[m] for m in MODS]), FREQUENCY_KEEP)
    mask = spatial | frequency
    hma = model.hma
    m1 = torch.cat([torch.ones(mask.shape[0], 1), mask.float()], dim=1).unsqueeze(-1)  # [B, L, 1]
    stage1 = [ref_block(hma.modal_blocks[m], tokens[m] * m1, m1) for m in MODS]
    m3 = m1.repeat(1, 3, 1)
    z = hma.out_norm(ref_block(hma.fusion_block, torch.cat(stage1, dim=1), m3)) * m3
    length = mask.shape[1] + 1
    parts = [z[:, i * length : (i + 1) * length] for i in range(3)]
    count = (parts[0][:, 1:].sum(dim=-1) != 0).sum(dim=1, keepdim=True).float()  # official divisor
    feats = [hma.reduce[m](torch.cat([p[:, 0], p[:, 1:].sum(dim=1) / count], dim=-1)) for m, p in zip(MODS, parts)]
    return torch.cat(feats, dim=-1), mask, tokens, {m: x[:, 0] for m, x in zip(MODS, stage1)}, rollouts, frequency


def clear_inputs(model, size, batch=3, first_seed=0):
    """Random inputs whose selections have no exact or near ties at the top-k boundaries.

    Ties are resolved by ``torch.topk`` in an implementation-defined way (docs/official-behaviour.md#known-quirks),
    so the inputs are drawn until every boundary has a clear gap: frequency counts differ, rollout
    scores differ by more than 1e-4 relative.
    """
    for seed in range(first_seed, first_seed + 50):
        g = torch.Generator().manual_seed(seed)
        images = {m: torch.randn(batch, 3, *size, generator=g) for m in MODS}
        cams = torch.arange(batch) % 3
        top = ref_frequency_scores([images[m] for m in MODS]).topk(FREQUENCY_KEEP + 1, dim=-1).values
        if torch.any(top[:, -2] == top[:, -1]):
            continue
        with torch.no_grad():
            ref = ref_editor(model, images, cams)
        rollouts = ref[4]
        gaps = [r.topk(HEAD_KEEP + 1, dim=-1).values for r in rollouts]
        if all(bool(((v[..., -2] - v[..., -1]) > 1e-4 * v[..., -2]).all()) for v in gaps):
            return images, cams, ref
    raise AssertionError("no tie-free inputs found")


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("size", [(128, 64), (64, 128)])
def test_eval_forward_equals_direct_official_computation(size):
    _, model = make_model(size)
    model.eval()
    images, cams, (feature, mask, _, _, _, _) = clear_inputs(model, size)
    assert 0 < int(mask.sum(dim=1).min()) and int(mask.sum(dim=1).max()) < mask.shape[1]  # a real selection
    with torch.no_grad():
        out = model.forward_features(images, cams)
    assert torch.equal(out.token_mask, mask)
    torch.testing.assert_close(out.feature, feature, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(model(images, cams), feature, atol=1e-5, rtol=1e-5)


def test_training_forward_equals_direct_official_computation():
    size = (128, 64)
    _, model = make_model(size, seed=1)
    images, cams, (feature, mask, tokens, cls, _, _) = clear_inputs(model, size, batch=3)
    model.train()
    out = model(images, cams)
    assert torch.equal(out.token_mask, mask)
    torch.testing.assert_close(out.fused_feat, feature, atol=1e-5, rtol=1e-5)
    for m in MODS:  # every backbone token is computed in training (BCC reads the background)
        torch.testing.assert_close(out.backbone_tokens[m], tokens[m], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.hma_cls[m], cls[m], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_backbone_maps_and_rollout_equal_the_manual_loop(grad):
    size = (64, 128)
    _, model = make_model(size, seed=2)
    model.eval()
    g = torch.Generator().manual_seed(5)
    images, cams = torch.randn(2, 3, *size, generator=g), torch.tensor([0, 2])
    tokens, maps = ref_backbone(model.backbone, images, cams)
    with torch.set_grad_enabled(grad):
        out = model.backbone(images, cams, return_attn=True)
        streamed = model.backbone(images, cams)
    for got, want in zip(out.attn, maps):
        assert not got.requires_grad
        torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)
    want_row = ref_rollout([a.detach() for a in maps])
    torch.testing.assert_close(out.rollout, want_row, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(streamed.rollout, want_row, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(out.tokens, tokens.detach(), atol=1e-5, rtol=1e-5)


def test_backbone_select_computes_only_kept_tokens_at_inference():
    size = (128, 64)
    _, model = make_model(size, seed=3)
    model.eval()
    g = torch.Generator().manual_seed(6)
    images, cams = torch.randn(3, 3, *size, generator=g), torch.tensor([0, 1, 2])
    seen = {}

    def select(row):
        seen["row"] = row
        keep = torch.zeros(row.shape[0], row.shape[2], dtype=torch.bool)
        keep[0, [1, 5, 6]] = True
        keep[2, 0] = True  # sample 1 keeps only its CLS token
        return keep

    with torch.no_grad():
        full = model.backbone(images, cams)
        out = model.backbone(images, cams, select=select)
    torch.testing.assert_close(seen["row"], full.rollout)
    keep_all = torch.cat([torch.ones(3, 1, dtype=torch.bool), out.keep], dim=1)
    torch.testing.assert_close(out.tokens[keep_all], full.tokens[keep_all], atol=1e-5, rtol=1e-5)
    assert torch.all(out.tokens[~keep_all] == 0)
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for kwargs in ({}, {"select": select}):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.backbone(images, cams, **kwargs)
        counts.append(counter.get_total_flops())
    assert counts[1] < counts[0]


def test_bf16_autocast_forward_and_backward_on_cpu():
    size = (128, 64)
    cfg, model = make_model(size, seed=4)
    criterion = EditorCriterion(cfg, 6, model.embed_dim)
    g = torch.Generator().manual_seed(7)
    images = {m: torch.randn(4, 3, *size, generator=g) for m in MODS}
    cams, targets = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 0, 1, 1])
    model.train()
    with autocast_context("cpu", "bf16"):
        out = model(images, cams)
        total, terms = criterion(out, targets)
    assert out.fused_feat.dtype == torch.bfloat16 and out.token_mask.dtype == torch.bool
    assert torch.isfinite(total) and all(torch.isfinite(t) for t in terms.values())
    total.backward()
    unused = ("backbone.fc.", "backbone_bn.", "backbone_head.")  # AL=1: the per-modality heads are idle
    grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith(unused)}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    model.eval()
    with torch.no_grad():
        reference = model(images, cams)
        with autocast_context("cpu", "bf16"):
            feature = model(images, cams)
    assert feature.shape == reference.shape and torch.isfinite(feature).all()
    cosine = F.cosine_similarity(feature.float(), reference, dim=1)
    assert torch.all(cosine > 0.98), cosine


def test_maybe_compile_keeps_the_eager_model_on_cpu(caplog):
    cfg, model = make_model((64, 32), **{"model.compile": "true"})
    with caplog.at_level(logging.INFO, logger="editor_reid.engine.acceleration"):
        assert maybe_compile(model, cfg) is model
    assert "eager" in caplog.text
    off, _ = make_model((64, 32))
    assert maybe_compile(model, off) is model
