"""Checkpoint files: their schema, atomic saving, safe loading, training-state capture and restore.

Two formats, told apart by the ``format`` entry:

* ``editor-reid/train-state`` (``checkpoints/last.pt``): everything a resumed run needs: model,
  criterion (OCFR centres), optimiser, scheduler, gradient scaler, sampler, RNG states, progress
  counters, the metrics-log offset, the config and the train-set sizes;
* ``editor-reid/weights`` (``best.pt``, ``epoch_<n>.pt``): model and criterion weights, the epoch,
  its evaluation metrics, the config and the train-set sizes.

A checkpoint is a plain dict of tensors, numbers, strings, None, lists, tuples and dicts, so
that ``torch.load(weights_only=True)`` reads it without executing pickled code. Saving writes
a temporary file in the target directory, fsyncs it and renames it over the target, so an
interrupted save never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch

from editor_reid.engine.rng import capture_rng_state
from editor_reid.errors import EditorReidError
from editor_reid.fileio import atomic_write

__all__ = [
    "STATE_FORMAT",
    "WEIGHTS_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "CheckpointWriteError",
    "previous_path",
    "weights_payload",
    "capture_training_state",
    "restore_training_state",
    "check_training_state",
    "load_training_state",
    "is_editor_reid_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
]

log = logging.getLogger(__name__)

STATE_FORMAT = "editor-reid/train-state"
WEIGHTS_FORMAT = "editor-reid/weights"
CHECKPOINT_VERSION = 1

_SAFE_LEAVES = (torch.Tensor, bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(EditorReidError, RuntimeError):
    """A checkpoint cannot be written or read safely."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (full disk, failed rename); the previous file is intact."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        OSError.__init__(self, message)
        self.errno = errno


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


