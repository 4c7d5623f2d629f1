"""``editor-reid search`` (``editor_reid.deploy.search``): a saved gallery index searched with a
feature file or with images extracted on the spot; open-set unknown flags."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _cli import exit_code, one_line  # noqa: E402
from _features import tiny_weights  # noqa: E402
from test_thresholds import make_features  # noqa: E402

from editor_reid.deploy.gallery import GalleryIndex
from editor_reid.deploy.search import run_search
from editor_reid.deploy.thresholds import calibrate_feature_file
from editor_reid.features.extract import run_extract
from editor_reid.features.store import load_feature_file, save_feature_file
from editor_reid.metrics import pairwise_distance


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A feature file with query and gallery rows, a flat index of its gallery rows with
    thresholds calibrated at FPR 0.05 and 0.2, and the calibration."""
    tmp = tmp_path_factory.mktemp("search")
    ff = make_features(n_ids=8, per_cam=2, cams=3, noise=0.8)
    feats = save_feature_file(tmp / "feats.npz", ff)
    index_dir = tmp / "index"
    GalleryIndex.from_feature_file(feats, kind="flat").save(index_dir)
    assert exit_code(["calibrate", "--features", str(feats), "--fpr", "0.05,0.2", "--index", str(index_dir),
                 "--out", str(tmp / "thr.json")]) == 0
    return tmp, feats, index_dir, calibrate_feature_file(ff, fprs=[0.05, 0.2])


def _brute_force(ff, query_rows, exclude_same_camera=False):
    """Gallery rows of the file by ascending distance to each query row, with the distances."""
    gallery_rows = np.flatnonzero(ff.split == "gallery")
    d = pairwise_distance(ff.features[query_rows], ff.features[gallery_rows])
    out = []
    for i, q in enumerate(query_rows):
        keep = np.ones(gallery_rows.size, bool)
        if exclude_same_camera:
            keep = ff.camid[gallery_rows] != ff.camid[q]
        order = np.flatnonzero(keep)[np.argsort(d[i, keep], kind="stable")]
        out.append((gallery_rows[order], d[i, order]))
    return out


