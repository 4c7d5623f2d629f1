"""Train/test transforms, pixel-mode random erasing, independent vs synchronized modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from editor_reid.config import load_config
from editor_reid.data.transforms import MultiModalTransform, RandomErasingPixel, build_transforms

SIZE = [32, 16]


def _cfg(*overrides):
    return load_config(None, overrides=[f"input.size_train={SIZE}", f"input.size_test={SIZE}", *overrides])


def _random_image(seed=0, size=(20, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _triplet(image):
    return {"RGB": image, "NI": image.copy(), "TI": image.copy()}


def test_test_transform_is_bilinear_resize_and_normalise():
    image = _random_image()
    out = build_transforms(_cfg(), is_train=False)(_triplet(image))
    expected = F.normalize(F.to_tensor(F.resize(image, SIZE, interpolation=InterpolationMode.BILINEAR)), [0.5] * 3, [0.5] * 3)
    assert set(out) == {"RGB", "NI", "TI"}
    for tensor in out.values():
        assert tensor.shape == (3, *SIZE)
        assert torch.equal(tensor, expected)


def test_train_pipeline_order_without_randomness():
    """flip p=0, erasing off: output = centre-free crop of the padded bicubic resize."""
    image = _random_image(1)
    transform = build_transforms(_cfg("input.prob=0.0", "input.re_prob=0.0"), is_train=True)
    torch.manual_seed(0)
    params = transform.sample_params()
    assert not params.flip and params.erase_box is None
    assert 0 <= params.crop_top <= 20 and 0 <= params.crop_left <= 20
    resized = F.resize(image, SIZE, interpolation=InterpolationMode.BICUBIC)
    padded = F.pad(resized, 10, fill=0)
    expected = F.normalize(F.to_tensor(F.crop(padded, params.crop_top, params.crop_left, *SIZE)), [0.5] * 3, [0.5] * 3)
    assert torch.equal(transform.apply(image, params), expected)


def test_synchronized_geometry_is_shared():
    transform = build_transforms(_cfg("input.aug_mode=synchronized", "input.re_prob=0.0"), is_train=True)
    image = _random_image(2)
    flipped_seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = transform(_triplet(image))
        assert torch.equal(out["RGB"], out["NI"]) and torch.equal(out["RGB"], out["TI"])
        torch.manual_seed(seed)
        flipped_seen.add(transform.sample_params().flip)
    assert flipped_seen == {True, False}  # the shared draw really is random


def test_independent_draws_differ_across_modalities():
    transform = build_transforms(_cfg("input.aug_mode=independent", "input.re_prob=0.0"), is_train=True)
    image = _random_image(3)
    differing = 0
    for seed in range(10):
        torch.manual_seed(seed)
        out = transform(_triplet(image))
        differing += not (torch.equal(out["RGB"], out["NI"]) and torch.equal(out["RGB"], out["TI"]))
    assert differing >= 8


def _erased_region(tensor, background):
    """Where the output is neither the constant image nor the zero padding (-1 after normalising)."""
    return ((tensor - background).abs() > 1e-6) & ((tensor + 1).abs() > 1e-6)


def test_synchronized_erasing_shares_the_box_not_the_noise():
    transform = build_transforms(_cfg("input.aug_mode=synchronized", "input.re_prob=1.0"), is_train=True)
    grey = Image.new("RGB", (16, 32), (128, 128, 128))
    background = (128 / 255 - 0.5) / 0.5
    for seed in range(10):
        torch.manual_seed(seed)
        out = transform(_triplet(grey))
        regions = [_erased_region(out[m], background) for m in ("RGB", "NI", "TI")]
        assert regions[0].any()
        assert torch.equal(regions[0], regions[1]) and torch.equal(regions[0], regions[2])
        assert not torch.equal(out["RGB"], out["NI"])  # each modality has its own noise


def test_independent_erasing_boxes_differ():
    transform = build_transforms(_cfg("input.aug_mode=independent", "input.re_prob=1.0"), is_train=True)
    grey = Image.new("RGB", (16, 32), (128, 128, 128))
    background = (128 / 255 - 0.5) / 0.5
    torch.manual_seed(0)
    out = transform(_triplet(grey))
    regions = [_erased_region(out[m], background) for m in ("RGB", "NI", "TI")]
    assert not (torch.equal(regions[0], regions[1]) and torch.equal(regions[0], regions[2]))


def test_random_erasing_box_statistics():
    erasing = RandomErasingPixel(probability=1.0)
    torch.manual_seed(0)
    h, w = 256, 128
    boxes = [erasing.sample_box(h, w) for _ in range(300)]
    boxes = [b for b in boxes if b is not None]
    assert len(boxes) > 250  # most draws fit within 10 tries
    for top, left, bh, bw in boxes:
        assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w
        area = bh * bw / (h * w)
        assert 0.015 < area < 0.36
        assert 0.25 < bh / bw < 4.0
    assert RandomErasingPixel(probability=0.0).sample_box(h, w) is None


def test_random_erasing_fills_standard_normal_noise():
    torch.manual_seed(1)
    tensor = torch.full((3, 400, 400), 5.0)
    out = RandomErasingPixel(probability=1.0, min_area=0.3, max_area=0.3)(tensor)
    noise = out[out != 5.0]
    assert noise.numel() > 0.25 * tensor.numel()
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1.0) < 0.02
    assert torch.equal(tensor, torch.full((3, 400, 400), 5.0))  # the input is not modified


def test_erasing_probability():
    erasing = RandomErasingPixel(probability=0.5)
    torch.manual_seed(2)
    erased = sum(erasing.sample_box(256, 128) is not None for _ in range(1000))
    assert 420 < erased < 580


def test_only_given_modalities_are_transformed():
    out = build_transforms(_cfg(), is_train=True)({"NI": _random_image()})
    assert set(out) == {"NI"} and out["NI"].shape == (3, *SIZE)


def test_invalid_mode():
    with pytest.raises(ValueError, match="aug_mode"):
        MultiModalTransform(SIZE, is_train=True, mode="shared")


def test_erasing_aspect_is_log_uniform():
    # timm's draw: log(h / w) uniform on [log 0.3, -log 0.3]. A uniform aspect on [0.3, 1 / 0.3]
    # (older ReID code) would put the mean log aspect near 0.44 and most boxes in the top third.
    erasing = RandomErasingPixel(probability=1.0, min_area=0.01, max_area=0.05)
    torch.manual_seed(3)
    boxes = [erasing.sample_box(1000, 1000) for _ in range(3000)]  # every such box fits at once
    log_aspect = np.array([math.log(bh / bw) for _, _, bh, bw in boxes])
    bound = -math.log(0.3)
    assert abs(log_aspect.mean()) < 0.03
    assert -bound - 0.01 < log_aspect.min() and log_aspect.max() < bound + 0.01
    thirds = np.histogram(log_aspect, bins=3, range=(-bound, bound))[0] / len(boxes)
    assert np.abs(thirds - 1 / 3).max() < 0.03
