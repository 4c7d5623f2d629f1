"""``editor-reid report``: one self-contained HTML page about an evaluated model, written after
training, by ``test --report`` and by the demo.

Public API:
    build_report(run_dir=None, *, weights=None, config=None, out=None, max_queries=8, queries=()) -> Path
    write_report(run, out, *, run_dir=None, max_queries=8, queries=()) -> Path   (from run_test's TestRun)
    run_dir_of(weights) -> Path | None
    require_report_extra()   raises one clear error when matplotlib / scikit-learn are missing

The page embeds everything (PNG and JPEG pictures as data URIs, inline CSS, no script, no
network), so it can be mailed or archived as one file. The pictures need matplotlib and the
t-SNE scikit-learn (``pip install "editor-reid[report]"``); they are imported only here, with
matplotlib's Agg backend.
"""

from editor_reid.report.build import SECTIONS, build_report, run_dir_of, write_report
from editor_reid.report.figures import require_matplotlib as require_report_extra

__all__ = ["SECTIONS", "build_report", "require_report_extra", "run_dir_of", "write_report"]
