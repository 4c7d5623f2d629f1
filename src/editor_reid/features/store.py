"""The feature file: a plain NumPy ``.npz`` that opens without editor-reid.

``np.load("feats.npz")`` gives, for N samples in the order of the input:

=============== =============== =========================================================
key             dtype, shape    meaning
=============== =============== =========================================================
``features``    float32 [N, F]  retrieval features (L2-normalised when ``normalized``)
``pid``         int64 [N]       identity (-1 when unknown, e.g. ``extract --images``)
``camid``       int64 [N]       camera, 0-based (-1 when unknown)
``sceneid``     int64 [N]       scene (MSVR310), -1 elsewhere
``split``       str [N]         "train", "query", "gallery", or "" when not from a split
``path_RGB``    str [N]         the sample's RGB file ("" where the sample has none);
``path_NI``     str [N]         likewise for NI,
``path_TI``     str [N]         and TI
``protocol``    str []          "same_camera" or "same_scene": how ``test --features``
                                excludes gallery items from a query's ranking
``normalized``  bool []         whether ``features`` rows have unit L2 norm
``modalities``  str [K]         the modalities that were fed to the model
``weights``     str []          the checkpoint the features came from
``fingerprint`` str []          the model's fingerprint (:func:`model_fingerprint`): a
                                gallery index refuses features of another model
``version``     int64 []        the file format's version (1)
=============== =============== =========================================================

Strings are fixed-width unicode arrays (``np.str_``), never Python objects, so the file loads
with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from editor_reid.errors import EditorReidError
from editor_reid.fileio import atomic_write
from editor_reid.modalities import MODALITIES, canonical_order, check_modalities

__all__ = ["FeatureFile", "FeatureFileError", "FORMAT_VERSION", "PROTOCOLS", "save_feature_file",
           "load_feature_file", "path_key", "model_fingerprint"]

FORMAT_VERSION = 1
PROTOCOLS = ("same_camera", "same_scene")


class FeatureFileError(EditorReidError, ValueError):
    """A feature file is missing a key, has a wrong shape or type, or is not an ``.npz`` at all."""


def model_fingerprint(state_dict) -> str:
    """A short hex digest of a model's weights (names, shapes, dtypes and values, in key order):
    equal for the same weights whatever file or format they came from, different for any other
    model. Features of two models are not comparable; this tells them apart."""
    import torch  # only here: reading a feature file needs NumPy alone

    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def path_key(modality: str) -> str:
    """The ``.npz`` key of a modality's path column (``path_RGB``)."""
    return f"path_{modality}"


def _path_columns(arrays: dict) -> list[str]:
    """The modalities of the ``path_<M>`` keys of a file (RGB, NI, TI and any other modality)."""
    names = [key[len("path_"):] for key in arrays if key.startswith("path_")]
    return [m for m in names if check_modalities([m]) is None]


@dataclass
class FeatureFile:
    """The contents of a feature file (see the module docstring for each field)."""

    features: np.ndarray
    pid: np.ndarray
    camid: np.ndarray
    sceneid: np.ndarray
    split: np.ndarray
    paths: dict[str, np.ndarray]
    protocol: str = "same_camera"
    normalized: bool = True
    modalities: tuple[str, ...] = MODALITIES
    weights: str = ""
    fingerprint: str = ""
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # keys a later version or a user added

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def select(self, mask: np.ndarray) -> "FeatureFile":
        """The rows where ``mask`` (bool [N]) is true, e.g. ``ff.select(ff.split == "query")``."""
        return FeatureFile(
            features=self.features[mask], pid=self.pid[mask], camid=self.camid[mask], sceneid=self.sceneid[mask],
            split=self.split[mask], paths={m: p[mask] for m, p in self.paths.items()}, protocol=self.protocol,
            normalized=self.normalized, modalities=self.modalities, weights=self.weights,
            fingerprint=self.fingerprint,
        )


def _column(values: Sequence, n: int, name: str, dtype) -> np.ndarray:
    array = np.asarray(values, dtype=dtype)
    if array.shape != (n,):
        raise FeatureFileError(f"feature file column '{name}' has shape {array.shape}, expected ({n},)")
    return array


def _strings(values: Sequence[str], n: int, name: str) -> np.ndarray:
    array = np.asarray(list(values), dtype=np.str_) if len(values) else np.zeros(0, dtype="<U1")
    if array.shape != (n,):
        raise FeatureFileError(f"feature file column '{name}' has shape {array.shape}, expected ({n},)")
    return array