def previous_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_checkpoint` with ``keep_previous`` keeps the file it replaced:
    ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any], *, keep_previous: bool = False) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file + fsync + os.replace).

    The previous file at ``path``, if any, stays intact until the new one is complete; on any
    failure the temporary file is removed and the error re-raised, a failed write (a full disk,
    a failed rename) as :class:`CheckpointWriteError`, which names the file. ``keep_previous``
    also keeps the replaced file as :func:`previous_path` (a hard link, so no copy), for when the
    new one is later found damaged. The file gets the permissions the umask gives new files
    (the temporary file is created private). Returns the path.
    """
    path = Path(path)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint '{path}': state must be a dict, got {type(state).__name__}")
    _check_storable(dict(state), "state")
    state = dict(state)
    keep = (lambda: path.exists() and _link_previous(path)) if keep_previous else None
    try:
        atomic_write(path, lambda tmp: _torch_save(state, tmp), before_replace=keep)
    except OSError as exc:
        raise CheckpointWriteError(
            f"could not write checkpoint '{path}': {exc.strerror or exc}; the previous checkpoint there, if any, "
            "is unchanged", exc.errno) from exc
    return path


def _torch_save(state: dict, tmp: Path) -> None:
    with open(tmp, "wb") as handle:
        torch.save(state, handle)


def _link_previous(path: Path) -> None:
    """Make ``previous_path(path)`` the file now at ``path`` (atomically: link, then rename)."""
    link = path.with_name(f".{path.name}.prev.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(link)
    os.link(path, link)
    os.replace(link, previous_path(path))


def _kind_of_file(path: Path) -> str | None:
    """What a file that is not a torch checkpoint is, from its first bytes (None: it may be one).

    torch checkpoints are zip archives (torch >= 1.6) or, in the legacy format, a pickle stream."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    for magic, kind in ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
                        (b"\x93NUMPY", "a NumPy .npy array"), (b"\x1f\x8b", "a gzip file")):
        if head.startswith(magic):
            return kind
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "not a torch checkpoint"
    return "a text file"


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint dict with ``torch.load(weights_only=True)``: no pickled code runs.

    A file holding anything beyond tensors and plain containers is refused with a
    CheckpointError naming the file; so is a file that is no torch checkpoint at all (empty,
    text, an image), a truncated one, and one whose top level is not a dict.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint '{path}' is a directory; give the checkpoint file inside it, "
                                "e.g. checkpoints/best.pt of a run")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    kind = _kind_of_file(path)
    if kind is not None:
        raise CheckpointError(f"'{path}' is not a checkpoint: it is {kind}" if kind != "not a torch checkpoint"
                              else f"'{path}' is not a torch checkpoint (neither a zip archive nor a pickle stream)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        detail = next((line.strip() for line in reason if "Unsupported global" in line), "")
        if not detail:
            raise CheckpointError(f"checkpoint '{path}' could not be read (damaged or not a torch file): "
                                  f"{reason[0] if reason else exc!r}") from exc
        detail = detail.split(" Please use", 1)[0]
        raise CheckpointError(
            f"checkpoint '{path}' contains Python objects that are not allowed by "
            f"torch.load(weights_only=True) and was refused (it could run arbitrary code). {detail}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else repr(exc)
        raise CheckpointError(f"checkpoint '{path}' could not be read (truncated or not a torch file?): {first}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint '{path}': expected a dict at the top level, got {type(state).__name__}")
    return state


# ------------------------------------------------------------------------------------ schema


def is_editor_reid_checkpoint(state: Any) -> bool:
    """True for a file written by editor-reid (training state or weights)."""
    return isinstance(state, Mapping) and state.get("format") in (STATE_FORMAT, WEIGHTS_FORMAT)


def weights_payload(model_state: Mapping[str, torch.Tensor], criterion_state: Mapping[str, torch.Tensor], *,
                    config: dict, epoch: int, metrics: dict | None, num_classes: int, num_cameras: int) -> dict:
    """The ``editor-reid/weights`` dict: what ``test`` and deployment need, no optimiser state."""
    return {
        "format": WEIGHTS_FORMAT,
        "version": CHECKPOINT_VERSION,
        "epoch": epoch,
        "metrics": metrics,
        "model": dict(model_state),
        "criterion": dict(criterion_state),
        "config": config,
        "num_classes": num_classes,
        "num_cameras": num_cameras,
    }


def capture_training_state(*, model, criterion, optimizer, scheduler, scaler, sampler, progress: dict,
                           config: dict, metrics_offset: int, num_classes: int, num_cameras: int) -> dict:
    """The ``editor-reid/train-state`` dict of a run, RNG states included (taken now)."""
    return {
        "format": STATE_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "criterion": criterion.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "sampler": sampler.state_dict(),
        "rng": capture_rng_state(),
        "progress": progress,
        "config": config,
        "metrics_offset": metrics_offset,
        "num_classes": num_classes,
        "num_cameras": num_cameras,
    }


def check_training_state(state: Any, path: str | os.PathLike) -> None:
    """Raise CheckpointError unless ``state`` is a training state this version can resume."""
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"'{path}' is not an editor-reid training state (expected format '{STATE_FORMAT}')")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"'{path}' was written by a newer editor-reid (checkpoint version {state['version']}, "
                              f"this one reads up to {CHECKPOINT_VERSION})")


def load_training_state(path: str | os.PathLike) -> tuple[dict, Path]:
    """The checked training state at ``path`` and the file it came from.

    When ``path`` cannot be read or is not a training state (a damaged disk, a truncated copy)
    and the state it replaced is still there (:func:`previous_path`, kept by the training loop),
    that one is used instead, with a warning naming both: the run loses the steps since, not
    itself.
    """
    path = Path(path)
    try:
        state = load_checkpoint(path)
        check_training_state(state, path)
        return state, path
    except CheckpointError as error:
        previous = previous_path(path)
        if not previous.is_file():
            raise
        try:
            state = load_checkpoint(previous)
            check_training_state(state, previous)
        except CheckpointError:
            raise error from None
        log.warning("%s; resuming from %s, the training state written before it", error, previous)
        return state, previous


def restore_training_state(state: Mapping[str, Any], *, model, criterion, optimizer, scheduler, scaler,
                           sampler) -> dict:
    """Load a checked training state into the run's parts; returns what the loop itself keeps:
    ``{"progress": dict, "rng": dict | None, "metrics_offset": int | None}``. The RNG states are
    returned, not applied: a mid-epoch resume applies them after replaying the loader."""
    model.load_state_dict(state["model"])
    criterion.load_state_dict(state["criterion"])
    optimizer.load_state_dict(state["optimizer"])
    if "base_lrs" in state["scheduler"]:
        # Written before the schedule was timm's CosineLRScheduler: the same schedule under other
        # field names, which the scheduler built from the run's config already holds.
        log.info("training state from an earlier editor-reid: the LR schedule is rebuilt from the run's config")
    else:
        scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["sampler"])
    return {"progress": dict(state["progress"]), "rng": state.get("rng"), "metrics_offset": state.get("metrics_offset")}
