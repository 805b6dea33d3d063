"""What the service accepts: a bounded request body (ASGI middleware, before parsing) and
the image's declared size, read from its header before any pixel is decoded."""

from __future__ import annotations

import io
import warnings

import pydicom
from fastapi.responses import JSONResponse
from PIL import Image

from cxr.data.images import is_dicom_bytes

DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
# Multipart framing around the file: boundaries, part headers, the pathology field.
FORM_OVERHEAD = 64 * 1024
TOO_BIG = (1 << 31, 1)


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
    if kind == "png" and data[12:16] == b"IHDR" and len(data) >= 24:
        # Straight from the first chunk: exact even for sizes PIL refuses to open.
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    try:
        if kind == "dicom":
            dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            return int(dataset.Columns), int(dataset.Rows)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Image.DecompressionBombError:
        return TOO_BIG  # over any sensible limit: PIL refuses to even open it
    except Exception:
        return None  # the decoder will say what is wrong


def mib(count: int) -> str:
    return f"{count / (1024 * 1024):.1f} MiB"


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, before parsing.

    Reads the body itself (at most ``limit`` bytes are ever held), then replays it to the app;
    ``Content-Length`` over the limit is refused without holding any of it. Before a refusal,
    the rest of the body is read and discarded, up to ``DRAIN_FACTOR`` times the limit: HTTP
    clients send the whole request before reading the answer, and a server that closes with
    unread data makes the kernel reset the connection, so the client would see a reset instead
    of the 413. Bodies beyond that bound are refused at once (memory stays bounded either way).
    """

    DRAIN_FACTOR = 4

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
                declared_size = int(declared)
            except ValueError:
                await JSONResponse({"detail": "invalid Content-Length"}, 400)(scope, receive, send)
                return
            if declared_size > self.limit:
                await self._refuse(scope, receive, send, received=0, declared=declared_size)
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                received = len(body)
                body.clear()
                await self._refuse(scope, receive, send, received=received, finished=not more)
                return
            if not more:
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(
        self, scope, receive, send, *, received: int, declared: int | None = None, finished=False
    ):
        bound = self.DRAIN_FACTOR * self.limit
        if not finished and (declared is None or declared <= bound):
            while received <= bound:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        response = JSONResponse(
            {"detail": f"request body is larger than the limit of {mib(self.limit)}"},
            413,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)
