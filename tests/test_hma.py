"""HMA: the compact (gathered) implementation against a direct official-style masked computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from editor_reid.model.hma import HMA, MaskedBlock, gather_kept_tokens

D, HEADS, N = 32, 4, 12


# ----------------------------------------------------------------------- direct reference
# (docs/official-behaviour.md#hma)


def ref_attention(attn, x, m):
    """Official AttentionMask: x⊙m, pairwise mask filled with -65504, row mask, proj (no biases)."""
    b, n, d = x.shape
    x = x * m
    qkv = F.linear(x, attn.qkv.weight).reshape(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = (q @ k.transpose(-2, -1)) * attn.scale
    pair = (m @ m.transpose(1, 2)).unsqueeze(1)  # [B, 1, L, L]
    scores = scores.masked_fill(pair == 0, -65504.0)
    probs = scores.softmax(dim=-1) * m.unsqueeze(1)  # row mask
    return F.linear((probs @ v).transpose(1, 2).reshape(b, n, d), attn.proj.weight)


def ref_mlp(mlp, x, m):
    x = x * m
    return F.linear(F.gelu(F.linear(x, mlp.fc1.weight)), mlp.fc2.weight)


def ref_block(block, x, m):
    x = x + ref_attention(block.attn, block.norm1(x), m)
    return x + ref_mlp(block.mlp, block.norm2(x), m)


def ref_hma(hma: HMA, tokens, mask):
    """Direct masked HMA over the full token sequences (official vit_pytorch.BlockMask + heads)."""
    m = torch.cat([torch.ones(mask.shape[0], 1), mask.float()], dim=1).unsqueeze(-1)  # [B, 1+N, 1]
    masked = [t * m for t in tokens]
    stage1 = [ref_block(hma.modal_blocks[name], x, m) for name, x in zip(hma.modalities, masked)]
    cls = {name: x[:, 0] for name, x in zip(hma.modalities, stage1)}
    m3 = m.repeat(1, len(tokens), 1)
    z = ref_block(hma.fusion_block, torch.cat(stage1, dim=1), m3)
    z = hma.out_norm(z) * m3
    count = mask.sum(dim=1, keepdim=True).float()
    feats = []
    for index, name in enumerate(hma.modalities):
        part = z[:, index * (N + 1) : (index + 1) * (N + 1)]
        feats.append(hma.reduce[name](torch.cat([part[:, 0], part[:, 1:].sum(1) / count], dim=-1)))
    return torch.cat(feats, dim=-1), cls, z


def make_hma(seed=0):
    torch.manual_seed(seed)
    hma = HMA(D, HEADS).eval()
    # move norms off their constant init so parity is meaningful (docs/official-behaviour.md#quirk-patch-mean-divisor)
    with torch.no_grad():
        for module in hma.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return hma


def random_inputs(seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(batch, N + 1, D, generator=g) for _ in range(3)]
    mask = torch.rand(batch, N, generator=g) < 0.4
    mask[0] = True  # one sample keeps everything, one keeps a single patch
    mask[1] = False
    mask[1, 5] = True
    return tokens, mask


# ------------------------------------------------------------------------------------------- tests


def test_efficient_hma_equals_direct_masked_computation():
    hma = make_hma()
    tokens, mask = random_inputs()
    out = hma(tokens, mask)
    feature, cls, _ = ref_hma(hma, tokens, mask)
    assert out.feature.shape == (4, 3 * D)
    torch.testing.assert_close(out.feature, feature, atol=1e-5, rtol=1e-5)
    for name in hma.modalities:
        torch.testing.assert_close(out.cls[name], cls[name], atol=1e-5, rtol=1e-5)


def test_all_tokens_kept_path_matches_reference():
    hma = make_hma(3)
    tokens, _ = random_inputs(4)
    mask = torch.ones(4, N, dtype=torch.bool)
    feature, _, _ = ref_hma(hma, tokens, mask)
    torch.testing.assert_close(hma(tokens, mask).feature, feature, atol=1e-5, rtol=1e-5)


def test_dropped_tokens_stay_zero_in_the_direct_computation_and_in_masked_blocks():
    hma = make_hma()
    tokens, mask = random_inputs()
    _, _, z = ref_hma(hma, tokens, mask)
    dropped = ~torch.cat([torch.ones(4, 1, dtype=torch.bool), mask], dim=1).repeat(1, 3)
    assert torch.all(z[dropped] == 0)
    # Our block on a full-length sequence keeps invalid rows exactly zero as well.
    block = hma.modal_blocks["RGB"]
    valid = torch.cat([torch.ones(4, 1, dtype=torch.bool), mask], dim=1)
    x = tokens[0] * valid.unsqueeze(-1)
    y = block(x, valid)
    assert torch.all(y[~valid] == 0)
    m = valid.unsqueeze(-1).float()
    torch.testing.assert_close(y, ref_block(block, x, m), atol=1e-5, rtol=1e-5)


def test_outputs_do_not_depend_on_dropped_positions():
    hma = make_hma()
    tokens, mask = random_inputs()
    base = hma(tokens, mask)
    keep = torch.cat([torch.ones(4, 1, dtype=torch.bool), mask], dim=1).unsqueeze(-1)
    noisy = [torch.where(keep, t, 100 * torch.randn_like(t)) for t in tokens]
    other = hma(noisy, mask)
    assert torch.equal(base.feature, other.feature)
    for name in hma.modalities:
        assert torch.equal(base.cls[name], other.cls[name])


def test_gather_kept_tokens_orders_cls_then_selected_patches():
    tokens = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1) + 1
    mask = torch.tensor([[False, True, False, True], [True, False, False, False]])
    compact, valid = gather_kept_tokens(tokens, mask)
    assert compact.shape == (2, 3, 1)
    assert compact[0, :, 0].tolist() == [1.0, 3.0, 5.0]
    assert compact[1, :, 0].tolist() == [6.0, 7.0, 0.0]
    assert valid.tolist() == [[True, True, True], [True, True, False]]


def test_structure_no_biases_eps_and_init():
    torch.manual_seed(0)
    hma = HMA(96, 4)
    for name, module in hma.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.startswith("reduce"):
            assert module.bias is None, name
        if isinstance(module, torch.nn.LayerNorm):
            assert module.eps == 1e-5
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    qkv = hma.modal_blocks["NI"].attn.qkv.weight.detach()
    # trunc_normal_(std=0.02) with the official absolute bounds [-2, 2]: in practice a normal.
    assert qkv.shape == (288, 96) and abs(float(qkv.std()) - 0.02) < 0.003
    reduce = hma.reduce["TI"]
    assert reduce.weight.shape == (96, 192) and torch.all(reduce.bias == 0)
    assert abs(float(reduce.weight.detach().std()) - (2 / 96) ** 0.5) < 0.02  # Kaiming normal, fan_out
    with pytest.raises(ValueError, match="hma_heads"):
        HMA(96, 5)


def test_gradients_flow_and_stay_finite_with_padding():
    hma = make_hma().train()
    tokens, mask = random_inputs()
    tokens = [t.requires_grad_() for t in tokens]
    out = hma(tokens, mask)
    (out.feature.sum() + sum(c.sum() for c in out.cls.values())).backward()
    for t in tokens:
        assert torch.isfinite(t.grad).all()
        dropped = ~torch.cat([torch.ones(4, 1, dtype=torch.bool), mask], dim=1)
        assert torch.all(t.grad[dropped] == 0)
    assert all(p.grad is not None for p in hma.parameters())


def test_empty_selection_averages_to_zero_patch_part():
    hma = make_hma()
    tokens, _ = random_inputs()
    mask = torch.zeros(4, N, dtype=torch.bool)
    out = hma(tokens, mask)
    assert torch.isfinite(out.feature).all()


def test_masked_block_with_all_valid_equals_unmasked_block():
    torch.manual_seed(0)
    block = MaskedBlock(D, HEADS)
    x = torch.randn(2, 7, D)
    valid = torch.ones(2, 7, dtype=torch.bool)
    torch.testing.assert_close(block(x, valid, all_valid=True), block(x, valid), atol=1e-6, rtol=1e-5)
