"""The HTTP service: ``POST /v1/predict``, ``POST /v1/explain``, ``GET /healthz``,
``GET /metrics`` (Prometheus), ``GET /v1/results`` (the DICOM listener's results), a page at ``/``.

:func:`create_app` checks its limits and the device, loads the model once and returns a FastAPI
app (served by :func:`cxr.serve.server.run_server` in ``cxr serve``). Uploads are read from
memory only, never from a path the client names: the request body is capped (413) and must keep
arriving (408 when it stalls), one ``file`` part per request, anything that is not PNG, JPEG or
DICOM gets 415. Decoding runs in worker processes with a memory cap
(:mod:`cxr.serve.decoding`): an image over the pixel limit (read from its header) or needing more
memory than the per-decode budget gets 413, one that cannot be decoded 422. Predictions go
through one batched inference worker (:mod:`cxr.serve.batching`), whose queue is bounded: when
it is full, 503 with ``Retry-After``; Grad-CAM runs per image in a bounded thread pool. A
request not answered within its time limit gets 503 with ``Retry-After``, and its decode, if
still running, is ended. With an API key (:mod:`cxr.serve.auth`), every endpoint but
``/healthz`` answers 401 without it. Every error is an RFC 9457 problem
(``application/problem+json``, :mod:`cxr.serve.problems`) whose ``detail`` names the upload by
its (sanitised) file name only and never echoes what a client sent; an unexpected failure is
logged on the server and answered 500 with the exception's class name, never a stack trace or a
server path. ``/openapi.json`` declares, per route, each status it can answer with its model
(:func:`openapi_schema` gives the schema without serving). ``/docs`` is served with its scripts
from this service, never from a CDN.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from cxr.data.images import as_uint8
from cxr.engine.inference import Predictor, image_record, load_predictor
from cxr.errors import CxrError, DeadlineExceeded, ServiceBusy, WorkerClosed
from cxr.explain.render import overlay_png, overlay_title
from cxr.runtime import resolve_device
from cxr.serve.auth import ApiKeyAuth
from cxr.serve.batching import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_WAIT_MS,
    BatchedPredictor,
    Scored,
    check_settings,
)
from cxr.serve.decoding import (
    DecodeOutOfMemory,
    DecodePool,
    DecoderCrashed,
    DecodeRefused,
    DecoderFailed,
    DecoderUnavailable,
    DecodeTimeout,
)
from cxr.serve.limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_DECODE_WORKERS,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_REQUEST_TIMEOUT_S,
    FORM_OVERHEAD,
    BodyLimit,
    BodyTimeout,
    ServiceLimits,
    mib,
    sniff,
)
from cxr.serve.metrics import RequestMetrics, ServiceMetrics
from cxr.serve.page import render_page
from cxr.serve.problems import (
    FieldError,
    InvalidField,
    add_problem_schemas,
    error_responses,
    field_error,
    problem_response,
)
from cxr.serve.results import add_results_route, open_results
from cxr.serve.schemas import Health, Prediction
from cxr.utils import safe_name

MEDIA_TYPES = "PNG, JPEG or DICOM"
# Errors from a decoding worker that mean "too large" (413) rather than "unreadable" (422):
# by class name, as the worker sends it (ImageTooLarge comes from cxr.data.images' size guard).
TOO_LARGE = frozenset({"TooManyPixels", "ImageTooLarge"})
# Threads that wait for a decoding worker's answer; they hold no pixels while they wait.
WAITING_THREADS = 32
# The pool ends a decode at the request's deadline itself; past it by this much, a request
# still queued for a waiting thread (none started its decode) is answered 503 and dropped.
DECODE_GRACE_S = 2.0
SWAGGER_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}
# What an upload part may be declared as; the service judges the bytes, not this header.
UPLOAD_MEDIA_TYPES = "image/png, image/jpeg, application/dicom, application/octet-stream"
UPLOAD_ENCODING = {
    "requestBody": {
        "content": {
            "multipart/form-data": {"encoding": {"file": {"contentType": UPLOAD_MEDIA_TYPES}}}
        }
    }
}
EXPLAINED_RESPONSE = {
    "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    "description": "The Grad-CAM overlay (PNG).",
    "headers": {
        name: {"description": text, "schema": {"type": "string"}}
        for name, text in (
            ("X-Pathology", "The label explained (non-ASCII escaped)."),
            ("X-Probability", "Its probability, 6 decimals."),
            ("X-Model-Synthetic", "true, false or unknown."),
        )
    },
}
log = logging.getLogger("cxr.serve")


def create_app(
    model_path: str | os.PathLike | None = None,
    *,
    predictor: Predictor | None = None,
    backend: str = "auto",
    device: str = "auto",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    decode_workers: int = DEFAULT_DECODE_WORKERS,
    decode_memory_bytes: int | None = None,
    compute_threads: int = 4,
    decoder: DecodePool | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    max_queue: int | None = None,
    api_key: str | None = None,
    results_db: str | None = None,
) -> FastAPI:
    """The app for a run folder or bundle (or an already loaded ``predictor``).

    Every limit must be positive (:class:`~cxr.errors.ConfigError` otherwise, raised before the
    model is loaded, as is one for a device that is not there). ``request_timeout_s`` bounds
    the time from a request's upload being read to its answer (queueing included); ``None`` or
    0 turns it off. ``header_timeout_s`` is the server's (:func:`cxr.serve.server.server_config`).
    ``decode_memory_bytes`` defaults to :func:`cxr.serve.limits.default_memory_budget`.
    ``decoder`` replaces the decoding pool the limits describe (tests pass one with a hook).
    ``max_batch``, ``max_wait_ms``, ``max_queue``: the batched worker's
    (:class:`~cxr.serve.batching.BatchedPredictor`). With ``api_key``, every endpoint but
    ``/healthz`` needs it. ``results_db``: the store ``GET /v1/results`` reads (404 without).
    """
    limits = ServiceLimits(
        max_upload_bytes=max_upload_bytes,
        max_pixels=max_pixels,
        request_timeout_s=request_timeout_s,
        header_timeout_s=header_timeout_s,
        body_timeout_s=body_timeout_s,
        decode_workers=decode_workers,
        decode_memory_bytes=decode_memory_bytes,
    )
    check_settings(max_batch, max_wait_ms, max_queue)
    store = None if results_db is None else open_results(results_db)
    if predictor is None:
        if model_path is None:
            raise CxrError("create_app needs a model path or a predictor")
        resolve_device(device)  # an absent device is an error before the model is read
        predictor = load_predictor(model_path, backend=backend, device=device)
    if decoder is None:
        decoder = DecodePool(
            limits.decode_workers, limits.decode_budget, max_pixels=limits.max_pixels
        )
    metrics = _metrics(predictor)
    batcher = BatchedPredictor(
        predictor, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
        metrics=metrics,
    )  # fmt: skip
    service = _Service(predictor, limits, decoder, compute_threads, batcher, metrics)
    app = _new_app(predictor)
    app.state.service = service
    app.state.results = store
    app.state.limits = limits
    _add_middleware(app, limits, metrics, api_key)
    _add_error_handlers(app)
    _add_docs(app)
    # 401 is a possible answer of every route but /healthz only where there is a key.
    keyed = (401,) if api_key is not None else ()
    _add_routes(app, service, keyed)
    add_results_route(app, store, keyed)
    _describe_schema(app, keyed=bool(keyed))
    return app


def _new_app(predictor: Predictor) -> FastAPI:
    """The bare FastAPI app, described by its model."""
    return FastAPI(
        title="cxr",
        version=_version(),
        description=(
            f"Chest X-ray classification ({len(predictor.labels)} findings) with Grad-CAM, by "
            f"a model trained on {predictor.about()['trained_on']}. "
            "Research software: not a medical device."
        ),
        docs_url=None,  # served by _add_docs with local assets instead of a CDN's
        redoc_url=None,
        lifespan=_lifespan,
    )


def openapi_schema(
    model_path: str | os.PathLike | None = None, *, predictor: Predictor | None = None, **options
) -> dict[str, Any]:
    """The OpenAPI schema the service for ``model_path`` (or ``predictor``) publishes at
    ``/openapi.json``, without serving it: for the docs' HTTP reference page and generated
    clients. ``options`` are :func:`create_app`'s (``api_key`` adds the security schemes and
    the 401s). An untrained bundle gives the same schema as a trained one with its labels."""
    backend, device = options.pop("backend", "torch"), options.pop("device", "cpu")
    if predictor is None:
        if model_path is None:
            raise CxrError("openapi_schema needs a model path or a predictor")
        predictor = load_predictor(model_path, backend=backend, device=device)
    # No decoding worker or model thread is started: the app is only asked for its schema.
    app = create_app(predictor=predictor, decode_workers=1, **options)
    try:
        return app.openapi()
    finally:
        app.state.service.close()  # nothing started, but its thread pools are let go
        if app.state.results is not None:
            app.state.results.close()


def _describe_schema(app: FastAPI, *, keyed: bool) -> None:
    """``app.openapi`` with the problem models in the components, FastAPI's unused validation
    models gone, and, with an API key, the ways to send it (every route but /healthz)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = add_problem_schemas(generate())
            if keyed:
                schema["components"]["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"},
                    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                }
                schema["security"] = [{"bearer": []}, {"apiKey": []}]
                schema["paths"]["/healthz"]["get"]["security"] = []  # open: for probes
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _metrics(predictor: Predictor) -> ServiceMetrics:
    """The service's metrics, with the model's identity."""
    metrics = ServiceMetrics()
    metrics.describe_model(
        weights_sha256=predictor.weights_digest or "unknown",
        backend=predictor.backend,
        image_size=predictor.image_size,
        labels=",".join(predictor.labels),
    )
    return metrics


