"""The HTTP service: ``POST /v1/predict``, ``POST /v1/explain``, ``GET /healthz``, a page at ``/``.

:func:`create_app` loads the model once and returns a FastAPI app (served by uvicorn in
``cxr serve``). Uploads are read from memory only, never from a path the client names:
the request body is capped (413), so is the decoded image's pixel count (413, checked from the
header before decoding), anything that is not PNG, JPEG or DICOM gets 415, and an image of a
supported type that cannot be decoded gets 422. Decoding and the model run in a bounded thread
pool under a per-request time limit (503 with ``Retry-After`` when it expires). Error bodies
are ``{"detail": message}`` with messages naming the upload by its (sanitised) file name only;
an unexpected failure is logged on the server and answered 500 with the exception's class
name, never a stack trace or a server path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from cxr.data.images import decode_gray
from cxr.engine.inference import Predictor, image_record, load_predictor
from cxr.errors import CxrError, ImageError
from cxr.explain.render import overlay_png, overlay_title
from cxr.serve.limits import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    FORM_OVERHEAD,
    TOO_BIG,
    BodyLimit,
    header_size,
    mib,
    sniff,
)
from cxr.utils import safe_name

DEFAULT_REQUEST_TIMEOUT_S = 60.0
MEDIA_TYPES = "PNG, JPEG or DICOM"
log = logging.getLogger("cxr.serve")


def create_app(
    model_path: str | os.PathLike | None = None,
    *,
    predictor: Predictor | None = None,
    backend: str = "auto",
    device: str = "auto",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_parallel_decodes: int = 4,
    request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S,
) -> FastAPI:
    """The app for a run folder or bundle (or an already loaded ``predictor``).

    ``request_timeout_s`` bounds the time from a request's upload being read to its answer
    (queueing for a worker included); ``None`` or 0 turns the limit off.
    """
    if predictor is None:
        if model_path is None:
            raise CxrError("create_app needs a model path or a predictor")
        predictor = load_predictor(model_path, backend=backend, device=device)
    service = _Service(
        predictor, max_upload_bytes, max_pixels, max_parallel_decodes, request_timeout_s
    )
    app = FastAPI(
        title="cxr",
        version=_version(),
        description=(
            "Chest X-ray classification (NIH ChestX-ray14, 14 pathologies) with Grad-CAM. "
            "Research software: not a medical device."
        ),
    )
    app.state.service = service
    app.add_middleware(BodyLimit, limit=max_upload_bytes + FORM_OVERHEAD)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The details (and the stack) go to the server's log, never to the client.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            {"detail": f"internal error ({type(exc).__name__}); see the server log"}, 500
        )

    _add_routes(app, service)
    return app


def _add_routes(app: FastAPI, service: _Service) -> None:
    predictor = service.predictor

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(_page_html(), headers={"Cache-Control": "no-store"})

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness and the model's description (labels, thresholds, image size, backend)."""
        return {"status": "ok", "model": predictor.describe()}

    @app.post("/v1/predict")
    async def predict(
        file: UploadFile = File(..., description=f"An X-ray: {MEDIA_TYPES}."),
    ) -> dict[str, Any]:
        """The 14 probabilities, the positive/negative calls and the thresholds used."""
        name, data = await service.read(file)
        return await service.run(name, "predicting", service.predict, name, data)

    @app.post(
        "/v1/explain",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "Grad-CAM overlay PNG"}},
    )
    async def explain(
        file: UploadFile = File(..., description=f"An X-ray: {MEDIA_TYPES}."),
        pathology: str = Form(..., description="A pathology name (e.g. Effusion) or index 0-13."),
    ) -> Response:
        """The Grad-CAM overlay (PNG) for one pathology over the crop the model saw."""
        index = _pathology_index(predictor.labels, pathology)
        if predictor.torch_model is None:
            raise HTTPException(501, "Grad-CAM is not available: the service runs an ONNX file")
        name, data = await service.read(file)
        return await service.run(name, "explaining", service.explain, name, data, index)


