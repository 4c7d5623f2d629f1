"""The HTML report: one tiny training run, then the page, its sections, its numbers, its pictures,
and every way to get one (report, train, test --report on an official checkpoint, demo)."""

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _cli import exit_code, one_line
from _tiny import train_cfg
from editor_reid.cli import main
from editor_reid.config import dump_config, load_config
from editor_reid.engine.checkpoint import load_checkpoint
from editor_reid.engine.evaluate import run_test
from editor_reid.model import build_model, to_official_state_dict

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

# What issue 15 asks the page to hold, in its order.
SECTIONS = ("metrics", "cmc", "roc", "missing", "cross", "ranklists", "tokens", "cameras", "objects", "training",
            "embedding", "config")
PAIRS = ("RGB->NI", "RGB->TI", "NI->RGB", "NI->TI", "TI->RGB", "TI->NI", "RGB+NI->RGB+TI", "RGB+NI->NI+TI",
         "RGB+TI->RGB+NI", "RGB+TI->NI+TI", "NI+TI->RGB+NI", "NI+TI->RGB+TI")


@pytest.fixture(scope="module")
def run_dir(train_data, tmp_path_factory):
    from editor_reid.engine.train import train

    out = tmp_path_factory.mktemp("report") / "run"
    train(train_cfg(train_data, out, "solver.max_epochs=2", "solver.eval_period=1"), quiet=True)
    return out


@pytest.fixture(scope="module")
def report(run_dir):
    from editor_reid.report import build_report

    path = build_report(run_dir, max_queries=4, queries=["3"], device="cpu")
    return path, path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def data(run_dir):
    """The report's numbers for the run's last checkpoint."""
    from editor_reid.report.data import ReportData

    captured = []
    cfg = load_config(run_dir / "config.yaml")
    run_test(cfg, run_dir / "checkpoints" / "last.pt", device="cpu", quiet=True,
             then=lambda run: captured.append(ReportData(run, seed=0)))
    return captured[0]


def _section(page: str, sid: str) -> str:
    match = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert match, sid
    return match.group(1)


def _decode(fragment: str) -> list[Image.Image]:
    images = []
    for kind, b64 in re.findall(r'src="data:image/(png|jpeg);base64,([^"]+)"', fragment):
        image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        image.load()
        assert image.format.lower() == kind
        images.append(image)
    return images


def test_report_is_written_next_to_the_run(run_dir, report):
    path, _ = report
    assert path == run_dir / "report.html"
    assert 10_000 < path.stat().st_size < 5_000_000


def test_report_has_every_section_in_order(report):
    _, page = report
    found = re.findall(r'<section id="([a-z]+)">\s*<h2>', page)
    assert tuple(found) == SECTIONS
    metrics = _section(page, "metrics")
    assert "final (epoch 2)" in metrics and "best (epoch" in metrics and "protocol same_camera" in metrics
    assert "report's weights (last.pt, epoch 2)" in metrics


def test_report_is_self_contained(report):
    _, page = report
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page)
    assert "<script" not in page and "<link" not in page


def test_report_images_decode(report):
    _, page = report
    # CMC, ROC, tokens, training, embedding + 1 named and 4 chosen rank lists of a query and 10 gallery entries
    images = _decode(page)
    assert len(images) == 5 + 5 * 11
    assert len(re.findall(r"<img ", page)) == len(images)
    for sid in ("cmc", "roc", "tokens", "training", "embedding"):
        assert len(_decode(_section(page, sid))) == 1, sid


