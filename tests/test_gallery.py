"""The gallery index (editor_reid.deploy.gallery) and ``editor-reid index``: exact ranking as the
metrics rank, the approximate kinds, persistence, the journal (also under SIGKILL), refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from _gallery_data import clustered, gaussian  # noqa: E402

pytest.importorskip("faiss")

from editor_reid.cli import main  # noqa: E402
from editor_reid.deploy.gallery import (  # noqa: E402
    AUTO_FLAT_MAX, FORMAT_VERSION, GalleryIndex, GalleryIndexError, IndexFileError, index_info, resolve_kind)
from editor_reid.features.store import FeatureFile, load_feature_file, save_feature_file  # noqa: E402
from editor_reid.metrics import pairwise_distance  # noqa: E402

DIM = 32


def _gaussian(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    return gaussian(n, seed, dim)


_clustered = clustered


def _recall(entries: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(entries, exact)]))


def _metadata(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"pid": rng.integers(0, 20, n), "camid": rng.integers(0, 4, n),
            "path_RGB": np.array([f"rgb/{i:05d}.jpg" for i in range(n)])}


@pytest.fixture(scope="module")
def gallery():
    return _gaussian(400, 0), _metadata(400)


# ----------------------------------------------------------------------------- exact search


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_flat_search_ranks_like_the_metrics(gallery, metric):
    g, meta = gallery
    q = _gaussian(30, 1) * 3.0  # unnormalised: the index normalises as the metrics do
    index = GalleryIndex.build(g * 2.0, meta, metric=metric)
    assert index.kind == "flat" and index.size == 400 and index.dim == DIM
    result = index.search(q, k=15)
    dist = pairwise_distance(q, g * 2.0, metric=metric)
    np.testing.assert_array_equal(result.entries, np.argsort(dist, axis=1, kind="stable")[:, :15])
    np.testing.assert_allclose(result.distances, np.take_along_axis(dist, result.entries, 1), atol=1e-5)
    assert result.distances.dtype == np.float32 and result.entries.dtype == np.int64
    assert not result.unknown.any()


def test_unnormalised_euclidean_ranks_like_the_metrics(gallery):
    g, _ = gallery
    q = _gaussian(10, 2)
    index = GalleryIndex.build(g, normalized=False)
    dist = pairwise_distance(q, g, normalize=False)
    result = index.search(q, k=5)
    np.testing.assert_array_equal(result.entries, np.argsort(dist, axis=1)[:, :5])
    np.testing.assert_allclose(result.distances, np.take_along_axis(dist, result.entries, 1), rtol=1e-5, atol=1e-4)


def test_k_larger_than_the_gallery_pads_and_one_query_may_be_1d(gallery):
    g, _ = gallery
    index = GalleryIndex.build(g[:5])
    result = index.search(g[0], k=8)
    assert result.entries.shape == (1, 8) and result.entries[0, 0] == 0
    assert (result.entries[0, 5:] == -1).all() and np.isinf(result.distances[0, 5:]).all()
    assert [m["gallery"] for m in result.to_json()[0]["matches"]] == list(result.entries[0, :5])
    empty = GalleryIndex.build(g[:0]).search(g[:2], k=3, threshold=1.0)
    assert (empty.entries == -1).all() and empty.unknown.all()


def test_exclude_same_camera_filters_like_the_protocol(gallery):
    g, meta = gallery
    q = _gaussian(20, 3)
    camids = meta["camid"].copy()
    camids[:360] = 0  # nearly all of the gallery shares camera 0: the search must fetch more than once
    index = GalleryIndex.build(g, {**meta, "camid": camids})
    q_cams = np.array([0] * 10 + [1] * 5 + [-1] * 5)
    result = index.search(q, k=12, query_camids=q_cams, exclude_same_camera=True)
    dist = pairwise_distance(q, g)
    for i in range(len(q)):
        allowed = np.ones(len(g), bool) if q_cams[i] < 0 else camids != q_cams[i]
        order = np.argsort(dist[i], kind="stable")
        expected = order[allowed[order]][:12]
        np.testing.assert_array_equal(result.entries[i, : len(expected)], expected)
        assert (result.entries[i, len(expected):] == -1).all()
    with pytest.raises(GalleryIndexError, match="needs query_camids"):
        index.search(q, exclude_same_camera=True)


def test_threshold_marks_unknown_queries(gallery):
    g, meta = gallery
    index = GalleryIndex.build(g, meta)
    q = np.concatenate([g[:3] + 0.01, _gaussian(3, 4)])  # three near-duplicates, three strangers
    result = index.search(q, k=3, threshold=0.1)
    assert result.unknown.tolist() == [False] * 3 + [True] * 3
    index.set_thresholds({"0.001": 0.1, "0.01": 1.5}, source="test")
    assert index.search(q, k=3, threshold="0.001").unknown.tolist() == result.unknown.tolist()
    with pytest.raises(GalleryIndexError, match="no threshold calibrated for FPR 0.5"):
        index.search(q, threshold="0.5")
    items = result.to_json(index.metadata)
    assert items[0]["query"] == 0 and items[0]["unknown"] is False
    assert set(items[0]["matches"][0]) == {"gallery", "pid", "camid", "row", "distance"}
    assert items[0]["matches"][0]["gallery"] == 0 and items[0]["matches"][0]["pid"] == int(meta["pid"][0])


# ----------------------------------------------------------------------------- approximate kinds


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_approximate_kinds_find_most_true_neighbours(kind, tmp_path):
    g, q = _clustered(3000, 5)
    exact = GalleryIndex.build(g).search(q, k=10)
    index = GalleryIndex.build(g, kind=kind, params={"nprobe": 16} if kind == "ivfpq" else None)
    result = index.search(q, k=10)
    assert index.kind == kind and _recall(result.entries, exact.entries) >= 0.9
    # Re-ranked (ivfpq) or stored (hnsw) exact features: the distances are exact.
    np.testing.assert_allclose(result.distances, np.take_along_axis(pairwise_distance(q, g), result.entries, 1),
                               atol=1e-5)
    index.save(tmp_path / "idx")
    loaded = GalleryIndex.load(tmp_path / "idx")
    assert loaded.kind == kind and loaded.params == index.params
    np.testing.assert_array_equal(loaded.search(q, k=10).entries, result.entries)
    loaded.add(g[:10])
    assert GalleryIndex.load(tmp_path / "idx").size == 3010


def test_auto_is_flat_for_small_galleries_and_ivfpq_needs_enough_entries():
    assert resolve_kind("auto", AUTO_FLAT_MAX) == "flat" and resolve_kind("auto", AUTO_FLAT_MAX + 1) == "ivfpq"
    with pytest.raises(GalleryIndexError, match="needs at least 64 entries to train.*has 50: use kind flat"):
        GalleryIndex.build(_gaussian(50, 6), kind="ivfpq")
    with pytest.raises(GalleryIndexError, match="kind must be one of"):
        GalleryIndex.build(_gaussian(50, 6), kind="lsh")


# ----------------------------------------------------------------------------- persistence and journal


def test_save_load_round_trip(gallery, tmp_path):
    g, meta = gallery
    index = GalleryIndex.build(g, meta, metric="cosine", fingerprint="abc123")
    index.set_thresholds({"0.01": 0.4}, source="unit")
    path = index.save(tmp_path / "idx")
    assert sorted(p.name for p in path.iterdir()) == ["index.1.faiss", "manifest.json", "metadata.1.npz"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == FORMAT_VERSION and manifest["entries"] == 400 and manifest["dim"] == DIM
    assert manifest["metric"] == "cosine" and manifest["kind"] == "flat" and manifest["fingerprint"] == "abc123"
    assert manifest["thresholds"] == {"0.01": 0.4} and manifest["threshold_source"] == "unit"
    loaded = GalleryIndex.load(path)
    assert (loaded.size, loaded.dim, loaded.metric, loaded.kind, loaded.fingerprint) == (400, DIM, "cosine", "flat",
                                                                                         "abc123")
    assert loaded.thresholds == {"0.01": 0.4}
    for key in ("pid", "camid", "path_RGB"):
        np.testing.assert_array_equal(loaded.metadata[key], meta[key])
    np.testing.assert_array_equal(loaded.metadata["row"], np.arange(400))
    q = _gaussian(5, 7)
    np.testing.assert_array_equal(loaded.search(q).entries, index.search(q).entries)
    # Thresholds set on a loaded index go straight to its manifest.
    loaded.set_thresholds({"0.001": 0.2}, source="again")
    assert GalleryIndex.load(path).thresholds == {"0.001": 0.2}
    with pytest.raises(GalleryIndexError, match="an FPR in"):
        loaded.set_thresholds({"2": 0.1})


def test_add_is_journaled_and_save_compacts(gallery, tmp_path):
    g, meta = gallery
    index = GalleryIndex.build(g[:300], {k: v[:300] for k, v in meta.items()})
    index.save(tmp_path / "idx")
    ids = index.add(g[300:350], {"pid": meta["pid"][300:350], "camid": meta["camid"][300:350], "note": ["x"] * 50})
    assert ids.tolist() == list(range(300, 350))
    index.add(g[350:], {"pid": meta["pid"][350:], "camid": meta["camid"][350:]})
    assert (tmp_path / "idx" / "journal.1.bin").is_file()
    info = index_info(tmp_path / "idx")
    assert info["entries"] == 300 and info["journal_entries"] == 100 and info["total_entries"] == 400
    loaded = GalleryIndex.load(tmp_path / "idx")
    assert loaded.size == 400
    np.testing.assert_array_equal(loaded.metadata["pid"], meta["pid"])
    assert loaded.metadata["note"][[0, 300, 399]].tolist() == ["", "x", ""]
    np.testing.assert_array_equal(loaded.search(g[:20]).entries, GalleryIndex.build(g).search(g[:20]).entries)
    loaded.save()
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["index.2.faiss", "manifest.json",
                                                                     "metadata.2.npz"]
    assert index_info(tmp_path / "idx")["entries"] == 400
    assert GalleryIndex.load(tmp_path / "idx").add(g[:1]).tolist() == [400]
    assert GalleryIndex.load(tmp_path / "idx").size == 401


def test_a_torn_journal_record_is_ignored_and_cut(gallery, tmp_path):
    g, _ = gallery
    index = GalleryIndex.build(g[:100])
    index.save(tmp_path / "idx")
    index.add(g[100:110])
    index.add(g[110:120])
    journal = tmp_path / "idx" / "journal.1.bin"
    whole = journal.read_bytes()
    first = 32 + int.from_bytes(whole[8:16], "little")  # header (32 bytes) + payload length
    cases = {whole[:-7]: 110, whole[:first + 10]: 110, whole[:first - 1]: 100, whole + b"\0" * 64: 120,
             whole + b"ERJ1\x00": 120}
    for data, size in cases.items():
        journal.write_bytes(data)
        assert GalleryIndex.load(tmp_path / "idx").size == size
    journal.write_bytes(whole[:-7])
    loaded = GalleryIndex.load(tmp_path / "idx")
    assert loaded.size == 110
    loaded.add(g[110:115])  # cuts the torn record before appending
    again = GalleryIndex.load(tmp_path / "idx")
    assert again.size == 115
    np.testing.assert_array_equal(again.search(g[110:115], k=1).entries[:, 0], np.arange(110, 115))
    # Damage followed by more records is not a torn tail: refused, naming the journal.
    data = bytearray(journal.read_bytes())
    data[40] ^= 0xFF
    journal.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="journal.1.bin' is corrupt at byte 0"):
        GalleryIndex.load(tmp_path / "idx")


_WRITER = """
import sys
import numpy as np
from editor_reid.deploy.gallery import GalleryIndex
directory, seed = sys.argv[1], int(sys.argv[2])
index = GalleryIndex.load(directory)
rng = np.random.default_rng(seed)
for step in range(10**6):
    n = int(rng.integers(1, 60))
    tag = seed * 100000 + step
    ids = index.add(rng.standard_normal((n, 256)).astype(np.float32), {"pid": np.full(n, tag)})
    print(ids[0], n, tag, flush=True)
    if step % 7 == 6:
        index.save()
