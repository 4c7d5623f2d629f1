"""Checkpoint files: atomic saving, safe loading, RNG state capture, non-finite loss checks.

A checkpoint is a plain dict of tensors, numbers, strings, None, lists, tuples and dicts, so
that ``torch.load(weights_only=True)`` reads it without executing pickled code. Saving writes
a temporary file in the target directory, fsyncs it and renames it over the target, so an
interrupted save never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import random
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "nonfinite_check",
]

log = logging.getLogger(__name__)

_SAFE_LEAVES = (torch.Tensor, bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read safely."""


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; names the term(s), epoch and step."""

    def __init__(self, terms: dict[str, float], epoch: int, step: int) -> None:
        self.terms = terms
        self.epoch = epoch
        self.step = step
        listed = ", ".join(f"'{name}' = {value}" for name, value in terms.items())
        super().__init__(f"non-finite loss at epoch {epoch}, step {step}: {listed}")


def _check_storable(value: Any, where: str) -> None:
    """Raise CheckpointError naming the first entry that weights_only loading would refuse."""
    if isinstance(value, _SAFE_LEAVES):
        return
    if isinstance(value, (dict, OrderedDict)):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise CheckpointError(f"cannot store {where}: key {key!r} of type {type(key).__name__} "
                                      "is not a str/int/float/bool/None")
            _check_storable(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_storable(item, f"{where}[{i}]")
        return
    raise CheckpointError(f"cannot store {where}: {type(value).__module__}.{type(value).__qualname__} is not "
                          "loadable with torch.load(weights_only=True); convert it to tensors/lists/numbers")


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file + fsync + os.replace).

    The previous file at ``path``, if any, stays intact until the new one is complete; on any
    failure the temporary file is removed and the error re-raised. Returns the path.
    """
    path = Path(path)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint '{path}': state must be a dict, got {type(state).__name__}")
    _check_storable(dict(state), "state")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(dict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform / filesystem.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint dict with ``torch.load(weights_only=True)``: no pickled code runs.

    A file holding anything beyond tensors and plain containers is refused with a
    CheckpointError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        detail = next((line.strip() for line in reason if "Unsupported global" in line), "")
        detail = detail.split(" Please use", 1)[0]
        raise CheckpointError(
            f"checkpoint '{path}' contains Python objects that are not allowed by "
            f"torch.load(weights_only=True) and was refused (it could run arbitrary code). {detail}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint '{path}' could not be read (truncated or not a torch file?): {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint '{path}': expected a dict at the top level, got {type(state).__name__}")
    return state


def capture_rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's and torch's (CPU and CUDA) global generators.

    Stored as tensors and numbers only, so it survives a weights_only round trip.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "numpy": {
            "bit_generator": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generators saved by :func:`capture_rng_state`."""
    missing = {"python", "numpy", "torch"} - set(state)
    if missing:
        raise KeyError(f"restore_rng_state: RNG state lacks {sorted(missing)}")
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((
        npy["bit_generator"],
        npy["keys"].numpy().astype(np.uint32),
        int(npy["pos"]),
        int(npy["has_gauss"]),
        float(npy["cached_gaussian"]),
    ))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda_states = state.get("cuda")
    if cuda_states:
        if not torch.cuda.is_available():
            log.warning("checkpoint has CUDA RNG state but CUDA is not available; not restored")
        else:
            count = min(len(cuda_states), torch.cuda.device_count())
            if count != len(cuda_states):
                log.warning("checkpoint has CUDA RNG state for %d devices, %d visible; restoring %d",
                            len(cuda_states), torch.cuda.device_count(), count)
            for index in range(count):
                torch.cuda.set_rng_state(cuda_states[index].cpu().to(torch.uint8), index)


def nonfinite_check(terms: Mapping[str, torch.Tensor | float], epoch: int, step: int) -> None:
    """Raise :class:`NonFiniteLossError` naming every NaN/inf term (one device sync in all)."""
    finite: dict[str, bool] = {}
    tensors = {name: v for name, v in terms.items() if isinstance(v, torch.Tensor)}
    if tensors:
        device = next(iter(tensors.values())).device
        flags = torch.stack([torch.isfinite(v.detach()).all().to(device) for v in tensors.values()])
        finite.update(zip(tensors, flags.tolist()))
    for name, value in terms.items():
        if name not in tensors:
            finite[name] = math.isfinite(float(value))
    bad = {}
    for name, value in terms.items():
        if not finite[name]:
            bad[name] = value.detach().float().cpu().tolist() if isinstance(value, torch.Tensor) else float(value)
    if bad:
        raise NonFiniteLossError(bad, epoch, step)
