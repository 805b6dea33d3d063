"""The spool: received images wait in ``incoming/``, the reports made from them wait in
``outgoing/`` until the destination has them. Every file is written to a temporary name,
fsynced, renamed and its folder fsynced, so an acknowledged image survives a killed process
or a power cut; names are SOP Instance UIDs, checked to be digits and dots."""

from __future__ import annotations

import os
from pathlib import Path

from cxr.dicom.checks import valid_uid
from cxr.errors import CxrError
from cxr.utils import atomic_write_bytes


class Spool:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.incoming_dir = self.folder / "incoming"
        self.outgoing_dir = self.folder / "outgoing"
        for directory in (self.incoming_dir, self.outgoing_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._clean_temporaries()

    def incoming(self, uid: str) -> Path:
        return self.incoming_dir / f"{_checked(uid)}.dcm"

    def put_incoming(self, uid: str, data: bytes) -> Path:
        """Write a received image durably (file and folder fsynced) or not at all: on any
        error (a full disk, an I/O error) nothing of it is left, so that it is never
        acknowledged half-written."""
        path = self.incoming(uid)
        try:
            _durable_write(path, data)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    def outgoing(self, uid: str) -> list[Path]:
        """The reports for ``uid`` ready to send, in the order they were made."""
        return sorted(self.outgoing_dir.glob(f"{_checked(uid)}.*.dcm"))

    def put_outgoing(self, uid: str, objects: list[bytes]) -> list[Path]:
        """Write ``uid``'s reports (replacing any earlier set)."""
        self.remove_outgoing(uid)
        paths = [self.outgoing_dir / f"{_checked(uid)}.{n:02d}.dcm" for n in range(len(objects))]
        try:
            for path, data in zip(paths, objects):
                atomic_write_bytes(path, data)
            _fsync_dir(self.outgoing_dir)
        except BaseException:
            # A part of a set must not be sent as if it were the whole: the image stays in
            # incoming/ and its reports are made again.
            self.remove_outgoing(uid)
            raise
        return paths

    def remove_incoming(self, uid: str) -> None:
        self.incoming(uid).unlink(missing_ok=True)

    def remove_outgoing(self, uid: str) -> None:
        for path in self.outgoing(uid):
            path.unlink(missing_ok=True)

    def incoming_uids(self) -> list[str]:
        """UIDs of the images in ``incoming/`` (oldest first)."""
        files = sorted(self.incoming_dir.glob("*.dcm"), key=lambda p: p.stat().st_mtime_ns)
        return [p.stem for p in files if valid_uid(p.stem)]

    def _clean_temporaries(self) -> None:
        """Half-written files of a killed process (``atomic_write_bytes``'s temporaries)."""
        for directory in (self.incoming_dir, self.outgoing_dir):
            for path in directory.glob(".*.tmp"):
                path.unlink(missing_ok=True)


def _checked(uid: str) -> str:
    if not valid_uid(uid):
        raise CxrError(f"{uid[:70]!r} is not a DICOM UID; refusing to use it as a file name")
    return uid


def _durable_write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (the file's own fsync does not cover it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
