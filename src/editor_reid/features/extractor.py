"""The :class:`FeatureExtractor`: retrieval features of a checkpoint for images given in Python.

A sample is a mapping from modality names to images, plus an optional camera::

    extractor = FeatureExtractor("run/checkpoints/best.pt")
    feats = extractor([{"RGB": "a_rgb.jpg", "NI": "a_ni.jpg", "TI": "a_ti.jpg", "camid": 2},
                       {"RGB": pil_image},                      # RGB only, unknown camera
                       {"TI": uint8_array, "camera": None}])    # [3, 3D] float32, unit rows

An image is a path (``str`` or ``os.PathLike``), a PIL image, an HxWx3 ``uint8`` NumPy array
or a CxHxW float tensor with values in [0, 1] (C = 3, or 1 for grey), as torchvision's
``to_tensor`` makes. Every kind becomes an 8-bit RGB PIL image and then goes through the test
transform of ``editor-reid test`` (resize, ``to_tensor``, normalise): a tensor is quantised to
8 bits first (``round(x * 255)``), so a tensor made by ``to_tensor`` from an 8-bit image gives
exactly the feature of that image. Files and PIL images are converted as the data layer reads
a dataset (:func:`editor_reid.data.dataset.to_rgb`: 16-bit thermal frames are stretched, alpha
is dropped).

Any subset of the modalities may be present, per sample; an absent one is fed as the zero image
of the missing-modality evaluation (:func:`editor_reid.modalities.absent_like`). The camera
(key ``camid`` or ``camera``) is an id of the checkpoint's SIE table; ``None`` or no key means an
unknown camera (:data:`editor_reid.model.UNKNOWN_CAMERA`), whose SIE term is the mean of the
learned camera embeddings (docs/features.md#unknown-cameras).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from editor_reid.config import (AMP_CHOICES, Config, ConfigError, config_from_dict, config_to_dict, load_config,
                                resolve_config_path)
from editor_reid.data.dataset import read_image, to_rgb
from editor_reid.data.loaders import collate
from editor_reid.data.transforms import build_transforms
from editor_reid.engine import checkpoint as ckpt
from editor_reid.engine.acceleration import maybe_compile
from editor_reid.engine.evaluate import load_weights, model_for_checkpoint
from editor_reid.engine.inference import extract_features
from editor_reid.engine.solver import autocast_context
from editor_reid.features.store import model_fingerprint
from editor_reid.errors import EditorReidError, UsageError
from editor_reid.modalities import MODALITIES, canonical_order
from editor_reid.model.backbone import UNKNOWN_CAMERA

__all__ = ["FeatureExtractor", "SampleError", "CAMERA_KEYS"]

log = logging.getLogger(__name__)

#: The keys a sample may give its camera id under.
CAMERA_KEYS = ("camid", "camera")
# Config keys that do not change the model a checkpoint holds (where its backbone came from).
_IRRELEVANT = {("model", "pretrain_path"), ("model", "pretrain_choice")}


class SampleError(EditorReidError, ValueError):
    """An input sample of :class:`FeatureExtractor` is malformed; ``index`` and ``key`` say where
    (``key`` is None when the sample as a whole is wrong)."""

    def __init__(self, index: int, key: str | None, problem: str) -> None:
        where = f"sample {index}" if key is None else f"sample {index}, key {key!r}"
        super().__init__(f"{where}: {problem}")
        self.index = index
        self.key = key


def _config_for(weights: str | Path, state: Any, config: Config | str | Path | None) -> Config:
    """The config that builds the model: ``config`` when given, else the checkpoint's own."""
    saved = state.get("config") if ckpt.is_editor_reid_checkpoint(state) else None
    if config is None:
        if not saved:
            raise ConfigError(f"'{weights}' carries no config (an official EDITOR checkpoint or a plain state dict): "
                              "give the config it was trained with, a YAML file or a preset name such as rgbnt201 "
                              "(--config on the command line, config= in Python)")
        return config_from_dict(saved, source=f"the config saved in '{weights}'")
    if isinstance(config, Config):
        cfg = config
    else:
        cfg = load_config(resolve_config_path(str(config)))
    if saved:
        _warn_differences(saved, cfg)
    return cfg


