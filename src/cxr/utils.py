"""Small helpers shared by several modules: atomic writes, bounded reads of regular files,
and safe file names."""

from __future__ import annotations

import errno
import io
import os
import stat
import tempfile
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(frame, path: str | Path) -> None:
    atomic_write_text(path, frame.to_csv(index=False))


def npy_bytes(array) -> bytes:
    """``array`` in NumPy's ``.npy`` format, for :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, ``._-``; at most 100 chars)."""
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text)
    return cleaned.strip("._")[:100]


class NotARegularFile(OSError):
    """A path that is a FIFO, socket, device or folder: reading it could block or never end."""


class FileTooLarge(OSError):
    """A file larger than the caller's limit (checked before reading)."""


def read_regular_file(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file, never blocking on a FIFO and never reading more than
    ``max_bytes``.

    The file is opened non-blocking and checked with ``fstat`` on the open descriptor (not
    the path, which another process could swap meanwhile), so a named pipe, a socket or a
    device raises :class:`NotARegularFile` instead of hanging. A declared size over
    ``max_bytes`` raises :class:`FileTooLarge` before anything is read.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(f"{path}: not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise FileTooLarge(f"{path}: {info.st_size:,} bytes, more than {max_bytes:,}")
        with os.fdopen(fd, "rb", closefd=True) as handle:
            fd = -1
            # At most one byte past the declared size: enough to see a file that grew.
            limit = info.st_size if max_bytes is None else min(info.st_size, max_bytes)
            data = handle.read(limit + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:  # grew while being read
        raise FileTooLarge(f"{path}: more than {max_bytes:,} bytes")
    return data
