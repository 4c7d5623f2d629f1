"""Image transforms for multi-modal samples (docs/official-behaviour.md#augmentation).

Train: Resize (bicubic) -> horizontal flip (p = ``input.prob``) -> Pad (zeros) -> RandomCrop
-> ToTensor -> Normalize -> RandomErasing in pixel mode (p = ``input.re_prob``).
Test: Resize (bilinear, the official default) -> ToTensor -> Normalize.

``input.aug_mode`` chooses how the three modalities draw their randomness:

- ``independent`` (official): each modality draws its own flip, crop offset and erasing box,
  so a training triplet is spatially misaligned (docs/official-behaviour.md#quirk-unsynchronised-augmentation);
- ``synchronized``: one draw of flip, crop offset and erasing box is shared by all modalities,
  keeping same-position tokens aligned for the shared token mask and BCC. The noise that
  fills the erased box is still drawn per modality; only the geometry is shared.

Random numbers come from torch's global generator, which the DataLoader seeds per worker.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

__all__ = ["RandomErasingPixel", "MultiModalTransform", "AugmentParams", "build_transforms"]


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive, like ``random.randint``)."""
    return int(torch.randint(low, high + 1, ()).item())


class RandomErasingPixel:
    """Random erasing that fills one box with per-pixel, per-channel N(0, 1) noise.

    The timm "pixel" mode used by the official code: with probability ``probability`` try up
    to ``max_tries`` times to place a box whose area is a uniform fraction of the image in
    [min_area, max_area] and whose aspect ratio is log-uniform in [min_aspect, 1/min_aspect];
    keep the first box that fits. Works on normalised tensors, so noise matches their scale.
    """

    def __init__(self, probability=0.5, min_area=0.02, max_area=1 / 3, min_aspect=0.3, max_tries=10):
        self.probability = probability
        self.min_area = min_area
        self.max_area = max_area
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.max_tries = max_tries

    def sample_box(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """Draw (top, left, h, w) of the box, or None when this image is not erased."""
        if torch.rand(()).item() >= self.probability:
            return None
        area = height * width
        for _ in range(self.max_tries):
            target = _uniform(self.min_area, self.max_area) * area
            aspect = math.exp(_uniform(*self.log_aspect))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if 0 < h < height and 0 < w < width:
                return _randint(0, height - h), _randint(0, width - w), h, w
        return None

    @staticmethod
    def apply(tensor: torch.Tensor, box: tuple[int, int, int, int] | None) -> torch.Tensor:
        if box is None:
            return tensor
        top, left, h, w = box
        out = tensor.clone()
        out[:, top : top + h, left : left + w] = torch.randn((tensor.shape[0], h, w), dtype=tensor.dtype)
        return out

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:  # [C, H, W]
        return self.apply(tensor, self.sample_box(tensor.shape[-2], tensor.shape[-1]))


@dataclass(frozen=True)
class AugmentParams:
    """One geometric draw: whether to flip, where to crop, which box to erase."""

    flip: bool
    crop_top: int
    crop_left: int
    erase_box: tuple[int, int, int, int] | None


class MultiModalTransform:
    """Callable on ``{modality: PIL.Image}`` returning ``{modality: Tensor[3, H, W]}``."""

    def __init__(
        self,
        size: tuple[int, int],
        *,
        is_train: bool,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        flip_prob: float = 0.5,
        padding: int = 10,
        erasing: RandomErasingPixel | None = None,
        mode: str = "independent",
    ):
        if mode not in ("independent", "synchronized"):
            raise ValueError(f"aug_mode must be 'independent' or 'synchronized', got {mode!r}")
        self.size = (int(size[0]), int(size[1]))
        self.is_train = is_train
        self.mean, self.std = list(mean), list(std)
        self.flip_prob = flip_prob
        self.padding = padding
        self.erasing = erasing
        self.mode = mode

    def sample_params(self) -> AugmentParams:
        h, w = self.size
        flip = torch.rand(()).item() < self.flip_prob
        top = _randint(0, 2 * self.padding)  # the padded image is exactly 2*padding larger
        left = _randint(0, 2 * self.padding)
        box = self.erasing.sample_box(h, w) if self.erasing is not None else None
        return AugmentParams(flip, top, left, box)

    def _to_normalised(self, image: Image.Image) -> torch.Tensor:
        return F.normalize(F.to_tensor(image), self.mean, self.std)

    def apply(self, image: Image.Image, params: AugmentParams) -> torch.Tensor:
        """The train pipeline on one image with a given draw."""
        image = F.resize(image, list(self.size), interpolation=InterpolationMode.BICUBIC)
        if params.flip:
            image = F.hflip(image)
        if self.padding:
            image = F.pad(image, self.padding, fill=0)
        image = F.crop(image, params.crop_top, params.crop_left, *self.size)
        return RandomErasingPixel.apply(self._to_normalised(image), params.erase_box)

    def __call__(self, images: Mapping[str, Image.Image]) -> dict[str, torch.Tensor]:
        if not self.is_train:
            return {
                m: self._to_normalised(F.resize(img, list(self.size), interpolation=InterpolationMode.BILINEAR))
                for m, img in images.items()
            }
        if self.mode == "synchronized":
            shared = self.sample_params()
            return {m: self.apply(img, shared) for m, img in images.items()}
        return {m: self.apply(img, self.sample_params()) for m, img in images.items()}


def build_transforms(cfg, is_train: bool) -> MultiModalTransform:
    """The train or test transform of ``cfg.input`` (sizes, flip/erasing probabilities, mode)."""
    inp = cfg.input
    if not is_train:
        return MultiModalTransform(inp.size_test, is_train=False, mean=inp.pixel_mean, std=inp.pixel_std)
    erasing = RandomErasingPixel(probability=inp.re_prob) if inp.re_prob > 0 else None
    return MultiModalTransform(
        inp.size_train,
        is_train=True,
        mean=inp.pixel_mean,
        std=inp.pixel_std,
        flip_prob=inp.prob,
        padding=inp.padding,
        erasing=erasing,
        mode=inp.aug_mode,
    )
