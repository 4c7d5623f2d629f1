"""The HTTP search service (editor_reid.deploy.service, ``editor-reid serve``): each endpoint
through Starlette's TestClient, its answers against GalleryIndex.search on the same features,
bad input and its status codes, micro-batching, refusals at startup, and a real server killed
with SIGKILL in the middle of a stream of additions."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _features import rgbnt201_test_samples, tiny_weights
from editor_reid import cli
from editor_reid.deploy.gallery import GalleryIndex
from editor_reid.deploy.service import (MAX_IMAGE_PIXELS, MicroBatcher, ServiceError, ServiceSettings,
                                        check_compatible, create_app)
from editor_reid.errors import EditorReidError, UsageError
from editor_reid.features.extractor import FeatureExtractor
from editor_reid.modalities import MODALITIES

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(extractor, samples as paths, their features, pids, camids, weights): the tiny checkpoint
    and the synthetic RGBNT201 test split, features extracted in-process."""
    tmp = tmp_path_factory.mktemp("serve")
    data, weights = tiny_weights(tmp)
    extractor = FeatureExtractor(weights, device="cpu")
    samples, pids, camids = rgbnt201_test_samples(data)
    feats = extractor([{**s, "camid": int(c)} for s, c in zip(samples, camids)])
    return {"extractor": extractor, "samples": samples, "feats": feats, "pids": pids, "camids": camids,
            "weights": weights, "tmp": tmp}


def _index(served, directory: Path | None = None, **kwargs) -> GalleryIndex:
    index = GalleryIndex.build(served["feats"], {"pid": served["pids"], "camid": served["camids"]},
                               fingerprint=served["extractor"].fingerprint, **kwargs)
    if directory is not None:
        index.save(directory)
    return index


def _files(sample: dict, modalities=MODALITIES) -> dict:
    return {m: (Path(sample[m]).name, Path(sample[m]).read_bytes(), "image/jpeg") for m in modalities}


@pytest.fixture
def client(served, tmp_path):
    app = create_app(_index(served, tmp_path / "index"), served["extractor"], settings=ServiceSettings(k=5))
    with TestClient(app) as test_client:
        yield test_client


# ----------------------------------------------------------------------------- endpoints


def test_healthz_reports_the_index_and_the_model(client, served):
    body = client.get("/healthz").json()
    assert body["status"] == "ok"
    assert body["size"] == len(served["samples"]) and body["dim"] == served["extractor"].feature_dim
    assert body["fingerprint"] == served["extractor"].fingerprint
    assert body["backend"] == "torch on cpu" and body["modalities"] == list(MODALITIES)
    assert body["batching"] == {"batches": 0, "samples": 0, "largest": 0}


@pytest.mark.parametrize("modalities, camid, options", [
    (MODALITIES, 2, {}),
    (("RGB",), None, {"k": 3}),
    (("NI", "TI"), 0, {"exclude_same_camera": True, "k": 4}),
    (MODALITIES, -1, {"threshold": 0.05}),
])
def test_search_answers_as_the_index_does_on_the_same_features(served, tmp_path, modalities, camid, options):
    index = _index(served)
    app = create_app(index, served["extractor"], settings=ServiceSettings(k=5))
    sample = served["samples"][3]
    form = {key: str(value).lower() for key, value in options.items()}
    if camid is not None:
        form["camid"] = str(camid)
    with TestClient(app) as client:
        response = client.post("/search", files=_files(sample, modalities), data=form)
    assert response.status_code == 200, response.text
    body = response.json()
    query = served["extractor"]({**{m: sample[m] for m in modalities}, "camid": camid})
    expected = index.search(query, k=options.get("k", 5), query_camids=[-1 if camid is None else camid],
                            exclude_same_camera=options.get("exclude_same_camera", False),
                            threshold=options.get("threshold")).to_json(index.metadata)[0]
    assert body["unknown"] == expected["unknown"]
    assert [m["gallery"] for m in body["matches"]] == [m["gallery"] for m in expected["matches"]]
    for got, want in zip(body["matches"], expected["matches"]):
        assert got["pid"] == want["pid"] and got["camid"] == want["camid"]
        assert got["distance"] == pytest.approx(want["distance"], abs=1e-5)
    if options.get("exclude_same_camera"):
        assert all(m["camid"] != camid for m in body["matches"])
    assert body["threshold"] == options.get("threshold")
    assert body["timing"]["batch_size"] == 1 and body["timing"]["total_ms"] > 0