def test_missing_and_cross_tables_are_those_of_test(run_dir, data, report):
    cfg = load_config(run_dir / "config.yaml")
    weights = run_dir / "checkpoints" / "last.pt"
    missing = run_test(cfg, weights, missing="all", quiet=True, device="cpu")
    cross = run_test(cfg, weights, cross="all", quiet=True, device="cpu")
    assert list(data.subsets) == list(missing)
    for name, row in missing.items():
        assert data.subsets[name] == pytest.approx(row), name
    assert list(data.cross) == [*PAIRS, "average"]
    for name in [*PAIRS, "average"]:
        assert data.cross[name] == pytest.approx(cross[name]), name
    assert data.metrics == pytest.approx(cross["RGB+NI+TI"])
    _, page = report
    table = _section(page, "cross")
    for name in PAIRS:
        row = re.search(rf"<tr><td>{re.escape(name.replace('>', '&gt;'))}</td>(.*?)</tr>", table)
        assert row, name
        first = re.search(r"<td>([\d.]+)</td>", row.group(1)).group(1)
        assert first == f"{100 * cross[name]['mAP']:.2f}", name


def test_per_query_ap_cmc_and_roc_agree_with_the_metrics(data):
    valid = ~np.isnan(data.query_ap)
    assert valid.sum() > 0
    assert data.query_ap[valid].mean() == pytest.approx(data.metrics["mAP"], abs=1e-12)
    assert data.cmc[0] == pytest.approx(data.metrics["rank1"]) and len(data.cmc) == 50
    from editor_reid import metrics

    q, g = data.query, data.gallery
    ids = dict(q_pids=q.pids, g_pids=g.pids, q_camids=q.camids, g_camids=g.camids)
    want = metrics.tpr_at_fpr(data.distmat, **ids, fprs=(1e-2, 1e-1))
    assert data.tpr_at(1e-1) == want[1e-1]
    assert data.num_negative_pairs == int((q.pids[:, None] != g.pids[None, :]).sum())
    assert np.isnan(data.tpr_at(1e-4))  # fewer than 10,000 different-identity pairs: not measurable


def test_rank_lists_skip_removed_items_and_follow_the_distances(data):
    for i in range(len(data.query.pids)):
        ranked = data.ranked(i)
        assert len(ranked) == min(10, len(data.gallery.pids))
        removed = (data.gallery.pids[ranked] == data.query.pids[i]) & (data.gallery.camids[ranked] == data.query.camids[i])
        assert not removed.any()
        assert np.all(np.diff(data.distmat[i, ranked]) >= 0)
    groups = data.chosen_queries(4, named=["3", "3"])
    assert groups["named"] == [3] and 3 not in groups["hardest"] + groups["random"]
    valid = np.flatnonzero(~np.isnan(data.query_ap))
    others = np.setdiff1d(valid, [3])
    assert data.query_ap[groups["hardest"]].max() <= np.sort(data.query_ap[others])[1]
    path = Path(data.splits.query[5].paths["NI"])
    assert data.chosen_queries(0, named=[path.name])["named"] == [5]
    assert data.chosen_queries(0, named=[str(path)])["named"] == [5]