def _add_middleware(
    app: FastAPI, limits: ServiceLimits, metrics: ServiceMetrics, api_key: str | None
) -> None:
    """Each added later wraps the ones before (the last added runs first)."""
    app.add_middleware(BodyLimit, limit=limits.max_upload_bytes + FORM_OVERHEAD)
    # Outside BodyLimit: it times the reads that BodyLimit makes.
    app.add_middleware(BodyTimeout, timeout_s=limits.body_timeout_s)
    if api_key is not None:
        # Outside the body limits: a request without the key is refused before its body is read.
        refused = metrics.refusals.labels(reason="unauthorized").inc
        app.add_middleware(ApiKeyAuth, key=api_key, on_refusal=refused)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: counts the 401s too


@asynccontextmanager
async def _lifespan(app: FastAPI):
    service = app.state.service
    await run_in_threadpool(service.start)
    try:
        yield
    finally:
        service.close()
        if app.state.results is not None:
            app.state.results.close()


def _add_error_handlers(app: FastAPI) -> None:
    """Every error the app raises answered as a problem (:mod:`cxr.serve.problems`); the
    middleware (body limit and timeout, API key) answers with the same model itself."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own 404 and 405 (no such route, method) come here too.
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        errors = [field_error("request", "request", detail)] if exc.status_code == 422 else None
        return problem_response(exc.status_code, detail, errors=errors, headers=exc.headers)

    @app.exception_handler(InvalidField)
    async def invalid_field(request: Request, exc: InvalidField) -> JSONResponse:
        return problem_response(422, exc.detail, errors=exc.errors)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes each invalid input back (a 1 MiB text field named
        # `file` came back as 6 MiB of JSON): say which field and what is wrong, nothing more.
        errors = _field_errors(exc.errors())
        detail = "invalid request: " + "; ".join(f"{e.field}: {e.problem}" for e in errors)
        return problem_response(422, detail, errors=errors)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The details (and the stack) go to the server's log, never to the client.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return problem_response(500, f"internal error ({type(exc).__name__}); see the server log")


def _add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs, its script, style and icon from the fastapi-offline package."""

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API",
            swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs/assets/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from swagger.io
        )

    @app.get("/docs/assets/{name}", include_in_schema=False)
    def docs_asset(name: str) -> FileResponse:
        media_type = SWAGGER_ASSETS.get(name)
        if media_type is None:
            raise HTTPException(404, "Not Found")
        path = resources.files("fastapi_offline") / "static" / name
        return FileResponse(
            str(path), media_type=media_type, headers={"Cache-Control": "max-age=86400"}
        )


