"""The multi-modal dataset: reads a sample's images, applies the transform, fills absent modalities."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from editor_reid.data.layouts import Sample
from editor_reid.errors import EditorReidError
from editor_reid.modalities import MODALITIES

__all__ = ["BadImageError", "read_image", "read_sample_images", "MultiModalDataset"]

logger = logging.getLogger(__name__)


class BadImageError(EditorReidError, RuntimeError):
    """An image file is missing, does not decode, or has the wrong geometry."""

    def __init__(self, path: str, reason: str = "cannot be decoded"):
        super().__init__(f"image '{path}' {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # keep the path when the error crosses a DataLoader worker boundary
        return type(self), (self.path, self.reason)


def read_image(path: str) -> Image.Image:
    """Fully decode ``path`` as RGB (files may be grey or palette); raise BadImageError on failure."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated JPEG fails here, not later inside a transform
            return img.convert("RGB")
    except FileNotFoundError:
        raise BadImageError(path, "does not exist") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImageError(path, f"cannot be decoded ({exc})") from None


def read_sample_images(sample: Sample, modalities: Sequence[str] = MODALITIES) -> dict[str, Image.Image]:
    """The sample's images for ``modalities``; RGBNT100 strips are read once and cut by column."""
    if sample.crop is None:
        return {m: read_image(sample.paths[m]) for m in modalities}
    strip_path = sample.paths[modalities[0]]
    strip = read_image(strip_path)
    width = sample.crop * len(MODALITIES)
    if strip.width != width:
        raise BadImageError(strip_path, f"is {strip.width} wide; a R|N|T strip must be {width} wide")
    out = {}
    for m in modalities:
        i = MODALITIES.index(m)
        out[m] = strip.crop((i * sample.crop, 0, (i + 1) * sample.crop, strip.height))
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
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[dict[str, Image.Image]], dict[str, torch.Tensor]],
        *,
        modalities: Sequence[str] = MODALITIES,
        skip_bad_images: bool = False,
    ):
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {list(modalities)}")
        self.samples = list(samples)
        self.transform = transform
        # Keep the canonical order so a strip's columns and the output keys line up.
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.skip_bad_images = skip_bad_images
        self.num_skipped = 0
        self._by_pid: dict[int, list[int]] = defaultdict(list)
        for i, s in enumerate(self.samples):
            self._by_pid[s.pid].append(i)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> dict[str, torch.Tensor]:
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
        # The camera/scene of the image actually returned (the SIE embedding depends on it).
        sample = self.samples[source]
        return {**images, "pid": sample.pid, "camid": sample.camid, "sceneid": sample.sceneid, "index": index}
