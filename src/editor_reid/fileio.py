"""Atomic file writes: the one way editor-reid replaces a file it owns.

A writer fills a temporary file in the target's folder; the file is flushed to disk, given the
permissions a new file would get (the process's umask, not ``mkstemp``'s private 0600), renamed
onto the target, and the folder entry is flushed too. A process killed at any moment leaves
either the old file or the new one, never a mixture. Checkpoints, feature files and their
chunks, gallery generations, thresholds, search results and exported models all go through
:func:`atomic_write`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "write_json_atomically", "fsync_directory"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_directory(directory: str | Path) -> None:
    """Make renames in ``directory`` durable; a no-op where the platform cannot open a folder."""
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


def atomic_write(path: str | Path, write: Callable[[Path], Any], *,
                 before_replace: Callable[[], Any] | None = None) -> Path:
    """Replace ``path`` with what ``write(tmp)`` writes to the temporary path ``tmp``.

    ``before_replace`` runs after the new file is on disk and before the rename (a checkpoint
    keeps the previous file there). The parent folder is created when missing. On any error the
    temporary file is removed and the old ``path`` is untouched. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def write_json_atomically(path: str | Path, value: Any, *, indent: int = 2) -> Path:
    """``value`` as JSON (with a final newline) at ``path``, atomically."""
    text = json.dumps(value, indent=indent) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))
