"""The HTTP search service on either gallery backend: a Milvus collection answers as the FAISS
index does, a retried ``POST /gallery`` adds nothing new, and ``serve --backend milvus`` refuses a
missing ``--uri`` in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _features import rgbnt201_test_samples, tiny_weights
from editor_reid import cli
from editor_reid.deploy.gallery import GalleryIndex
from editor_reid.deploy.service import ServiceSettings, create_app
from editor_reid.features.extractor import FeatureExtractor
from editor_reid.modalities import MODALITIES

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")
from fastapi.testclient import TestClient  # noqa: E402

from editor_reid.deploy.milvus import MilvusGallery  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_milvus")
    data, weights = tiny_weights(tmp)
    extractor = FeatureExtractor(weights, device="cpu")
    samples, pids, camids = rgbnt201_test_samples(data)
    feats = extractor([{**s, "camid": int(c)} for s, c in zip(samples, camids)])
    paths = {f"path_{m}": np.array([s[m] for s in samples]) for m in MODALITIES}
    return {"extractor": extractor, "samples": samples, "feats": feats, "tmp": tmp,
            "metadata": {"pid": pids, "camid": camids, **paths}, "uri": str(tmp / "g.db")}


def _gallery(served, backend: str, name: str):
    kwargs = dict(fingerprint=served["extractor"].fingerprint, kind="flat")
    if backend == "milvus":
        return MilvusGallery.build(served["feats"], served["metadata"], uri=served["uri"], collection=name,
                                   overwrite=True, **kwargs)
    index = GalleryIndex.build(served["feats"], served["metadata"], **kwargs)
    index.save(served["tmp"] / name)
    return index


def _files(sample: dict) -> dict:
    return {m: (Path(sample[m]).name, Path(sample[m]).read_bytes(), "image/jpeg") for m in MODALITIES}


def _without_timing(body: dict) -> dict:
    return {key: value for key, value in body.items() if key != "timing"}


def test_a_milvus_gallery_answers_as_the_faiss_index(served):
    answers = {}
    for backend in ("faiss", "milvus"):
        app = create_app(_gallery(served, backend, f"answers_{backend}"), served["extractor"],
                         settings=ServiceSettings(k=5))
        with TestClient(app) as client:
            health = client.get("/healthz").json()
            assert health["gallery"] == backend and health["size"] == len(served["samples"])
            answers[backend] = [_without_timing(client.post("/search", files=_files(served["samples"][i]),
                                                            data={"camid": "1", "exclude_same_camera": "true"}).json())
                                for i in (0, 5)]
    for faiss_answer, milvus_answer in zip(answers["faiss"], answers["milvus"]):
        assert faiss_answer["unknown"] == milvus_answer["unknown"]
        rows = [(m["pid"], m["camid"], m["row"]) for m in faiss_answer["matches"]]
        assert rows == [(m["pid"], m["camid"], m["row"]) for m in milvus_answer["matches"]]
        np.testing.assert_allclose([m["distance"] for m in faiss_answer["matches"]],
                                   [m["distance"] for m in milvus_answer["matches"]], atol=1e-5)
        assert all(m["camid"] != 1 for m in milvus_answer["matches"])


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_a_retried_addition_adds_nothing_new(served, backend):
    gallery = _gallery(served, backend, f"retry_{backend}")
    app = create_app(gallery, served["extractor"], settings=ServiceSettings(k=3))
    size = len(served["samples"])
    sample = served["samples"][2]
    with TestClient(app) as client:
        first = client.post("/gallery", files=_files(sample), data={"pid": "77", "camid": "1"}).json()
        again = client.post("/gallery", files=_files(sample), data={"pid": "77", "camid": "1"}).json()
        other = client.post("/gallery", files=_files(sample), data={"pid": "78", "camid": "1"}).json()
        assert first["size"] == size + 1 and again["size"] == size + 1 and other["size"] == size + 2
        assert first["ids"] == again["ids"] != other["ids"]
        found = client.post("/search", files=_files(sample), data={"camid": "1", "k": "5"}).json()
    pids = {m["pid"] for m in found["matches"] if m["distance"] < 1e-5}
    assert {77, 78} <= pids


def test_serve_with_milvus_needs_a_uri(capsys):
    assert cli.main(["serve", "--index", "city", "--backend", "milvus", "--weights", "w.pt"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--backend milvus needs --uri" in err
