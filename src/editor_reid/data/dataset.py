"""The multi-modal dataset: reads a sample's images, applies the transform, fills absent modalities."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from editor_reid.data.layouts import Sample
from editor_reid.errors import EditorReidError
from editor_reid.modalities import MODALITIES, canonical_order, check_modalities

__all__ = ["BadImageError", "open_image", "to_rgb", "read_image", "read_sample_images", "MultiModalDataset"]

logger = logging.getLogger(__name__)


class BadImageError(EditorReidError, RuntimeError):
    """An image file is missing, does not decode, or has the wrong geometry."""

    def __init__(self, path: str, reason: str = "cannot be decoded"):
        super().__init__(f"image '{path}' {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # keep the path when the error crosses a DataLoader worker boundary
        return type(self), (self.path, self.reason)


# Modes whose ``convert("RGB")`` gives the right picture: 8-bit colour and grey, bilevel,
# palette, Pillow's formula colour spaces, and their alpha variants. Alpha is dropped (the
# stored colour is kept), exactly as the official reader's ``convert("RGB")`` does, so a model
# trained with the official code sees the same pixels.
_CONVERTIBLE = frozenset({"RGB", "RGBX", "RGBA", "RGBa", "L", "LA", "1", "P", "PA", "CMYK", "YCbCr", "HSV"})
# 16/32-bit integer and float greyscale. Pillow's ``convert`` clips these at 255, which turns a
# raw thermal frame (values in the thousands) all white, so they are stretched instead.
_HIGH_DEPTH = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def open_image(path: str) -> Image.Image:
    """Open and fully decode ``path`` in the file's own mode; close it with ``with``.

    Raises BadImageError naming the file when it is missing or does not decode (decoding is
    done here so a truncated JPEG fails now, not later inside a transform).
    """
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise BadImageError(path, "does not exist") from None
    except _DECODE_ERRORS as exc:
        raise BadImageError(path, f"cannot be decoded ({exc})") from None
    try:
        image.load()
    except _DECODE_ERRORS as exc:
        image.close()
        raise BadImageError(path, f"cannot be decoded ({exc})") from None
    return image


def _stretch_to_8bit(image: Image.Image) -> Image.Image:
    """A 16/32-bit or float grey image as "L", its own [min, max] mapped linearly onto [0, 255].

    The image's own range, not the type's: a thermal camera's raw counts fill a few thousand of
    the 65 536 levels, which the type's range would crush into a nearly flat, dark picture. This
    is the linear automatic gain control of thermal viewers. Non-finite floats take the nearest
    end of the range; a constant image becomes black.
    """
    values = np.asarray(image).astype(np.float64)  # [H, W]
    finite = np.isfinite(values)
    if not finite.any():
        return Image.new("L", image.size)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return Image.fromarray(np.rint((values - lo) * scale).astype(np.uint8))


def to_rgb(image: Image.Image, path: str) -> Image.Image:
    """``image`` as a new 8-bit RGB image; BadImageError naming ``path`` and the mode when its
    mode has no faithful conversion (for example "LAB", which Pillow converts as if it were RGB)."""
    mode = image.mode
    if mode in _HIGH_DEPTH:
        image = _stretch_to_8bit(image)
    elif mode == "La":
        image = image.convert("LA")  # Pillow has no direct La -> RGB path
    elif mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the route Pillow asks for; the colours are the same
    elif mode not in _CONVERTIBLE:
        raise BadImageError(
            path, f"has image mode '{mode}', which cannot be converted to 8-bit RGB; save it as RGB or greyscale"
        )
    return image.convert("RGB")


def read_image(path: str) -> Image.Image:
    """Fully decode ``path`` as 8-bit RGB (see :func:`to_rgb` for the modes); raise BadImageError on failure."""
    with open_image(path) as image:
        return to_rgb(image, path)


def read_sample_images(sample: Sample, modalities: Sequence[str] = MODALITIES) -> dict[str, Image.Image]:
    """The sample's images for those of ``modalities`` it has (a manifest row may lack some);
    strips (RGBNT100, RGBN300) are read once and cut by column, in the sample's strip order."""
    wanted = modalities
    modalities = [m for m in modalities if m in sample.paths]
    if not modalities:
        have = ", ".join(sample.paths) or "no modality"
        raise BadImageError(next(iter(sample.paths.values()), "(no file)"),
                            f"belongs to a sample with {have}, none of the modalities read ({', '.join(wanted)})")
    if sample.crop is None:
        return {m: read_image(sample.paths[m]) for m in modalities}
    strip_path = sample.paths[modalities[0]]
    strip = read_image(strip_path)
    width = sample.crop * len(sample.strip)
    if strip.width != width:
        raise BadImageError(strip_path, f"is {strip.width} wide; a {'|'.join(sample.strip)} strip must be {width} wide")
    out = {}
    for m in modalities:
        left, right = sample.strip_columns(m)
        out[m] = strip.crop((left, 0, right, strip.height))
    return out


