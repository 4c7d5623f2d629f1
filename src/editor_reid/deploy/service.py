"""The HTTP search service behind ``editor-reid serve``: a gallery index and a feature extractor
answering ``POST /search``, ``POST /gallery`` and ``GET /healthz`` (docs/serve.md).

::

    index = GalleryIndex.load("gallery/")
    extractor = FeatureExtractor("best.pt")              # or FeatureExtractor.from_onnx("model.onnx")
    app = create_app(index, extractor, settings=ServiceSettings(max_batch=16, max_wait_ms=5))
    # TestClient(app), or run_server(...) for a real socket

Requests are micro-batched: each request decodes its images, then queues one sample; a
:class:`MicroBatcher` takes up to ``max_batch`` queued samples, waiting at most ``max_wait_ms``
after the oldest arrived, and runs them through one extractor call in a worker thread, where the
batch's searches and gallery additions are also done (searches grouped by their parameters,
additions in one durable :meth:`GalleryIndex.add`). The event loop only parses and decodes; the
single worker thread is the only one that touches the model and the index.

Every bad input is a 4xx answer with a JSON body ``{"error": "<one line>"}``; a 500 means a bug.

FastAPI and uvicorn (the ``serve`` extra) are imported by :func:`create_app` and
:func:`run_server` only.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at
# run time, and ``Request`` is imported inside create_app (the serve extra is optional).

import asyncio
import hashlib
import io
import logging
import math
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from editor_reid.data.dataset import BadImageError, to_rgb
from editor_reid.deploy.gallery import key_of
from editor_reid.errors import EditorReidError, UsageError
from editor_reid.features.store import path_key
from editor_reid.modalities import MODALITIES, canonical_order

__all__ = ["ServiceSettings", "ServiceError", "MicroBatcher", "create_app", "check_compatible", "run_server",
           "MAX_IMAGE_PIXELS"]

log = logging.getLogger(__name__)

#: The largest image (width × height) a request may carry; a larger one is refused (413) before
#: it is decoded, as a few kilobytes of PNG can unpack into gigabytes.
MAX_IMAGE_PIXELS = 25_000_000
UNKNOWN_CAMERA = -1  # editor_reid.model.UNKNOWN_CAMERA, without importing the model here
_SEARCH_FIELDS = ("camid", "k", "exclude_same_camera", "threshold", "fpr")
_GALLERY_FIELDS = ("pid", "camid")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class ServiceError(Exception):
    """A request the service refuses: ``status`` (4xx, or 503 when the gallery cannot be written)
    and a one-line ``message``, sent as ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ServiceSettings:
    """How the service batches, limits and answers (the ``editor-reid serve`` options).

    Args:
        k: matches returned per search unless the request gives ``k``.
        max_batch: samples per extractor call, at most.
        max_wait_ms: how long a queued sample may wait for others to fill its batch.
        max_upload_mb: the largest request body, in MiB (413 beyond it, counted while reading).
        threshold: the default open-set distance threshold: a query whose best match is farther
            is ``"unknown"``. None: no open-set decision unless a request asks for one.
        fpr: instead of ``threshold``, a false-positive rate the index calibrated a threshold for.
    """

    k: int = 10
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_upload_mb: float = 20.0
    threshold: float | None = None
    fpr: float | None = None

    def __post_init__(self) -> None:
        if self.k < 1 or self.max_batch < 1:
            raise UsageError(f"k and max_batch must be at least 1, got k={self.k}, max_batch={self.max_batch}")
        if not (self.max_wait_ms >= 0 and math.isfinite(self.max_wait_ms)):
            raise UsageError(f"max_wait_ms must be a finite number >= 0, got {self.max_wait_ms}")
        if not (self.max_upload_mb > 0 and math.isfinite(self.max_upload_mb)):
            raise UsageError(f"max_upload_mb must be a finite number > 0, got {self.max_upload_mb}")
        if self.threshold is not None and self.fpr is not None:
            raise UsageError("give a threshold or an fpr, not both: each sets the open-set distance threshold")
        if self.threshold is not None and not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise UsageError(f"threshold must be a finite distance >= 0, got {self.threshold}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


# ----------------------------------------------------------------------------- startup checks


def _fpr_thresholds(index) -> dict[float, float]:
    """The index's calibrated thresholds keyed by the FPR as a number (its keys are strings)."""
    return {float(key): float(value) for key, value in (index.thresholds or {}).items()}


def _threshold_for_fpr(index, fpr: float) -> float | None:
    """The calibrated distance threshold of ``fpr``; None when the index has none for it."""
    for key, value in _fpr_thresholds(index).items():
        if math.isclose(key, fpr, rel_tol=1e-9, abs_tol=1e-12):
            return value
    return None


def _calibrated(index) -> str:
    keys = sorted(_fpr_thresholds(index))
    return ", ".join(f"{key:g}" for key in keys) if keys else "none"


def check_compatible(index, extractor, settings: ServiceSettings) -> float | None:
    """Raise EditorReidError when ``extractor`` cannot serve ``index`` (another feature width, or
    another model's fingerprint when both have one) or ``settings.fpr`` has no calibrated
    threshold; return the default threshold (None: no open-set decision)."""
    if index.dim != extractor.feature_dim:
        raise EditorReidError(f"the gallery index holds features of width {index.dim}, but the model gives "
                              f"{extractor.feature_dim}; build the index with this model's features")
    ours, theirs = extractor.fingerprint or "", index.fingerprint or ""
    if ours and theirs and ours != theirs:
        raise EditorReidError(f"the gallery index was built from another model's features (model {theirs[:12]}), but "
                              f"the model served is {ours[:12]}; serve the model the index was built with, or rebuild "
                              f"the index with this model's features")
    if settings.fpr is None:
        return settings.threshold
    threshold = _threshold_for_fpr(index, settings.fpr)
    if threshold is None:
        raise EditorReidError(f"the gallery index has no threshold calibrated for FPR {settings.fpr:g} (it has: "
                              f"{_calibrated(index)}); calibrate the index for it (editor-reid calibrate --index) or "
                              f"give a distance with --threshold")
    return threshold


# ----------------------------------------------------------------------------- micro-batching


@dataclass
class _Job:
    """One request's sample and what to do with its feature."""

    sample: dict[str, Any]  # modality -> PIL image, plus "camid"
    kind: str  # "search" or "add"
    params: dict[str, Any] = field(default_factory=dict)
    queued: float = 0.0  # time.perf_counter() when queued


class MicroBatcher:
    """Collects the items of concurrent requests into batches and runs ``process`` on each batch
    in one worker thread.

    A batch closes when it holds ``max_batch`` items or when its oldest item has waited
    ``max_wait_s``; items that arrive while a batch runs form the next one. ``process(items)``
    returns one outcome per item, a result or an exception, which :meth:`submit` returns or
    raises. ``calls``, ``items`` and ``largest`` count the batches run, the items in them and the
    largest batch.
    """

    def __init__(self, process: Callable[[list], list], *, max_batch: int, max_wait_s: float) -> None:
        self._process = process
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.calls = self.items = self.largest = 0
        self._pending: list[tuple[Any, float, asyncio.Future]] = []
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False

    async def start(self) -> None:
        self._closing = False
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="editor-reid-batch")
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Take no more items; what is queued or running is finished and answered first."""
        self._closing = True
        if self._arrived is not None:
            self._arrived.set()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, True)

    async def submit(self, item: Any) -> Any:
        if self._task is None or self._task.done() or self._closing:
            raise ServiceError(503, "the server is shutting down")
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, time.perf_counter(), future))
        self._arrived.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._pending[0][1] + self.max_wait_s
            while (len(self._pending) < self.max_batch and not self._closing
                   and (remaining := deadline - time.perf_counter()) > 0):
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            live = [(item, future) for item, _, future in batch if not future.done()]  # a client may have left
            if not live:
                continue
            self.calls += 1
            self.items += len(live)
            self.largest = max(self.largest, len(live))
            try:
                outcomes = await loop.run_in_executor(self._executor, self._process, [item for item, _ in live])
            except Exception as exc:  # noqa: BLE001 (a bug in process: every request of the batch hears of it)
                log.exception("a batch failed")
                outcomes = [exc] * len(live)
            for (_, future), outcome in zip(live, outcomes):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def stats(self) -> dict[str, int]:
        return {"batches": self.calls, "samples": self.items, "largest": self.largest}


class _Worker:
    """What the worker thread does with a batch of jobs: one extractor call, the searches grouped
    by their parameters, the additions in one durable ``index.add``."""

    def __init__(self, index, extractor) -> None:
        self.index = index
        self.extractor = extractor

    def __call__(self, jobs: list[_Job]) -> list[Any]:
        start = time.perf_counter()
        try:
            feats = self.extractor([job.sample for job in jobs])  # [B, D]
        except Exception as exc:  # noqa: BLE001
            if len(jobs) == 1:
                return [_as_service_error(exc)]
            return [self([job])[0] for job in jobs]  # one bad sample must not fail the others
        outcomes: list[Any] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        adds: list[int] = []
        for row, job in enumerate(jobs):
            if job.kind == "add":
                adds.append(row)
            else:
                key = (job.params["k"], job.params["exclude_same_camera"], job.params["threshold"])
                groups.setdefault(key, []).append(row)
        for (k, exclude, threshold), rows in groups.items():
            try:
                answers = self._search(feats[rows], [jobs[r].sample["camid"] for r in rows], k, exclude, threshold)
            except Exception as exc:  # noqa: BLE001
                answers = [_as_service_error(exc)] * len(rows)
            for row, answer in zip(rows, answers):
                outcomes[row] = answer
        if adds:
            try:
                ids = self._add(feats[adds], [jobs[r] for r in adds])
            except Exception as exc:  # noqa: BLE001
                error = _as_service_error(exc, writing=True)
                ids = [error] * len(adds)
            for row, new in zip(adds, ids):
                outcomes[row] = new
        elapsed = (time.perf_counter() - start) * 1000
        for row, job in enumerate(jobs):
            if isinstance(outcomes[row], dict):
                outcomes[row]["timing"] = {"wait_ms": round((start - job.queued) * 1000, 3),
                                           "batch_ms": round(elapsed, 3), "batch_size": len(jobs)}
        return outcomes

    def _search(self, queries: np.ndarray, camids: list[int], k: int, exclude: bool,
                threshold: float | None) -> list[dict]:
        result = self.index.search(queries, k=k, query_camids=np.asarray(camids, dtype=np.int64),
                                   exclude_same_camera=exclude, threshold=threshold)
        answers = []
        for item in result.to_json():
            item.pop("query", None)
            answers.append({**item, "threshold": threshold})
        return answers

    def _add(self, feats: np.ndarray, jobs: list[_Job]) -> list[dict]:
        fingerprint = self.extractor.fingerprint or ""
        metadata = {"pid": [job.params["pid"] for job in jobs], "camid": [job.sample["camid"] for job in jobs],
                    "row": [-1] * len(jobs),  # not from a feature file
                    # The sample key comes from the uploaded bytes: a retried request adds nothing new.
                    "key": [_upload_key(fingerprint, job.params["pid"], job.sample["camid"], job.params["digest"])
                            for job in jobs],
                    **{path_key(m): [job.params["files"].get(m, "") for job in jobs]
                       for m in canonical_order([*MODALITIES, *self.extractor.modalities])}}
        ids = self.index.add(feats, metadata, fingerprint=self.extractor.fingerprint, skip_existing=True)
        return [{"ids": [int(i)]} for i in np.asarray(ids).reshape(-1)]


def _upload_key(fingerprint: str, pid: int, camid: int, digest: str) -> int:
    """The sample key of an uploaded sample: its model, identity, camera and image bytes."""
    return key_of(f"{fingerprint}\0upload\0{pid}\0{camid}\0{digest}".encode())


def _as_service_error(exc: BaseException, writing: bool = False) -> BaseException:
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, EditorReidError):
        return ServiceError(400, str(exc).splitlines()[0])
    if writing and isinstance(exc, OSError):
        return ServiceError(503, f"the gallery could not be written ({exc}); the addition was not made")
    log.error("request failed", exc_info=exc)
    return exc  # a bug: the client gets a 500


# ----------------------------------------------------------------------------- requests


def _decode(field_name: str, upload_name: str | None, data: bytes) -> Image.Image:
    """An uploaded image as 8-bit RGB (the data layer's conversion), or ServiceError naming the field."""
    what = f"field {field_name!r}" + (f" ({upload_name})" if upload_name else "")
    if not data:
        raise ServiceError(400, f"{what} is empty; send an image file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ServiceError(413, f"{what} is a {width}x{height} image; the service decodes at most "
                                        f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels")
            image.load()
            return to_rgb(image, field_name)
    except ServiceError:
        raise
    except BadImageError as exc:
        raise ServiceError(400, f"{what} {exc.reason}") from None
    except Image.UnidentifiedImageError:
        raise ServiceError(400, f"{what} is not an image (no format Pillow reads)") from None
    except _DECODE_ERRORS as exc:
        raise ServiceError(400, f"{what} is not a decodable image ({exc})") from None


def _form_text(form, name: str) -> str | None:
    """A plain (non-file) form field's text, or None when absent; ServiceError for a file."""
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise ServiceError(400, f"field {name!r} must be a plain form value, not a file")
    return value


def _integer(form, name: str, *, minimum: int | None = None) -> int | None:
    value = _form_text(form, name)
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        raise ServiceError(400, f"field {name!r} must be an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ServiceError(400, f"field {name!r} must be >= {minimum}, got {number}")
    return number


def _number(form, name: str) -> float | None:
    value = _form_text(form, name)
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ServiceError(400, f"field {name!r} must be a finite number, got {value!r}")
    return number


def _boolean(form, name: str) -> bool | None:
    value = form.get(name)
    if value is None:
        return None
    text = value.strip().lower() if isinstance(value, str) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ServiceError(400, f"field {name!r} must be true or false, got {value!r}")


class _Requests:
    """Parses and checks a request's form into a :class:`_Job` (everything but the model's work)."""

    def __init__(self, index, extractor, settings: ServiceSettings, threshold: float | None) -> None:
        self.index = index
        self.extractor = extractor
        self.settings = settings
        self.threshold = threshold
        self.modalities = tuple(extractor.modalities)
        #: The image fields a form may hold: the benchmark modalities and the model's own.
        self.image_fields = canonical_order([*MODALITIES, *self.modalities])
        self.num_cameras = getattr(extractor, "num_cameras", None)

    async def job(self, request, form_class, kind: str) -> _Job:
        """The request's form as a job, ``kind`` "search" or "add"; its uploads are closed after
        reading. ServiceError for any bad input, checked in the order: body, fields, values, images."""
        form = await self._read_form(request, form_class)
        try:
            self._check_fields(form, _GALLERY_FIELDS if kind == "add" else _SEARCH_FIELDS)
            if kind == "add":
                pid = _integer(form, "pid", minimum=0)
                if pid is None:
                    raise ServiceError(400, "field 'pid' is required: the identity (an integer >= 0) of the sample "
                                            "to add")
                params = {"pid": pid}
            else:
                params = self._search_params(form)
            camid = self._camera(form)
            images, params["files"], params["digest"] = await self._images(form)
        finally:
            await form.close()
        return _Job({**images, "camid": camid}, kind, params)

    async def _read_form(self, request, form_class) -> Any:
        """The multipart form, with the body limit enforced while it is read."""
        limit = self.settings.max_upload_bytes
        too_large = ServiceError(413, f"the request is larger than the limit of {self.settings.max_upload_mb:g} MiB "
                                      "(--max-upload-mb)")
        declared = request.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise too_large
        received = 0

        async def receive():
            nonlocal received
            message = await request.receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large
            return message

        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise ServiceError(400, "send the images as a multipart form (Content-Type: multipart/form-data), "
                                    "e.g. curl -F RGB=@rgb.jpg")
        limited = form_class(request.scope, receive)
        form = await limited.form(max_files=len(self.image_fields) + 1, max_fields=16, max_part_size=64 * 1024)
        return form

    def _check_fields(self, form, allowed: Sequence[str]) -> None:
        """ServiceError for an unknown or repeated field, or an image field the model does not read."""
        known = (*self.image_fields, *allowed)
        for name in form.keys():
            if name not in known:
                raise ServiceError(400, f"unknown field {name!r}; the form takes images as {', '.join(self.image_fields)} "
                                        f"and the values {', '.join(allowed)}")
            if len(form.getlist(name)) > 1:
                raise ServiceError(400, f"field {name!r} is given {len(form.getlist(name))} times; give it once")
        uploads = {m: form[m] for m in self.image_fields if m in form}
        if not uploads:
            raise ServiceError(422, f"no image: give at least one of {', '.join(self.modalities)} as a file field, "
                                    "e.g. curl -F RGB=@rgb.jpg")
        for name, upload in uploads.items():
            if isinstance(upload, str):
                raise ServiceError(400, f"field {name!r} must be an image file upload (a form part with a filename, "
                                        f"e.g. curl -F {name}=@image.jpg), not a plain value")
            if name not in self.modalities:
                raise ServiceError(400, f"field {name!r}: the model does not read {name} (its modalities: "
                                        f"{', '.join(self.modalities)})")

    async def _images(self, form) -> tuple[dict[str, Image.Image], dict[str, str], str]:
        """(the form's images decoded to 8-bit RGB, off the event loop; the uploads' file names; a
        digest of the uploaded bytes)."""
        uploads = {m: form[m] for m in self.image_fields if m in form}
        data = {name: (upload.filename, await upload.read()) for name, upload in uploads.items()}
        images = await asyncio.to_thread(lambda: {name: _decode(name, filename, raw)
                                                  for name, (filename, raw) in data.items()})
        digest = hashlib.sha256()
        for name in sorted(data):
            digest.update(f"{name}\0{len(data[name][1])}\0".encode())
            digest.update(data[name][1])
        return images, {name: filename or "" for name, (filename, _) in data.items()}, digest.hexdigest()

    def _camera(self, form) -> int:
        camid = _integer(form, "camid")
        if camid is None or camid == UNKNOWN_CAMERA:
            return UNKNOWN_CAMERA
        if camid < UNKNOWN_CAMERA or (self.num_cameras is not None and camid >= self.num_cameras):
            known = f"0..{self.num_cameras - 1}" if self.num_cameras is not None else "0 or more"
            raise ServiceError(400, f"field 'camid': camera {camid} is not in the model's camera table (cameras "
                                    f"{known}); send -1 or leave camid out for a camera the model was not trained on")
        return camid

    def _search_params(self, form) -> dict[str, Any]:
        k = _integer(form, "k", minimum=1)
        exclude = _boolean(form, "exclude_same_camera")
        threshold, fpr = _number(form, "threshold"), _number(form, "fpr")
        if threshold is not None and fpr is not None:
            raise ServiceError(400, "give 'threshold' or 'fpr', not both: each sets the open-set distance threshold")
        if threshold is not None and threshold < 0:
            raise ServiceError(400, f"field 'threshold' must be a distance >= 0, got {threshold:g}")
        if fpr is not None:
            threshold = _threshold_for_fpr(self.index, fpr)
            if threshold is None:
                raise ServiceError(400, f"field 'fpr': the gallery index has no threshold calibrated for FPR {fpr:g} "
                                        f"(it has: {_calibrated(self.index)})")
        return {"k": k or self.settings.k, "exclude_same_camera": bool(exclude),
                "threshold": self.threshold if threshold is None and fpr is None else threshold}


# ----------------------------------------------------------------------------- the app


def describe_backend(extractor) -> str:
    """What runs the model: ``torch on cpu``, ``torch on cuda:0``, ``onnxruntime``."""
    import torch

    if isinstance(getattr(extractor, "model", None), torch.nn.Module):
        return f"torch on {extractor.device}"
    return "onnxruntime"


def _import_serve() -> dict[str, Any]:
    """FastAPI and uvicorn, or a one-line UsageError telling how to install them."""
    try:
        import fastapi
        import uvicorn
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException
        from starlette.requests import Request
    except ImportError as exc:
        raise UsageError(f"the HTTP service needs FastAPI, uvicorn and python-multipart ({exc.name} is not "
                         'installed): pip install "editor-reid[serve]"') from None
    try:  # Starlette parses forms with python-multipart, whose module was "multipart" before 0.0.13
        import python_multipart  # noqa: F401
    except ImportError:
        try:
            import multipart  # noqa: F401
        except ImportError:
            raise UsageError('the HTTP service needs python-multipart: pip install "editor-reid[serve]"') from None
    return {"fastapi": fastapi, "uvicorn": uvicorn, "JSONResponse": JSONResponse, "HTTPException": HTTPException,
            "Request": Request}


def create_app(index, extractor, *, settings: ServiceSettings | None = None,
               on_ready: Callable[[], None] | None = None):
    """The FastAPI application serving ``index`` with ``extractor`` (a :class:`FeatureExtractor`
    or its ONNX twin).

    Raises EditorReidError before anything runs when the two do not fit (see
    :func:`check_compatible`). The micro-batcher starts with the application's lifespan: use
    ``with TestClient(app)``, not a bare ``TestClient(app)``. ``app.state.batcher`` counts the
    batches run; ``on_ready`` is called once the service takes requests.
    """
    serve = _import_serve()
    fastapi, JSONResponse, Request = serve["fastapi"], serve["JSONResponse"], serve["Request"]
    settings = settings or ServiceSettings()
    threshold = check_compatible(index, extractor, settings)
    batcher = MicroBatcher(_Worker(index, extractor), max_batch=settings.max_batch,
                           max_wait_s=settings.max_wait_ms / 1000)
    requests = _Requests(index, extractor, settings, threshold)
    backend = describe_backend(extractor)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await batcher.stop()

    app = fastapi.FastAPI(title="editor-reid search service", lifespan=lifespan,
                          description="Multi-modal (RGB/NI/TI) re-identification search over a gallery index.")
    app.state.batcher = batcher
    app.state.index = index
    app.state.extractor = extractor
    app.state.settings = settings

    def _error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ServiceError)
    async def service_error(request, exc: ServiceError):
        return _error(exc.status, exc.message)

    @app.exception_handler(serve["HTTPException"])
    async def http_error(request, exc):  # Starlette's own: 404, 405, a malformed multipart body
        return _error(exc.status_code, str(exc.detail))

    async def run(job: _Job) -> dict:
        job.queued = time.perf_counter()
        return await batcher.submit(job)

    @app.post("/search", summary="search the gallery with one sample's images")
    async def search(request: Request):
        start = time.perf_counter()
        answer = await run(await requests.job(request, Request, "search"))
        answer["timing"]["total_ms"] = round((time.perf_counter() - start) * 1000, 3)
        return answer

    @app.post("/gallery", summary="add one sample of an identity to the gallery (durable when acknowledged)")
    async def gallery(request: Request):
        start = time.perf_counter()
        answer = await run(await requests.job(request, Request, "add"))
        answer["size"] = int(index.size)
        answer["timing"]["total_ms"] = round((time.perf_counter() - start) * 1000, 3)
        return answer

    @app.get("/healthz", summary="status, gallery size, feature width, model fingerprint, backend")
    async def healthz():
        size = await asyncio.to_thread(lambda: int(index.size))  # a server round trip for Milvus
        return {"status": "ok", "size": size, "dim": int(index.dim), "metric": index.metric,
                "kind": index.kind, "gallery": index.backend, "fingerprint": extractor.fingerprint or index.fingerprint or "",
                "backend": backend, "modalities": list(extractor.modalities),
                "num_cameras": requests.num_cameras, "threshold": threshold,
                "thresholds": {f"{key:g}": value for key, value in sorted(_fpr_thresholds(index).items())},
                "settings": asdict(settings), "batching": batcher.stats()}

    return app


def run_server(index_dir, *, weights=None, config=None, onnx=None, device: str = "auto", host: str = "127.0.0.1",
               port: int = 8000, settings: ServiceSettings | None = None, access_log: bool = False,
               backend: str | None = None, uri: str | None = None) -> None:
    """Open the gallery ``index_dir`` (an index directory, or with ``backend="milvus"`` a collection
    at ``uri``) and the model (``weights`` [+ ``config``] or ``onnx``), check
    that they fit, and serve until SIGINT / SIGTERM. Port 0 picks a free port; the line
    ``serving http://HOST:PORT ...`` on stdout says which, once requests are taken."""
    serve = _import_serve()
    from editor_reid.deploy.gallery import check_backend, gallery_name, open_gallery
    from editor_reid.features.extractor import FeatureExtractor

    if (weights is None) == (onnx is None):
        raise UsageError("give the model as weights (a checkpoint) or as onnx (an exported model), one of them")
    settings = settings or ServiceSettings()
    backend = check_backend(backend, uri)
    index = open_gallery(index_dir, backend=backend, uri=uri)
    index_dir = gallery_name(index, index_dir)
    # One model call per batch: the extractor's own batches are as large as ours.
    if onnx is not None:
        extractor = FeatureExtractor.from_onnx(onnx, device=device, batch_size=settings.max_batch)
    else:
        extractor = FeatureExtractor(weights, config=config, device=device, batch_size=settings.max_batch)
    try:
        sock = socket.create_server((host, port))
    except OSError as exc:  # the port is taken, the host is not this machine's
        reason = (exc.strerror or str(exc)).split(" (while attempting")[0]  # create_server repeats the address
        raise EditorReidError(f"cannot listen on {host}:{port} ({reason}); stop what is listening there or choose "
                              "another --host / --port") from None
    bound = sock.getsockname()[1]

    def ready() -> None:
        print(f"serving http://{host}:{bound} (gallery '{index_dir}': {index.size} entries of width {index.dim}; "
              f"backend {describe_backend(extractor)}; max batch {settings.max_batch}, max wait "
              f"{settings.max_wait_ms:g} ms)", flush=True)

    app = create_app(index, extractor, settings=settings, on_ready=ready)
    uvicorn = serve["uvicorn"]
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=access_log, lifespan="on"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
