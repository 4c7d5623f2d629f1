"""``extract --to-gallery``: the gallery rows go into a FAISS index or a Milvus collection as the
extraction runs; an interrupted run resumes without duplicates, and two torchrun processes write
their own chunks to a Milvus Lite server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")
pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

sys.path.insert(0, str(Path(__file__).parent))
from _features import extract_on_one_thread, tiny_weights  # noqa: E402

from editor_reid.cli import main  # noqa: E402
from editor_reid.deploy.gallery import GalleryIndex, _metadata_of, entry_columns  # noqa: E402
from editor_reid.deploy.milvus import MilvusGallery  # noqa: E402
from editor_reid.deploy.sink import MilvusSink, gallery_sink  # noqa: E402
from editor_reid.engine.distributed import DistContext  # noqa: E402
from editor_reid.errors import EditorReidError, UsageError  # noqa: E402
from editor_reid.features import load_feature_file  # noqa: E402
from editor_reid.features.extract import run_extract  # noqa: E402

# Chunks of 5 samples in batches of 2: 22 query rows, then 22 gallery rows (from row 22, chunk 4 on), 9 chunks.
CHUNKING = dict(chunk_size=5, batch_size=2, device="cpu", quiet=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extract_gallery")
    data, weights = tiny_weights(tmp)
    return tmp, data, weights


@pytest.fixture(scope="module")
def single(setup):
    """The feature file of one uninterrupted process on one thread (as each torchrun rank)."""
    tmp, data, weights = setup
    return load_feature_file(extract_on_one_thread(weights, tmp / "single.npz", data, **CHUNKING))


def _expected(ff):
    """The gallery rows of a feature file: their rows, sample keys and normalised features."""
    rows = np.flatnonzero(ff.split == "gallery")
    part = ff.select(rows)
    keys = entry_columns(_metadata_of(part, rows), len(part), part.features, fingerprint=ff.fingerprint)["key"]
    return rows, keys, part.features / np.linalg.norm(part.features, axis=1, keepdims=True)


def _check_collection(gallery, ff) -> None:
    """The collection holds every gallery row of ``ff`` once, under its sample key, with its feature."""
    rows, keys, feats = _expected(ff)
    meta = gallery.metadata
    assert gallery.size == len(rows)
    assert sorted(meta["key"].tolist()) == sorted(keys.tolist())  # no duplicate, none missing
    result = gallery.search(feats, k=1)
    np.testing.assert_array_equal(result.fields["row"][:, 0], rows)
    np.testing.assert_array_equal(result.entries[:, 0], keys)
    assert float(result.distances.max()) < 1e-5


def _interrupted(weights, data, out, sink, stop_after: int) -> list[int]:
    written: list[int] = []

    def stop(index: int) -> None:
        written.append(index)
        if len(written) == stop_after:
            raise KeyboardInterrupt

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_extract(weights, out, dataset="rgbnt201", root=data, on_chunk=stop, sink=sink, **CHUNKING)
    finally:
        torch.set_num_threads(threads)
    return written


def _drop_chunk(gallery, ff, chunk: int, chunk_size: int = 5) -> int:
    """Delete the entries of one finished chunk, as if the process died between saving the chunk
    and writing it to Milvus; returns how many were deleted."""
    rows, keys, _ = _expected(ff)
    lost = keys[(rows >= chunk * chunk_size) & (rows < (chunk + 1) * chunk_size)]
    gallery._client.delete(gallery.collection, ids=lost.tolist())
    return len(lost)


def test_an_interrupted_extraction_to_a_milvus_lite_file_resumes_without_duplicates(setup, single, tmp_path):
    _, data, weights = setup
    uri = str(tmp_path / "g.db")
    out = tmp_path / "feats.npz"
    assert _interrupted(weights, data, out, gallery_sink("city", uri=uri), stop_after=6) == list(range(6))
    gallery = MilvusGallery.open(uri, "city")
    rows, _, _ = _expected(single)
    assert gallery.size == int((rows < 30).sum()) == 8  # the gallery rows of the six finished chunks
    assert _drop_chunk(gallery, single, chunk=5) == 5
    extract_on_one_thread(weights, out, data, sink=gallery_sink("city", uri=uri), **CHUNKING)
    _check_collection(gallery, single)
    assert gallery.fingerprint == single.fingerprint and gallery.dim == single.features.shape[1]
    # Again from scratch: every sample is there already, nothing is added twice.
    out.unlink()
    run_extract(weights, out, dataset="rgbnt201", root=data, sink=gallery_sink("city", uri=uri), **CHUNKING)
    _check_collection(gallery, single)


def test_extract_to_a_faiss_index_adds_the_gallery_rows_once(setup, single, tmp_path, capsys):
    _, data, weights = setup
    index_dir = tmp_path / "idx"
    out = tmp_path / "feats.npz"
    args = ["extract", "--weights", str(weights), "--dataset", "rgbnt201", "--root", str(data), "--out", str(out),
            "--chunk-size", "5", "--batch-size", "2", "--device", "cpu", "--to-gallery", str(index_dir)]
    assert main(args) == 0
    rows, keys, feats = _expected(single)
    assert f"added {len(rows)} of {len(rows)} gallery rows to index" in capsys.readouterr().out
    index = GalleryIndex.load(index_dir)
    np.testing.assert_array_equal(index.metadata["row"], rows)
    np.testing.assert_array_equal(index.metadata["key"], keys)
    assert index.search(feats, k=1).distances.max() < 1e-5
    assert main(args) == 0  # the same samples again: nothing new
    assert f"added 0 of {len(rows)} gallery rows" in capsys.readouterr().out
    assert GalleryIndex.load(index_dir).size == len(rows)


def test_a_gallery_of_another_model_is_refused_before_extracting(setup, tmp_path, capsys):
    _, data, weights = setup
    uri = str(tmp_path / "g.db")
    MilvusGallery.create(uri, "other", dim=7)
    out = tmp_path / "feats.npz"
    base = ["extract", "--weights", str(weights), "--dataset", "rgbnt201", "--root", str(data), "--out", str(out),
            "--device", "cpu"]
    assert main([*base, "--to-gallery", "other", "--uri", uri]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("editor-reid: ") and len(err.splitlines()) == 1
    assert "holds 7-d features, the model gives" in err
    assert not out.exists() and not (tmp_path / "feats.npz.parts").exists() or not list(
        (tmp_path / "feats.npz.parts").glob("chunk_*"))
    assert main([*base, "--uri", uri]) == 2
    assert "--uri is the Milvus of --to-gallery" in capsys.readouterr().err
    assert main([*base, "--to-gallery", "bad-name", "--uri", uri]) == 1
    assert "collection name" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    assert main([*base, "--to-gallery", str(tmp_path / "junk")]) == 2
    assert "holds no gallery index" in capsys.readouterr().err


def test_a_milvus_lite_file_is_refused_under_torchrun():
    sink = MilvusSink("city", "/tmp/g.db")
    with pytest.raises(UsageError, match="milvus-lite server --data-dir /tmp/g.db"):
        sink.open(DistContext(rank=0, world_size=2), dim=8, fingerprint="", modalities=("RGB",), count=1,
                  has_gallery=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def lite_server(tmp_path):
    """A Milvus Lite gRPC server in a process of its own: the URI, as a Milvus server's."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "milvus"),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None, "the Milvus Lite server did not start"
        time.sleep(0.2)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with Gloo is not available")