def test_search_with_a_calibrated_fpr_and_the_server_default(served):
    index = _index(served)
    index.set_thresholds({"0.01": 0.0, "0.001": 4.0})
    app = create_app(index, served["extractor"], settings=ServiceSettings(fpr=0.001))
    sample = {**_files(served["samples"][0], ("RGB",))}
    with TestClient(app) as client:
        default = client.post("/search", files=sample).json()
        strict = client.post("/search", files=sample, data={"fpr": "1e-2"}).json()
        closed = client.post("/search", files=sample, data={"threshold": "4"}).json()
        assert client.get("/healthz").json()["thresholds"] == {"0.001": 4.0, "0.01": 0.0}
    assert default["threshold"] == 4.0 and not default["unknown"]
    assert strict["threshold"] == 0.0 and strict["unknown"]  # no RGB-only query lies at distance 0
    assert closed["threshold"] == 4.0 and not closed["unknown"]


def test_gallery_add_is_searchable_and_persisted(served, tmp_path):
    directory = tmp_path / "index"
    index = _index(served, directory)
    app = create_app(index, served["extractor"], settings=ServiceSettings(k=3))
    sample = served["samples"][5]
    size = len(served["samples"])
    with TestClient(app) as client:
        added = client.post("/gallery", files=_files(sample, ("RGB", "TI")), data={"pid": "77", "camid": "1"})
        assert added.status_code == 200, added.text
        assert added.json()["ids"] == [size] and added.json()["size"] == size + 1
        found = client.post("/search", files=_files(sample, ("RGB", "TI")), data={"camid": "1"}).json()
        assert client.get("/healthz").json()["size"] == size + 1
    best = found["matches"][0]
    assert (best["gallery"], best["pid"], best["camid"]) == (size, 77, 1) and best["distance"] < 1e-5
    reloaded = GalleryIndex.load(directory)  # the add is in the journal: no save needed
    assert reloaded.size == size + 1
    assert reloaded.metadata["pid"][size] == 77 and reloaded.metadata["camid"][size] == 1
    assert reloaded.metadata["path_RGB"][size] == Path(sample["RGB"]).name


# ----------------------------------------------------------------------------- bad input


