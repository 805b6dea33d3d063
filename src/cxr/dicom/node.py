"""The DICOM node: a Storage SCP that takes radiographs, predicts them and sends a structured
report per image to a destination, losing nothing across restarts.

The port opens first; the model loads meanwhile in a thread, and images wait in the spool
until it runs. An instance streams to the spool's folder as it arrives, within
``max_dataset_mb`` (:mod:`cxr.dicom.receive`), is checked (:mod:`cxr.dicom.checks`), its SOP
Instance UID claimed in the results store (first write wins), written to the spool (fsync +
rename), recorded as ``received``, and only then acknowledged; what cannot be kept is
answered 0xA700. A transient fault after that (a full disk, a locked store) leaves the image
spooled and retried: only an unreadable image, or a report the destination refused
``max_send_attempts`` times, ends ``failed``. A bounded number
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
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import Verification

from cxr.data.images import MAX_PIXELS, as_uint8, decode_gray
from cxr.dicom.checks import Refused, check_instance, valid_uid
from cxr.dicom.forward import Destination, Forwarder, ForwardError
from cxr.dicom.receive import DatasetReceiver, ReceivedDataset
from cxr.dicom.report import (
    NOT_FOR_DIAGNOSIS,
    ModelInfo,
    ReportMaker,
    overlay_capture,
    overlay_pixels,
)
from cxr.dicom.spool import Spool
from cxr.errors import CxrError
from cxr.results.store import (
    BEING_RECEIVED,
    CLAIMED,
    HELD_ALREADY,
    ResultsStore,
    StoreError,
)

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
UID_CONFLICT = "SOP Instance UID already received for another patient"
MAX_PDU = 2**20  # the largest P-DATA PDU this node accepts (negotiated)
ASSOCIATE_SLACK = 2**18  # an association request with many contexts and a user identity


@dataclass(frozen=True)
class NodeOptions:
    ae_title: str = "CXR"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_ae: tuple[str, ...] = ()  # empty: any calling AE title
    accept_any_called_ae: bool = False  # else the called AE title must be ae_title
    max_associations: int = 32
    # A connection that sends no A-ASSOCIATE-RQ holds an association slot: ARTIM bounds it.
    first_pdu_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0  # an association that sends nothing for this long is aborted
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
    store_busy_timeout_s: float = 30.0  # an SQLite write waits this long for another process
    max_dataset_mb: float = 64.0  # a larger incoming dataset is refused (0xA700)


@dataclass
class _Counts:
    received: int = 0
    refused: int = 0
    predicted: int = 0
    sent: int = 0
    failed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # associations, by reason
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def reject(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1


class DicomNode:
    def __init__(
        self,
        predictor,
        model: ModelInfo,
        store: ResultsStore,
        spool: Spool,
        destination: Destination,
        options: NodeOptions = NodeOptions(),
        *,
        loader: Callable[[], tuple[object, ModelInfo]] | None = None,
    ):
        """``predictor`` and ``model`` ready, or None and a ``loader`` returning them that
        :meth:`start` runs in the background once the port is open."""
        if options.patient_ids not in PATIENT_ID_MODES:
            raise CxrError(f"patient IDs: choose from {', '.join(PATIENT_ID_MODES)}")
        if predictor is None and loader is None:
            raise CxrError("a DICOM node needs a predictor or a loader for one")
        self.store, self.spool, self.options = store, spool, options
        self.predictor = self.model = self.batcher = self.reports = None
        if predictor is not None:
            self._use_model(predictor, model)
        self._loader = loader
        self.load_error: BaseException | None = None  # why the loader failed
        self.forwarder = Forwarder(destination, options.ae_title, options.timeout_s)
        self.receiver = DatasetReceiver(
            spool.incoming_dir, int(options.max_dataset_mb * 1e6), MAX_PDU + ASSOCIATE_SLACK
        )
        self.counts = _Counts()
        self._slots = threading.BoundedSemaphore(options.queue_size)
        self._work: queue.Queue[str] = queue.Queue()
        self._outbox: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._ready = threading.Event()  # the model runs: the workers may predict
        self._listening = threading.Event()
        self._retries: dict[str, int] = {}  # uid -> transient failures so far
        self._sent_unrecorded: queue.Queue[str] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._server = None

    def _use_model(self, predictor, model: ModelInfo) -> None:
        from cxr.serve.batching import BatchedPredictor  # (imports torch: not before listening)

        self.predictor, self.model = predictor, model
        # The model is shared with `cxr serve`'s batched worker: the images the worker
        # threads hold are run together.
        self.batcher = BatchedPredictor(
            predictor, max_batch=self.options.max_batch, max_wait_ms=self.options.max_wait_ms
        )
        self.reports = ReportMaker(model)

    # ------------------------------------------------------------------ life cycle

    def start(self, on_listening: Callable[[tuple[str, int]], None] | None = None) -> DicomNode:
        """Resume what the spool holds, then listen; the model loads and starts meanwhile
        in a thread of its own, and images received before it runs wait in the spool
        (C-ECHO and C-STORE are answered at once). ``on_listening`` is called with the
        address once the port is open, before "model ready" is logged. Returns then."""
        self._spawn(self._warm_up, "cxr-model")
        for n in range(self.options.workers):
            self._spawn(self._work_loop, f"cxr-worker-{n}")
        for n in range(self.options.senders):
            self._spawn(self._send_loop, f"cxr-sender-{n}")
        try:
            self.recover()  # the workers run: more pending images than slots wait for them
            self._drop_old_claims()
        except BaseException:
            self.stop()  # a store that cannot be read: nothing listens, nothing is deleted
            raise
        self._server = self._make_ae().start_server(
            (self.options.host, self.options.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_REJECTED, self._on_reject),
                (evt.EVT_CONN_OPEN, self.receiver.on_open),
                (evt.EVT_PDU_RECV, self.receiver.on_pdu),
                (evt.EVT_CONN_CLOSE, self.receiver.on_close),
            ],
        )
        if on_listening is not None:
            on_listening(self.address)
        self._listening.set()
        return self

    def _drop_old_claims(self) -> None:
        """Claims the last run left were never acknowledged: forget them. A store locked by
        another process now leaves them until the next start (a resend of one of those
        images is answered "try later" meanwhile), and does not stop this one."""
        try:
            dropped = self.store.drop_claims()
        except StoreError as exc:
            log.warning("claims of the last run kept for now: %s", exc)
            return
        if dropped:
            log.info("%d image(s) being received when the last run ended were dropped", dropped)

    def _warm_up(self) -> None:
        """Load the model (when only a loader was given) and start its batcher; "model
        ready" is logged once the port is open too."""
        began = time.monotonic()
        try:
            if self.batcher is None:
                self._use_model(*self._loader())
            if self._stop.is_set():
                return
            self.batcher.start()
        except Exception as exc:  # the node keeps spooling; the CLI ends on load_error
            self.load_error = exc
            log.error("the model cannot be loaded: %s", exc)
            return
        self._ready.set()
        while not self._listening.wait(0.1):
            if self._stop.is_set():
                return
        log.info(
            "model ready after %.1f s: received images are now predicted",
            time.monotonic() - began,
        )

    def queue_depths(self) -> dict[str, int]:
        """Images waiting for the model, and reports waiting to be sent."""
        return {"prediction": self._work.qsize(), "delivery": self._outbox.qsize()}

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
        if self._ready.is_set():
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
        ae.require_called_aet = not self.options.accept_any_called_ae
        ae.maximum_associations = self.options.max_associations
        # Larger PDUs than pynetdicom's 16 KiB default: a 2 MB radiograph in 2 PDUs instead of
        # 128 (a fifth less time receiving), still a bounded read per PDU.
        ae.maximum_pdu_size = MAX_PDU
        # acse_timeout is the ARTIM timer: how long a connection may wait before its
        # A-ASSOCIATE-RQ (and a release its reply); network_timeout is the idle limit.
        ae.acse_timeout = self.options.first_pdu_timeout_s
        ae.network_timeout = self.options.idle_timeout_s
        ae.dimse_timeout = self.options.timeout_s
        return ae

    # ------------------------------------------------------------------ recovery

    def recover(self) -> int:
        """Queue what an earlier run left: received images to predict, predicted reports to
        send. Spooled images never recorded were never acknowledged: their senders still
        have them, so they are deleted. Returns the number of instances resumed."""
        # A store that cannot be read raises StoreError here: the node refuses to start
        # rather than guess which spooled images were acknowledged.
        resumed = 0
        for row in self.store.pending():
            uid = row["sop_instance_uid"]
            if row["status"] == "predicted" and self.spool.outgoing(uid):
                self.spool.remove_incoming(uid)
                self._outbox.put(uid)
                resumed += 1
            elif self.spool.incoming(uid).is_file():  # received, or its reports were lost
                self._slots.acquire()
                self._work.put(uid)
                resumed += 1
            else:
                self._fail(uid, f"its spooled {_lost_file(row['status'])} was missing at start")
        for uid in self.spool.incoming_uids():
            # "receiving": a claim the last run left, never acknowledged (dropped next).
            if self.store.status_of(uid) in (None, "receiving", "sent", "refused", "failed"):
                self.spool.remove_incoming(uid)
        return resumed

    # ------------------------------------------------------------------ reception

    def _on_reject(self, event) -> None:
        """A rejected association is logged and counted, never a results row: no instance
        came, and a flood of them must not fill the table."""
        reason = rejection_reason(event.assoc.acceptor.primitive)
        requested = event.assoc.requestor.primitive
        calling = _ae_text(getattr(requested, "calling_ae_title", ""))
        called = _ae_text(getattr(requested, "called_ae_title", ""))
        self.counts.reject(reason)
        log.warning("association from %r to %r rejected: %s", calling, called, reason)

    def _on_store(self, event):
        received = self.receiver.take(event.assoc)
        try:
            return self._store_received(event, received)
        finally:
            if received is not None:
                received.discard()

    def _store_received(self, event, received: ReceivedDataset | None):
        calling = _ae_text(event.assoc.requestor.ae_title)
        if received is not None and received.path is None:
            return self._unkept(event, calling, received)
        try:
            data = _file_bytes(event, received)
        except OSError as exc:
            log.error("cannot read the received dataset back: %s", exc)
            return _status(STATUS_OUT_OF_RESOURCES, "cannot spool the image")
        try:
            instance = check_instance(data, max_pixels=self.options.max_pixels)
            if instance.sop_instance_uid != event.request.AffectedSOPInstanceUID:
                raise Refused("the SOP Instance UID differs from the one the request names")
        except Refused as exc:
            return self._refuse(event, calling, str(exc))
        return self._admit(instance, data, calling)

    def _admit(self, instance, data: bytes, calling: str):
        """Claim the SOP Instance UID in the store, then spool, then confirm: between two
        senders racing one UID the store decides before either's bytes are written."""
        uid = instance.sop_instance_uid
        try:
            claim = self.store.claim(
                uid,
                patient_ref=self._patient_ref(instance.patient_id),
                study_instance_uid=instance.study_instance_uid,
                sop_class_uid=instance.sop_class_uid,
                calling_ae=calling,
            )
        except CxrError as exc:
            log.error("cannot admit %s: %s", uid, exc)
            return _status(STATUS_OUT_OF_RESOURCES, "cannot record the image")
        if claim != CLAIMED:
            return self._not_claimed(uid, calling, claim)
        if not self._slots.acquire(timeout=self.options.admit_timeout_s):
            self._record(partial(self.store.withdraw, uid))
            return _status(STATUS_OUT_OF_RESOURCES, "listener busy, try again later")
        try:
            self.spool.put_incoming(uid, data)
            self.store.confirm(uid)
        except Exception as exc:  # whatever it was, the claim must not outlive this call
            self._slots.release()
            self.spool.remove_incoming(uid)  # nothing unacknowledged is left to resume
            self._record(partial(self.store.withdraw, uid))
            log.error("cannot admit %s: %s", uid, exc, exc_info=not isinstance(exc, OSError))
            return _status(STATUS_OUT_OF_RESOURCES, "cannot spool or record the image")
        self.counts.add("received")
        self._work.put(uid)
        return STATUS_SUCCESS

    def _not_claimed(self, uid: str, calling: str, claim: str):
        if claim == HELD_ALREADY:
            return STATUS_SUCCESS  # a resend of an image already held: one result only
        if claim == BEING_RECEIVED:
            return _status(STATUS_OUT_OF_RESOURCES, "the same image is arriving now; try later")
        # First write wins: what was acknowledged for one patient is never replaced.
        self.counts.add("refused")
        log.warning("refused %s from %s: %s", uid, calling, UID_CONFLICT)
        return _status(STATUS_CANNOT_UNDERSTAND, UID_CONFLICT)

    def _unkept(self, event, calling: str, received: ReceivedDataset):
        """A dataset that was not kept as it arrived: too large, or the disk refused it."""
        uid = str(event.request.AffectedSOPInstanceUID or "")[:64]
        if not received.oversized:
            log.error("cannot spool %s from %s: %s", uid, calling, received.error)
            return _status(STATUS_OUT_OF_RESOURCES, "cannot spool the image")
        limit = self.options.max_dataset_mb
        reason = f"dataset of {received.size:,} bytes is over the {limit:g} MB limit"
        log.warning("refused %s from %s: %s (--max-dataset-mb)", uid, calling, reason)
        self.counts.add("refused")
        self._record(
            lambda: self.store.refuse(uid if valid_uid(uid) else None, reason, calling_ae=calling)
        )
        return _status(STATUS_OUT_OF_RESOURCES, reason)

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
        while not self._ready.wait(0.2):
            if self._stop.is_set():
                return
        while not self._stop.is_set():
            try:
                uid = self._work.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._process(uid)
            except (OSError, StoreError) as exc:
                # A full disk or a locked store passes: the image stays spooled and keeps its
                # admission slot until it is predicted and recorded.
                self._retry_later(uid, exc)
                continue
            except Exception as exc:  # one image's trouble must not stop the worker
                log.exception("processing %s failed", uid)
                self._fail(uid, f"internal error ({exc.__class__.__name__}: {exc})")
            self._retries.pop(uid, None)
            self._slots.release()

    def _retry_later(self, uid: str, problem: Exception) -> None:
        tries = self._retries[uid] = self._retries.get(uid, 0) + 1
        delay = min(0.5 * 2 ** min(tries - 1, 10), self.options.retry_max_s)
        log.warning("%s: %s; trying again in %.1f s", uid, problem, delay)
        timer = threading.Timer(delay, self._work.put, args=(uid,))
        timer.daemon = True
        timer.start()

    def _process(self, uid: str) -> None:
        path = self.spool.incoming(uid)
        try:
            gray = decode_gray(path, name=uid, max_pixels=self.options.max_pixels)
        except CxrError as exc:
            if not self._fail(uid, str(exc).removeprefix(f"{uid}: ")):
                raise StoreError(f"{uid}: its failure cannot be recorded yet") from None
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
            rgb = overlay_pixels(as_uint8(crop), heatmap, lines)
            captures.append(overlay_capture(source, self.model, label, rgb))
        return captures

    # ------------------------------------------------------------------ delivery

    def _send_loop(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            self._record_unrecorded_sends()
            batch = self._gather()
            while batch and not self._stop.is_set():
                try:
                    batch = self._deliver(batch)
                    delay = 1.0
                except ForwardError as exc:
                    log.warning("forwarding %d reports failed: %s", len(batch), exc)
                    for uid in batch:
                        self._record(partial(self.store.attempt_failed, uid, str(exc)))
                self._record_unrecorded_sends()
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
                self._record_sent(uid)
            elif self._attempts_after_failure(uid, problems[uid]) >= self.options.max_send_attempts:
                if self._fail(uid, problems[uid]):
                    self.spool.remove_outgoing(uid)
                else:
                    retry.append(uid)  # kept until its end can be recorded
            else:
                retry.append(uid)
        return retry

    def _record_sent(self, uid: str) -> None:
        """Mark a delivered report sent; while the store cannot be written its reports stay
        spooled and the write is tried again (not the delivery)."""
        try:
            self.store.sent(uid)
        except StoreError as exc:
            log.warning("%s was delivered but cannot be recorded yet: %s", uid, exc)
            self._sent_unrecorded.put(uid)
            return
        self.counts.add("sent")
        self.spool.remove_outgoing(uid)

    def _record_unrecorded_sends(self) -> None:
        for _ in range(self._sent_unrecorded.qsize()):
            self._record_sent(self._sent_unrecorded.get_nowait())

    def _attempts_after_failure(self, uid: str, problem: str) -> int:
        try:
            return self.store.attempt_failed(uid, problem)
        except StoreError as exc:
            log.error("%s", exc)
            return 0  # not counted: tried again

    # ------------------------------------------------------------------ helpers

    def _fail(self, uid: str, reason: str) -> bool:
        """Record a permanent failure; False when the store could not be written (then the
        spooled files stay, and a restart finds the row pending and tries again)."""
        log.warning("%s failed: %s", uid, reason)
        if not self._record(lambda: self.store.failed(uid, reason)):
            return False
        self.counts.add("failed")
        return True

    @staticmethod
    def _record(write: Callable[[], object]) -> bool:
        """A store write whose failure is logged, not raised into pynetdicom's thread."""
        try:
            write()
        except StoreError as exc:
            log.error("%s", exc)
            return False
        return True


def _file_bytes(event, received: ReceivedDataset | None) -> bytes:
    """The received instance as a DICOM file (pynetdicom's own file meta, the dataset as
    it arrived)."""
    if received is None:  # not streamed (no PDU handler bound): pynetdicom held it
        return event.encoded_dataset()
    meta = encode_file_meta(event.file_meta)
    return b"".join((b"\x00" * 128, b"DICM", meta, received.read()))


def _lost_file(status: str) -> str:
    return "image" if status == "received" else "report (and image)"


# (result source, diagnostic) of an A-ASSOCIATE-RJ (PS3.8 9.3.4) -> the reason logged.
REJECTION_REASONS = {
    (0x01, 0x02): "application context name not supported",
    (0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x07): "called AE title not recognised",
    (0x02, 0x02): "protocol version not supported",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "too many associations (local limit exceeded)",
}


def rejection_reason(rejection) -> str:
    key = (getattr(rejection, "result_source", None), getattr(rejection, "diagnostic", None))
    return REJECTION_REASONS.get(key, "no reason given")


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
