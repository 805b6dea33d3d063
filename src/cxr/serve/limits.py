"""What the service accepts: positive limits (checked before anything starts), a bounded
request body that keeps arriving (ASGI middleware, before parsing), the image's declared size,
read from its header before any pixel is decoded, and the memory one decode may use."""

from __future__ import annotations

import asyncio
import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image

from cxr.data.images import is_dicom_bytes
from cxr.errors import ConfigError
from cxr.serve.problems import problem_response

DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_REQUEST_TIMEOUT_S = 60.0
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 10.0
DEFAULT_DECODE_WORKERS = 2
# Measured peak of one decode at 40 Mpx: about 34 bytes per pixel for 16-bit PNG and DICOM
# (float64 temporaries while rescaling to 8 bits), 7 for RGB(A), 3 for 8-bit gray. 40 leaves
# headroom; the fixed part covers the upload the worker holds, a copy of it, and slack.
DECODE_BYTES_PER_PIXEL = 40
DECODE_FIXED_BYTES = 64 * 2**20
# Multipart framing around the file: boundaries, part headers, the pathology field.
FORM_OVERHEAD = 64 * 1024
TOO_BIG = (1 << 31, 1)


def check_positive(name: str, value: float, *, zero_means_none: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number above 0 (or exactly 0,
    where ``zero_means_none``); ``name`` is what the caller calls it (a parameter, an option)."""
    if zero_means_none and value == 0:
        return
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        allowed = "a positive number (0 turns it off)" if zero_means_none else "a positive number"
        raise ConfigError(f"{name} must be {allowed}, not {value!r}")


def default_memory_budget(
    max_pixels: int = DEFAULT_MAX_PIXELS, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
) -> int:
    """Bytes one decode may use: enough for the largest accepted image at any bit depth
    (1,654 MiB at the default 40 Mpx and 32 MiB)."""
    return DECODE_FIXED_BYTES + 2 * int(max_upload_bytes) + DECODE_BYTES_PER_PIXEL * int(max_pixels)


@dataclass(frozen=True)
class ServiceLimits:
    """The service's limits, each checked when made (:class:`ConfigError` for a bad one)."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S  # None or 0: no limit
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    decode_workers: int = DEFAULT_DECODE_WORKERS
    decode_memory_bytes: int | None = None  # None: default_memory_budget(...)

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_pixels", "header_timeout_s", "body_timeout_s"):
            check_positive(name, getattr(self, name))
        if self.request_timeout_s is not None:
            check_positive("request_timeout_s", self.request_timeout_s, zero_means_none=True)
        if isinstance(self.decode_workers, bool) or not isinstance(self.decode_workers, int):
            raise ConfigError(f"decode_workers must be a whole number, not {self.decode_workers!r}")
        check_positive("decode_workers", self.decode_workers)
        if self.decode_memory_bytes is not None:
            check_positive("decode_memory_bytes", self.decode_memory_bytes)

    @property
    def request_timeout(self) -> float | None:
        """Seconds a request may take, or ``None`` for no limit."""
        return float(self.request_timeout_s) if self.request_timeout_s else None

    @property
    def decode_budget(self) -> int:
        """Bytes one decode may use."""
        if self.decode_memory_bytes is not None:
            return int(self.decode_memory_bytes)
        return default_memory_budget(self.max_pixels, self.max_upload_bytes)


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
    if kind == "dicom":
        # Left to the decoding guard (cxr.data.images), which checks Rows x Columns and the
        # compressed header inside without inflating a deflated file first and then again.
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as image:
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
                await problem_response(400, "invalid Content-Length")(scope, receive, send)
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
        response = problem_response(
            413,
            f"request body is larger than the limit of {mib(self.limit)}",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


class BodyTimeout:
    """ASGI middleware: answer 408 and close when a request body stalls.

    While the app waits for the next part of the body, each wait is bounded by ``timeout_s``,
    and the whole body by ``total_s`` (a client sending a byte every few seconds would pass
    every wait): a client that stalls or trickles gets ``408`` with ``Connection: close``
    instead of holding a connection (and the upload received so far) open for as long as it
    likes. Once the body is complete, ``receive`` is passed through untouched (the app may
    wait on it for a disconnect while it answers).
    """

    def __init__(self, app, timeout_s: float, total_s: float | None = None):
        self.app = app
        self.timeout_s = float(timeout_s)
        # By default 30 waits: a 32 MiB upload must come at 110 KB/s at least (10 s waits).
        self.total_s = float(total_s) if total_s else 30 * self.timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = False
        started = False
        deadline = asyncio.get_running_loop().time() + self.total_s

        async def timed_receive():
            nonlocal body_done
            if body_done:
                return await receive()
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(self.timeout_s, left)))
            except (asyncio.TimeoutError, TimeoutError):
                raise _BodyStalled from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, timed_receive, tracked_send)
        except _BodyStalled:
            if started:  # nothing sensible to add to a response under way: the server closes
                raise
            response = problem_response(
                408,
                f"request body stalled: nothing received for {self.timeout_s:g} s, "
                f"or not all of it within {self.total_s:g} s",
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)


class _BodyStalled(Exception):
    """The client sent no part of the request body within the body timeout."""
