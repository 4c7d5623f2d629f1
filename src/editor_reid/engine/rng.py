"""The state of every random generator a training step draws from, as checkpoint-safe values.

Python's ``random``, NumPy's legacy global generator, torch's CPU generator and every CUDA
device's; stored as tensors and numbers only, so a training state holding them survives a
``torch.load(weights_only=True)`` round trip, and a resumed run draws the same numbers.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]

log = logging.getLogger(__name__)


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