def _warn_differences(saved: dict, cfg: Config) -> None:
    mine = config_to_dict(cfg)
    diffs = [f"{section}.{key} (checkpoint: {value!r}, config: {mine[section].get(key)!r})"
             for section in ("model", "input") for key, value in saved.get(section, {}).items()
             if (section, key) not in _IRRELEVANT and mine[section].get(key) != value]
    if diffs:
        log.warning("the checkpoint was trained with a different config; the given one is used: %s", "; ".join(diffs))


def _runtime_config(cfg: Config, batch_size: int | None) -> Config:
    """A copy of ``cfg`` for extraction: ``batch_size`` (when given) as ``test.ims_per_batch``, and
    bad images stop it (the skip rule's replacement "of the same identity" would put another
    image's feature in a row)."""
    cfg = copy.deepcopy(cfg)
    if batch_size is not None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        cfg.test.ims_per_batch = int(batch_size)
    cfg.datasets.skip_bad_images = False
    return cfg


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_amp(amp: str, device: torch.device) -> str:
    """``amp`` when it can run on ``device``; UsageError (before the model is built) otherwise."""
    if amp not in AMP_CHOICES:
        raise UsageError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise UsageError(f"amp 'fp16' needs a CUDA device, and features are extracted on {device.type}; "
                         "use bf16 or none")
    try:
        autocast_context(device, amp)
    except ValueError as exc:  # bf16 on a GPU without it
        raise UsageError(f"amp {amp!r} cannot run on {device}: {exc}") from None
    return amp


def _camera(index: int, sample: Mapping[str, Any], num_cameras: int | None) -> int:
    keys = [k for k in CAMERA_KEYS if k in sample]
    if len(keys) > 1:
        raise SampleError(index, keys[1], f"gives the camera twice ({' and '.join(keys)}); use one of them")
    if not keys or sample[keys[0]] is None:
        return UNKNOWN_CAMERA
    key, value = keys[0], sample[keys[0]]
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise SampleError(index, key, f"camera must be an integer id or None (unknown), got {value!r}")
    value = int(value)
    if value < UNKNOWN_CAMERA or (num_cameras is not None and value >= num_cameras):
        known = f"0..{num_cameras - 1}" if num_cameras is not None else "0 or more"
        raise SampleError(index, key, f"camera {value} is not in the checkpoint's SIE table (cameras {known}); "
                                      "pass None for a camera the model was not trained on")
    return value


def _check_image(index: int, key: str, value: Any) -> None:
    """Raise SampleError unless ``value`` is one of the image kinds (cheap: no decoding)."""
    if isinstance(value, (str, os.PathLike, Image.Image)):
        return
    if isinstance(value, np.ndarray):
        if value.ndim != 3 or value.shape[2] != 3 or value.dtype != np.uint8:
            raise SampleError(index, key, f"expected an HxWx3 uint8 array, got {value.dtype} {list(value.shape)}")
        if value.shape[0] == 0 or value.shape[1] == 0:
            raise SampleError(index, key, f"the image is empty ({list(value.shape)})")
        return
    if isinstance(value, torch.Tensor):
        if value.dim() != 3 or value.shape[0] not in (1, 3) or not value.is_floating_point():
            dtype = str(value.dtype).removeprefix("torch.")
            raise SampleError(index, key, "expected a CxHxW float tensor (C = 3, or 1 for grey) with values in "
                                          f"[0, 1], got {dtype} {list(value.shape)}")
        if value.shape[1] == 0 or value.shape[2] == 0:
            raise SampleError(index, key, f"the image is empty ({list(value.shape)})")
        low, high = torch.aminmax(value.detach())
        if not (low >= 0 and high <= 1):  # also false for NaN
            raise SampleError(index, key, f"tensor values must lie in [0, 1] (as torchvision's to_tensor makes them), "
                                          f"got [{low.item():g}, {high.item():g}]")
        return
    raise SampleError(index, key, f"expected a path, a PIL image, an HxWx3 uint8 array or a CxHxW float tensor, "
                                  f"got {type(value).__name__}")