def _png(size=(8, 8), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG" if mode != "LAB" else "TIFF")
    return buffer.getvalue()


def _jpeg_noise() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


RGB_OK = ("a.png", _png(), "image/png")


@pytest.mark.parametrize("files, data, status, words", [
    ({"RGB": ("a.jpg", b"not an image", "image/jpeg")}, {}, 400, "field 'RGB' (a.jpg) is not an image"),
    ({"NI": ("cut.jpg", _jpeg_noise()[:600], "image/jpeg")}, {}, 400, "field 'NI' (cut.jpg) is not a decodable image"),
    ({"TI": ("e.png", b"", "image/png")}, {}, 400, "field 'TI' (e.png) is empty"),
    ({"RGB": ("lab.tif", _png(mode="LAB"), "image/tiff")}, {}, 400, "has image mode 'LAB'"),
    ({}, {"camid": "1", "k": "3"}, 422, "no image"),
    ({"XX": RGB_OK}, {}, 400, "unknown field 'XX'"),
    ({"RGB": RGB_OK}, {"pid": "3"}, 400, "unknown field 'pid'"),
    ({"rgb": RGB_OK}, {}, 400, "unknown field 'rgb'"),
    ({"RGB": RGB_OK}, {"NI": "text"}, 400, "field 'NI' must be an image file upload"),
    ({"RGB": RGB_OK}, {"camid": "4"}, 400, "camera 4 is not in the model's camera table (cameras 0..3)"),
    ({"RGB": RGB_OK}, {"camid": "-2"}, 400, "camera -2 is not in the model's camera table"),
    ({"RGB": RGB_OK}, {"camid": "two"}, 400, "field 'camid' must be an integer"),
    ({"RGB": RGB_OK}, {"k": "0"}, 400, "field 'k' must be >= 1"),
    ({"RGB": RGB_OK}, {"threshold": "nan"}, 400, "field 'threshold' must be a finite number"),
    ({"RGB": RGB_OK}, {"threshold": "-1"}, 400, "field 'threshold' must be a distance >= 0"),
    ({"RGB": RGB_OK}, {"threshold": "1", "fpr": "0.01"}, 400, "not both"),
    ({"RGB": RGB_OK}, {"fpr": "0.5"}, 400, "no threshold calibrated for FPR 0.5 (it has: none)"),
    ({"RGB": RGB_OK}, {"exclude_same_camera": "maybe"}, 400, "must be true or false"),
    ({"RGB": ("big.png", _png((6000, 5000), "1"), "image/png")}, {}, 413,
     f"the service decodes at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels"),
])
def test_bad_search_input_is_a_4xx_with_a_json_message(client, files, data, status, words):
    if files:
        response = client.post("/search", files=files, data=data)
    else:  # a multipart form of plain values only
        response = client.post("/search", files={key: (None, value) for key, value in data.items()})
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_repeated_field_and_non_multipart_bodies(client):
    repeated = client.post("/search", files=[("RGB", RGB_OK), ("RGB", RGB_OK)])
    assert repeated.status_code == 400 and "field 'RGB' is given 2 times" in repeated.json()["error"]
    plain = client.post("/search", data={"camid": "1"})
    assert plain.status_code == 400 and "multipart" in plain.json()["error"]
    broken = client.post("/search", content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data"})
    assert 400 <= broken.status_code < 500 and "error" in broken.json()
    assert client.get("/nowhere").status_code == 404 and client.get("/search").status_code == 405


@pytest.mark.parametrize("data, words", [
    ({}, "field 'pid' is required"),
    ({"pid": "-1"}, "field 'pid' must be >= 0"),
    ({"pid": "x"}, "field 'pid' must be an integer"),
    ({"pid": "1", "k": "3"}, "unknown field 'k'"),
])
def test_bad_gallery_input(client, data, words):
    response = client.post("/gallery", files={"RGB": RGB_OK}, data=data)
    assert response.status_code == 400 and words in response.json()["error"]
    assert client.get("/healthz").json()["size"] == 22  # nothing was added


def test_a_gallery_that_cannot_be_written_is_a_503(served, tmp_path, monkeypatch):
    index = _index(served, tmp_path / "index")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index, "add", full_disk)
    with TestClient(create_app(index, served["extractor"])) as client:
        response = client.post("/gallery", files={"RGB": RGB_OK}, data={"pid": "1"})
    assert response.status_code == 503
    assert response.json()["error"] == ("the gallery could not be written ([Errno 28] No space left on device); the "
                                        "addition was not made")


def test_oversized_uploads_are_refused_while_reading(served):
    app = create_app(_index(served), served["extractor"], settings=ServiceSettings(max_upload_mb=0.01))
    big = ("big.png", os.urandom(20_000), "image/png")
    with TestClient(app) as client:
        declared = client.post("/search", files={"RGB": big})
        chunks = (b"x" * 4096 for _ in range(8))  # no Content-Length: counted as it arrives
        streamed = client.post("/search", content=chunks, headers={"content-type": "multipart/form-data; boundary=b"})
        small = client.post("/search", files={"RGB": RGB_OK})
    for response in (declared, streamed):
        assert response.status_code == 413 and "0.01 MiB" in response.json()["error"]
    assert small.status_code == 200


def test_a_modality_the_model_does_not_read(served, tmp_path):
    _, weights = tiny_weights(tmp_path, "datasets.modalities=[RGB,NI]")
    extractor = FeatureExtractor(weights, device="cpu")
    index = GalleryIndex.build(np.eye(2, extractor.feature_dim, dtype=np.float32), fingerprint=extractor.fingerprint)
    with TestClient(create_app(index, extractor)) as client:
        response = client.post("/search", files={"RGB": RGB_OK, "TI": RGB_OK})
    assert response.status_code == 400
    assert response.json()["error"] == "field 'TI': the model does not read TI (its modalities: RGB, NI)"


# ----------------------------------------------------------------------------- micro-batching


class _CountingExtractor:
    """The extractor, counting its calls and the samples in each."""

    def __init__(self, extractor) -> None:
        self._extractor = extractor
        self.batches: list[int] = []

    def __getattr__(self, name):
        return getattr(self._extractor, name)

    def __call__(self, samples, **kwargs):
        self.batches.append(len(samples))
        return self._extractor(samples, **kwargs)


def test_concurrent_requests_share_model_calls(served):
    extractor = _CountingExtractor(served["extractor"])
    app = create_app(_index(served), extractor, settings=ServiceSettings(max_batch=4, max_wait_ms=400))
    samples = served["samples"][:8]
    with TestClient(app) as client:
        def post(i: int):
            if i % 2:
                return client.post("/gallery", files=_files(samples[i], ("RGB",)), data={"pid": str(100 + i)})
            return client.post("/search", files=_files(samples[i], ("RGB",)))

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(post, range(8)))
        stats = client.get("/healthz").json()["batching"]
    assert [r.status_code for r in responses] == [200] * 8
    assert sum(extractor.batches) == 8 and max(extractor.batches) <= 4
    assert len(extractor.batches) < 8 and max(extractor.batches) > 1  # shared, not one call per request
    assert stats == {"batches": len(extractor.batches), "samples": 8, "largest": max(extractor.batches)}
    sizes = [r.json()["timing"]["batch_size"] for r in responses]
    assert max(sizes) > 1
    ids = sorted(r.json()["ids"][0] for r in responses[1::2])
    assert ids == list(range(22, 26))  # one add each, in one or more journal records


