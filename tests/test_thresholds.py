"""Open-set thresholds (``editor_reid.deploy.thresholds``) and ``editor-reid calibrate``."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from editor_reid.cli import main
from editor_reid.deploy.thresholds import (
    ThresholdError,
    calibrate_distances,
    calibrate_feature_file,
    calibrate_features,
    fpr_key,
    load_thresholds,
    lookup_threshold,
    pair_distances,
    parse_fprs,
    select_thresholds,
)
from editor_reid.errors import UsageError
from editor_reid.features.store import FeatureFile, load_feature_file, save_feature_file
from editor_reid.metrics import pairwise_distance, tpr_at_fpr

GENUINE = [0.1, 0.3, 0.5, 0.7]
IMPOSTOR = [0.2, 0.4, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3]  # N = 10, a tie at 0.4


def make_features(n_ids=6, per_cam=2, cams=3, dim=16, seed=0, fingerprint="abc123", noise=0.6) -> FeatureFile:
    """Query = camera 0, gallery = the other cameras; one cluster per identity, unit rows."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    rows, pid, camid, split = [], [], [], []
    for p in range(n_ids):
        for c in range(cams):
            for _ in range(per_cam):
                rows.append(centres[p] + noise * rng.normal(size=dim))
                pid.append(p)
                camid.append(c)
                split.append("query" if c == 0 else "gallery")
    f = np.asarray(rows, np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    n = len(pid)
    return FeatureFile(features=f, pid=np.asarray(pid), camid=np.asarray(camid), sceneid=np.full(n, -1),
                       split=np.asarray(split), paths={"RGB": np.asarray([f"img/{i:03d}.jpg" for i in range(n)])},
                       fingerprint=fingerprint)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("editor-reid:"), err
    return lines[0]


# ----------------------------------------------------------------------------- the rule


def test_thresholds_on_hand_made_distances():
    low, tie, three = select_thresholds(GENUINE, IMPOSTOR, [0.1, 0.2, 0.3])
    # FPR 0.1: one impostor may pass, the smallest (0.2); genuine 0.1 is below it.
    assert (low.threshold, low.tpr, low.measured_fpr) == (pytest.approx(0.2), 0.25, 0.1)
    # FPR 0.2 would accept 0.2 and one of the tied 0.4s: a tie is all or nothing, so back to 0.2.
    assert (tie.threshold, tie.tpr, tie.measured_fpr) == (pytest.approx(0.2), 0.25, 0.1)
    # FPR 0.3 accepts 0.2, 0.4, 0.4 and the genuine 0.1 and 0.3.
    assert (three.threshold, three.tpr, three.measured_fpr) == (pytest.approx(0.4), 0.5, 0.3)
    assert np.float32(three.threshold) == np.float32(0.4)  # an observed distance, exactly


def test_a_tie_at_the_start_accepts_no_impostor():
    (point,) = select_thresholds(GENUINE, [0.5] * 10, [0.1])
    assert point.threshold < 0.5 and np.float32(point.threshold) == np.nextafter(np.float32(0.5), np.float32(0))
    assert (point.tpr, point.measured_fpr) == (0.5, 0.0)


def test_fpr_times_count_is_exact():
    # 0.29 * 100 is 28.999... in floating point: 29 impostors may still pass.
    impostor = np.arange(100, dtype=np.float32)
    (point,) = select_thresholds([0.5], impostor, [0.29])
    assert point.threshold == 28.0 and point.measured_fpr == 0.29
    (point,) = select_thresholds([0.5], impostor[:21], [17 / 21])
    assert point.threshold == 16.0


def test_too_few_impostors_name_the_count_needed():
    with pytest.raises(ThresholdError, match=r"FPR 0\.05 needs at least 20 impostor pairs .* has 10"):
        select_thresholds(GENUINE, IMPOSTOR, [0.05])
    with pytest.raises(ThresholdError, match="no genuine pair"):
        select_thresholds([], IMPOSTOR, [0.1])


def test_only_the_smallest_impostors_are_needed():
    full = select_thresholds(GENUINE, IMPOSTOR, [0.1, 0.3])
    assert select_thresholds(GENUINE, IMPOSTOR[:4], [0.1, 0.3], num_impostor=10) == full
    with pytest.raises(ValueError, match="needs the 4 smallest"):
        select_thresholds(GENUINE, IMPOSTOR[:3], [0.3], num_impostor=10)


def test_parse_fprs():
    assert parse_fprs("1e-2, 1e-3,1e-2") == (0.01, 0.001)
    assert fpr_key(1e-3) == "0.001" and fpr_key(1e-5) == "1e-05"
    for bad in ("0", "1", "x", "", "-1e-3"):
        with pytest.raises(UsageError):
            parse_fprs(bad)


# ----------------------------------------------------------------------------- pairs


def test_pairs_follow_the_protocol():
    d = np.array([[0.0, 0.1, 0.2, 0.3],
                  [0.4, 0.5, 0.6, 0.7]], np.float32)
    q_pids, g_pids = [1, 2], [1, 1, 2, 3]
    q_cams, g_cams = [0, 0], [0, 1, 0, 1]
    pairs = pair_distances(iter([(0, 2, d)]), q_pids, g_pids, q_cams, g_cams)
    # Query 0: gallery 0 is the same pid in the same camera (junk), gallery 1 genuine.
    # Query 1: gallery 2 is the same pid in the same camera (junk); no genuine pair.
    assert pairs.genuine.tolist() == pytest.approx([0.1])
    assert pairs.impostor.tolist() == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.7])
    assert pairs.num_impostor == 5
    # same_scene: the same camera no longer matters, the scene does.
    pairs = pair_distances(iter([(0, 2, d)]), q_pids, g_pids, q_cams, g_cams, q_sceneids=[5, 6],
                           g_sceneids=[6, 5, 7, 6], protocol="same_scene")
    assert pairs.genuine.tolist() == pytest.approx([0.0, 0.6])
    assert pairs.num_impostor == 5


