"""The DICOM node: a Storage SCP that takes radiographs, predicts them and sends a structured
report per image to a destination, losing nothing across restarts.

An instance is checked (:mod:`cxr.dicom.checks`), written to the spool (fsync + rename),
recorded as ``received`` in the results store, and only then acknowledged. A bounded number
of admitted images wait for the model (``queue_size``: a sender past it waits, then gets
"out of resources"). Worker threads decode each spooled file as ``cxr predict`` does, the
model runs them in batches, the reports are written to the spool and the row becomes
``predicted``; sender threads (one association each) deliver them by C-STORE with back-off,
and the row becomes ``sent``. On start the store's pending rows and the spool's files say
what is left to do, so an acknowledged image gets its report once however the process ended
before: the report's UID is derived from the image's, and the destination keeps one copy of
a repeated one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from cxr.data.images import MAX_PIXELS, decode_gray
from cxr.dicom.checks import Refused, check_instance, valid_uid
from cxr.dicom.forward import Destination, Forwarder, ForwardError
from cxr.dicom.report import (
    NOT_FOR_DIAGNOSIS,
    ModelInfo,
    ReportMaker,
    overlay_capture,
    overlay_pixels,
)
from cxr.dicom.spool import Spool
from cxr.errors import CxrError
from cxr.results.store import ResultsStore, StoreError
from cxr.serve.batching import BatchedPredictor

log = logging.getLogger(__name__)

# The transfer syntaxes the decoder reads (cxr.data.images), offered for every storage class
# so that anything a PACS sends arrives and is checked, and refused with a reason if need be.
TRANSFER_SYNTAXES = [
    *pydicom.uid.UncompressedTransferSyntaxes,
    *pydicom.uid.JPEGTransferSyntaxes,
    *pydicom.uid.JPEGLSTransferSyntaxes,
    *pydicom.uid.JPEG2000TransferSyntaxes,
    *pydicom.uid.RLETransferSyntaxes,
]
STATUS_SUCCESS = 0x0000
STATUS_CANNOT_UNDERSTAND = 0xC000  # a failure: the instance is refused
STATUS_OUT_OF_RESOURCES = 0xA700  # a failure the sender may retry later
PATIENT_ID_MODES = ("hash", "keep", "drop")


@dataclass(frozen=True)
class NodeOptions:
    ae_title: str = "CXR"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_ae: tuple[str, ...] = ()  # empty: any calling AE title
    overlays: bool = False
    workers: int = 4
    senders: int = 4  # concurrent associations to the destination
    queue_size: int = 64
    max_batch: int = 16
    max_wait_ms: float = 10.0
    max_pixels: int = MAX_PIXELS
    patient_ids: str = "hash"
    admit_timeout_s: float = 30.0
    retry_max_s: float = 60.0
    max_send_attempts: int = 10
    timeout_s: float = 60.0


@dataclass
class _Counts:
    received: int = 0
    refused: int = 0
    predicted: int = 0
    sent: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


class DicomNode:
    def __init__(
        self,
        predictor,
        model: ModelInfo,
        store: ResultsStore,
        spool: Spool,
        destination: Destination,
        options: NodeOptions = NodeOptions(),
    ):
        if options.patient_ids not in PATIENT_ID_MODES:
            raise CxrError(f"patient IDs: choose from {', '.join(PATIENT_ID_MODES)}")
        self.predictor, self.model, self.store, self.spool = predictor, model, store, spool
        self.options = options
        self.forwarder = Forwarder(destination, options.ae_title, options.timeout_s)
        # The model is shared with `cxr serve`'s batched worker: the images the worker
        # threads hold are run together.
        self.batcher = BatchedPredictor(
            predictor, max_batch=options.max_batch, max_wait_ms=options.max_wait_ms
        )
        self.reports = ReportMaker(model)
        self.counts = _Counts()
        self._slots = threading.BoundedSemaphore(options.queue_size)
        self._work: queue.Queue[str] = queue.Queue()
        self._outbox: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None

    # ------------------------------------------------------------------ life cycle

    def start(self) -> DicomNode:
        """Start the model, the workers and the sender, resume what the spool holds, then
        listen. Returns once the port is open."""
        self.batcher.start()
        for n in range(self.options.workers):
            self._spawn(self._work_loop, f"cxr-worker-{n}")
        for n in range(self.options.senders):
            self._spawn(self._send_loop, f"cxr-sender-{n}")
        self.recover()
        self._server = self._make_ae().start_server(
            (self.options.host, self.options.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_reject)],
        )
        return self

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_address[:2]

    def stop(self) -> None:
        """Stop listening and let the threads end; pending work stays in the spool."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._stop.is_set():
            return
        self._stop.set()
        self.batcher.close(timeout=self.options.timeout_s)
        for thread in self._threads:
            thread.join(timeout=self.options.timeout_s)

    def wait(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Poll ``condition`` until it holds or ``timeout`` passes (for tests and tools)."""
        return _poll(condition, timeout, self._stop)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.options.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(self.options.allowed_ae)
        ae.maximum_associations = 32
        # Larger PDUs than pynetdicom's 16 KiB default: a 2 MB radiograph in 2 PDUs instead of
        # 128 (a fifth less time receiving), still a bounded read per PDU.
        ae.maximum_pdu_size = 2**20
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.options.timeout_s
        return ae

    # ------------------------------------------------------------------ recovery

    def recover(self) -> int:
        """Queue what an earlier run left: received images to predict, predicted reports to
        send. Spooled images never recorded were never acknowledged: their senders still
        have them, so they are deleted. Returns the number of instances resumed."""
        resumed = 0
        for row in self.store.pending():
            uid = row["sop_instance_uid"]
            if row["status"] == "received":
                if self.spool.incoming(uid).is_file():
                    self._slots.acquire()
                    self._work.put(uid)
                    resumed += 1
                else:
                    self._fail(uid, "the spooled image was missing after a restart")
            elif self.spool.outgoing(uid):
                self.spool.remove_incoming(uid)
                self._outbox.put(uid)
                resumed += 1
            else:
                self._fail(uid, "the spooled report was missing after a restart")
        for uid in self.spool.incoming_uids():
            if self.store.status_of(uid) != "received":
                self.spool.remove_incoming(uid)
        return resumed

    # ------------------------------------------------------------------ reception

    def _on_reject(self, event) -> None:
        calling = _ae_text(event.assoc.requestor.ae_title)
        reason = f"association from calling AE title {calling!r} refused: not an allowed AE"
        log.warning(reason)
        self._record(lambda: self.store.refuse(None, reason, calling_ae=calling))

    def _on_store(self, event):
        calling = _ae_text(event.assoc.requestor.ae_title)
        try:
            data = event.encoded_dataset()
            instance = check_instance(data, max_pixels=self.options.max_pixels)
            if instance.sop_instance_uid != event.request.AffectedSOPInstanceUID:
                raise Refused("the SOP Instance UID differs from the one the request names")
        except Refused as exc:
            return self._refuse(event, calling, str(exc))
        if self.store.status_of(instance.sop_instance_uid) in ("received", "predicted", "sent"):
            return STATUS_SUCCESS  # a resend of an image already held: one result only
        if not self._slots.acquire(timeout=self.options.admit_timeout_s):
            return _status(STATUS_OUT_OF_RESOURCES, "listener busy, try again later")
        try:
            self.spool.put_incoming(instance.sop_instance_uid, data)
            admitted = self.store.admit(
                instance.sop_instance_uid,
                study_instance_uid=instance.study_instance_uid,
                sop_class_uid=instance.sop_class_uid,
                patient_ref=self._patient_ref(instance.patient_id),
                calling_ae=calling,
            )
        except (OSError, CxrError) as exc:
            self._slots.release()
            log.error("cannot admit %s: %s", instance.sop_instance_uid, exc)
            return _status(STATUS_OUT_OF_RESOURCES, "cannot spool or record the image")
        if admitted:
            self.counts.add("received")
            self._work.put(instance.sop_instance_uid)
        else:
            self._slots.release()
        return STATUS_SUCCESS

    def _refuse(self, event, calling: str, reason: str):
        uid = str(event.request.AffectedSOPInstanceUID or "")
        sop_class = str(event.request.AffectedSOPClassUID or "")
        self.counts.add("refused")
        log.info("refused %s from %s: %s", uid[:64], calling, reason)
        self._record(
            lambda: self.store.refuse(
                uid if valid_uid(uid) else None,
                reason,
                calling_ae=calling,
                sop_class_uid=sop_class if valid_uid(sop_class) else None,
            )
        )
        return _status(STATUS_CANNOT_UNDERSTAND, reason)

    def _patient_ref(self, patient_id: str | None) -> str | None:
        if self.options.patient_ids == "keep":
            return patient_id
        if self.options.patient_ids == "hash":
            return self.store.patient_ref(patient_id)
        return None

    # ------------------------------------------------------------------ prediction

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                uid = self._work.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._process(uid)
            except Exception as exc:  # one image's trouble must not stop the worker
                log.exception("processing %s failed", uid)
                self._fail(uid, f"internal error ({exc.__class__.__name__}: {exc})")
            finally:
                self._slots.release()

    def _process(self, uid: str) -> None:
        path = self.spool.incoming(uid)
        try:
            gray = decode_gray(path, name=uid, max_pixels=self.options.max_pixels)
        except CxrError as exc:
            self._fail(uid, str(exc).removeprefix(f"{uid}: "))
            self.spool.remove_incoming(uid)
            return
        probabilities = self.batcher.submit(gray).result(timeout=self.options.timeout_s * 10)
        source = pydicom.dcmread(path, stop_before_pixels=True)
        objects = [self.reports.report(source, probabilities)]
        if self.options.overlays:
            objects += self._overlays(source, gray, probabilities)
        self.spool.put_outgoing(uid, objects)
        labels = self.model.labels
        calls = self.predictor.calls(probabilities[None])[0]
        self.store.predicted(
            uid,
            model_digest=self.model.digest,
            probabilities={label: float(p) for label, p in zip(labels, probabilities)},
            calls={label: bool(c) for label, c in zip(labels, calls)},
        )
        self.counts.add("predicted")
        self.spool.remove_incoming(uid)
        self._outbox.put(uid)

    def _overlays(self, source: Dataset, gray: np.ndarray, probabilities) -> list[bytes]:
        """A Secondary Capture per positive finding: the Grad-CAM overlay, titled. Every
        one is made from ``source`` alone (its patient, study and reference)."""
        positive = [c for c, p in enumerate(probabilities) if p >= self.model.thresholds[c]]
        if not positive:
            return []
        preprocess = self.predictor.preprocess
        crop = preprocess.crop_resized(gray)
        maps = self.predictor.gradcam(preprocess.to_tensor(crop)[None], positive)[0]
        captures = []
        for c, heatmap in zip(positive, maps):
            label = self.model.labels[c]
            lines = [
                label,
                f"p={probabilities[c]:.2f} (threshold {self.model.thresholds[c]:.2f})",
                NOT_FOR_DIAGNOSIS,
            ]
            rgb = overlay_pixels(crop, heatmap, lines)
            captures.append(overlay_capture(source, self.model, label, rgb))
        return captures

    # ------------------------------------------------------------------ delivery

    def _send_loop(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            batch = self._gather()
            while batch and not self._stop.is_set():
                try:
                    batch = self._deliver(batch)
                    delay = 1.0
                except ForwardError as exc:
                    log.warning("forwarding %d reports failed: %s", len(batch), exc)
                    for uid in batch:
                        self._record(partial(self.store.attempt_failed, uid, str(exc)))
                if batch:
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.options.retry_max_s)

    def _gather(self, most: int = 32) -> list[str]:
        try:
            batch = [self._outbox.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(batch) < most:
            try:
                batch.append(self._outbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _deliver(self, batch: list[str]) -> list[str]:
        """Send the batch; returns the instances to try again."""
        files = {}
        for uid in batch:
            paths = self.spool.outgoing(uid)
            if paths:
                files[uid] = paths
            else:
                self._fail(uid, "its report is missing from the spool")
        problems = self.forwarder.send(files)
        retry = []
        for uid in files:
            if uid not in problems:
                self.store.sent(uid)
                self.counts.add("sent")
                self.spool.remove_outgoing(uid)
            elif self.store.attempt_failed(uid, problems[uid]) >= self.options.max_send_attempts:
                self._fail(uid, problems[uid])
                self.spool.remove_outgoing(uid)
            else:
                retry.append(uid)
        return retry

    # ------------------------------------------------------------------ helpers

    def _fail(self, uid: str, reason: str) -> None:
        self.counts.add("failed")
        log.warning("%s failed: %s", uid, reason)
        self._record(lambda: self.store.failed(uid, reason))

    @staticmethod
    def _record(write: Callable[[], object]) -> None:
        """A store write whose failure is logged, not raised into pynetdicom's thread."""
        try:
            write()
        except StoreError as exc:
            log.error("%s", exc)


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]  # LO: at most 64 characters
    return status


def _ae_text(value) -> str:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return text.strip()[:16]


def _poll(condition: Callable[[], bool], timeout: float, stop: threading.Event) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if stop.wait(0.05):
            return False
    return condition()