def _upload_field(limit: int):
    """The ``file`` form field of the POST routes, with its size limit in the schema."""
    return File(
        ...,
        description=f"An X-ray: {MEDIA_TYPES} (judged by its bytes), at most {limit:,} bytes.",
        # format binary beside FastAPI's contentMediaType: what client generators read as a
        # file (openapi-python-client sent a text field without it).
        json_schema_extra={"format": "binary", "maxLength": limit},
    )


def _add_routes(app: FastAPI, service: _Service, keyed: tuple[int, ...]) -> None:
    predictor = service.predictor
    labels = list(predictor.labels)
    upload = _upload_field(service.limits.max_upload_bytes)
    # Every POST: the body limits and timeout (400, 408, 413), the upload's checks (415, 422),
    # the service's time limit and queue (503).
    upload_errors = (*keyed, 400, 408, 413, 415, 422, 500, 503)
    explain_errors = (*upload_errors, 501) if predictor.torch_model is None else upload_errors

    page_html = render_page(predictor.meta, service.about)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(page_html, headers={"Cache-Control": "no-store"})

    @app.get("/healthz", response_model=Health, responses=error_responses(500))
    def healthz() -> dict[str, Any]:
        """Liveness, the model's description and the decoding workers' state."""
        return {
            "status": "ok",
            "model": predictor.describe(),
            "decoding": service.decoder.describe(),
            "batching": service.batcher.describe(),
        }

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus metrics (text exposition format)."""
        return Response(
            service.metrics.render(),
            media_type=service.metrics.content_type,
            headers={"Cache-Control": "no-store"},
        )

    @app.post(
        "/v1/predict",
        response_model=Prediction,
        responses=error_responses(*upload_errors),
        openapi_extra=UPLOAD_ENCODING,
    )
    async def predict(request: Request, file: UploadFile = upload) -> dict[str, Any]:
        """The bundle's probabilities, positive/negative calls and thresholds, per label."""
        name, data = await service.read(request, file)
        return await service.predict(name, data)

    @app.post(
        "/v1/explain",
        response_class=Response,
        responses={200: EXPLAINED_RESPONSE, **error_responses(*explain_errors)},
        openapi_extra=UPLOAD_ENCODING,
    )
    async def explain(
        request: Request,
        file: UploadFile = upload,
        pathology: str = Form(
            ...,
            description=f"A label of the model or its index 0-{len(labels) - 1} (the service "
            "also takes a label in any case, with '_' for a space).",
            json_schema_extra={"enum": [*labels, *map(str, range(len(labels)))]},
        ),
    ) -> Response:
        """The Grad-CAM overlay (PNG) for one pathology over the crop the model saw."""
        index = _pathology_index(predictor.labels, pathology)
        if predictor.torch_model is None:
            raise HTTPException(501, "Grad-CAM is not available: the service runs an ONNX file")
        name, data = await service.read(request, file)
        return await service.run(name, "explaining", service.explain, data, index)