def test_chunks_and_truncation_do_not_change_the_result():
    ff = make_features(n_ids=8, per_cam=3)
    q, g = ff.select(ff.split == "query"), ff.select(ff.split == "gallery")
    d = pairwise_distance(q.features, g.features)
    fprs = [0.01, 0.05, 0.2]
    whole = calibrate_distances(d, q.pid, g.pid, q.camid, g.camid, fprs=fprs)
    for chunk in (1, 5, 1000):
        cal = calibrate_features(q.features, g.features, q.pid, g.pid, q.camid, g.camid, fprs=fprs,
                                 chunk_size=chunk)
        # A one-row matrix product may round differently from a whole one: equal within float32.
        assert [p.threshold for p in cal.points] == pytest.approx([p.threshold for p in whole.points], abs=1e-6)
        assert [(p.tpr, p.measured_fpr) for p in cal.points] == [(p.tpr, p.measured_fpr) for p in whole.points]
        assert (cal.num_genuine, cal.num_impostor) == (whole.num_genuine, whole.num_impostor)
    # Brute force: every pair in one list.
    same = q.pid[:, None] == g.pid[None, :]
    genuine, impostor = d[same & (q.camid[:, None] != g.camid[None, :])], d[~same]
    assert select_thresholds(genuine, impostor, fprs) == whole.points
    assert whole.num_genuine == genuine.size and whole.num_impostor == impostor.size
    for p in whole.points:
        assert p.measured_fpr <= p.fpr
        assert p.measured_fpr == (impostor <= np.float32(p.threshold)).mean()
        assert p.tpr == (genuine <= np.float32(p.threshold)).mean()


def test_cosine_thresholds_are_half_the_euclidean_ones():
    ff = make_features()
    euclid = calibrate_feature_file(ff, fprs=[0.05], metric="euclidean")
    cosine = calibrate_feature_file(ff, fprs=[0.05], metric="cosine")
    # On unit rows |q - g|^2 = 2 - 2 cos = 2 (1 - cos).
    assert euclid.points[0].threshold == pytest.approx(2 * cosine.points[0].threshold, abs=1e-5)
    assert euclid.points[0].tpr == cosine.points[0].tpr


def test_agrees_with_tpr_at_fpr_at_a_roc_corner():
    # Sorted by distance: I G I I G I I I. Accepting k impostors and the genuine pairs below the
    # k-th is the corner where the ROC turns from right to up, the one tpr_at_fpr picks.
    d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]], np.float32)
    q_pids, g_pids = [0], [1, 0, 2, 3, 0, 4, 5, 6]
    cams = ([0], [1] * 8)
    cal = calibrate_distances(d, q_pids, g_pids, *cams, fprs=[1 / 6, 3 / 6])
    reference = tpr_at_fpr(d, q_pids, g_pids, *cams, fprs=[1 / 6, 3 / 6])
    assert [p.tpr for p in cal.points] == [reference[1 / 6], reference[3 / 6]] == [0.0, 0.5]


def test_unlabelled_or_missing_splits_are_refused():
    ff = make_features()
    ff.pid[ff.split == "gallery"] = -1
    with pytest.raises(ThresholdError, match="gallery row.*pid -1"):
        calibrate_feature_file(ff)
    ff = make_features()
    with pytest.raises(ThresholdError, match="no rows with split 'query'"):
        calibrate_feature_file(ff.select(ff.split == "gallery"))


