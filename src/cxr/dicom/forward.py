"""Sending the reports on: C-STORE to the destination (the PACS), several files per
association, every network step under a timeout."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import (
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE

from cxr.errors import CxrError

log = logging.getLogger(__name__)
TIMEOUT_S = 30.0


class ForwardError(CxrError):
    """The destination could not be reached or refused the association."""


@dataclass(frozen=True)
class Destination:
    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``HOST:PORT:AET`` (an IPv6 host in brackets: ``[::1]:104:PACS``)."""
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            parts = [host, *rest.removeprefix(":").split(":")]
        else:
            parts = text.rsplit(":", 2)
        if len(parts) != 3 or not parts[0] or not parts[2]:
            raise CxrError(f"--forward {text!r}: expected HOST:PORT:AET, e.g. pacs.local:104:PACS")
        host, port_text, ae_title = parts
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise CxrError(f"--forward {text!r}: port must be a number from 1 to 65535")
        if len(ae_title) > 16 or not ae_title.isascii() or "\\" in ae_title:
            raise CxrError(f"--forward {text!r}: an AE title is at most 16 ASCII characters")
        return cls(host, int(port_text), ae_title)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.ae_title}"


class Forwarder:
    def __init__(self, destination: Destination, calling_ae: str, timeout: float = TIMEOUT_S):
        self.destination = destination
        self.ae = AE(ae_title=calling_ae)
        for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            self.ae.add_requested_context(
                sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            )
        self.ae.acse_timeout = self.ae.dimse_timeout = timeout
        self.ae.network_timeout = self.ae.connection_timeout = timeout

    def send(self, files: dict[str, list[Path]]) -> dict[str, str]:
        """Send each instance's files over one association; returns ``{uid: problem}`` for
        the instances the destination did not take (the others were all stored).
        Raises :class:`ForwardError` when no association could be made or it broke."""
        where = str(self.destination)
        assoc = self.ae.associate(
            self.destination.host, self.destination.port, ae_title=self.destination.ae_title
        )
        if not assoc.is_established:
            raise ForwardError(f"{where}: association refused or unreachable")
        problems: dict[str, str] = {}
        try:
            for uid, paths in files.items():
                for path in paths:
                    problem = self._store(assoc, path)
                    if problem:
                        problems[uid] = problem
                        break
                if not assoc.is_established:
                    raise ForwardError(f"{where}: association ended while sending")
        finally:
            if assoc.is_established:
                assoc.release()
        return problems

    @staticmethod
    def _store(assoc, path: Path) -> str | None:
        try:
            status = assoc.send_c_store(path)
        except (ValueError, RuntimeError, OSError) as exc:  # no context, unreadable file
            return f"cannot send {path.name}: {exc}"
        if not status or "Status" not in status:
            return "no response from the destination (timeout or aborted association)"
        code = int(status.Status)
        # 0x0000 success; 0xB000, 0xB007, 0xB006: warnings (stored, with coercion).
        if code in (0x0000, 0xB000, 0xB006, 0xB007):
            return None
        comment = str(status.get("ErrorComment", "") or "")
        return f"destination refused the report: status 0x{code:04X} {comment}".strip()