def test_micro_batcher_batches_by_size_and_isolates_failures():
    seen: list[list[int]] = []

    def process(items):
        seen.append(list(items))
        return [ValueError(f"bad {x}") if x == 3 else x * 10 for x in items]

    async def main():
        batcher = MicroBatcher(process, max_batch=2, max_wait_s=0.2)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(x) for x in range(5)), return_exceptions=True)
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert results[:3] == [0, 10, 20] and isinstance(results[3], ValueError) and results[4] == 40
    assert seen == [[0, 1], [2, 3], [4]]


def test_micro_batcher_closes_a_batch_after_max_wait():
    seen: list[int] = []

    async def main():
        batcher = MicroBatcher(lambda items: seen.append(len(items)) or list(items), max_batch=8, max_wait_s=0.01)
        await batcher.start()
        try:
            first = await batcher.submit("a")  # alone: waits 10 ms, not for 7 more
            await asyncio.sleep(0.05)
            assert await batcher.submit("b") == "b"
            return first
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == "a" and seen == [1, 1]


def test_micro_batcher_answers_what_is_queued_before_it_stops():
    async def main():
        batcher = MicroBatcher(lambda items: [x + 1 for x in items], max_batch=2, max_wait_s=10)
        await batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(x)) for x in range(3)]
        await asyncio.sleep(0)  # queued, waiting for company
        await batcher.stop()  # no 10 s wait: the queue is drained at once
        with pytest.raises(ServiceError, match="shutting down"):
            await batcher.submit(9)
        return [await p for p in pending]

    start = time.perf_counter()
    assert asyncio.run(main()) == [1, 2, 3] and time.perf_counter() - start < 5


# ----------------------------------------------------------------------------- startup


def test_startup_refuses_an_index_of_another_width_or_model(served):
    extractor = served["extractor"]
    narrow = GalleryIndex.build(np.eye(3, 10, dtype=np.float32))
    with pytest.raises(EditorReidError, match="features of width 10, but the model gives 192"):
        create_app(narrow, extractor)
    other = GalleryIndex.build(served["feats"], fingerprint="0" * 32)
    with pytest.raises(EditorReidError, match="another model's features"):
        create_app(other, extractor)
    unknown = GalleryIndex.build(served["feats"])  # no fingerprint recorded: accepted
    assert check_compatible(unknown, extractor, ServiceSettings(threshold=0.5)) == 0.5
    with pytest.raises(EditorReidError, match=r"no threshold calibrated for FPR 0.001 \(it has: none\)"):
        create_app(unknown, extractor, settings=ServiceSettings(fpr=1e-3))


def test_settings_are_checked():
    with pytest.raises(UsageError, match="not both"):
        ServiceSettings(threshold=1.0, fpr=0.01)
    with pytest.raises(UsageError, match="max_batch"):
        ServiceSettings(max_batch=0)
    with pytest.raises(UsageError, match="max_upload_mb"):
        ServiceSettings(max_upload_mb=0)