class _Service:
    """Reads and checks uploads; bounds the memory that parallel decodes can take."""

    def __init__(
        self,
        predictor: Predictor,
        max_upload_bytes,
        max_pixels,
        max_parallel_decodes,
        request_timeout_s=DEFAULT_REQUEST_TIMEOUT_S,
    ):
        self.predictor = predictor
        self.preprocess = predictor.preprocess
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_pixels = int(max_pixels)
        parallel = max(1, int(max_parallel_decodes))
        self.decodes = threading.BoundedSemaphore(parallel)
        self.timeout = float(request_timeout_s) if request_timeout_s else None
        # Bounded: requests beyond it wait (and time out) instead of starting more threads.
        self.pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="cxr-serve")

    async def read(self, upload: UploadFile) -> tuple[str, bytes]:
        name = safe_name(os.path.basename((upload.filename or "").replace("\\", "/"))) or "upload"
        data = await upload.read(self.max_upload_bytes + 1)
        if len(data) > self.max_upload_bytes:
            raise HTTPException(
                413, f"{name}: upload is larger than the limit of {mib(self.max_upload_bytes)}"
            )
        return name, data

    async def run(self, name: str, doing: str, work, *args):
        """``work(*args)`` in the pool, within the time limit; failures become JSON errors.

        On expiry the client gets 503 at once; work not yet started is dropped, work already
        running finishes in its thread (Python threads cannot be killed) and its result is
        discarded.
        """
        future = asyncio.get_running_loop().run_in_executor(self.pool, work, *args)
        try:
            return await asyncio.wait_for(future, self.timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise HTTPException(
                503,
                f"{name}: not answered within the time limit of {self.timeout:g} s "
                "(the service is busy or the image is too slow to process); try again later",
                headers={"Retry-After": "5"},
            ) from None
        except HTTPException:
            raise
        except Exception as exc:
            log.error("%s: %s failed", name, doing, exc_info=exc)
            raise HTTPException(
                500, f"{name}: internal error while {doing} ({type(exc).__name__})"
            ) from None

    def predict(self, name: str, data: bytes) -> dict[str, Any]:
        """One upload's probabilities, calls and thresholds (runs in the pool)."""
        gray, _crop, image = self.prepare(name, data)
        predictor, labels = self.predictor, self.predictor.labels
        probabilities = predictor.probabilities(image[None])[0]
        calls = predictor.calls(probabilities[None])[0]
        return image_record(
            labels,
            probabilities,
            calls,
            file=name,
            width=int(gray.shape[1]),
            height=int(gray.shape[0]),
            labels=labels,
            thresholds=dict(zip(labels, predictor.thresholds)),
            backend=predictor.backend,
        )

    def explain(self, name: str, data: bytes, index: int) -> Response:
        """One upload's Grad-CAM overlay PNG for the pathology ``index`` (runs in the pool)."""
        _gray, crop, image = self.prepare(name, data)
        predictor, labels = self.predictor, self.predictor.labels
        probability = float(predictor.probabilities(image[None])[0][index])
        try:
            heatmap = predictor.gradcam(image[None], [index])[0, 0]
        except CxrError as exc:
            log.error("%s: Grad-CAM failed: %s", name, exc)
            raise HTTPException(500, f"{name}: Grad-CAM failed ({type(exc).__name__})") from None
        title = overlay_title(name, labels[index], probability, predictor.thresholds[index])
        return Response(
            overlay_png(crop, heatmap, title),
            media_type="image/png",
            headers={
                "X-Pathology": labels[index],
                "X-Probability": f"{probability:.6f}",
                "Cache-Control": "no-store",
            },
        )

    def prepare(self, name: str, data: bytes):
        """(gray image, model crop, normalised tensor) or an HTTP error saying what is wrong."""
        kind = sniff(data)
        if kind is None:
            what = "empty (0 bytes)" if not data else f"not a {MEDIA_TYPES} image"
            raise HTTPException(415, f"{name}: {what}")
        size = header_size(data, kind)
        if size is not None and size[0] * size[1] > self.max_pixels:
            shown = "too many" if size == TOO_BIG else f"{size[0]}x{size[1]}"
            raise HTTPException(
                413,
                f"{name}: image is {shown} pixels, more than the limit of {self.max_pixels:,}",
            )
        with self.decodes:
            try:
                gray = decode_gray(data, name=name)
            except ImageError as exc:
                raise HTTPException(422, str(exc)) from None
            if gray.size > self.max_pixels:
                raise HTTPException(413, f"{name}: image has more than {self.max_pixels:,} pixels")
            crop = self.preprocess.crop_resized(gray)
        return gray, crop, self.preprocess.to_tensor(crop)


def _pathology_index(labels: list[str], pathology: str) -> int:
    text = pathology.strip()
    if text.isdigit() and int(text) < len(labels):
        return int(text)
    folded = {label.lower(): i for i, label in enumerate(labels)}
    key = text.lower().replace(" ", "_")
    if key in folded:
        return folded[key]
    raise HTTPException(
        422, f"unknown pathology {text[:60]!r}; choose one of {', '.join(labels)} or 0-13"
    )


def _version() -> str:
    try:
        return version("cxr")
    except PackageNotFoundError:
        return "0"


def _page_html() -> str:
    return resources.files("cxr.serve").joinpath("static/index.html").read_text(encoding="utf-8")
