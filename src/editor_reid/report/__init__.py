"""``editor-reid report``: one self-contained HTML page about a finished (or running) training run.

Public API:
    build_report(run_dir, *, weights=None, out=None, max_queries=8) -> Path

The page embeds everything (PNG pictures as data URIs, inline CSS, no script, no network), so
it can be mailed or archived as one file. The pictures need matplotlib (``pip install
"editor-reid[report]"``); it is imported only here, with the Agg backend.
"""

from editor_reid.report.build import build_report

__all__ = ["build_report"]
