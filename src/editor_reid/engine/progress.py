"""What a run has done so far: step counters, the evaluation history and the best epoch.

A :class:`Progress` travels in ``last.pt`` (as a dict), so a resumed run continues its counters
and its history; :meth:`Progress.summary` is what training returns.
"""

from __future__ import annotations

import dataclasses

from editor_reid.engine.inference import METRIC_KEYS

__all__ = ["Progress"]


@dataclasses.dataclass
class Progress:
    epoch: int = 0  # last completed epoch
    step: int = 0  # steps completed inside epoch + 1 (mid-epoch checkpoints only)
    global_step: int = 0
    history: list = dataclasses.field(default_factory=list)  # evaluation records {"epoch", metrics...}
    best: dict | None = None  # {"epoch": e, "metrics": {...}}
    epoch_sums: dict = dataclasses.field(default_factory=dict)  # running loss sums of a partial epoch
    epoch_time: float = 0.0  # seconds spent in a partial epoch before a mid-epoch checkpoint

    def record_evaluation(self, epoch: int, metrics: dict) -> bool:
        """Add an evaluation; True when it is the best trained epoch so far (by mAP, later wins ties)."""
        self.history.append({"epoch": epoch, **metrics})
        if epoch > 0 and (self.best is None or metrics["mAP"] >= self.best["metrics"]["mAP"]):
            self.best = {"epoch": epoch, "metrics": metrics}
            return True
        return False

    def evaluation_of(self, epoch: int) -> dict | None:
        """The evaluation record of ``epoch`` if it was the last one made."""
        return self.history[-1] if self.history and self.history[-1]["epoch"] == epoch else None

    def finish_epoch(self, epoch: int) -> None:
        self.epoch, self.step, self.epoch_sums, self.epoch_time = epoch, 0, {}, 0.0

    def summary(self, run_dir: str, epoch_times: list[float]) -> dict:
        """Final, best and untrained evaluations, the history and the mean epoch time."""
        trained = [r for r in self.history if r["epoch"] > 0]
        untrained = next((r for r in self.history if r["epoch"] == 0), None)
        return {
            "run_dir": run_dir,
            "epochs": self.epoch,
            "final": _split_record(trained[-1] if trained else None),
            "best": _split_record({"epoch": self.best["epoch"], **self.best["metrics"]}) if self.best else None,
            "untrained": _split_record(untrained),
            "history": list(self.history),
            "seconds_per_epoch": sum(epoch_times) / len(epoch_times) if epoch_times else None,
        }


def _split_record(record: dict | None) -> dict | None:
    if record is None:
        return None
    return {"epoch": record["epoch"], "metrics": {k: record[k] for k in METRIC_KEYS}}
