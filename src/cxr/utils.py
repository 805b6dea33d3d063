"""Small helpers shared by several modules: atomic writes, bounded reads of regular files,
safe file names, and file names as text that can always be written."""

from __future__ import annotations

import errno
import io
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

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
    """Every CSV cxr writes goes through here: text cells a spreadsheet would run as a
    formula get a leading ``'`` (:mod:`cxr.safety`); cxr's readers take it off again."""
    from cxr.safety import csv_text

    atomic_write_text(path, csv_text(frame))


def npy_bytes(array) -> bytes:
    """``array`` in NumPy's ``.npy`` format, for :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, ``._-``; at most 100 chars)."""
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text)
    return cleaned.strip("._")[:100]


def path_text(path: str | os.PathLike) -> str:
    """A file name as text that always encodes to UTF-8: bytes that are not UTF-8 become
    ``\\xNN`` (``scan\\xff.png``), everything else is kept as is.

    On POSIX a name is bytes; Python decodes the ones that are not UTF-8 into lone surrogates,
    which no UTF-8 writer accepts (a CSV of results failed after every prediction was done).
    Every place a path becomes text in results (CSV, JSON) goes through here, so a name reads
    the same in all of them.
    """
    text = os.fspath(path)
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    try:
        raw = os.fsencode(text)
    except UnicodeEncodeError:  # a surrogate that did not come from the file system
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


# C0 controls, DEL and C1 controls: ESC (and the C1 CSI, U+009B) starts a terminal escape
# sequence, and a file name can hold any of them. Tab, newline and carriage return are
# escaped too: a name must not start a new line that looks like another message.
_CONTROL_ESCAPES = {
    code: {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}.get(code, f"\\x{code:02x}")
    for code in (*range(0x20), *range(0x7F, 0xA0))
}
# Bidirectional overrides and isolates reorder what follows them on screen (a name could
# show as another), so they are escaped too.
_CONTROL_ESCAPES.update(
    {code: f"\\u{code:04x}" for code in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}
)


def printable_text(text: object) -> str:
    """``text`` safe to show to a person (a terminal, an image title): :func:`path_text`, then
    control characters (C0, DEL, C1) as ``repr``-style escapes (``\\x1b``, ``\\n``); other
    Unicode is kept.

    A backslash is not doubled, so a name that holds ``\\x1b`` as four characters looks the
    same as one holding ESC: a display is safe either way, and a name reads the same as in
    the CSV and JSON that :func:`path_text` writes.
    """
    if not isinstance(text, (str, bytes, os.PathLike)):
        text = str(text)  # an exception, a number
    return path_text(text).translate(_CONTROL_ESCAPES)


class NotARegularFile(OSError):
    """A path that is a FIFO, socket, device or folder: reading it could block or never end."""


class FileTooLarge(OSError):
    """A file larger than the caller's limit (checked before reading)."""


@contextmanager
def open_regular(path: str | os.PathLike) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """``(file, its stat)`` for a regular file, opened without ever blocking.

    The file is opened non-blocking and checked with ``fstat`` on the open descriptor (not
    the path, which another process could swap meanwhile), so a named pipe, a socket or a
    device raises :class:`NotARegularFile` instead of hanging, and a folder
    :class:`IsADirectoryError`.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(f"{path}: not a regular file")
        handle = os.fdopen(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle, info


def read_regular_file(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file (:func:`open_regular`), never more than ``max_bytes``: a
    declared size over it raises :class:`FileTooLarge` before anything is read."""
    with open_regular(path) as (handle, info):
        if max_bytes is not None and info.st_size > max_bytes:
            raise FileTooLarge(f"{path}: {info.st_size:,} bytes, more than {max_bytes:,}")
        # At most one byte past the declared size: enough to see a file that grew.
        limit = info.st_size if max_bytes is None else min(info.st_size, max_bytes)
        data = handle.read(limit + 1)
    if max_bytes is not None and len(data) > max_bytes:  # grew while being read
        raise FileTooLarge(f"{path}: more than {max_bytes:,} bytes")
    return data


def read_regular_head(path: str | os.PathLike, size: int) -> bytes:
    """The first ``size`` bytes (or fewer) of a regular file (:func:`open_regular`), for
    sniffing its format."""
    with open_regular(path) as (handle, _info):
        return handle.read(size)