def _as_pil(index: int, key: str, value: Any) -> Image.Image:
    """An image of any accepted kind as an 8-bit RGB PIL image (the data layer's conversion)."""
    if isinstance(value, (str, os.PathLike)):
        return read_image(os.fspath(value))
    where = f"sample {index} {key}"
    if isinstance(value, Image.Image):
        return to_rgb(value, where)
    if isinstance(value, torch.Tensor):
        quantised = (value.detach().to("cpu", torch.float32) * 255).round().to(torch.uint8)  # [C, H, W]
        value = quantised.permute(1, 2, 0).numpy()
        if value.shape[2] == 1:  # grey: replicated like a grey file
            return to_rgb(Image.fromarray(np.ascontiguousarray(value[:, :, 0])), where)
    return Image.fromarray(np.ascontiguousarray(value)).convert("RGB")


class FeatureExtractor:
    """Retrieval features of ``weights`` for samples given as paths, PIL images, arrays or tensors
    (see the module docstring for the sample format).

    Args:
        weights: an editor-reid checkpoint (``best.pt``, ``last.pt``, ``epoch_<n>.pt``: the model
            is built from the config saved in it), an official EDITOR ``.pth`` or a plain state
            dict of our model (these carry no config: ``config`` is then required). Read with
            ``torch.load(weights_only=True)``.
        config: a :class:`~editor_reid.config.Config`, a YAML file or a preset name; when given,
            it is used instead of the checkpoint's own (a warning lists model/input differences).
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1" or a ``torch.device``.
        batch_size: samples per forward pass (default: the config's ``test.ims_per_batch``).
            Batches are formed in input order, as ``editor-reid test`` forms them.
        amp: "none" (fp32), "bf16" or "fp16" (CUDA only) autocast.

    Only the config's ``datasets.modalities`` are fed to the model; other modalities in a sample
    are ignored, as ``editor-reid test`` ignores them.
    """

    def __init__(self, weights: str | Path, config: Config | str | Path | None = None,
                 device: str | torch.device = "auto", batch_size: int | None = None, amp: str = "none") -> None:
        self.weights = str(weights)
        state = ckpt.load_checkpoint(weights, map_location="cpu")
        self.cfg = cfg = _runtime_config(_config_for(weights, state, config), batch_size)
        self.device = _device(device)
        self.amp = _check_amp(amp, self.device)
        model = model_for_checkpoint(cfg, state, 0, 0, weights)
        self.loaded = load_weights(model, weights, state)
        del state
        #: :func:`~editor_reid.features.store.model_fingerprint` of the weights: written into
        #: feature files, checked by a gallery index.
        self.fingerprint = model_fingerprint(model.state_dict())
        self.model = maybe_compile(model.to(self.device).eval(), cfg)
        self.transform = build_transforms(cfg, is_train=False)
        self.modalities = canonical_order(cfg.datasets.modalities)

    @classmethod
    def from_onnx(cls, path: str | Path, device: str | torch.device = "cpu", batch_size: int | None = None,
                  threads: int | None = None) -> FeatureExtractor:
        """An extractor that runs an ONNX file of ``editor-reid export`` with onnxruntime
        (:class:`~editor_reid.deploy.onnx_runtime.OnnxModel`) instead of a checkpoint with PyTorch.

        Calls, ``extract_batches``, ``cfg``, ``feature_dim``, ``modalities``, ``num_cameras`` and
        ``fingerprint`` (the exported weights') behave as with the checkpoint; the config comes from
        the file. ``device``: "cpu", "cuda[:N]" (onnxruntime-gpu) or "auto"; ``threads``:
        onnxruntime's intra-op threads. Features stay fp32 (no ``amp``).
        """
        from editor_reid.deploy.onnx_runtime import OnnxModel

        model = OnnxModel(path, device=device, threads=threads)
        self = cls.__new__(cls)
        self.weights = str(path)
        self.cfg = cfg = _runtime_config(model.cfg, batch_size)
        self.device = torch.device("cpu")  # batches are handed to onnxruntime from the host
        self.amp = "none"
        self.loaded = None
        self.fingerprint = model.fingerprint
        self.model = model
        self.transform = build_transforms(cfg, is_train=False)
        self.modalities = canonical_order(cfg.datasets.modalities)
        return self

    @property
    def batch_size(self) -> int:
        return self.cfg.test.ims_per_batch

    @property
    def feature_dim(self) -> int:
        """The width of a feature row (3 × the backbone width)."""
        return self.model.feat_dim

    @property
    def num_cameras(self) -> int | None:
        """The size of the checkpoint's SIE camera table; None without one (cameras are then ignored)."""
        if not isinstance(self.model, torch.nn.Module):  # an ONNX graph (from_onnx) keeps it in its metadata
            return self.model.num_cameras
        sie = self.model.backbone.sie_embed
        return None if sie is None else int(sie.shape[0])

    def check_cameras(self, camids: Iterable[int], what: str) -> None:
        """Raise EditorReidError when a camera id of ``what`` (e.g. "the rgbnt201 query split") is
        outside the SIE table and is not :data:`UNKNOWN_CAMERA`."""
        table = self.num_cameras
        ids = np.asarray(list(camids), dtype=np.int64)
        if table is None or ids.size == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        if low < UNKNOWN_CAMERA or high >= table:
            bad = high if high >= table else low
            raise EditorReidError(
                f"checkpoint '{self.weights}' was trained with {table} cameras (its SIE camera embedding), but {what} "
                f"has camera id {bad}; features can be extracted only for the cameras it has seen, or for unknown "
                f"cameras (id {UNKNOWN_CAMERA}, e.g. 'extract --images')")

    def __call__(self, samples: Mapping[str, Any] | Iterable[Mapping[str, Any]], *,
                 normalize: bool = True) -> np.ndarray:
        """Features of ``samples`` (one mapping or a list of them): float32 [N, 3D], one row per
        sample in order, L2-normalised unless ``normalize=False``.

        Every sample is checked before the first image is decoded: an unknown key, an image of
        the wrong kind, shape or dtype, a camera outside the SIE table or a sample without any of
        the model's modalities raises :class:`SampleError` naming the sample and the key. A file
        that cannot be read raises :class:`~editor_reid.data.dataset.BadImageError` naming it.
        """
        items = [samples] if isinstance(samples, Mapping) else list(samples)
        checked = [self._check(i, s) for i, s in enumerate(items)]
        if not checked:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        return self.extract_batches(self._batches(checked), normalize=normalize)

    def extract_batches(self, batches: Iterable[dict], *, normalize: bool = True) -> np.ndarray:
        """Features of collated batches (:func:`editor_reid.data.loaders.collate` output, e.g. the
        batches of :func:`editor_reid.data.loaders.build_test_loader`): float32 [N, 3D]."""
        feats = extract_features(self.model, batches, self.device, amp=self.amp).feats  # [N, 3D]
        if normalize:
            feats = F.normalize(feats, dim=1)
        return feats.numpy()

    def _check(self, index: int, sample: Any) -> tuple[dict[str, Any], int]:
        """(the sample's images of the model's modalities, camera id), or SampleError."""
        known = canonical_order([*MODALITIES, *self.modalities])
        if not isinstance(sample, Mapping):
            raise SampleError(index, None, f"expected a mapping of modality names ({', '.join(known)}) to images, "
                                           f"got {type(sample).__name__}")
        for key in sample:
            if key not in known and key not in CAMERA_KEYS:
                raise SampleError(index, key, f"unknown key; a sample maps some of {', '.join(known)} to images "
                                              f"and may give its camera as {' or '.join(CAMERA_KEYS)}")
        given = {m: sample[m] for m in known if sample.get(m) is not None}
        if not given:
            raise SampleError(index, None, f"has no image; give at least one of {', '.join(self.modalities)}")
        for m, value in given.items():
            _check_image(index, m, value)
        images = {m: v for m, v in given.items() if m in self.modalities}
        if not images:
            raise SampleError(index, None, f"has only {', '.join(given)}, none of the modalities the model reads "
                                           f"(datasets.modalities: {', '.join(self.modalities)})")
        return images, _camera(index, sample, self.num_cameras)

    def _batches(self, checked: Sequence[tuple[dict[str, Any], int]]) -> Iterator[dict]:
        """Collated batches, decoded one batch at a time (the list may be long)."""
        for start in range(0, len(checked), self.batch_size):
            items = []
            for index in range(start, min(start + self.batch_size, len(checked))):
                images, camid = checked[index]
                tensors = self.transform({m: _as_pil(index, m, v) for m, v in images.items()})
                items.append({**tensors, "pid": -1, "camid": camid, "sceneid": -1, "index": index})
            yield collate(items)
