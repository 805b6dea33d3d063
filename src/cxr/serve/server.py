"""Serving the app with uvicorn, with a time limit on each request's headers.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but has no limit on how
long a client may take to send a request's headers: a connection that sends half a request line,
or nothing at all, is held open for as long as the client likes. :class:`HeaderTimeoutH11`
adds that limit to uvicorn's h11 protocol; the body's limit is :class:`cxr.serve.limits.BodyTimeout`
(an ASGI middleware, so it holds under any server). uvicorn's own header-size limit
(``h11_max_incomplete_event_size``, 16 KiB) stays in force.
"""

from __future__ import annotations

import asyncio

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from cxr.errors import ConfigError
from cxr.serve.limits import DEFAULT_HEADER_TIMEOUT_S


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete
    within ``header_timeout_s`` of the connection opening or of the request's first byte.

    Subclass with another ``header_timeout_s`` (:func:`header_timeout_protocol`) to change it.
    """

    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_header_timer()  # a client that connects and sends nothing is timed too

    def data_received(self, data: bytes) -> None:
        # A new request's first bytes (after a keep-alive pause) start its header clock.
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        # No request to answer yet: close, as uvicorn does when a keep-alive pause runs out.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutH11]:
    """:class:`HeaderTimeoutH11` with a header time limit of ``seconds``."""
    return type("HeaderTimeoutH11", (HeaderTimeoutH11,), {"header_timeout_s": float(seconds)})


def check_port(port: int, name: str = "port") -> None:
    """Raise :class:`ConfigError` unless ``port`` is a TCP port to listen on (1 to 65535);
    ``name`` is what the caller calls it."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{name} must be between 1 and 65535, not {port!r}")


def server_config(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"
) -> uvicorn.Config:
    """The uvicorn configuration for an app from :func:`cxr.serve.app.create_app`: one
    process, h11 with the app's header time limit."""
    check_port(port)
    limits = app.state.limits
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        workers=1,
        http=header_timeout_protocol(limits.header_timeout_s),
        timeout_graceful_shutdown=10,
    )


def run_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start the app's decoding workers, then serve until interrupted."""
    config = server_config(app, host=host, port=port)
    app.state.service.start()  # a worker that cannot start is an error now, not per request
    uvicorn.Server(config).run()
