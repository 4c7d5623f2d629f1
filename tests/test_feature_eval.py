"""``editor-reid test --features`` / ``evaluate_feature_file``: a feature file's query rows against
its gallery rows give the metrics ``test`` computes from the model; the file's protocol is used;
bad files and bad command lines get one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from editor_reid import metrics
from editor_reid.cli import main
from editor_reid.config import dump_config, load_config
from editor_reid.data.layouts import load_dataset
from editor_reid.data.loaders import build_test_loader
from editor_reid.data.synthetic import make_synthetic
from editor_reid.engine.evaluate import evaluate_feature_file, run_test
from editor_reid.engine.inference import extract_features
from editor_reid.features.store import FeatureFile, FeatureFileError, save_feature_file
from editor_reid.model import build_model

from _tiny import tiny_cfg

METRICS = ("mAP", "rank1", "rank5", "rank10", "mINP")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Weights of an untrained tiny model and a feature file of the features ``test`` computes
    with them: RGBNT201's query and gallery are one sample list, so its rows appear twice."""
    root = tmp_path_factory.mktemp("feats")
    make_synthetic("rgbnt201", root / "data", ids=8, views=2, seed=0)
    cfg = tiny_cfg(**{"model.pretrain_choice": "none", "dataloader.num_workers": 0, "test.ims_per_batch": 64,
                      "datasets.root_dir": str(root / "data")})
    splits = load_dataset(cfg.datasets.names, cfg.datasets.root_dir)
    torch.manual_seed(0)
    model = build_model(cfg, splits.num_train_pids, splits.num_cameras).eval()
    torch.save(model.state_dict(), root / "w.pt")
    feats = extract_features(model, build_test_loader(cfg, splits.query), "cpu")
    n = len(feats.pids)
    ff = FeatureFile(
        features=np.concatenate([feats.feats.numpy()] * 2), pid=np.tile(feats.pids, 2),
        camid=np.tile(feats.camids, 2), sceneid=np.tile(feats.sceneids, 2),
        split=np.array(["query"] * n + ["gallery"] * n), paths={}, protocol=splits.protocol, normalized=False,
        weights=str(root / "w.pt"))
    return cfg, root / "w.pt", save_feature_file(root / "feats.npz", ff), ff


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("editor-reid:") and "Traceback" not in err, err
    return lines[0]


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_the_file_gives_the_metrics_of_test(setup, capsys):
    cfg, weights, path, _ = setup
    assert evaluate_feature_file(cfg, path) == run_test(cfg, weights, device="cpu", quiet=True)
    printed = capsys.readouterr().out
    assert f"features: {path}" in printed and "22 query / 22 gallery rows" in printed and "R-1" in printed
    assert evaluate_feature_file(cfg, path, rerank=True, quiet=True) == run_test(
        cfg, weights, rerank=True, device="cpu", quiet=True)


def test_cli_without_config_uses_the_default_test_settings(setup, tmp_path, capsys):
    cfg, weights, path, _ = setup
    out = tmp_path / "m.json"
    assert main(["test", "--features", str(path), "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == run_test(cfg, weights, device="cpu", quiet=True)
    # With a config, its test.* settings apply.
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(cfg))
    assert main(["test", "--features", str(path), "--config", str(config), "test.feat_norm=false",
                 "--json", str(out)]) == 0
    raw = load_config(config, overrides=["test.feat_norm=false"])
    assert json.loads(out.read_text()) == evaluate_feature_file(raw, path, quiet=True)
    assert "modalities fed RGB+NI+TI" in capsys.readouterr().out


def test_same_scene_protocol_uses_the_scene_ids(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    pid, camid, sceneid = rng.integers(0, 5, n), rng.integers(0, 3, n), rng.integers(0, 4, n)
    features = rng.standard_normal((n, 8)).astype(np.float32)
    split = np.where(np.arange(n) < 12, "query", "gallery")
    path = save_feature_file(tmp_path / "msvr.npz", FeatureFile(features, pid, camid, sceneid, split, paths={},
                                                                protocol="same_scene", normalized=False))
    q, g = split == "query", split == "gallery"
    expected = metrics.evaluate_features(features[q], features[g], pid[q], pid[g], camid[q], camid[g],
                                         q_sceneids=sceneid[q], g_sceneids=sceneid[g], protocol="same_scene")
    result = evaluate_feature_file(load_config(None), path, quiet=True)
    assert result == pytest.approx({k: float(expected[k]) for k in METRICS})
    by_camera = metrics.evaluate_features(features[q], features[g], pid[q], pid[g], camid[q], camid[g])
    assert result != pytest.approx({k: float(by_camera[k]) for k in METRICS})

    sceneid[3] = -1
    save_feature_file(path, FeatureFile(features, pid, camid, sceneid, split, paths={}, protocol="same_scene"))
    with pytest.raises(FeatureFileError, match="'sceneid'"):
        evaluate_feature_file(load_config(None), path, quiet=True)


def test_bad_files_exit_with_one_line(setup, tmp_path, capsys):
    _, _, _, ff = setup
    only_query = save_feature_file(tmp_path / "q.npz", ff.select(ff.split == "query"))
    assert main(["test", "--features", str(only_query)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert str(only_query) in line and "no rows with 'split' == 'gallery'" in line and "'query'" in line

    bad_shape = tmp_path / "shape.npz"
    np.savez(bad_shape, features=ff.features, pid=ff.pid[:-1], camid=ff.camid, split=ff.split)
    assert main(["test", "--features", str(bad_shape)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad_shape) in line and "'pid'" in line

    not_npz = tmp_path / "notes.npz"
    not_npz.write_text("not an archive")
    assert main(["test", "--features", str(not_npz)]) == 1
    assert str(not_npz) in _one_error_line(capsys.readouterr().err)

    assert main(["test", "--features", str(tmp_path / "absent.npz")]) == 2
    assert "absent.npz" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["test", "--features", "f.npz", "--weights", "w.pt"], "not allowed with argument"),
        (["test", "--config", "demo"], "one of the arguments --weights --features is required"),
        (["test", "--weights", "w.pt"], "required with --weights: --config"),
        (["test", "--features", "f.npz", "--cross", "all"], "--cross needs --weights"),
        (["test", "--features", "f.npz", "--query-modalities", "RGB"], "needs --weights"),
    ],
)
def test_usage_errors(argv, message, capsys):
    assert _exit_code(argv) == 2
    assert message in _one_error_line(capsys.readouterr().err)
