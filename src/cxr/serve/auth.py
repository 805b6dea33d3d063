"""The service's API key: read from a file, checked on every request but ``/healthz``.

A client sends the key as ``Authorization: Bearer KEY``, as ``X-API-Key: KEY``, or as the
password of HTTP Basic authentication (any user name). The last one is for people: a browser
opening the page at ``/`` is answered 401 with a Basic challenge, asks for the key once in its
own dialog, and then sends it with every request of the page, its ``fetch`` calls included, so
the page works unchanged. Keys are compared in constant time (of their SHA-256 digests, so
that not even the length leaks).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import stat
from pathlib import Path

from cxr.errors import ConfigError
from cxr.serve.problems import problem_response

MAX_KEY_FILE_BYTES = 4096
MIN_KEY_CHARS = 16
OPEN_PATHS = frozenset({"/healthz"})
# Visible ASCII only: anything else cannot travel in an HTTP header as written.
KEY_PATTERN = re.compile(r"[\x21-\x7e]+")
REALM = 'Basic realm="cxr", charset="UTF-8"'


def read_api_key(path: str | os.PathLike) -> str:
    """The key in ``path`` (surrounding whitespace and the final newline ignored).

    The file must be a regular file (a link to one is fine: secrets mounted by Kubernetes or
    systemd are links) of at most 4 KiB, holding one key of 16 or more visible ASCII
    characters; :class:`ConfigError` names the file and the problem otherwise.
    """
    path = Path(path)
    try:
        # O_NONBLOCK: a named pipe put where the key should be must not block the start.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the API key file ({exc.strerror})") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: the API key file is not a regular file")
        if info.st_size > MAX_KEY_FILE_BYTES:
            raise ConfigError(
                f"{path}: the API key file has {info.st_size:,} bytes, more than the "
                f"{MAX_KEY_FILE_BYTES:,} a key file may have"
            )
        data = os.read(descriptor, MAX_KEY_FILE_BYTES)
    finally:
        os.close(descriptor)
    key = data.strip()
    if not key:
        raise ConfigError(f"{path}: the API key file is empty")
    if not KEY_PATTERN.fullmatch(key.decode("latin-1")):
        raise ConfigError(
            f"{path}: the API key must be one line of visible ASCII characters "
            "(no spaces, no other scripts)"
        )
    if len(key) < MIN_KEY_CHARS:
        raise ConfigError(
            f"{path}: the API key has {len(key)} characters, fewer than {MIN_KEY_CHARS}; "
            "make one with: openssl rand -hex 32"
        )
    return key.decode("ascii")


def readable_by_others(path: str | os.PathLike) -> bool:
    """Whether users other than the owner and group may read the key file."""
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def presented_keys(headers: dict[bytes, bytes]) -> list[bytes]:
    """Every key the request's headers offer (Bearer, Basic password, X-API-Key)."""
    keys = []
    if b"x-api-key" in headers:
        keys.append(headers[b"x-api-key"].strip())
    scheme, _, value = headers.get(b"authorization", b"").strip().partition(b" ")
    if scheme.lower() == b"bearer":
        keys.append(value.strip())
    elif scheme.lower() == b"basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        keys.append(decoded.partition(b":")[2])
    return keys


class ApiKeyAuth:
    """ASGI middleware: 401 for a request to anything but ``/healthz`` without the key.

    ``on_refusal`` (optional) is called for each refusal (the service counts them).
    """

    def __init__(self, app, key: str, on_refusal=None):
        self.app = app
        self.digest = hashlib.sha256(key.encode("ascii")).digest()
        self.on_refusal = on_refusal

    def allows(self, headers: dict[bytes, bytes]) -> bool:
        found = False
        for key in presented_keys(headers):
            # Every offered key is compared: the time does not depend on which one matched.
            found |= hmac.compare_digest(hashlib.sha256(key).digest(), self.digest)
        return found

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.allows(dict(scope["headers"])):
            await self.app(scope, receive, send)
            return
        if self.on_refusal is not None:
            self.on_refusal()
        response = problem_response(
            401,
            "missing or wrong API key: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
            # Close: the unread body of a refused upload must not be taken for the next request.
            headers={"WWW-Authenticate": REALM, "Connection": "close"},
        )
        await response(scope, receive, send)