def test_two_torchrun_processes_write_their_chunks_to_a_milvus_lite_server(setup, single, tmp_path, lite_server):
    _, data, weights = setup
    out = tmp_path / "feats.npz"
    # An interrupted single-process run first; one of its finished chunks never reached Milvus.
    _interrupted(weights, data, out, gallery_sink("city", uri=lite_server), stop_after=6)
    gallery = MilvusGallery.open(lite_server, "city")
    assert gallery.lite and _drop_chunk(gallery, single, chunk=5) == 5
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "editor_reid", "extract", "--weights", str(weights),
           "--dataset", "rgbnt201", "--root", str(data), "--out", str(out), "--chunk-size", "5", "--batch-size", "2",
           "--device", "cpu", "--to-gallery", "city", "--uri", lite_server]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # Both ranks wrote rows themselves: rank 0 chunks 6 and 8, rank 1 chunk 7 and the lost chunk 5.
    written = {int(line.split("rank ")[1].split()[0]): int(line.split(" wrote ")[1].split()[0])
               for line in proc.stdout.splitlines() if " gallery rows to Milvus collection" in line}
    assert sorted(written) == [0, 1] and all(n > 0 for n in written.values()), proc.stdout
    rows, _, _ = _expected(single)
    assert sum(written.values()) == int((rows >= 25).sum()) == 19
    assert "6 of 9 chunks already done" in proc.stdout
    _check_collection(gallery, single)
    assert load_feature_file(out).features.shape == single.features.shape
    with pytest.raises(EditorReidError, match="no collection 'nowhere'"):
        MilvusGallery.open(lite_server, "nowhere")


def test_without_pymilvus_the_milvus_backend_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # import pymilvus now raises ImportError
    assert main(["index", "info", "--index", "city", "--uri", str(tmp_path / "g.db")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "editor-reid[milvus]"' in err
