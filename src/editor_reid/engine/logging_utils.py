"""Run-directory bookkeeping and console output: log file, ``metrics.jsonl``, optional TensorBoard,
``env.json``, the progress bar.

Only the main rank writes; the other ranks get a :class:`MetricsLogger` with ``enabled=False``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy
import timm
import torch
from tqdm.auto import tqdm

from editor_reid import __version__

__all__ = [
    "LOGGER_NAME",
    "attach_file_log",
    "file_log",
    "other_ranks_warn_only",
    "progress_bar",
    "format_eta",
    "ensure_console_log",
    "MetricsLogger",
    "environment_info",
    "write_environment",
]

LOGGER_NAME = "editor_reid"


def ensure_console_log(level: int = logging.INFO) -> None:
    """Give the package logger a console handler when the application configured none.

    Commands call this so that ``logging.info`` from the library reaches the terminal; an
    application that set up its own logging (a handler on the package or the root logger)
    is left alone.
    """
    pkg = logging.getLogger(LOGGER_NAME)
    if pkg.handlers or logging.getLogger().handlers:
        pkg.setLevel(min(pkg.level or level, level))
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    pkg.addHandler(handler)
    pkg.setLevel(level)


def attach_file_log(path: Path) -> logging.Handler:
    """Copy the package's log messages to ``path`` (appended); detach with ``removeHandler``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pkg = logging.getLogger(LOGGER_NAME)
    pkg.addHandler(handler)
    if pkg.level == logging.NOTSET or pkg.level > logging.INFO:
        pkg.setLevel(logging.INFO)
    return handler


@contextlib.contextmanager
def file_log(path: Path) -> Iterator[logging.Handler]:
    """Copy the package's log messages to ``path`` inside the block."""
    handler = attach_file_log(path)
    try:
        yield handler
    finally:
        logging.getLogger(LOGGER_NAME).removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def other_ranks_warn_only(is_main: bool) -> Iterator[None]:
    """One voice in a distributed run: inside the block, ranks other than 0 log warnings only."""
    pkg = logging.getLogger(LOGGER_NAME)
    level = pkg.level
    if not is_main:
        pkg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        pkg.setLevel(level)


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar over an epoch's steps (off on ranks other than 0)."""
    # ``disable`` is passed only to switch the bar off, so TQDM_DISABLE=1 still works otherwise.
    kwargs = {} if enabled else {"disable": True}
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False, unit="step", **kwargs)


def format_eta(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour)."""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


class MetricsLogger:
    """Append-only JSON-lines metrics (``metrics.jsonl``) and, if asked, TensorBoard scalars.

    Each record is one line ``{"kind": "train"|"epoch"|"eval"|..., "epoch": .., "step": .., ...}``.
    ``offset()`` is the file size after the last flushed record: a checkpoint stores it and a
    resumed run truncates the file back to it, so records of a killed partial epoch do not
    appear twice.
    """

    def __init__(self, path: Path, *, enabled: bool = True, tensorboard_dir: Path | None = None,
                 truncate_to: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        self._fh = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_to is not None and self.path.exists():
            with open(self.path, "r+b") as fh:
                fh.truncate(min(truncate_to, self.path.stat().st_size))
        self._fh = open(self.path, "a", encoding="utf-8")
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is an optional extra
                raise RuntimeError(
                    "config key 'solver.tensorboard' is true but TensorBoard is not installed; "
                    "install it with `pip install editor-reid[tensorboard]` (or `pip install tensorboard`) "
                    "or set solver.tensorboard=false"
                ) from exc
            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def log(self, kind: str, *, global_step: int | None = None, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, **({"global_step": global_step} if global_step is not None else {}),
                  **_jsonable(fields), "time": round(time.time(), 3)}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None and global_step is not None:
            for name, value in _flatten(fields).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in ("epoch", "step"):
                    self._tb.add_scalar(f"{kind}/{name}", value, global_step)

    def offset(self) -> int:
        if not self.enabled:
            return 0
        self._fh.flush()
        return self.path.stat().st_size

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _flatten(fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in fields.items():
        value = _jsonable(value)
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    commit = result.stdout.strip()
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return commit + ("-dirty" if dirty else "")


def environment_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions, device and git commit: enough to tell two runs' environments apart."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    info: dict[str, Any] = {
        "editor_reid": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git_commit": _git_commit(),
        "argv": sys.argv,
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def write_environment(path: Path, device: torch.device | str | None = None, **extra: Any) -> dict[str, Any]:
    info = environment_info(device)
    info.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2) + "\n")
    return info