"""


def test_acknowledged_adds_survive_sigkill(tmp_path):
    directory = tmp_path / "idx"
    GalleryIndex.build(_gaussian(50, 8, dim=256)).save(directory)
    rng = np.random.default_rng(0)
    acknowledged = []
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for seed in range(1, 7):
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(directory), str(seed)], stdout=subprocess.PIPE,
                                 text=True, env=env)
        for _ in range(int(rng.integers(1, 25))):
            line = child.stdout.readline()
            if not line:
                break
            acknowledged.append(line)
        time.sleep(float(rng.uniform(0, 0.03)))  # somewhere in a later add or save
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=60)
        acknowledged += rest.splitlines(keepends=True)
        assert child.returncode == -signal.SIGKILL
        loaded = GalleryIndex.load(directory)  # loads after every kill
    pid = loaded.metadata["pid"]
    # A line the kill cut short (no newline yet) is not counted: the test cannot read what it said.
    acknowledged = [tuple(map(int, line.split())) for line in acknowledged if line.endswith("\n")]
    assert len(acknowledged) >= 6
    for first, n, tag in acknowledged:
        assert first + n <= loaded.size and (pid[first:first + n] == tag).all(), (first, n, tag)


def test_concurrent_searches_and_adds(gallery, tmp_path):
    g, _ = gallery
    index = GalleryIndex.build(g[:100])
    index.save(tmp_path / "idx")
    errors = []

    def searcher():
        try:
            for _ in range(50):
                result = index.search(g[:4], k=5)
                assert (result.entries[:, 0] == np.arange(4)).all()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def adder(start):
        try:
            for i in range(start, start + 50, 10):
                index.add(g[i:i + 10])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)] + [threading.Thread(target=adder, args=(s,))
                                                                      for s in (100, 150)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and index.size == 200 and GalleryIndex.load(tmp_path / "idx").size == 200


# ----------------------------------------------------------------------------- refusals


def test_refuses_another_width_or_model(gallery):
    g, _ = gallery
    index = GalleryIndex.build(g, fingerprint="aaaa")
    with pytest.raises(GalleryIndexError, match="the index holds 32-d features, the file has 16-d"):
        index.add(_gaussian(3, 9, dim=16))
    with pytest.raises(GalleryIndexError, match="the index holds 32-d features, the queries are 16-d"):
        index.search(_gaussian(3, 9, dim=16))
    with pytest.raises(GalleryIndexError, match="model aaaa, these come from model bbbb"):
        index.add(g[:2], fingerprint="bbbb")
    assert index.add(g[:2], fingerprint="").size == 2 and index.add(g[:2], fingerprint="aaaa").size == 2
    assert GalleryIndex.build(g).add(g[:1], fingerprint="bbbb").size == 1
    with pytest.raises(GalleryIndexError, match="row 1 holds NaN"):
        index.add(np.array([[0.0] * DIM, [np.nan] * DIM], dtype=np.float32))


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else
                     np.random.default_rng(0).bytes(len(data)) if how == "garbage" else b"not a file")


@pytest.mark.parametrize("how", ["truncate", "garbage", "short garbage"])
@pytest.mark.parametrize("name", ["index.1.faiss", "metadata.1.npz", "manifest.json"])
def test_corrupt_files_are_refused_by_name(gallery, tmp_path, name, how):
    g, meta = gallery
    GalleryIndex.build(g, meta).save(tmp_path / "idx")
    _corrupt(tmp_path / "idx" / name, how)
    with pytest.raises(IndexFileError, match=name.replace(".", r"\.")) as info:
        GalleryIndex.load(tmp_path / "idx")
    assert "\n" not in str(info.value)


def test_missing_newer_or_absent_index_files(gallery, tmp_path):
    g, _ = gallery
    directory = tmp_path / "idx"
    GalleryIndex.build(g).save(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").write_text(json.dumps({**manifest, "version": FORMAT_VERSION + 1}))
    with pytest.raises(IndexFileError, match=f"format version {FORMAT_VERSION + 1}.*upgrade editor-reid"):
        GalleryIndex.load(directory)
    (directory / "manifest.json").write_text(json.dumps({**manifest, "entries": "many"}))
    with pytest.raises(IndexFileError, match="corrupt: bad or missing entries"):
        GalleryIndex.load(directory)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    (directory / "index.1.faiss").unlink()
    with pytest.raises(IndexFileError, match="index.1.faiss' is missing"):
        GalleryIndex.load(directory)
    (directory / "manifest.json").unlink()
    with pytest.raises(IndexFileError, match="holds no gallery index"):
        GalleryIndex.load(directory)
    with pytest.raises(FileNotFoundError):
        GalleryIndex.load(tmp_path / "nowhere")


def test_a_killed_save_leaves_the_previous_generation(gallery, tmp_path, monkeypatch):
    g, _ = gallery
    index = GalleryIndex.build(g[:100])
    index.save(tmp_path / "idx")
    index.add(g[100:150])
    import editor_reid.deploy.gallery as module

    def die(directory, manifest):
        raise KeyboardInterrupt  # stands for a kill just before the manifest switch

    monkeypatch.setattr(module, "_write_manifest", die)
    with pytest.raises(KeyboardInterrupt):
        index.save()
    assert GalleryIndex.load(tmp_path / "idx").size == 150  # generation 1 and its journal
    monkeypatch.undo()
    index.save()
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["index.2.faiss", "manifest.json",
                                                                     "metadata.2.npz"]
    assert GalleryIndex.load(tmp_path / "idx").size == 150


# ----------------------------------------------------------------------------- the command line


@pytest.fixture()
def feature_files(tmp_path):
    def write(name, n, *, splits=("query", "gallery"), dim=DIM, fingerprint="f00d", seed=0):
        rng = np.random.default_rng(seed)
        ff = FeatureFile(features=rng.standard_normal((n, dim)).astype(np.float32), pid=np.arange(n) % 7,
                         camid=np.arange(n) % 3, sceneid=np.full(n, -1), split=np.array([splits[i % len(splits)]
                                                                                          for i in range(n)]),
                         paths={"RGB": np.array([f"r{i}.png" for i in range(n)])}, fingerprint=fingerprint)
        return save_feature_file(tmp_path / name, ff)

    return write


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("editor-reid: ") and "Traceback" not in err, err
    return lines[0]


def test_cli_index_build_add_info(feature_files, tmp_path, capsys):
    feats = feature_files("feats.npz", 40)
    out = tmp_path / "idx"
    assert main(["index", "build", "--features", str(feats), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "20 of 40 rows" in printed and "(split gallery)" in printed and "flat index (exact)" in printed
    index = GalleryIndex.load(out)
    np.testing.assert_array_equal(index.metadata["row"], np.arange(1, 40, 2))
    assert index.metadata["path_RGB"][0] == "r1.png" and index.fingerprint == "f00d"

    assert main(["index", "build", "--features", str(feats), "--out", str(out)]) == 2
    assert "exists and is not empty" in _one_line(capsys.readouterr().err)
    assert main(["index", "build", "--features", str(feats), "--out", str(out), "--overwrite", "--splits",
                 "query,gallery", "--metric", "cosine"]) == 0
    assert "40 of 40 rows" in capsys.readouterr().out and GalleryIndex.load(out).metric == "cosine"

    more = feature_files("more.npz", 10, splits=("",), seed=1)
    assert main(["index", "add", "--index", str(out), "--features", str(more)]) == 0
    assert "all rows: the file has no gallery split" in capsys.readouterr().out
    assert main(["index", "info", "--index", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_entries"] == 50 and info["journal_entries"] == 10 and info["dim"] == DIM
    assert {"metric", "kind", "fingerprint", "thresholds"} <= set(info)
    # The same samples again add nothing (sample keys); a file of new ones adds its rows.
    assert main(["index", "add", "--index", str(out), "--features", str(more), "--compact"]) == 0
    assert "0 new, 10 held already" in capsys.readouterr().out
    newer = feature_files("newer.npz", 10, splits=("",), seed=2, fingerprint="f00d")
    newer_ff = load_feature_file(newer)
    newer_ff.paths["RGB"] = np.array([f"new{i}.png" for i in range(10)])
    save_feature_file(newer, newer_ff)
    assert main(["index", "add", "--index", str(out), "--features", str(newer), "--compact"]) == 0
    assert "10 new, 0 held already" in capsys.readouterr().out
    assert main(["index", "info", "--index", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entries"] == 60 and info["journal_entries"] == 0 and info["generation"] == 4


def test_cli_index_errors_are_one_line(feature_files, tmp_path, capsys):
    feats = feature_files("feats.npz", 20)
    out = tmp_path / "idx"
    assert main(["index", "build", "--features", str(feats), "--out", str(out)]) == 0
    capsys.readouterr()
    wide = feature_files("wide.npz", 5, dim=16)
    assert main(["index", "add", "--index", str(out), "--features", str(wide)]) == 1
    assert "the index holds 32-d features, the file has 16-d" in _one_line(capsys.readouterr().err)
    other = feature_files("other.npz", 5, fingerprint="beef")
    assert main(["index", "add", "--index", str(out), "--features", str(other)]) == 1
    assert "features of different models are not comparable" in _one_line(capsys.readouterr().err)
    assert main(["index", "build", "--features", str(feats), "--out", str(tmp_path / "x"), "--kind", "ivfpq"]) == 1
    assert "needs at least" in _one_line(capsys.readouterr().err)
    assert main(["index", "build", "--features", str(feats), "--out", str(tmp_path / "y"), "--splits", "train"]) == 1
    assert "no rows of split(s) train" in _one_line(capsys.readouterr().err)
    (out / "index.1.faiss").write_bytes(b"garbage")
    assert main(["index", "info", "--index", str(out)]) == 0  # reads the manifest only
    capsys.readouterr()
    assert main(["index", "add", "--index", str(out), "--features", str(feats)]) == 1
    assert "index.1.faiss' is" in _one_line(capsys.readouterr().err)
    assert main(["index", "info", "--index", str(tmp_path / "nowhere")]) == 2
    _one_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_info:
        main(["index"])
    assert exit_info.value.code == 2


def test_a_faiss_build_with_gpus_searches_a_gpu_replica_of_a_flat_index(monkeypatch):
    """faiss-gpu has get_num_gpus/index_cpu_to_all_gpus; with a GPU, a flat index is searched on
    its replica and adds reach both. Simulated here: a counting stand-in for the GPU copy."""
    import faiss

    class Replica:
        def __init__(self, index):
            self.index, self.searches = faiss.clone_index(index), 0

        def add(self, x):
            self.index.add(x)

        def search(self, q, k, params=None):
            self.searches += 1
            return self.index.search(q, k, params=params)

    replicas = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: replicas.append(Replica(index)) or replicas[-1],
                        raising=False)
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((40, 16)).astype(np.float32)
    index = GalleryIndex.build(gallery, kind="flat")
    index.add(rng.standard_normal((5, 16)).astype(np.float32))
    (replica,) = replicas
    assert replica.index.ntotal == index.size == 45
    result = index.search(gallery[:3], k=1)
    assert replica.searches == 1 and list(result.entries[:, 0]) == [0, 1, 2]
    GalleryIndex.build(np.tile(gallery, (2, 1)), kind="ivfpq", params={"nlist": 2, "nprobe": 2, "m": 4})
    assert len(replicas) == 1  # no GPU copy of the approximate kinds
