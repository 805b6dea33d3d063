"""The HTTP service: ``POST /v1/predict``, ``POST /v1/explain``, ``GET /healthz``, a page at ``/``.

:func:`create_app` loads the model once and returns a FastAPI app (served by uvicorn in
``cxr serve``). Uploads are read from memory only, never from a path the client names:
the request body is capped (413), so is the decoded image's pixel count (413, checked from the
header before decoding), anything that is not PNG, JPEG or DICOM gets 415, and an image of a
supported type that cannot be decoded gets 422. Error bodies are ``{"detail": message}``
with messages naming the upload by its (sanitised) file name only.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from importlib import resources
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image

from cxr.data.images import decode_gray, is_dicom_bytes
from cxr.errors import CxrError, ImageError
from cxr.predict import (
    Predictor,
    explain_heatmaps,
    image_record,
    load_predictor,
    overlay,
    safe_name,
)

DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
# Multipart framing around the file: boundaries, part headers, the pathology field.
_FORM_OVERHEAD = 64 * 1024
MEDIA_TYPES = "PNG, JPEG or DICOM"


def create_app(
    model_path: str | os.PathLike | None = None,
    *,
    predictor: Predictor | None = None,
    backend: str = "auto",
    device: str = "auto",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_parallel_decodes: int = 4,
) -> FastAPI:
    """The app for a run folder or bundle (or an already loaded ``predictor``)."""
    if predictor is None:
        if model_path is None:
            raise CxrError("create_app needs a model path or a predictor")
        predictor = load_predictor(model_path, backend=backend, device=device)
    service = _Service(predictor, max_upload_bytes, max_pixels, max_parallel_decodes)
    app = FastAPI(
        title="cxr",
        version=_version(),
        description=(
            "Chest X-ray classification (NIH ChestX-ray14, 14 pathologies) with Grad-CAM. "
            "Research software: not a medical device."
        ),
    )
    app.state.service = service
    app.add_middleware(BodyLimit, limit=max_upload_bytes + _FORM_OVERHEAD)
    labels = predictor.labels

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(_page_html(), headers={"Cache-Control": "no-store"})

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness and the model's description (labels, thresholds, image size, backend)."""
        return {"status": "ok", "model": predictor.describe()}

    @app.post("/v1/predict")
    def predict(
        file: UploadFile = File(..., description=f"An X-ray: {MEDIA_TYPES}."),
    ) -> dict[str, Any]:
        """The 14 probabilities, the positive/negative calls and the thresholds used."""
        name, data = service.read(file)
        gray, _crop, image = service.prepare(name, data)
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

    @app.post(
        "/v1/explain",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "Grad-CAM overlay PNG"}},
    )
    def explain(
        file: UploadFile = File(..., description=f"An X-ray: {MEDIA_TYPES}."),
        pathology: str = Form(..., description="A pathology name (e.g. Effusion) or index 0-13."),
    ) -> Response:
        """The Grad-CAM overlay (PNG) for one pathology over the crop the model saw."""
        index = _pathology_index(labels, pathology)
        if predictor.torch_model is None:
            raise HTTPException(501, "Grad-CAM is not available: the service runs an ONNX file")
        name, data = service.read(file)
        _gray, crop, image = service.prepare(name, data)
        probability = float(predictor.probabilities(image[None])[0][index])
        try:
            heatmap = explain_heatmaps(predictor, image[None], [index])[0, 0]
        except CxrError as exc:
            raise HTTPException(500, f"Grad-CAM failed: {exc}") from None
        png = overlay(crop, heatmap, f"{labels[index]}  p={probability:.2f}")
        return Response(
            png,
            media_type="image/png",
            headers={
                "X-Pathology": labels[index],
                "X-Probability": f"{probability:.6f}",
                "Cache-Control": "no-store",
            },
        )

    return app


class _Service:
    """Reads and checks uploads; bounds the memory that parallel decodes can take."""

    def __init__(self, predictor: Predictor, max_upload_bytes, max_pixels, max_parallel_decodes):
        self.predictor = predictor
        self.preprocess = predictor.preprocess
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_pixels = int(max_pixels)
        self.decodes = threading.BoundedSemaphore(max(1, int(max_parallel_decodes)))

    def read(self, upload: UploadFile) -> tuple[str, bytes]:
        name = safe_name(os.path.basename((upload.filename or "").replace("\\", "/"))) or "upload"
        data = upload.file.read(self.max_upload_bytes + 1)
        if len(data) > self.max_upload_bytes:
            raise HTTPException(
                413, f"{name}: upload is larger than the limit of {_mib(self.max_upload_bytes)}"
            )
        return name, data

    def prepare(self, name: str, data: bytes):
        """(gray image, model crop, normalised tensor) or an HTTP error saying what is wrong."""
        kind = sniff(data)
        if kind is None:
            what = "empty (0 bytes)" if not data else f"not a {MEDIA_TYPES} image"
            raise HTTPException(415, f"{name}: {what}")
        size = header_size(data, kind)
        if size is not None and size[0] * size[1] > self.max_pixels:
            raise HTTPException(
                413,
                f"{name}: image is {size[0]}x{size[1]} pixels, more than the limit of "
                f"{self.max_pixels:,}",
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


def sniff(data: bytes) -> str | None:
    """``png``, ``jpeg`` or ``dicom`` from the first bytes; ``None`` for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if is_dicom_bytes(data[:132]):
        return "dicom"
    return None


def header_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """(width, height) from the header, without decoding pixels; ``None`` if unreadable."""
    try:
        if kind == "dicom":
            import pydicom

            dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            return int(dataset.Columns), int(dataset.Rows)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Image.DecompressionBombError:
        return (1 << 31, 1)  # over any sensible limit: PIL refuses to even open it
    except Exception:
        return None  # the decoder will say what is wrong


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


def _mib(count: int) -> str:
    return f"{count / (1024 * 1024):.1f} MiB"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cxr")
    except Exception:
        return "0"


def _page_html() -> str:
    return resources.files("cxr").joinpath("static/index.html").read_text(encoding="utf-8")


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, before parsing.

    Reads the body itself (at most ``limit`` bytes are ever held), then replays it to the app;
    ``Content-Length`` over the limit is refused without reading anything.
    """

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                await JSONResponse({"detail": "invalid Content-Length"}, 400)(scope, receive, send)
                return
            if too_big:
                await self._refuse(scope, receive, send)
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = JSONResponse(
            {"detail": f"request body is larger than the limit of {_mib(self.limit)}"},
            413,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)