class MultiModalDataset(Dataset):
    """Samples -> ``{<modality>: Tensor[3, H, W] for each of modalities, "pid", "camid", "sceneid", "index"}``.

    Only ``modalities`` are read, transformed and returned; the model stands in for the others
    (zero images after normalisation, see ``EDITOR``), so a missing modality is filled in one
    place. A file that does not decode raises
    BadImageError naming it. With ``skip_bad_images`` the sample is instead replaced by the
    next readable sample of the same identity and ``num_skipped`` is incremented (in the
    process that read it: with DataLoader workers, each worker keeps its own count; every skip
    is also logged as a warning naming the file). ``index`` is always the requested index;
    pid, camid and sceneid describe the images actually returned.

    ``reading`` (optional, set by the loader builders) is a shared-memory int64 tensor [W, 2]
    for W DataLoader workers: row ``w`` holds worker ``w``'s pid and the index of the sample it
    is reading, -1 between samples. A worker killed by a signal or ``os._exit`` leaves no
    Python error behind; the main process reads the row to name the sample it was reading.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[dict[str, Image.Image]], dict[str, torch.Tensor]],
        *,
        modalities: Sequence[str] = MODALITIES,
        skip_bad_images: bool = False,
        reading: torch.Tensor | None = None,
    ):
        problem = check_modalities(list(modalities))
        if problem:
            raise ValueError(f"modalities {list(modalities)}: {problem}")
        self.samples = list(samples)
        self.transform = transform
        # The canonical order for the output keys; a strip's columns follow ``Sample.strip``.
        self.modalities = canonical_order(modalities)
        self.skip_bad_images = skip_bad_images
        self.num_skipped = 0
        self.reading = reading
        self._row = None  # set in each worker process on its first sample
        self._by_pid: dict[int, list[int]] = defaultdict(list)
        for i, s in enumerate(self.samples):
            self._by_pid[s.pid].append(i)

    def __len__(self) -> int:
        return len(self.samples)

    def _mark(self, index: int) -> None:
        """Record in ``reading`` the sample this worker now reads (-1: none); under a microsecond."""
        if self.reading is None:
            return
        if self._row is None:
            info = get_worker_info()
            if info is None:
                return  # the main process: an error there surfaces by itself
            # This worker's row as a NumPy view of the shared table: a write costs nanoseconds.
            self._row = self.reading[info.id].numpy()
            self._row[0] = os.getpid()
        self._row[1] = index

    def _load(self, index: int) -> dict[str, torch.Tensor]:
        self._mark(index)  # a replacement candidate is marked too: its files may be the culprit
        return self.transform(read_sample_images(self.samples[index], self.modalities))

    def _load_replacement(self, index: int, error: BadImageError) -> tuple[int, dict[str, torch.Tensor]]:
        """The next readable sample of the same pid, trying each candidate at most once."""
        same = self._by_pid[self.samples[index].pid]
        start = same.index(index)
        for candidate in same[start + 1 :] + same[:start]:
            try:
                images = self._load(candidate)
            except BadImageError as exc:
                logger.warning("skipping unreadable sample %d: %s", candidate, exc)
                continue
            return candidate, images
        raise BadImageError(error.path, f"{error.reason}, and no other image of pid {self.samples[index].pid} is readable")

    def __getitem__(self, index: int) -> dict:
        source = index
        try:
            images = self._load(index)
        except BadImageError as exc:
            if not self.skip_bad_images:
                raise
            self.num_skipped += 1
            logger.warning("skipping unreadable sample %d: %s", index, exc)
            source, images = self._load_replacement(index, exc)
        finally:
            # A worker that dies after this (collating, sending) must not blame the sample.
            self._mark(-1)
        # The camera/scene of the image actually returned (the SIE embedding depends on it).
        sample = self.samples[source]
        return {**images, "pid": sample.pid, "camid": sample.camid, "sceneid": sample.sceneid, "index": index}
