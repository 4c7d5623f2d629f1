"""The errors a user's input can cause, and the exit status the command line gives each.

Every exception that means "the input is wrong" (a configuration, a file, a dataset, a
checkpoint) derives from :class:`EditorReidError`; the command line prints its message as one
line, ``editor-reid: <message>``, and exits with its ``exit_code``: 2 for usage and
configuration errors, 1 for data, checkpoint and runtime problems. Anything else is a bug and
keeps its traceback. This module imports nothing, so every layer (the model included) may use it.
"""

from __future__ import annotations

__all__ = ["EditorReidError", "UsageError", "TrainingInterrupted"]


class EditorReidError(Exception):
    """A problem with the user's input or environment, reported in one line (exit status 1)."""

    exit_code = 1


class UsageError(EditorReidError):
    """A wrong command line or configuration (exit status 2)."""

    exit_code = 2


class TrainingInterrupted(EditorReidError):
    """Training stopped on SIGINT / SIGTERM after writing a checkpoint (exit status 128 + signal)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