def save_feature_file(path: str | Path, ff: FeatureFile) -> Path:
    """Write ``ff`` to ``path`` atomically (a temporary file in the same folder, then a rename),
    so a crash leaves either the old file or the new one. Returns the path written."""
    path = Path(path)
    features = np.ascontiguousarray(ff.features, dtype=np.float32)
    if features.ndim != 2:
        raise FeatureFileError(f"features must be [N, F], got shape {features.shape}")
    n = features.shape[0]
    if ff.protocol not in PROTOCOLS:
        raise FeatureFileError(f"protocol must be one of {PROTOCOLS}, got {ff.protocol!r}")
    arrays = {
        "features": features,
        "pid": _column(ff.pid, n, "pid", np.int64),
        "camid": _column(ff.camid, n, "camid", np.int64),
        "sceneid": _column(ff.sceneid, n, "sceneid", np.int64),
        "split": _strings(ff.split, n, "split"),
        **{path_key(m): _strings(ff.paths.get(m, [""] * n), n, path_key(m))
           for m in canonical_order([*MODALITIES, *ff.paths])},
        "protocol": np.asarray(ff.protocol, dtype=np.str_),
        "normalized": np.asarray(bool(ff.normalized)),
        "modalities": np.asarray(list(ff.modalities), dtype=np.str_),
        "weights": np.asarray(str(ff.weights), dtype=np.str_),
        "fingerprint": np.asarray(str(ff.fingerprint), dtype=np.str_),
        "version": np.asarray(FORMAT_VERSION, dtype=np.int64),
    }
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file, not a name: np.savez would append ".npz" to the name
            np.savez(handle, **arrays)

    return atomic_write(path, write)


_REQUIRED = ("features", "pid", "camid", "split")


def load_feature_file(path: str | Path) -> FeatureFile:
    """Read a feature file (``allow_pickle=False``); FeatureFileError names the file and the key
    at fault. Files written by other tools need only ``features``, ``pid``, ``camid`` and
    ``split``; the rest take their defaults (``sceneid`` -1, empty paths, protocol same_camera,
    ``normalized`` False)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError) as exc:
        raise FeatureFileError(f"feature file '{path}' is not a readable .npz ({exc})") from None
    missing = [key for key in _REQUIRED if key not in arrays]
    if missing:
        raise FeatureFileError(f"feature file '{path}' lacks the key(s) {', '.join(missing)}; "
                               f"expected {', '.join(_REQUIRED)} (see docs/features.md)")
    features = arrays.pop("features")
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        raise FeatureFileError(f"feature file '{path}': 'features' must be a float [N, F] array, "
                               f"got {features.dtype} {features.shape}")
    n = features.shape[0]

    def column(key: str, dtype, default) -> np.ndarray:
        value = arrays.pop(key, None)
        if value is None:
            return np.full(n, default, dtype=dtype)
        if value.shape != (n,):
            raise FeatureFileError(f"feature file '{path}': '{key}' has shape {value.shape}, expected ({n},) "
                                   "like the rows of 'features'")
        try:
            return value.astype(dtype)
        except ValueError:
            raise FeatureFileError(f"feature file '{path}': '{key}' is {value.dtype}, expected {np.dtype(dtype)}") from None

    def scalar(key: str, default):
        value = arrays.pop(key, None)
        return default if value is None else value.item()

    ff = FeatureFile(
        features=features.astype(np.float32, copy=False),
        pid=column("pid", np.int64, -1),
        camid=column("camid", np.int64, -1),
        sceneid=column("sceneid", np.int64, -1),
        split=column("split", np.str_, ""),
        paths={m: column(path_key(m), np.str_, "") for m in canonical_order([*MODALITIES, *_path_columns(arrays)])},
        protocol=str(scalar("protocol", "same_camera")),
        normalized=bool(scalar("normalized", False)),
        modalities=tuple(str(m) for m in arrays.pop("modalities", np.asarray(MODALITIES))),
        weights=str(scalar("weights", "")),
        fingerprint=str(scalar("fingerprint", "")),
    )
    arrays.pop("version", None)
    ff.extra = arrays
    if ff.protocol not in PROTOCOLS:
        raise FeatureFileError(f"feature file '{path}': protocol {ff.protocol!r} is not one of {', '.join(PROTOCOLS)}")
    return ff
