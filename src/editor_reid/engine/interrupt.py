"""SIGINT / SIGTERM during training: stop after the current step instead of in the middle of it.

A cluster pre-empts a job with SIGTERM (and a grace period), a user presses Ctrl-C (SIGINT).
Either way the loop should finish the optimiser step it is in, write a checkpoint and exit, so
that ``--resume`` continues exactly. :class:`StopRequest` records the signal; the loop asks
:meth:`StopRequest.requested` between steps. A second signal stops at once (KeyboardInterrupt);
the checkpoints are written atomically, so even that never damages ``last.pt``.

Handlers can only be installed from the main thread; elsewhere (a training run started from a
worker thread of an application) signals keep their previous behaviour.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

from editor_reid.engine import distributed as du
from editor_reid.errors import TrainingInterrupted

__all__ = ["StopRequest", "STOP_SIGNALS"]

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A context manager catching SIGINT/SIGTERM; ``signum`` is the first one received (or None)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self._restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.signum = signum
        log.warning("received %s: finishing the current step, then writing a checkpoint "
                    "(send it again to stop at once)", signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def agreed(self, ctx: du.DistContext) -> bool:
        """Whether a signal reached any rank; under DDP every rank then stops at the same step
        (one small all-reduce per call)."""
        self.signum = du.max_over_ranks(ctx, self.signum or 0) or None
        return self.requested

    def interrupted(self, where: str, state: Path, run_dir: Path) -> TrainingInterrupted:
        """The exception that ends the run, once its state is written to ``state``."""
        log.info("stopped by %s at %s; training state written to %s", self.name, where, state)
        return TrainingInterrupted(f"training stopped by {self.name} at {where}; its state is saved in {state}. "
                                   f"Continue with: editor-reid train --resume {run_dir}", self.signum)
