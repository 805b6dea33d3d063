"""Receiving a C-STORE's dataset without holding it in memory, and within a size limit.

pynetdicom gathers a request's dataset in memory (or, with its process-wide
``STORE_RECV_CHUNKED_DATASET``, in a file in the system temporary folder, whatever its size).
Here an ``EVT_PDU_RECV`` handler, which pynetdicom calls on the association's reading thread
for each P-DATA-TF PDU before the DIMSE layer sees it, moves each dataset fragment to a file in
the spool's folder and leaves pynetdicom the fragment's one-byte header alone (so that it
still sees where the message ends). Memory is therefore bounded by one PDU (the node's
maximum PDU size) per association while a dataset arrives; the disk by the limit: past it the
file is deleted and the rest of the fragments are counted and dropped, so that the sender
still gets an answer (0xA700) rather than a broken association. A PDU claiming more than the
node accepts (the negotiated maximum and room for an association request) closes the
connection before pynetdicom reads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from pynetdicom.pdu import P_DATA_TF

log = logging.getLogger(__name__)


@dataclass
class ReceivedDataset:
    """One request's dataset as it arrived: the file holding it (None when it was too large
    or could not be written), its size in bytes, and the write error if any."""

    path: Path | None
    size: int
    oversized: bool = False
    error: OSError | None = None

    def read(self) -> bytes:
        return self.path.read_bytes()

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class _Incoming:
    """The dataset fragments of the request being received on one association."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.size = 0
        self.error: OSError | None = None
        self.oversized = False
        fd, name = tempfile.mkstemp(dir=folder, prefix=".rx-", suffix=".tmp")
        self.path: Path | None = Path(name)
        self.handle = os.fdopen(fd, "wb")

    def add(self, fragment: bytes) -> None:
        self.size += len(fragment)
        if self.handle is None:
            return
        if self.size > self.limit:
            self.oversized = True
            self._drop()
            return
        try:
            self.handle.write(fragment)
        except OSError as exc:
            self.error = exc
            self._drop()

    def finish(self) -> ReceivedDataset:
        if self.handle is not None:
            try:
                self.handle.close()
            except OSError as exc:
                self.error = exc
                self._drop()
        return ReceivedDataset(self.path, self.size, self.oversized, self.error)

    def _drop(self) -> None:
        with contextlib.suppress(OSError):  # the file is deleted anyway
            self.handle.close()
        self.handle = None
        self.path.unlink(missing_ok=True)
        self.path = None


class DatasetReceiver:
    """Bind :meth:`on_open` to ``EVT_CONN_OPEN``, :meth:`on_pdu` to ``EVT_PDU_RECV`` and
    :meth:`on_close` to ``EVT_CONN_CLOSE``; the ``EVT_C_STORE`` handler then :meth:`take`\\ s
    each request's dataset. ``largest_pdu``: the most bytes one PDU may claim."""

    def __init__(self, folder: str | os.PathLike, limit_bytes: int, largest_pdu: int):
        self.folder, self.limit, self.largest_pdu = Path(folder), limit_bytes, largest_pdu
        self._lock = threading.Lock()
        self._current: dict[int, _Incoming] = {}
        # Finished datasets not yet taken, oldest first.
        self._finished: dict[int, deque[ReceivedDataset]] = {}

    def on_open(self, event) -> None:
        """pynetdicom reads a whole PDU, of whatever length its header claims, before any
        handler sees it; a sender ignoring the negotiated maximum could make that 4 GiB.
        Such a claim ends the connection before the PDU is read."""
        sock, most = event.assoc.dul.socket, self.largest_pdu
        read = sock.recv

        def bounded(nr_bytes: int) -> bytearray:
            if nr_bytes > most:
                log.warning(
                    "closing the connection from %s: a PDU of %s bytes is over the %s accepted",
                    (getattr(event, "address", None) or ("?",))[0],
                    f"{nr_bytes:,}",
                    f"{most:,}",
                )
                raise OSError(f"a PDU of {nr_bytes:,} bytes is over the {most:,} accepted")
            return read(nr_bytes)

        sock.recv = bounded

    def on_pdu(self, event) -> None:
        pdu = event.pdu
        if not isinstance(pdu, P_DATA_TF):
            return
        key = id(event.assoc)
        for item in pdu.presentation_data_value_items:
            value = item.presentation_data_value
            if not value or value[0] & 1:  # a command fragment: pynetdicom's to decode
                continue
            item.presentation_data_value = value[:1]
            self._add(key, value[1:], last=bool(value[0] & 2))

    def _add(self, key: int, fragment: bytes, last: bool) -> None:
        with self._lock:
            incoming = self._current.get(key)
        if incoming is None:
            try:
                incoming = _Incoming(self.folder, self.limit)
            except OSError as exc:
                incoming = _Failed(exc, self.limit)
            with self._lock:
                self._current[key] = incoming
        incoming.add(fragment)
        if last:
            received = incoming.finish()
            with self._lock:
                del self._current[key]
                self._finished.setdefault(key, deque()).append(received)

    def take(self, assoc) -> ReceivedDataset | None:
        """The dataset of the request being handled on ``assoc``: the latest received (the
        caller deletes its file with :meth:`ReceivedDataset.discard` once done). One request
        is handled at a time (pynetdicom negotiates one outstanding operation), so an older
        one left is a request pynetdicom answered itself, without the handler: dropped."""
        with self._lock:
            waiting = self._finished.pop(id(assoc), None)
        if not waiting:
            return None
        latest = waiting.pop()
        for stale in waiting:
            stale.discard()
        return latest

    def on_close(self, event) -> None:
        """An association's end: delete what it left (an interrupted or untaken dataset)."""
        key = id(event.assoc)
        with self._lock:
            incoming = self._current.pop(key, None)
            left = list(self._finished.pop(key, ()))
        if incoming is not None:
            left.append(incoming.finish())
        for received in left:
            received.discard()


class _Failed:
    """A dataset whose file could not even be made (a full disk): counted, not kept."""

    def __init__(self, error: OSError, limit: int):
        self.error, self.limit, self.size = error, limit, 0

    def add(self, fragment: bytes) -> None:
        self.size += len(fragment)

    def finish(self) -> ReceivedDataset:
        return ReceivedDataset(None, self.size, self.size > self.limit, self.error)