def test_results_equal_a_brute_force_ranking(setup, capsys):
    tmp, feats, index_dir, _ = setup
    out = tmp / "res.json"
    assert exit_code(["search", "--index", str(index_dir), "--features", str(feats), "-k", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    ff = load_feature_file(feats)
    assert f"search: {len(ff)} queries" in printed and "0 unknown (closed set" in printed and str(out) in printed
    results = json.loads(out.read_text())
    assert [r["query"] for r in results] == list(range(len(ff)))  # every row, in order
    expected = _brute_force(ff, np.arange(len(ff)))
    for r, (rows, dist) in zip(results, expected):
        assert list(r) == ["query", "pid", "camid", "split", "paths", "unknown", "matches"]
        assert (r["pid"], r["camid"], r["split"]) == (ff.pid[r["query"]], ff.camid[r["query"]], ff.split[r["query"]])
        assert r["paths"] == {"RGB": ff.paths["RGB"][r["query"]]} and r["unknown"] is False
        assert len(r["matches"]) == 5
        assert [m["row"] for m in r["matches"]] == rows[:5].tolist()
        got = [m["distance"] for m in r["matches"]]
        assert got == sorted(got) and got == pytest.approx(dist[:5].tolist(), abs=1e-5)
        for m in r["matches"]:
            assert set(m) == {"gallery", "pid", "camid", "row", "distance"}
            assert (m["pid"], m["camid"]) == (ff.pid[m["row"]], ff.camid[m["row"]])


def test_splits_and_exclude_same_camera(setup):
    tmp, feats, index_dir, _ = setup
    ff = load_feature_file(feats)
    query_rows = np.flatnonzero(ff.split == "query")
    results = run_search(index_dir, None, features=feats, splits=["query"], k=3, exclude_same_camera=True,
                         quiet=True)
    assert [r["query"] for r in results] == query_rows.tolist()
    for r, (rows, _) in zip(results, _brute_force(ff, query_rows, exclude_same_camera=True)):
        assert [m["row"] for m in r["matches"]] == rows[:3].tolist()
    # Gallery rows as queries: their own camera holds their own image; excluded, it never comes back.
    gallery_rows = np.flatnonzero(ff.split == "gallery")
    results = run_search(index_dir, None, features=feats, splits=["gallery"], k=40, exclude_same_camera=True,
                         quiet=True)
    for r in results:
        assert r["matches"] and all(m["camid"] != r["camid"] for m in r["matches"])
        assert len(r["matches"]) == int((ff.camid[gallery_rows] != r["camid"]).sum())  # fewer than k


def _agree(unknown, best, threshold) -> None:
    """unknown == (best > threshold), except within float rounding of the threshold: FAISS and
    the metrics compute the same distance with different roundings (about 1e-7)."""
    clear = np.abs(best - threshold) > 1e-5
    assert np.array_equal(np.asarray(unknown)[clear], (best > threshold)[clear])
    assert clear.sum() >= len(best) - 1


def test_unknown_flags_with_a_threshold_and_an_fpr(setup, capsys):
    tmp, feats, index_dir, cal = setup
    ff = load_feature_file(feats)
    rows = np.flatnonzero(ff.split == "query")
    best = np.array([d[0] for _, d in _brute_force(ff, rows)])
    low, high = np.sort(best)[len(best) // 2 - 1: len(best) // 2 + 1]
    threshold = float(low + high) / 2  # half the queries are unknown, none is close to the line
    results = run_search(index_dir, tmp / "t.json", features=feats, splits=["query"], k=2, threshold=threshold,
                         quiet=True)
    unknown = np.array([r["unknown"] for r in results])
    assert unknown.tolist() == (best > threshold).tolist() and unknown.sum() == len(best) // 2
    # --fpr takes the threshold calibrate stored in the index's manifest.
    t05 = cal.thresholds["0.05"]
    assert GalleryIndex.load(index_dir).thresholds["0.05"] == pytest.approx(t05)
    out = tmp / "f.json"
    assert exit_code(["search", "--index", str(index_dir), "--features", str(feats), "--splits", "query", "--fpr", "5e-2",
                 "--out", str(out)]) == 0
    unknown = [r["unknown"] for r in json.loads(out.read_text())]
    _agree(unknown, best, np.float32(t05))
    assert f"{sum(unknown)} unknown (threshold {t05:.6g} (FPR 0.05))" in capsys.readouterr().out
    # ... or from a calibrate --out file.
    assert exit_code(["search", "--index", str(index_dir), "--features", str(feats), "--splits", "query", "--fpr", "0.2",
                 "--thresholds", str(tmp / "thr.json"), "--out", str(out)]) == 0
    _agree([r["unknown"] for r in json.loads(out.read_text())], best, np.float32(cal.thresholds["0.2"]))


def test_errors_are_one_line(setup, tmp_path, capsys):
    tmp, feats, index_dir, _ = setup
    base = ["search", "--index", str(index_dir), "--out", str(tmp_path / "r.json")]
    other_model = make_features(n_ids=8, fingerprint="fedcba987654")
    narrow = make_features(dim=8)
    cases = [
        (["--features", str(feats), "--fpr", "1e-3"],
         r"no threshold calibrated for FPR 0\.001 in the manifest of index '.*' \(calibrated FPRs: 0\.05, 0\.2\)", 1),
        (["--features", str(save_feature_file(tmp_path / "o.npz", other_model))],
         r"come from model fedcba987654, index '.*' holds features of model abc123", 1),
        (["--features", str(save_feature_file(tmp_path / "n.npz", narrow))],
         r"are 8-d, index '.*' holds 16-d features", 1),
        (["--features", str(feats), "--thresholds", str(tmp / "thr.json")], r"--thresholds goes with --fpr", 2),
        (["--features", str(feats), "--fpr", "0.05", "--threshold", "1"], r"not allowed with argument", 2),
        (["--features", str(feats), "--splits", "train"], r"no rows with split train", 1),
        (["--features", str(feats), "--images", "x"], r"--images goes with --weights", 2),
        (["--weights", "w.pt"], r"search --weights needs exactly one input", 2),
    ]
    for argv, message, status in cases:
        assert exit_code([*base, *argv]) == status, argv
        assert re.search(message, one_line(capsys.readouterr().err)), argv
    # A thresholds file of another metric is refused.
    cosine = tmp_path / "cos.json"
    assert exit_code(["calibrate", "--features", str(feats), "--fpr", "0.05", "--metric", "cosine", "--out",
                 str(cosine)]) == 0
    capsys.readouterr()
    assert exit_code([*base, "--features", str(feats), "--fpr", "0.05", "--thresholds", str(cosine)]) == 1
    assert "holds cosine distances but index" in one_line(capsys.readouterr().err)


def test_search_with_weights_extracts_the_queries(tmp_path, capsys):
    data, weights = tiny_weights(tmp_path)
    gallery = run_extract(weights, tmp_path / "gallery.npz", dataset="rgbnt201", root=data, splits=["gallery"],
                          device="cpu", quiet=True)
    index_dir = tmp_path / "index"
    GalleryIndex.from_feature_file(gallery).save(index_dir)
    out = tmp_path / "res.json"
    assert exit_code(["search", "--index", str(index_dir), "--weights", str(weights), "--dataset", "rgbnt201",
                 "--root", str(data), "--device", "cpu", "-k", "3", "--out", str(out)]) == 0
    assert "search: extracted" in capsys.readouterr().out
    results = json.loads(out.read_text())
    ff = load_feature_file(gallery)
    assert len(results) == len(ff)  # RGBNT201: the query split is the gallery's images
    for r in results:
        assert r["split"] == "query" and r["pid"] >= 0
        # Each query is a gallery image: it finds itself first, at distance ~0.
        best = r["matches"][0]
        assert best["distance"] == pytest.approx(0.0, abs=1e-4)
        assert ff.paths["RGB"][best["row"]] == r["paths"]["RGB"]