class _Service:
    """Reads and checks uploads, has them decoded by worker processes, predicts them through
    the batched worker and explains them in a bounded thread pool, each request within its
    time limit."""

    def __init__(
        self,
        predictor: Predictor,
        limits: ServiceLimits,
        decoder: DecodePool,
        threads: int,
        batcher: BatchedPredictor,
        metrics: ServiceMetrics,
    ):
        self.predictor = predictor
        self.about = predictor.about()  # what the model is: part of every answer
        self.batcher = batcher
        self.metrics = metrics
        self.preprocess = predictor.preprocess
        self.limits = limits
        self.decoder = decoder
        self.timeout = limits.request_timeout
        # Bounded: requests beyond it wait (and time out) instead of starting more threads.
        self.compute = ThreadPoolExecutor(max(1, int(threads)), thread_name_prefix="cxr-serve")
        self.waiting = ThreadPoolExecutor(WAITING_THREADS, thread_name_prefix="cxr-decode-wait")

    def start(self) -> None:
        self.decoder.start()
        self.batcher.start()

    def close(self) -> None:
        self.batcher.close()
        self.decoder.close()
        self.compute.shutdown(wait=False, cancel_futures=True)
        self.waiting.shutdown(wait=False, cancel_futures=True)

    async def read(self, request: Request, upload: UploadFile) -> tuple[str, bytes]:
        """The upload's name (a label, never a path) and bytes, or an HTTP error."""
        form = await request.form()  # already parsed for the route: cached, not read again
        parts = len(form.getlist("file"))
        if parts > 1:
            raise InvalidField(
                "file", "body", f"one file per request (the form has {parts} 'file' parts)"
            )
        name = safe_name(os.path.basename((upload.filename or "").replace("\\", "/"))) or "upload"
        limit = self.limits.max_upload_bytes
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise HTTPException(413, f"{name}: upload is larger than the limit of {mib(limit)}")
        if sniff(data) is None:
            what = "empty (0 bytes)" if not data else f"not a {MEDIA_TYPES} image"
            raise HTTPException(415, f"{name}: {what}")
        return name, data

    async def run(self, name: str, doing: str, work, data: bytes, *args):
        """Decode ``data`` in a worker, then ``work(name, gray, *args)`` in the thread pool,
        both within the request's time limit; failures become JSON errors."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        gray = await self._decode(name, data, deadline)
        return await self._compute(name, doing, work, gray, deadline, *args)

    async def _decode(self, name: str, data: bytes, deadline: float | None) -> np.ndarray:
        """The decoded image, or the HTTP error that the decoding pool's outcome stands for."""
        try:
            return await self._decoded(name, data, deadline)
        except DecodeTimeout:
            raise self._too_slow(name) from None
        except DecodeRefused as exc:
            if exc.kind in TOO_LARGE:
                raise HTTPException(413, str(exc)) from None
            raise InvalidField("file", "body", str(exc), "cannot be decoded") from None
        except DecodeOutOfMemory as exc:  # a size limit, like the pixel limit: 413
            raise HTTPException(413, str(exc)) from None
        except DecoderCrashed as exc:  # the input made a decoder library die: unreadable
            log.warning("%s", exc)
            raise InvalidField("file", "body", str(exc), "cannot be decoded") from None
        except DecoderUnavailable as exc:
            log.error("%s: no decoding worker: %s", name, exc)
            raise HTTPException(
                503,
                f"{name}: no decoder is available; try again later",
                headers={"Retry-After": "5"},
            ) from None
        except DecoderFailed as exc:
            kind = exc.kind if re.fullmatch(r"\w{1,60}", exc.kind) else "error"
            log.error("%s: decoding failed: %s: %s", name, kind, exc)
            raise HTTPException(500, f"{name}: internal error while decoding ({kind})") from None

    async def _decoded(self, name: str, data: bytes, deadline: float | None) -> np.ndarray:
        started = threading.Event()
        job = asyncio.get_running_loop().run_in_executor(
            self.waiting, self._decode_by, name, data, deadline, started
        )
        bound = None if deadline is None else _remaining(deadline) + DECODE_GRACE_S
        done, _ = await asyncio.wait({job}, timeout=bound)
        if not done and not started.is_set():
            job.cancel()  # still queued for a waiting thread: dropped before it starts
            raise DecodeTimeout(name)
        # Started: the pool itself ends the decode at the deadline, killing its worker before
        # it returns, so a 503 never leaves a decode running behind it.
        return await job

    def _decode_by(
        self, name: str, data: bytes, deadline: float | None, started: threading.Event
    ) -> np.ndarray:
        """Runs in a waiting thread: the decode, with what is left of the time limit."""
        started.set()
        remaining = None if deadline is None else _remaining(deadline)
        if remaining == 0.0:
            raise DecodeTimeout(name)
        return self.decoder.decode(data, name=name, timeout=remaining)

    async def _compute(self, name, doing, work, gray, deadline, *args):
        future = asyncio.get_running_loop().run_in_executor(self.compute, work, name, gray, *args)
        try:
            return await asyncio.wait_for(
                future, None if deadline is None else _remaining(deadline)
            )
        except (asyncio.TimeoutError, TimeoutError):
            # Work not yet started is dropped; a model call already running finishes in its
            # thread (Python threads cannot be killed) and its result is discarded.
            raise self._too_slow(name) from None
        except HTTPException:
            raise
        except Exception as exc:
            log.error("%s: %s failed", name, doing, exc_info=exc)
            raise HTTPException(
                500, f"{name}: internal error while {doing} ({type(exc).__name__})"
            ) from None

    async def predict(self, name: str, data: bytes) -> dict[str, Any]:
        """Decode ``data`` in a worker, then predict it in a batch, within the time limit."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        gray = await self._decode(name, data, deadline)
        scored = await self._batched(name, gray, deadline)
        predictor, labels = self.predictor, self.predictor.labels
        calls = predictor.calls(scored.probabilities[None])[0]
        return image_record(
            labels,
            scored.probabilities,
            calls,
            file=name,
            width=int(gray.shape[1]),
            height=int(gray.shape[0]),
            labels=labels,
            thresholds=dict(zip(labels, predictor.thresholds)),
            backend=predictor.backend,
            model=self.about,
            ood=scored.ood,
        )

    async def _batched(self, name: str, gray: np.ndarray, deadline: float | None) -> Scored:
        """The image's probabilities and out-of-distribution score from the batched worker,
        or the HTTP error for why not."""
        work = self.batcher.predict(gray, deadline=deadline, executor=self.compute, scored=True)
        try:
            return await asyncio.wait_for(work, None if deadline is None else _remaining(deadline))
        except (asyncio.TimeoutError, TimeoutError, DeadlineExceeded):
            raise self._too_slow(name) from None
        except ServiceBusy as exc:
            raise HTTPException(
                503, f"{name}: the service is busy ({exc}); try again later",
                headers={"Retry-After": "1"},
            ) from None  # fmt: skip
        except WorkerClosed:
            raise HTTPException(
                503, f"{name}: the service is shutting down", headers={"Retry-After": "5"}
            ) from None
        except Exception as exc:
            log.error("%s: predicting failed", name, exc_info=exc)
            raise HTTPException(
                500, f"{name}: internal error while predicting ({type(exc).__name__})"
            ) from None

    def _too_slow(self, name: str) -> HTTPException:
        self.metrics.refusals.labels(reason="timeout").inc()
        return HTTPException(
            503,
            f"{name}: not answered within the time limit of {self.timeout:g} s "
            "(the service is busy or the image is too slow to process); try again later",
            headers={"Retry-After": "5"},
        )

    def explain(self, name: str, gray: np.ndarray, index: int) -> Response:
        """One image's Grad-CAM overlay PNG for the pathology ``index`` (runs in the pool)."""
        crop = self.preprocess.crop_resized(gray)
        image = self.preprocess.to_tensor(crop)
        predictor, labels = self.predictor, self.predictor.labels
        probability = float(predictor.probabilities(image[None])[0][index])
        try:
            heatmap = predictor.gradcam(image[None], [index])[0, 0]
        except CxrError as exc:
            log.error("%s: Grad-CAM failed: %s", name, exc)
            raise HTTPException(500, f"{name}: Grad-CAM failed ({type(exc).__name__})") from None
        title = overlay_title(name, labels[index], probability, predictor.thresholds[index])
        return Response(
            overlay_png(as_uint8(crop), heatmap, title),
            media_type="image/png",
            headers={
                # Header values are Latin-1: a label in another script is sent escaped.
                "X-Pathology": labels[index].encode("ascii", "backslashreplace").decode(),
                "X-Probability": f"{probability:.6f}",
                "X-Model-Synthetic": _synthetic_header(self.about),
                "Cache-Control": "no-store",
            },
        )


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _label_key(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).casefold().replace("_", " ").split())