def test_named_query_that_does_not_exist_is_one_line(run_dir, tmp_path, capsys):
    assert exit_code(["report", str(run_dir), "--out", str(tmp_path / "r.html"), "--query", "no_such.jpg",
                      "--device", "cpu"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "query 'no_such.jpg'" in line
    assert exit_code(["report", str(run_dir), "--out", str(tmp_path / "r.html"), "--query", "999",
                      "--device", "cpu"]) == 2
    assert "query 999: the test split has 32 queries" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "r.html").exists()


def test_tokens_on_the_object_use_the_synthetic_masks(data, run_dir):
    share = data.object_share()
    assert share is not None and share.images == len(data.splits.query)
    # The kept masks are the model's token masks of the full-modality query pass.
    from editor_reid.data.loaders import build_test_loader
    from editor_reid.engine.inference import batch_images

    model = data.run.model
    masks = []
    with torch.no_grad():
        for batch in build_test_loader(data.cfg, data.splits.query):
            masks.append(model.forward_features(batch_images(batch, "cpu"), batch["camid"]).token_mask.numpy())
    assert np.array_equal(np.concatenate(masks), data.query.token_masks)
    assert share.selected_per_image == pytest.approx(data.query.token_masks.sum(axis=1).mean())
    assert 0 < share.object_patch_fraction < 1 and 0 <= share.selected_on_object <= 1


def test_objects_section_without_masks_says_so(data, monkeypatch):
    from editor_reid.report import data as report_data

    monkeypatch.setattr(report_data, "mask_path_for", lambda path: (_ for _ in ()).throw(ValueError("outside")))
    assert data.object_share() is None


def test_cli_report_writes_the_out_file(run_dir, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(run_dir), "--out", str(out), "--max-queries", "2", "--device", "cpu",
                 "--weights", str(run_dir / "checkpoints" / "best.pt")]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert "best.pt" in out.read_text()


def test_cli_report_missing_run_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in one_line(capsys.readouterr().err)


def test_train_writes_the_report_at_the_end(train_data, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(dump_config(train_cfg(train_data, tmp_path / "run", "solver.max_epochs=1")))
    assert main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'run' / 'report.html'}" in out
    page = (tmp_path / "run" / "report.html").read_text()
    assert "final (epoch 1)" in page
    config.write_text(dump_config(train_cfg(train_data, tmp_path / "quiet", "solver.max_epochs=1")))
    assert main(["train", "--config", str(config), "--no-report"]) == 0
    assert not (tmp_path / "quiet" / "report.html").exists()


def test_without_the_extra_training_still_succeeds(train_data, tmp_path, capsys, monkeypatch):
    from editor_reid.report import figures

    def missing():
        raise figures.MissingExtraError("the report needs matplotlib; install it with `pip install \"editor-reid[report]\"`")

    monkeypatch.setattr(figures, "require_matplotlib", missing)
    monkeypatch.setattr(figures, "_pyplot", missing)
    config = tmp_path / "c.yaml"
    config.write_text(dump_config(train_cfg(train_data, tmp_path / "run", "solver.max_epochs=1")))
    assert main(["train", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert "editor-reid: report skipped: the report needs matplotlib" in err
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "run" / "report.html").exists()


def test_test_report_on_an_official_checkpoint(run_dir, tmp_path, capsys):
    cfg = load_config(run_dir / "config.yaml")
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    model = build_model(cfg, state["num_classes"], state["num_cameras"])
    model.load_state_dict(state["model"])
    torch.save(to_official_state_dict(model), tmp_path / "EDITORbest.pth")
    config = tmp_path / "c.yaml"
    config.write_text(dump_config(cfg))
    out = tmp_path / "official" / "report.html"
    assert main(["test", "--config", str(config), "--weights", str(tmp_path / "EDITORbest.pth"),
                 "--report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out}" in printed and "official EDITOR checkpoint" in printed
    page = out.read_text()
    assert tuple(re.findall(r'<section id="([a-z]+)">', page)) == SECTIONS
    assert "official EDITOR checkpoint, epoch not recorded" in page
    assert "No training records" in _section(page, "training")
    ours = run_test(cfg, run_dir / "checkpoints" / "last.pt", quiet=True, device="cpu")
    row = re.search(r"report's weights \(EDITORbest.pth[^<]*</td><td>([\d.]+)</td>", page)
    assert row and row.group(1) == f"{100 * ours['mAP']:.2f}"


def test_test_report_needs_weights(tmp_path, capsys):
    assert exit_code(["test", "--features", str(tmp_path / "f.npz"), "--report", str(tmp_path / "r.html")]) == 2
    assert "--report needs --weights" in one_line(capsys.readouterr().err)


def test_demo_writes_its_report_and_prints_the_path(run_dir, tmp_path, capsys, monkeypatch):
    from editor_reid.engine import demo

    # The demo's own run takes minutes; the CLI's report step is what is checked here.
    monkeypatch.setattr(demo, "run_demo", lambda out, **kwargs: {"run_dir": str(run_dir)})
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert f"report: {run_dir / 'report.html'}" in capsys.readouterr().out
