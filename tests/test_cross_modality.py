"""Cross-modality retrieval (``run_test(query_modalities=..., gallery_modalities=..., cross="all")``,
``editor-reid test --cross all``): the standard pairs, rows that equal a computation from
separately extracted features, one extraction per modality subset, and the usage errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from editor_reid import metrics
from editor_reid.cli import main
from editor_reid.config import dump_config
from editor_reid.data.layouts import load_dataset
from editor_reid.data.loaders import build_test_loader
from editor_reid.data.synthetic import make_synthetic
from editor_reid.engine import inference
from editor_reid.engine.evaluate import run_test
from editor_reid.engine.inference import extract_features
from editor_reid.errors import UsageError
from editor_reid.model import build_model
from editor_reid.modalities import cross_modality_pairs, pair_name

from _tiny import tiny_cfg

PAIRS = ["RGB->NI", "RGB->TI", "NI->RGB", "NI->TI", "TI->RGB", "TI->NI",
         "RGB+NI->RGB+TI", "RGB+NI->NI+TI", "RGB+TI->RGB+NI", "RGB+TI->NI+TI", "NI+TI->RGB+NI", "NI+TI->RGB+TI"]
METRICS = {"mAP", "rank1", "rank5", "rank10", "mINP"}


def _cfg(root, **overrides):
    return tiny_cfg(**{"model.pretrain_choice": "none", "dataloader.num_workers": 0, "test.ims_per_batch": 64,
                       "datasets.root_dir": str(root), **overrides})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A synthetic RGBNT201 tree, an untrained tiny model and its weights file."""
    root = tmp_path_factory.mktemp("cross")
    make_synthetic("rgbnt201", root / "data", ids=8, views=2, seed=0)
    cfg = _cfg(root / "data")
    splits = load_dataset(cfg.datasets.names, cfg.datasets.root_dir)
    torch.manual_seed(0)
    model = build_model(cfg, splits.num_train_pids, splits.num_cameras).eval()
    torch.save(model.state_dict(), root / "w.pt")
    return cfg, root / "w.pt", model, splits


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("editor-reid:") and "Traceback" not in err, err
    return lines[0]


def test_standard_pairs():
    assert [pair_name(q, g) for q, g in cross_modality_pairs()] == PAIRS
    assert cross_modality_pairs(["RGB", "TI"]) == [(("RGB",), ("TI",)), (("TI",), ("RGB",))]
    assert cross_modality_pairs(["NI"]) == []


def test_cross_all_extracts_each_subset_once_and_reports_every_pair(setup, tmp_path, monkeypatch, capsys):
    cfg, weights, _, _ = setup
    fed = []

    def counting(model, loader, device, amp="none", modalities=None, keep_token_masks=False):
        fed.append(tuple(modalities))
        return extract_features(model, loader, device, amp=amp, modalities=modalities)

    monkeypatch.setattr(inference, "extract_features", counting)
    out = tmp_path / "cross.json"
    result = run_test(cfg, weights, cross="all", json_out=out)
    # RGBNT201: query and gallery are one sample list, so 6 subsets + all modalities = 7 passes.
    assert sorted(fed) == sorted([("RGB",), ("NI",), ("TI",), ("RGB", "NI"), ("RGB", "TI"), ("NI", "TI"),
                                  ("RGB", "NI", "TI")])
    assert list(result) == [*PAIRS, "average", "RGB+NI+TI"]
    assert all(set(row) == METRICS for row in result.values())
    for key in METRICS:
        assert result["average"][key] == pytest.approx(np.mean([result[p][key] for p in PAIRS]))
    assert json.loads(out.read_text()) == result  # JSON round-trips floats exactly
    printed = capsys.readouterr().out
    assert "absent modalities are zero images" in printed
    for name in [*PAIRS, "average", "RGB+NI+TI"]:
        assert any(line.startswith(name + " ") for line in printed.splitlines()), name
    monkeypatch.undo()
    assert result["RGB+NI+TI"] == pytest.approx(run_test(cfg, weights, quiet=True))


def test_a_pair_equals_metrics_of_separately_extracted_features(setup):
    cfg, weights, model, splits = setup
    loader = build_test_loader(cfg, splits.query)
    query = extract_features(model, loader, "cpu", modalities=("RGB",))
    gallery = extract_features(model, loader, "cpu", modalities=("NI", "TI"))
    assert not torch.allclose(query.feats, gallery.feats)
    expected = metrics.evaluate_features(
        query.feats, gallery.feats, query.pids, gallery.pids, query.camids, gallery.camids,
        protocol=splits.protocol, metric=cfg.test.distance, normalize=cfg.test.feat_norm)
    # Names in any case and order, as a string or a list.
    result = run_test(cfg, weights, query_modalities="rgb", gallery_modalities=["TI", "NI"], device="cpu", quiet=True)
    assert result == pytest.approx({k: float(expected[k]) for k in METRICS})


def test_same_modality_on_both_sides_equals_the_missing_modality_row(setup, capsys):
    cfg, weights, _, _ = setup
    missing = run_test(cfg, weights, missing="all", quiet=True)
    assert run_test(cfg, weights, query_modalities="RGB", gallery_modalities="RGB") == pytest.approx(missing["RGB"])
    printed = capsys.readouterr().out
    assert "fed: queries RGB, gallery RGB" in printed and "RGB->RGB " in printed
    # One side only: the other gets every configured modality.
    assert run_test(cfg, weights, query_modalities="RGB,NI,TI", quiet=True) == pytest.approx(missing["RGB+NI+TI"])


@pytest.mark.parametrize(
    "kwargs, modalities, message",
    [
        ({"cross": "all", "missing": "all"}, None, "give only one of them"),
        ({"cross": "all", "gallery_modalities": "NI"}, None, "give only one of them"),
        ({"query_modalities": "RGB,XX"}, None, "query modalities 'RGB,XX': 'XX' is not one of RGB, NI, TI"),
        ({"gallery_modalities": "TI"}, "[RGB,NI]", "gallery modalities 'TI': 'TI' is not one of RGB, NI"),
        ({"query_modalities": "RGB,rgb"}, None, "'rgb' is named twice"),
        ({"query_modalities": []}, None, "none given"),
        ({"query_modalities": "RGB,"}, None, "an empty name is not one of"),
        ({"cross": "all"}, "[NI]", "needs two modalities or more"),
    ],
)
def test_usage_errors_come_before_any_work(setup, kwargs, modalities, message):
    cfg, _, _, _ = setup
    if modalities:
        cfg = _cfg(cfg.datasets.root_dir, **{"datasets.modalities": modalities})
    with pytest.raises(UsageError, match=message):
        run_test(cfg, "never-read.pt", **kwargs)


def test_cli_cross_all_and_its_errors(setup, tmp_path, capsys):
    cfg, weights, _, _ = setup
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(cfg))
    base = ["test", "--config", str(config), "--weights", str(weights)]
    out = tmp_path / "m.json"
    assert main([*base, "--cross", "all", "--json", str(out)]) == 0
    assert list(json.loads(out.read_text())) == [*PAIRS, "average", "RGB+NI+TI"]
    capsys.readouterr()
    assert main([*base, "--query-modalities", "XX"]) == 2
    assert "'XX' is not one of RGB, NI, TI" in _one_error_line(capsys.readouterr().err)
    for extra in (["--cross", "all", "--query-modalities", "RGB"], ["--missing", "all", "--gallery-modalities", "NI"]):
        with pytest.raises(SystemExit) as exc:
            main([*base, *extra])
        assert exc.value.code == 2
        assert "cannot be combined" in _one_error_line(capsys.readouterr().err)
