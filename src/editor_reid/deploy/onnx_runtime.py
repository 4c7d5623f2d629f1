"""An exported EDITOR graph (:mod:`editor_reid.deploy.export`) run by onnxruntime, called like the
PyTorch model.

``OnnxModel("model.onnx")(images, cam_ids)`` takes what ``EDITOR.forward`` takes (a dict of
some of the modalities' normalised images [B, 3, H, W], camera ids [B]) and returns the same
[B, 3D] float32 feature, as a CPU tensor; an absent modality is fed as the zero image. The
configuration, feature width, camera count and fingerprint come from the file's metadata, so
:meth:`editor_reid.features.extractor.FeatureExtractor.from_onnx` runs it without a checkpoint.
onnxruntime (the ``onnx`` extra) is imported only here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from editor_reid.config import Config, config_from_dict
from editor_reid.deploy.export import INPUT_NAMES, METADATA_KEYS, OUTPUT_NAMES, require_onnx
from editor_reid.errors import EditorReidError, UsageError
from editor_reid.modalities import MODALITIES
from editor_reid.model.backbone import UNKNOWN_CAMERA

__all__ = ["OnnxGraphError", "OnnxModel", "onnx_providers"]


class OnnxGraphError(EditorReidError, ValueError):
    """A file that is not an editor-reid ONNX export (unreadable, or without its metadata)."""


def onnx_providers(device: str | torch.device) -> list:
    """onnxruntime execution providers for ``device``: "cpu", "cuda", "cuda:N" or "auto" (CUDA
    when onnxruntime has it, else the CPU)."""
    ort = require_onnx("onnxruntime", "the onnxruntime backend")
    available = ort.get_available_providers()
    device = torch.device("cuda" if str(device) == "auto" and "CUDAExecutionProvider" in available
                          else "cpu" if str(device) == "auto" else device)
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    raise UsageError(f"device '{device}' is not available to onnxruntime (it has {', '.join(available)}); "
                     "use --device cpu, or install onnxruntime-gpu for CUDA")


class OnnxModel:
    """An exported graph behind the call signature of the PyTorch model in eval mode.

    Args:
        path: an ONNX file written by ``editor-reid export``.
        device: see :func:`onnx_providers`.
        threads: onnxruntime's intra-op threads (default: onnxruntime's choice, the physical cores).

    Attributes: ``cfg`` (the exported model's config), ``feat_dim``, ``num_cameras`` (the SIE
    table size, None without one), ``fingerprint``, ``version`` (editor-reid's, at export),
    ``modalities``, ``img_size`` (H, W), ``last_token_mask`` ([B, N] bool of the last call).
    """

    training = False  # always in evaluation mode; eval() and train() keep it so

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", threads: int | None = None) -> None:
        ort = require_onnx("onnxruntime", "the onnxruntime backend")
        self.path = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"ONNX file '{path}' does not exist" if not Path(path).exists()
                                    else f"ONNX file '{path}' is not a file")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        providers = onnx_providers(device)
        try:
            self.session = ort.InferenceSession(self.path, options, providers=providers)
        except Exception as exc:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) derive from Exception only
            raise OnnxGraphError(f"'{path}' is not a readable ONNX file: {str(exc).strip()}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [key for key in METADATA_KEYS if key not in meta]
        names = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        if missing or names != (list(INPUT_NAMES), list(OUTPUT_NAMES)):
            what = (f"no editor-reid metadata: {', '.join(missing)} missing" if missing else
                    f"inputs {', '.join(names[0])} and outputs {', '.join(names[1])}, expected "
                    f"{', '.join(INPUT_NAMES)} and {', '.join(OUTPUT_NAMES)}")
            raise OnnxGraphError(f"'{path}' is not an ONNX file written by 'editor-reid export' ({what}); export "
                                 "the checkpoint with editor-reid export --format onnx")
        values = {key: json.loads(meta[key]) for key in METADATA_KEYS}
        self.cfg: Config = config_from_dict(values["editor_reid.config"], source=f"the config saved in '{path}'")
        self.feat_dim = int(values["editor_reid.feature_dim"])
        self.num_cameras: int | None = values["editor_reid.num_cameras"]
        self.fingerprint: str = values["editor_reid.fingerprint"]
        self.version: str = values["editor_reid.version"]
        self.modalities = tuple(values["editor_reid.modalities"])
        self.img_size = tuple(int(v) for v in values["editor_reid.input_size"])
        self.last_token_mask: torch.Tensor | None = None

    def eval(self) -> OnnxModel:
        return self

    def train(self, mode: bool = True) -> OnnxModel:
        return self

    def _inputs(self, images: Mapping[str, torch.Tensor | np.ndarray]) -> list[np.ndarray]:
        unknown = [k for k in images if k not in MODALITIES]
        if unknown or not images:
            raise ValueError(f"expected a dict with a non-empty subset of {list(MODALITIES)}, got {list(images)}")
        arrays = {m: np.ascontiguousarray(v.detach().to("cpu", torch.float32).numpy() if isinstance(v, torch.Tensor)
                                          else np.asarray(v, dtype=np.float32)) for m, v in images.items()}
        reference = next(iter(arrays.values()))
        expected = (3, *self.img_size)
        for m, array in arrays.items():
            if array.ndim != 4 or array.shape[1:] != expected or array.shape[0] != reference.shape[0]:
                raise ValueError(f"modality '{m}' has shape {list(array.shape)}, expected "
                                 f"[{reference.shape[0]}, {', '.join(map(str, expected))}] (the model's input size)")
        return [arrays[m] if m in arrays else np.zeros_like(reference) for m in MODALITIES]

    def _cameras(self, cam_ids, batch: int) -> np.ndarray:
        if cam_ids is None:
            if self.num_cameras is not None:
                raise ValueError("the SIE camera embedding is enabled (model.sie_camera): pass the camera ids")
            return np.full(batch, UNKNOWN_CAMERA, dtype=np.int64)
        cams = (cam_ids.detach().cpu().numpy() if isinstance(cam_ids, torch.Tensor) else np.asarray(cam_ids))
        cams = cams.astype(np.int64).reshape(-1)
        if cams.shape[0] != batch:
            raise ValueError(f"{cams.shape[0]} camera ids for {batch} samples")
        # The graph would wrap a negative index around the table; out of range is refused here.
        if self.num_cameras is not None and cams.size and (cams.min() < UNKNOWN_CAMERA
                                                           or cams.max() >= self.num_cameras):
            raise ValueError(f"camera id out of range [{cams.min()}, {cams.max()}]: the SIE table has "
                             f"{self.num_cameras} cameras (ids 0..{self.num_cameras - 1}, or {UNKNOWN_CAMERA} for "
                             "an unknown camera)")
        return cams

    def __call__(self, images: Mapping[str, torch.Tensor | np.ndarray], cam_ids=None) -> torch.Tensor:
        """The feature [B, 3D] float32 (CPU tensor) of ``images`` and ``cam_ids`` (see the class)."""
        inputs = self._inputs(images)
        feed = dict(zip(INPUT_NAMES, [*inputs, self._cameras(cam_ids, inputs[0].shape[0])]))
        feature, mask = self.session.run(list(OUTPUT_NAMES), feed)
        self.last_token_mask = torch.from_numpy(mask)
        return torch.from_numpy(feature)

    def __repr__(self) -> str:
        return (f"OnnxModel('{self.path}', feature {self.feat_dim}-d, input {self.img_size[0]}x{self.img_size[1]}, "
                f"providers {self.session.get_providers()})")
