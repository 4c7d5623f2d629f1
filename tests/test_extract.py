"""``editor-reid extract``: a dataset split and a folder of images to a feature file; chunks,
resuming an interrupted run, and two torchrun processes writing the file one process writes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _features import extract_on_one_thread, tiny_weights  # noqa: E402

from editor_reid.cli import main
from editor_reid.data.layouts import load_dataset
from editor_reid.errors import UsageError
from editor_reid.features import FeatureExtractor, load_feature_file
from editor_reid.features.extract import run_extract, scan_images

ATOL = 1e-6
# Chunks of 5 samples in batches of 2: the last batch of every chunk is short.
CHUNKING = dict(chunk_size=5, batch_size=2, device="cpu", quiet=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extract")
    data, weights = tiny_weights(tmp)
    return tmp, data, weights


@pytest.fixture(scope="module")
def single(setup):
    """The query and gallery features of one process, on one thread (as each torchrun rank)."""
    tmp, data, weights = setup
    return extract_on_one_thread(weights, tmp / "single.npz", data, **CHUNKING)


def _same_file(a, b) -> None:
    with np.load(a) as x, np.load(b) as y:
        assert sorted(x.files) == sorted(y.files)
        for key in x.files:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_cli_extract_of_a_dataset(setup, single, capsys):
    tmp, data, weights = setup
    out = tmp / "cli.npz"
    assert main(["extract", "--weights", str(weights), "--dataset", "rgbnt201", "--root", str(data), "--out", str(out),
                 "--batch-size", "4", "--device", "cpu"]) == 0
    assert "wrote 44 features (192-d, L2-normalised)" in capsys.readouterr().out
    assert not (tmp / "cli.npz.parts").exists()
    ff = load_feature_file(out)
    splits = load_dataset("rgbnt201", data, splits=("query", "gallery"))
    rows = splits.query + splits.gallery  # RGBNT201: the same images twice, once per split
    assert list(ff.split) == ["query"] * len(splits.query) + ["gallery"] * len(splits.gallery)
    for m in ("RGB", "NI", "TI"):
        assert list(ff.paths[m]) == [s.paths[m] for s in rows]
    assert list(ff.pid) == [s.pid for s in rows] and list(ff.camid) == [s.camid for s in rows]
    assert (ff.sceneid == -1).all() and ff.protocol == "same_camera" and ff.normalized
    assert ff.modalities == ("RGB", "NI", "TI") and ff.weights == str(weights)
    np.testing.assert_allclose(np.linalg.norm(ff.features, axis=1), 1.0, atol=1e-6)
    # The features of the Python API on the same files and cameras (the extractor's tests tie
    # those to `editor-reid test`).
    expected = FeatureExtractor(weights, device="cpu", batch_size=4)([{**s.paths, "camid": s.camid} for s in rows])
    np.testing.assert_allclose(ff.features, expected, rtol=0, atol=ATOL)
    # Another chunking gives the same features up to float rounding; --no-normalize the raw ones.
    np.testing.assert_allclose(load_feature_file(single).features, ff.features, rtol=0, atol=ATOL)
    raw = tmp / "raw.npz"
    assert main(["extract", "--weights", str(weights), "--dataset", "rgbnt201", "--root", str(data), "--out", str(raw),
                 "--splits", "gallery", "--no-normalize", "--device", "cpu"]) == 0
    raw_ff = load_feature_file(raw)
    assert not raw_ff.normalized and set(raw_ff.split) == {"gallery"} and len(raw_ff) == len(splits.gallery)
    unit = raw_ff.features / np.linalg.norm(raw_ff.features, axis=1, keepdims=True)
    np.testing.assert_allclose(unit, ff.features[len(splits.query):], rtol=0, atol=ATOL)


def test_extract_of_a_manifest_equals_that_of_its_layout(setup, single, tmp_path):
    from editor_reid.data.manifest import make_manifest

    _, data, weights = setup
    make_manifest("rgbnt201", data, tmp_path / "m.csv", splits=("query", "gallery"))
    ff = load_feature_file(run_extract(weights, tmp_path / "m.npz", manifest=tmp_path / "m.csv", **CHUNKING))
    layout = load_feature_file(single)
    for column in ("pid", "camid", "sceneid", "split"):
        np.testing.assert_array_equal(getattr(ff, column), getattr(layout, column), err_msg=column)
    assert [Path(p).resolve() for p in ff.paths["TI"]] == [Path(p).resolve() for p in layout.paths["TI"]]
    np.testing.assert_allclose(ff.features, layout.features, rtol=0, atol=ATOL)


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_extract_of_a_flat_folder_of_images(setup, tmp_path):
    _, _, weights = setup
    folder = tmp_path / "photos"
    names = ["b.png", "a.jpg", "sub/c.JPEG", "sub/deeper/d.bmp"]
    for seed, name in enumerate(names):
        _image(folder / name, seed)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "photos.npz"
    assert main(["extract", "--weights", str(weights), "--images", str(folder), "--out", str(out),
                 "--device", "cpu"]) == 0
    ff = load_feature_file(out)
    ordered = [str(folder / n) for n in sorted(names)]
    assert list(ff.paths["RGB"]) == ordered and set(ff.paths["NI"]) == {""} and set(ff.paths["TI"]) == {""}
    assert (ff.pid == -1).all() and (ff.camid == -1).all() and set(ff.split) == {""}
    expected = FeatureExtractor(weights, device="cpu")([{"RGB": p} for p in ordered])
    np.testing.assert_allclose(ff.features, expected, rtol=0, atol=ATOL)


def test_extract_of_modality_folders_pairs_by_relative_path(setup, tmp_path):
    _, _, weights = setup
    folder = tmp_path / "cams"
    for seed, name in enumerate(["RGB/x/1.jpg", "NI/x/1.jpg", "RGB/2.jpg", "NI/3.jpg", "RGB/4.jpg", "NI/4.jpg"]):
        _image(folder / name, seed)
    _image(folder / "stray.jpg", 9)  # outside the modality folders: not read
    samples = scan_images(folder)
    assert [s.paths for s in samples] == [
        {"RGB": str(folder / "RGB/2.jpg")},
        {"NI": str(folder / "NI/3.jpg")},
        {"RGB": str(folder / "RGB/4.jpg"), "NI": str(folder / "NI/4.jpg")},
        {"RGB": str(folder / "RGB/x/1.jpg"), "NI": str(folder / "NI/x/1.jpg")},
    ]
    out = run_extract(weights, tmp_path / "cams.npz", images=folder, batch_size=3, device="cpu", quiet=True)
    ff = load_feature_file(out)
    assert list(ff.paths["NI"]) == ["", str(folder / "NI/3.jpg"), str(folder / "NI/4.jpg"), str(folder / "NI/x/1.jpg")]
    assert set(ff.paths["TI"]) == {""}
    expected = FeatureExtractor(weights, device="cpu", batch_size=3)([dict(s.paths) for s in samples])
    np.testing.assert_allclose(ff.features, expected, rtol=0, atol=ATOL)


def test_an_interrupted_extraction_continues_where_it_stopped(setup, single, tmp_path, capsys):
    _, data, weights = setup
    out = tmp_path / "resumed.npz"
    written: list[int] = []

    def stop_after_three(index: int) -> None:
        written.append(index)
        if len(written) == 3:
            raise KeyboardInterrupt

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_extract(weights, out, dataset="rgbnt201", root=data, on_chunk=stop_after_three, **CHUNKING)
        parts = tmp_path / "resumed.npz.parts"
        assert sorted(p.name for p in parts.iterdir()) == [
            "chunk_000000.npz", "chunk_000001.npz", "chunk_000002.npz", "header.json"]
        assert not out.exists()
        # Other arguments do not mix with these chunks.
        with pytest.raises(UsageError, match="chunks of another extraction \\(chunk_size differ\\).*delete the folder"):
            run_extract(weights, out, dataset="rgbnt201", root=data, **{**CHUNKING, "chunk_size": 6})
        assert main(["extract", "--weights", str(weights), "--dataset", "rgbnt201", "--root", str(data), "--out",
                     str(out), "--device", "cpu", "--no-normalize", "--chunk-size", "5", "--batch-size", "2"]) == 2
        assert "(normalize differ); rerun with the same arguments" in capsys.readouterr().err
        rest: list[int] = []
        capsys.readouterr()
        run_extract(weights, out, dataset="rgbnt201", root=data, on_chunk=rest.append, **{**CHUNKING, "quiet": False})
    finally:
        torch.set_num_threads(threads)
    assert "3 of 9 chunks already done" in capsys.readouterr().out
    assert rest == list(range(3, 9))  # 44 samples in chunks of 5: only the 6 unfinished ones
    assert not parts.exists()
    _same_file(out, single)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with Gloo is not available")
def test_two_torchrun_processes_write_the_file_of_one(setup, single):
    tmp, data, weights = setup
    out = tmp / "ddp.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "editor_reid", "extract", "--weights", str(weights),
           "--dataset", "rgbnt201", "--root", str(data), "--out", str(out), "--chunk-size", "5", "--batch-size", "2",
           "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.count("wrote 44 features") == 1  # rank 0 merges and reports
    assert not (tmp / "ddp.npz.parts").exists()
    ff = load_feature_file(out)
    assert ff.weights == str(weights)
    _same_file(out, single)


def test_input_errors(setup, tmp_path, capsys):
    _, data, weights = setup
    base = ["extract", "--weights", str(weights), "--out", str(tmp_path / "x.npz"), "--device", "cpu"]
    with pytest.raises(SystemExit) as info:
        main(base)
    assert info.value.code == 2
    assert "one of the arguments --dataset --manifest --images is required" in capsys.readouterr().err
    assert main([*base, "--dataset", "rgbnt201"]) == 2
    assert "extract --dataset rgbnt201 needs --root DIR" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*base, "--images", str(tmp_path / "empty")]) == 1
    assert "no image files (.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp) under" in capsys.readouterr().err
    assert main([*base, "--images", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # A checkpoint with fewer cameras than the data: named before any work.
    small_tmp = tmp_path / "two_cameras"
    small_tmp.mkdir()
    shutil.copytree(data, small_tmp / "data")
    _, small = tiny_weights(small_tmp, seed=1)
    state = torch.load(small, weights_only=True)
    state["model"]["backbone.sie_embed"] = state["model"]["backbone.sie_embed"][:2]
    state["num_cameras"] = 2
    torch.save(state, small)
    assert main(["extract", "--weights", str(small), "--dataset", "rgbnt201", "--root", str(data), "--device", "cpu",
                 "--out", str(tmp_path / "y.npz")]) == 1
    err = capsys.readouterr().err
    assert "was trained with 2 cameras" in err and "has camera id 3" in err and "--images" in err


def test_test_features_on_an_extracted_file_gives_the_metrics_of_test(setup, tmp_path):
    """extract -> test --features reproduces test --weights: exactly with raw features (the
    evaluation normalises them as test does), and to rounding with L2-normalised ones."""
    from editor_reid.config import config_from_dict
    from editor_reid.engine.checkpoint import load_checkpoint
    from editor_reid.engine.evaluate import evaluate_feature_file, run_test

    _, data, weights = setup
    cfg = config_from_dict(load_checkpoint(weights)["config"])
    cfg.datasets.root_dir = str(data)
    reference = run_test(cfg, weights, device="cpu", quiet=True)
    options = dict(dataset="rgbnt201", root=data, batch_size=cfg.test.ims_per_batch, device="cpu", quiet=True)
    raw = run_extract(weights, tmp_path / "raw.npz", normalize=False, **options)
    assert evaluate_feature_file(cfg, raw, quiet=True) == reference
    unit = run_extract(weights, tmp_path / "unit.npz", **options)
    from_unit = evaluate_feature_file(cfg, unit, quiet=True)
    assert from_unit.keys() == reference.keys()
    for key, value in reference.items():
        assert from_unit[key] == pytest.approx(value, abs=0.02), key


def test_the_file_carries_the_fingerprint_of_the_model(setup, single, tmp_path):
    """Equal for the same weights (the extractor's, the file's); different for another model."""
    tmp, data, weights = setup
    fingerprint = load_feature_file(single).fingerprint
    assert len(fingerprint) == 32 and fingerprint == FeatureExtractor(weights, device="cpu").fingerprint
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    _, other = tiny_weights(other_dir, seed=1)
    assert FeatureExtractor(other, device="cpu").fingerprint != fingerprint


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_one_line_usage_error(setup, tmp_path, capsys):
    _, data, weights = setup
    status = main(["extract", "--weights", str(weights), "--dataset", "rgbnt201", "--root", str(data),
                   "--device", "cuda", "--out", str(tmp_path / "f.npz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "use --device cpu" in err[0]