def test_lookup_lists_the_calibrated_fprs():
    assert lookup_threshold({"0.01": 0.5, "0.001": 0.3}, 1e-3, "x") == 0.3
    with pytest.raises(ThresholdError, match=r"FPR 0\.0001 in x \(calibrated FPRs: 0\.001, 0\.01\)"):
        lookup_threshold({"0.01": 0.5, "0.001": 0.3}, 1e-4, "x")


# ----------------------------------------------------------------------------- the command


def test_calibrate_cli_writes_the_thresholds_file(tmp_path, capsys):
    ff = make_features(n_ids=8)
    feats = save_feature_file(tmp_path / "feats.npz", ff)
    out = tmp_path / "thr.json"
    assert main(["calibrate", "--features", str(feats), "--fpr", "1e-2,5e-2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FPR" in printed and "threshold" in printed and "impostor pairs" in printed
    data = json.loads(out.read_text())
    expected = calibrate_feature_file(load_feature_file(feats), fprs=[1e-2, 5e-2])
    assert data["metric"] == "euclidean" and data["fingerprint"] == "abc123"
    assert data["thresholds"] == expected.thresholds == {"0.01": pytest.approx(expected.points[0].threshold),
                                                          "0.05": pytest.approx(expected.points[1].threshold)}
    assert data["tpr"]["0.05"] == expected.points[1].tpr
    assert data["pairs"] == {"genuine": expected.num_genuine, "impostor": expected.num_impostor}
    assert str(feats) in data["source"]
    assert load_thresholds(out)["thresholds"] == data["thresholds"]


@pytest.mark.parametrize("argv, message, status", [
    (["--fpr", "1e-6"], r"FPR 1e-06 needs at least 1000000 impostor pairs", 1),
    (["--fpr", "2"], r"argument --fpr: invalid value '2'", 2),
    ([], r"calibrate needs somewhere to put the thresholds", 2),
])
def test_calibrate_cli_errors_are_one_line(tmp_path, capsys, argv, message, status):
    feats = save_feature_file(tmp_path / "feats.npz", make_features())
    out = ["--out", str(tmp_path / "t.json")] if argv else []
    try:
        code = main(["calibrate", "--features", str(feats), *argv, *out])
    except SystemExit as exc:
        code = exc.code
    assert code == status
    assert re.search(message, _one_line(capsys.readouterr().err))


def test_calibrate_into_an_index_manifest(tmp_path, capsys):
    from editor_reid.deploy.gallery import GalleryIndex

    feats = save_feature_file(tmp_path / "feats.npz", make_features(n_ids=8))
    index_dir = tmp_path / "index"
    GalleryIndex.from_feature_file(feats, kind="flat", metric="cosine").save(index_dir)
    # No --metric: the index's (cosine).
    assert main(["calibrate", "--features", str(feats), "--fpr", "0.05", "--index", str(index_dir)]) == 0
    assert "manifest of index" in capsys.readouterr().out
    index = GalleryIndex.load(index_dir)
    expected = calibrate_feature_file(load_feature_file(feats), fprs=[0.05], metric="cosine")
    assert index.thresholds == pytest.approx(expected.thresholds) and str(feats) in index.threshold_source
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["thresholds"] == pytest.approx(expected.thresholds)

    other = save_feature_file(tmp_path / "other.npz", make_features(n_ids=8, fingerprint="fedcba987654"))
    for argv, message in [
        (["--features", str(feats), "--metric", "euclidean"], r"--metric euclidean differs from the metric of index"),
        (["--features", str(other)], r"is from model fedcba987654, index '.*' holds features of model abc123"),
    ]:
        assert main(["calibrate", *argv, "--fpr", "0.05", "--index", str(index_dir)]) == 1
        assert re.search(message, _one_line(capsys.readouterr().err))
    assert GalleryIndex.load(index_dir).thresholds == pytest.approx(expected.thresholds)  # unchanged


def test_calibrate_with_weights_extracts_query_and_gallery(tmp_path, capsys):
    from _features import tiny_weights

    data, weights = tiny_weights(tmp_path)
    out = tmp_path / "thr.json"
    assert main(["calibrate", "--weights", str(weights), "--dataset", "rgbnt201", "--root", str(data),
                 "--device", "cpu", "--fpr", "0.1", "--out", str(out)]) == 0
    assert "calibrate: extracted" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert "rgbnt201 query, gallery" in result["source"] and len(result["fingerprint"]) == 32
    # RGBNT201: query = gallery; the self-pairs (same pid, same camera) are no pair at all.
    assert result["pairs"]["genuine"] > 0 and result["rows"]["query"] == result["rows"]["gallery"]
    assert 0 < result["thresholds"]["0.1"] <= 4.0