def _pathology_index(labels: list[str], pathology: str) -> int:
    """The index that ``pathology`` names: ASCII decimal digits in range, or a label
    as the bundle writes it, case-insensitively, a space and an underscore alike ("Pleural
    Effusion", "pleural_thickening"); 422 listing the valid names for anything else."""
    text = pathology.strip()
    # Not str.isdigit(): it accepts '²' and '①' (int() then fails: a 500), and int() reads
    # '٣' and '３' as 3, an index the client did not write.
    if re.fullmatch(r"[0-9]{1,3}", text) and int(text) < len(labels):
        return int(text)
    index = {_label_key(label): i for i, label in enumerate(labels)}.get(_label_key(text))
    if index is not None:
        return index
    shown = ascii(text[:40]) + ("..." if len(text) > 40 else "")
    choices = f"choose one of {', '.join(labels)} or 0-{len(labels) - 1}"
    raise InvalidField(
        "pathology", "body", f"unknown pathology {shown}; {choices}", f"unknown; {choices}"
    )


def _field_errors(errors) -> list[FieldError]:
    """The fields of a request FastAPI could not validate and what is wrong with each, in
    words of our own (nothing the client sent is repeated)."""
    found: list[FieldError] = []
    for error in list(errors)[:5]:
        location = tuple(error.get("loc") or ())
        where = str(location[0]) if len(location) > 1 else "request"
        field = str(location[-1]) if location else "request"
        if not re.fullmatch(r"[A-Za-z_]{1,30}", field):
            field = "request"
        if error.get("type") == "missing":
            problem = "missing"
        elif field == "file":
            problem = "expected an uploaded file (a multipart part with a file name)"
        else:
            problem = "invalid value"
        entry = field_error(field, where, problem)
        if entry not in found:
            found.append(entry)
    return found or [field_error("request", "request", "malformed")]


def _version() -> str:
    try:
        return version("cxr")
    except PackageNotFoundError:
        return "0"


def _synthetic_header(about: dict[str, Any]) -> str:
    return {True: "true", False: "false"}.get(about.get("synthetic"), "unknown")
