"""The HTML report: one tiny training run, then the page, its sections, its pictures and the CLI."""

import base64
import io
import re

import pytest
from PIL import Image

from _tiny import train_cfg
from editor_reid.cli import main

pytest.importorskip("matplotlib")

SECTIONS = ("metrics", "cmc", "missing", "ranklists", "tokens", "cameras", "training", "config")


@pytest.fixture(scope="module")
def run_dir(train_data, tmp_path_factory):
    from editor_reid.engine.train import train

    out = tmp_path_factory.mktemp("report") / "run"
    train(train_cfg(train_data, out, "solver.max_epochs=2", "solver.eval_period=1"))
    return out


@pytest.fixture(scope="module")
def report(run_dir):
    from editor_reid.report import build_report

    path = build_report(run_dir, max_queries=4, device="cpu")
    return path, path.read_text(encoding="utf-8")


def test_report_is_written_next_to_the_run(run_dir, report):
    path, _ = report
    assert path == run_dir / "report.html"
    assert 10_000 < path.stat().st_size < 2_000_000


def test_report_has_every_section(report):
    _, page = report
    for sid in SECTIONS:
        assert re.search(rf'<section id="{sid}">\s*<h2>', page), sid
    assert "final (epoch 2)" in page and "best (epoch" in page and "protocol same_camera" in page
    assert "RGB+NI+TI" in page and "average" in page  # the missing-modality table


def test_report_is_self_contained(report):
    _, page = report
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page)
    assert "<script" not in page and "<link" not in page


def test_report_images_decode(report):
    _, page = report
    uris = re.findall(r'src="data:image/(png|jpeg);base64,([^"]+)"', page)
    assert len(uris) >= 3 + 4 * 11  # CMC, tokens, training + 4 rank lists of a query and 10 gallery entries
    for kind, data in uris:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
        assert image.format.lower() == kind
    assert len(re.findall(r"<img ", page)) == len(uris)


def test_cli_report_writes_the_out_file(run_dir, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(run_dir), "--out", str(out), "--max-queries", "2", "--device", "cpu",
                 "--weights", str(run_dir / "checkpoints" / "best.pt")]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert "best.pt" in out.read_text()


def test_cli_report_missing_run_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("editor-reid: ") and "not a run directory" in err[0]
