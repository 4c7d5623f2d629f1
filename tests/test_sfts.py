"""SFTS: Haar DWT, frequency scores (official and highpass), spatial rollout selection, masking."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch

from editor_reid.model.backbone import rollout_cls_row
from editor_reid.model.sfts import (
    SFTS,
    apply_token_mask,
    frequency_mask,
    frequency_scores,
    haar_dwt2,
    haar_idwt2,
    select_tokens,
    spatial_mask,
    topk_mask,
)


@pytest.mark.parametrize("shape", [(2, 3, 256, 128), (1, 3, 128, 256), (1, 2, 37, 22)])
def test_haar_dwt_matches_pywavelets(shape):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    low, highs = haar_dwt2(x, 4)
    ref = pywt.wavedec2(x.numpy(), "haar", mode="zero", level=4, axes=(-2, -1))
    np.testing.assert_allclose(low.numpy(), ref[0], atol=1e-12)
    for level in range(1, 5):  # ref[-level] holds (cH, cV, cD) of level `level`
        np.testing.assert_allclose(highs[level - 1].numpy(), np.stack(ref[-level], axis=-3), atol=1e-12)
    back = haar_idwt2(low, highs, size=shape[-2:])
    torch.testing.assert_close(back, x, atol=1e-12, rtol=0)
    rec = pywt.waverec2(ref, "haar", mode="zero", axes=(-2, -1))
    np.testing.assert_allclose(haar_idwt2(low, highs).numpy(), rec, atol=1e-12)


@pytest.mark.parametrize("size", [(256, 128), (128, 256)])
def test_official_frequency_path_equals_pixel_mean_shortcut(size):
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(4, 3, *size, generator=g) for _ in range(3)]
    stack = torch.stack(images)
    low, highs = haar_dwt2(stack, 4)
    rebuilt = haar_idwt2(low.mean(0), [h.mean(0) for h in highs], size=size)
    torch.testing.assert_close(rebuilt, stack.mean(0), atol=1e-5, rtol=0)
    official = frequency_scores(images, 16, mode="official")
    shortcut = frequency_scores(images, 16, mode="official", shortcut=True)
    torch.testing.assert_close(official, shortcut, atol=0, rtol=0)
    assert official.shape == (4, (size[0] // 16) * (size[1] // 16))
    assert float(official.min()) >= 0 and float(official.max()) <= 256


def test_frequency_score_counts_bright_pixels_per_patch_row_major():
    images = [torch.full((1, 3, 32, 48), -1.0) for _ in range(3)]  # grid 2 x 3
    images[0][0, :, 0:16, 32:48] = 3.0  # patch 2: mean 1/3 > 0 everywhere -> 256
    images[1][0, :, 16:32, 0:8] = 5.0  # patch 3: left half mean (5-1-1)/3 > 0 -> 128
    images[2][0, :, 16:20, 16:32] = 4.0  # patch 4: 4 rows of 16 -> 64
    scores = frequency_scores(images, 16)
    assert scores.tolist() == [[0.0, 0.0, 256.0, 128.0, 64.0, 0.0]]
    assert frequency_mask(images, 2, 16)[0].tolist() == [False, False, True, True, False, False]


def test_highpass_scores_follow_the_documented_formula():
    g = torch.Generator().manual_seed(2)
    images = [torch.randn(2, 3, 64, 32, generator=g, dtype=torch.float64) for _ in range(3)]
    scores = frequency_scores(images, 16, mode="highpass")
    mean = torch.stack(images).mean(0).numpy()
    coeffs = pywt.wavedec2(mean, "haar", mode="zero", level=4, axes=(-2, -1))
    want = np.zeros((2, 4, 2))
    for level in range(1, 5):
        step = 16 // 2**level
        energy = sum(c**2 for c in coeffs[-level]).sum(axis=1)  # over bands and colour channels
        for r in range(4):
            for c in range(2):
                want[:, r, c] += energy[:, r * step : (r + 1) * step, c * step : (c + 1) * step].sum(axis=(-2, -1))
    np.testing.assert_allclose(scores.numpy(), want.reshape(2, 8), rtol=1e-5)


def test_highpass_prefers_textured_patches_over_flat_bright_ones():
    image = torch.zeros(1, 3, 32, 32)
    image[..., :16, :16] = 1.0  # flat and bright: the official count likes it, no high frequencies
    checker = (torch.arange(16).view(-1, 1) + torch.arange(16).view(1, -1)) % 2
    image[..., 16:, 16:] = checker.float() * 2 - 1  # texture
    images = [image] * 3
    assert frequency_mask(images, 1, 16, mode="highpass")[0].tolist() == [False, False, False, True]
    assert frequency_mask(images, 1, 16, mode="official")[0].tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="frequency_mode"):
        frequency_scores(images, 16, mode="lowpass")


def test_spatial_mask_on_hand_built_attention_maps():
    n = 6  # patches; token 0 is CLS
    eye = torch.eye(n + 1).expand(1, 2, n + 1, n + 1)
    first = eye.clone()
    first[0, 0, 0] = torch.tensor([0.0, 0.4, 0.05, 0.3, 0.05, 0.1, 0.1])  # head 0 -> patches 0, 2
    first[0, 1, 0] = torch.tensor([0.1, 0.0, 0.0, 0.0, 0.5, 0.1, 0.3])  # head 1 -> patches 3, 5
    # A_2 = identity, A_1 = first: the CLS row of A_2·A_1 is first's CLS row.
    row = rollout_cls_row([first, eye])
    torch.testing.assert_close(row, first[:, :, 0, 1:])
    mask = spatial_mask([row], head_keep=2)
    assert mask[0].tolist() == [True, False, True, True, False, True]
    # A second modality adds its own picks (union over modalities).
    other = torch.zeros(1, 2, n)
    other[0, :, 1] = 1.0
    other[0, 1, 4] = 0.5
    mask = spatial_mask([row, other], head_keep=2)
    assert mask[0].tolist() == [True, True, True, True, True, True]
    assert spatial_mask([row], head_keep=1)[0].tolist() == [True, False, False, True, False, False]
    assert not spatial_mask([row], head_keep=0).any()


def test_cls_rollout_chain_equals_full_matrix_product():
    g = torch.Generator().manual_seed(3)
    maps = [torch.softmax(torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64), dim=-1) for _ in range(5)]
    full = maps[0]
    for a in maps[1:]:
        full = a @ full  # A_5 A_4 A_3 A_2 A_1
    torch.testing.assert_close(rollout_cls_row(maps), full[:, :, 0, 1:], atol=1e-12, rtol=0)
    # The product is row-stochastic; no residual term, no renormalisation.
    torch.testing.assert_close(full.sum(-1), torch.ones(2, 3, 9, dtype=torch.float64))


def test_topk_mask_bounds():
    scores = torch.tensor([[3.0, 1.0, 2.0]])
    assert topk_mask(scores, 2)[0].tolist() == [True, False, True]
    assert topk_mask(scores, 10).all() and not topk_mask(scores, 0).any()


def test_select_tokens_is_the_union_and_masking_keeps_cls():
    g = torch.Generator().manual_seed(4)
    images = [torch.randn(2, 3, 64, 32, generator=g) for _ in range(3)]
    rollouts = [torch.rand(2, 4, 8, generator=g) for _ in range(3)]
    mask = select_tokens(rollouts, images, head_keep=1, frequency_keep=2)
    assert torch.equal(mask, spatial_mask(rollouts, 1) | frequency_mask(images, 2, 16))
    assert torch.equal(SFTS(1, 2)(rollouts, images), mask)
    assert mask.dtype == torch.bool and not mask.requires_grad

    tokens = torch.randn(2, 9, 5, requires_grad=True)
    masked = apply_token_mask(tokens, mask)
    torch.testing.assert_close(masked[:, 0], tokens[:, 0])
    assert torch.all(masked[:, 1:][~mask] == 0)
    torch.testing.assert_close(masked[:, 1:][mask], tokens[:, 1:][mask])
    masked.sum().backward()  # gradient reaches kept tokens only, never the selection
    assert torch.all(tokens.grad[:, 1:][~mask] == 0) and torch.all(tokens.grad[:, 0] == 1)


def test_selection_has_no_gradient_path_from_scores():
    images = [torch.randn(1, 3, 32, 32, requires_grad=True) for _ in range(3)]
    rollouts = [torch.rand(1, 2, 4, requires_grad=True) for _ in range(3)]
    mask = select_tokens(rollouts, images, head_keep=1, frequency_keep=1)
    assert mask.grad_fn is None
