"""Pictures of SFTS's token selection and how much of it lands on the object (PIL only).

The selected-token mask M_U is shared by the three modalities (docs/official-behaviour.md#sfts-union), so one mask is
drawn over the RGB, NI and TI images of a sample: selected patches at full brightness with a thin
outline, unselected patches dimmed, as in the paper's token-selection figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = [
    "OBJECT_PATCH_THRESHOLD",
    "tensor_to_image",
    "highlight_tokens",
    "mask_at_size",
    "patch_object_fraction",
    "token_object_overlap",
    "render_token_selection",
]

# A patch counts as "object" when at least half of its pixels belong to the object mask.
OBJECT_PATCH_THRESHOLD = 0.5

_DIM = 0.35  # brightness kept by unselected patches
_OUTLINE = (255, 215, 0)  # selected-patch outline (gold)


def tensor_to_image(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Undo Normalize on a [3, H, W] tensor and return an RGB PIL image."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = (x.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))


def mask_at_size(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A bool [h, w] object mask resized (nearest) to ``size`` = (H, W), the model's input."""
    h, w = size
    if mask.shape == (h, w):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127


def patch_object_fraction(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of object pixels in every patch, row-major like the ViT tokens: [gh * gw].

    ``mask`` is a bool [H, W] object mask at the model's input resolution; H and W must be
    multiples of the grid.
    """
    gh, gw = grid
    h, w = mask.shape
    if h % gh or w % gw:
        raise ValueError(f"mask of size {h}x{w} does not split into a {gh}x{gw} patch grid")
    ph, pw = h // gh, w // gw
    return mask.astype(np.float64).reshape(gh, ph, gw, pw).mean(axis=(1, 3)).reshape(-1)


def token_object_overlap(selected: np.ndarray, on_object: np.ndarray, seed: int) -> dict[str, float]:
    """How many selected tokens fall on the object, against as many random tokens per image.

    ``selected`` and ``on_object`` are bool [S, N] (S images, N patches). For each image the
    random baseline draws ``selected[i].sum()`` distinct patches uniformly (seeded).
    """
    selected = np.asarray(selected, dtype=bool)
    on_object = np.asarray(on_object, dtype=bool)
    if selected.shape != on_object.shape:
        raise ValueError(f"selected {selected.shape} and on_object {on_object.shape} differ in shape")
    rng = np.random.default_rng(seed)
    random_hits = 0
    for row_obj, count in zip(on_object, selected.sum(axis=1)):
        picks = rng.choice(row_obj.size, size=int(count), replace=False)
        random_hits += int(row_obj[picks].sum())
    total = int(selected.sum())
    return {
        "selected_on_object": float((selected & on_object).sum() / max(total, 1)),
        "random_on_object": float(random_hits / max(total, 1)),
        "object_patch_fraction": float(on_object.mean()) if on_object.size else 0.0,
        "selected_per_image": float(selected.sum(axis=1).mean()) if len(selected) else 0.0,
        "patches_per_image": int(selected.shape[1]) if selected.ndim == 2 else 0,
        "images": int(len(selected)),
    }


def highlight_tokens(image: Image.Image, keep: np.ndarray, grid: tuple[int, int], scale: int = 1) -> Image.Image:
    """``image`` enlarged ``scale`` times with the kept patches (bool [gh * gw]) bright and
    outlined, the others dimmed."""
    gh, gw = grid
    w, h = image.size
    image = image.resize((w * scale, h * scale), Image.NEAREST)
    ph, pw = h * scale // gh, w * scale // gw
    dim_mask = np.repeat(np.repeat((~keep.reshape(gh, gw)).astype(np.float32), ph, 0), pw, 1)[..., None]
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels * (1.0 - dim_mask * (1.0 - _DIM))
    out = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for index in np.flatnonzero(keep):
        r, c = divmod(int(index), gw)
        draw.rectangle([c * pw, r * ph, (c + 1) * pw - 1, (r + 1) * ph - 1], outline=_OUTLINE, width=1)
    return out


def render_token_selection(samples: Sequence[dict[str, Image.Image]], masks: Sequence[np.ndarray],
                           grid: tuple[int, int], out_path: str | Path, *, titles: Sequence[str] | None = None,
                           scale: int = 2) -> Path:
    """Draw one row per sample: its modalities side by side with the selected tokens highlighted.

    ``samples``: per sample a dict modality -> PIL image at the model's input size;
    ``masks``: per sample the bool [gh * gw] selected-token mask. Writes a PNG and returns its path.
    """
    if len(samples) != len(masks) or not samples:
        raise ValueError(f"render_token_selection: {len(samples)} samples but {len(masks)} masks")
    modalities = list(samples[0])
    w, h = samples[0][modalities[0]].size
    cell_w, cell_h = w * scale, h * scale
    gap, label_h, title_w = 6, 16, 0 if titles is None else 72
    width = title_w + len(modalities) * (cell_w + gap) + gap
    height = label_h + len(samples) * (cell_h + gap) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, modality in enumerate(modalities):
        draw.text((title_w + gap + j * (cell_w + gap) + cell_w // 2 - 8, 2), modality, fill=(0, 0, 0))
    for i, (images, keep) in enumerate(zip(samples, masks)):
        y = label_h + gap + i * (cell_h + gap)
        keep = np.asarray(keep, dtype=bool).reshape(-1)
        if titles is not None:
            draw.multiline_text((4, y + cell_h // 2 - 12), titles[i], fill=(0, 0, 0))
        for j, modality in enumerate(modalities):
            canvas.paste(highlight_tokens(images[modality].convert("RGB"), keep, grid, scale),
                         (title_w + gap + j * (cell_w + gap), y))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path)
    return out_path
