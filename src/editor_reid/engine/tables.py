"""The one fixed-width table of retrieval metrics that every command prints."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from editor_reid.engine.inference import METRIC_KEYS

__all__ = ["METRIC_HEADERS", "format_metrics_table", "format_summary"]

#: Column headers of METRIC_KEYS (mAP, rank1, rank5, rank10, mINP).
METRIC_HEADERS = ("mAP", "R-1", "R-5", "R-10", "mINP")


def _cell(value: Any) -> str:
    """A fraction as a percentage; a ``{"mean", "std"}`` aggregate as ``mean ± std``."""
    if isinstance(value, Mapping):
        return f"{100 * value['mean']:.1f} ± {100 * value['std']:.1f}"
    return f"{100 * value:.2f}"


def format_metrics_table(rows: Mapping[str, Mapping[str, Any]], first_column: str = "", *,
                         notes: Mapping[str, str] | None = None, rule_before: Collection[str] = ()) -> str:
    """Rows of metrics (fractions, or mean/std aggregates) as a table in percent.

    ``rows``: label -> metrics with the keys of ``METRIC_KEYS``; ``notes``: label -> a remark
    printed after the row; ``rule_before``: labels preceded by a horizontal rule (averages).
    """
    notes = notes or {}
    cells = {label: [_cell(metrics[k]) for k in METRIC_KEYS] for label, metrics in rows.items()}
    label_width = max([len(first_column), *(len(label) for label in rows)])
    widths = [max([len(h), *(len(c[i]) for c in cells.values())]) for i, h in enumerate(METRIC_HEADERS)]
    head = f"{first_column:<{label_width}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(METRIC_HEADERS, widths))
    lines = [head, "-" * len(head)]
    for label, row in cells.items():
        if label in rule_before:
            lines.append("-" * len(head))
        line = f"{label:<{label_width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(row, widths))
        lines.append(f"{line}   <- {notes[label]}" if label in notes else line)
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    """The run's metrics table: untrained, final and best epoch, each labelled."""
    rows, notes = {}, {}
    if summary.get("untrained"):
        rows["untrained (epoch 0)"] = summary["untrained"]["metrics"]
    if summary.get("final"):
        label = f"final (epoch {summary['final']['epoch']})"
        rows[label], notes[label] = summary["final"]["metrics"], "the honest figure"
    if summary.get("best"):
        label = f"best (epoch {summary['best']['epoch']}, test)"
        rows[label] = summary["best"]["metrics"]
        notes[label] = "selected on the test split, as the official code reports"
    table = format_metrics_table(rows, notes=notes) if rows else "(no evaluation)"
    return f"run directory: {summary['run_dir']}\n{table}"