def test_without_fastapi_the_error_says_what_to_install(served, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(UsageError, match=r'pip install "editor-reid\[serve\]"'):
        create_app(_index(served), served["extractor"])


def test_serve_refuses_another_models_index_in_one_line(served, tmp_path, capsys):
    GalleryIndex.build(served["feats"], fingerprint="f" * 32).save(tmp_path / "other")
    status = cli.main(["serve", "--index", str(tmp_path / "other"), "--weights", str(served["weights"]),
                       "--port", "0"])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1
    assert err.startswith("editor-reid: the gallery index was built from another model's features (model ffffffffffff)")


@pytest.mark.parametrize("argv, words", [
    (["--weights", "w.pt"], "the following arguments are required: --index"),
    (["--index", "i"], "one of the arguments --weights --onnx is required"),
    (["--index", "i", "--weights", "w.pt", "--onnx", "m.onnx"], "argument --onnx: not allowed with argument --weights"),
    (["--index", "i", "--onnx", "m.onnx", "--config", "demo"], "--config goes with --weights"),
    (["--index", "i", "--weights", "w.pt", "--fpr", "0.01", "--threshold", "1"],
     "argument --threshold: not allowed with argument --fpr"),
    (["--index", "i", "--weights", "w.pt", "--max-batch", "0"], "argument --max-batch: invalid value '0'"),
    (["--index", "i", "--weights", "w.pt", "--max-wait-ms", "-1"], "expected a finite number >= 0"),
    (["--index", "i", "--weights", "w.pt", "--max-upload-mb", "0"], "expected a finite number > 0"),
    (["--index", "i", "--weights", "w.pt", "--port", "70000"], "expected an integer in [0, 65535]"),
    (["--index", "i", "--weights", "w.pt", "-k", "0"], "argument -k: invalid value '0'"),
])
def test_serve_command_line_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("editor-reid: serve: ") and words in err


def test_serve_parser_defaults():
    args = cli.parse_args(["serve", "--index", "i", "--weights", "w.pt"])
    assert (args.host, args.port, args.max_batch, args.max_wait_ms, args.max_upload_mb, args.k) == \
        ("127.0.0.1", 8000, 16, 5.0, 20.0, 10)
    assert args.fpr is None and args.threshold is None and args.device == "auto"


def test_a_taken_port_is_one_line(served, tmp_path, capsys):
    import socket

    _index(served, tmp_path / "index")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        status = cli.main(["serve", "--index", str(tmp_path / "index"), "--weights", str(served["weights"]),
                           "--port", str(port)])
    err = capsys.readouterr().err
    assert status == 1 and err == (f"editor-reid: cannot listen on 127.0.0.1:{port} (Address already in use); stop "
                                   "what is listening there or choose another --host / --port\n")


def test_a_missing_index_is_a_usage_error(served, tmp_path, capsys):
    status = cli.main(["serve", "--index", str(tmp_path / "none"), "--weights", str(served["weights"])])
    assert status == 2 and "none" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a real server


def _start_server(index_dir: Path, weights: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "editor_reid", "serve", "--index", str(index_dir), "--weights",
                                str(weights), "--port", "0", "--max-wait-ms", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = process.stdout.readline()
    match = re.match(r"serving (http://127\.0\.0\.1:\d+) ", line)
    if not match:
        process.kill()
        pytest.fail(f"the server did not start: {line!r} {process.stderr.read()[-3000:]}")
    return process, match.group(1)


def test_acknowledged_additions_survive_sigkill(served, tmp_path):
    import httpx

    directory = tmp_path / "index"
    _index(served, directory)
    size = len(served["samples"])
    process, url = _start_server(directory, served["weights"])
    acknowledged: dict[int, int] = {}  # entry id -> pid
    lock = threading.Lock()
    stop = threading.Event()

    def add_stream(worker: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in range(1000):
                if stop.is_set():
                    return
                pid = 1000 + 100 * worker + i
                sample = served["samples"][(worker + i) % size]
                try:
                    response = client.post("/gallery", files=_files(sample, ("RGB",)), data={"pid": str(pid)})
                except httpx.HTTPError:
                    return  # the server is gone
                if response.status_code == 200:
                    with lock:
                        acknowledged[response.json()["ids"][0]] = pid

    try:
        threads = [threading.Thread(target=add_stream, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(acknowledged) < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)  # with requests in flight
        process.wait(10)
        stop.set()
        for thread in threads:
            thread.join(30)
    finally:
        process.kill()
        process.wait(10)
        process.stdout.close()
        process.stderr.close()
    assert len(acknowledged) >= 12

    reloaded = GalleryIndex.load(directory)
    assert reloaded.size >= size + len(acknowledged)  # in-flight ones may be there too, unacknowledged
    for entry, pid in acknowledged.items():
        assert reloaded.metadata["pid"][entry] == pid

    process, url = _start_server(directory, served["weights"])
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/healthz").json()["size"] == reloaded.size
            entry, pid = max(acknowledged.items())
            sample_index = next(i for i, s in enumerate(served["samples"])
                                if Path(s["RGB"]).name == reloaded.metadata["path_RGB"][entry])
            found = client.post("/search", files=_files(served["samples"][sample_index], ("RGB",)),
                                data={"k": str(reloaded.size)}).json()
        match = next(m for m in found["matches"] if m["gallery"] == entry)
        assert match["pid"] == pid and match["distance"] < 1e-5
    finally:
        process.terminate()
        process.wait(30)
        process.stdout.close()
        process.stderr.close()
