"""One batched inference worker, shared by ``cxr serve`` and the DICOM listener.

Callers hand in decoded grayscale images one at a time (:meth:`BatchedPredictor.submit`, or
``await`` :meth:`BatchedPredictor.predict` from asyncio) and get a future of that image's
probabilities. A single worker thread groups what is waiting into batches of up to
``max_batch`` images and runs the model once per batch, so that under load the service runs at
the speed of the batched forward instead of one image at a time under the predictor's lock.

A batch starts as soon as it is full, or when its oldest image has waited ``max_wait_ms``: when
the model was busy, the images that queued meanwhile already waited that long and go at once;
when it was idle, a lone image waits at most ``max_wait_ms`` for company.

What keeps it bounded and honest:

- the queue holds at most ``max_queue`` images; beyond that :meth:`submit` raises
  :class:`~cxr.errors.ServiceBusy` at once (a service answers 503 with ``Retry-After``);
- an image whose deadline passed, or whose future was cancelled (its request gave up), is
  dropped before the model sees it;
- a batch whose forward fails fails its own futures only; the worker goes on with the next;
- :meth:`close` lets the queued work finish for up to ``timeout`` seconds, then fails whatever
  is left with :class:`~cxr.errors.WorkerClosed`: it never hangs, even on a stuck model.

The probabilities are the predictor's own (its preprocessing, labels, calibrated temperature),
per image as :meth:`~cxr.engine.inference.Predictor.probabilities` gives them for a batch of
one; kernels for larger batches may round differently in the last bits of float32
(differences of about 1e-7).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future, InvalidStateError
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from cxr.errors import ConfigError, DeadlineExceeded, ImageError, ServiceBusy, WorkerClosed

if TYPE_CHECKING:
    from cxr.engine.inference import Predictor
    from cxr.serve.metrics import ServiceMetrics

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_WAIT_MS = 5.0
# Enough for every client of a busy service to have an image waiting while a batch runs, small
# enough that the last one in the queue is still answered within a request's time limit.
MIN_QUEUE = 64
QUEUE_BATCHES = 4
log = logging.getLogger("cxr.serve.batching")


@dataclass
class _Job:
    image: torch.Tensor  # preprocessed, [3, S, S]
    future: Future
    deadline: float | None  # time.monotonic() after which the image is dropped
    queued_at: float
    scored: bool = False  # answer Scored (probabilities + out-of-distribution score)


@dataclass(frozen=True)
class Scored:
    """One image's probabilities and its out-of-distribution score (``None`` when the
    bundle has no summary)."""

    probabilities: np.ndarray
    ood: dict | None


class BatchedPredictor:
    """Groups single-image requests into batches for one :class:`Predictor`.

    ``metrics`` (a :class:`cxr.serve.metrics.ServiceMetrics`, optional) records batch sizes,
    the queue's depth and refusals. ``max_queue`` defaults to ``max(64, 4 * max_batch)``.
    The worker thread starts on :meth:`start` or with the first :meth:`submit`.
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        max_queue: int | None = None,
        metrics: ServiceMetrics | None = None,
    ):
        check_settings(max_batch, max_wait_ms, max_queue)
        if max_queue is None:
            max_queue = max(MIN_QUEUE, QUEUE_BATCHES * max_batch)
        self.predictor = predictor
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_ms) / 1000
        self.max_queue = int(max_queue)
        self.metrics = metrics
        self._preprocess = predictor.preprocess
        self._classes = len(predictor.labels)
        self._pending: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._changed = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ callers

    def start(self) -> None:
        """Start the worker thread (once; later calls do nothing)."""
        with self._changed:
            if self._closed:
                raise WorkerClosed("the inference worker is closed")
            if self._thread is None:
                # A daemon: a model call stuck forever must not keep the process alive.
                self._thread = threading.Thread(target=self._work, name="cxr-batcher", daemon=True)
                self._thread.start()

    def submit(
        self, image: np.ndarray, *, deadline: float | None = None, scored: bool = False
    ) -> Future:
        """A future of ``image``'s probabilities (float64, one per label), or with ``scored``
        of a :class:`Scored` (the probabilities and the out-of-distribution score from the
        same forward pass).

        ``image`` is a decoded 2-D uint8 grayscale array; it is preprocessed here, in the
        caller's thread. ``deadline`` is a :func:`time.monotonic` time after which the image is
        dropped unrun (its future fails with :class:`DeadlineExceeded`). Raises
        :class:`ServiceBusy` when the queue is full and :class:`WorkerClosed` after
        :meth:`close`.
        """
        tensor = self._prepared(image)
        self.start()
        future: Future = Future()
        with self._changed:
            if self._closed:
                raise WorkerClosed("the inference worker is closed")
            if len(self._pending) >= self.max_queue:
                self._refused("queue_full")
                raise ServiceBusy(f"the inference queue is full ({self.max_queue} images waiting)")
            self._pending.append(_Job(tensor, future, deadline, time.monotonic(), scored))
            self._set_depth()
            self._changed.notify_all()
        return future

    async def predict(
        self,
        image: np.ndarray,
        *,
        deadline: float | None = None,
        executor: Executor | None = None,
        scored: bool = False,
    ) -> np.ndarray | Scored:
        """:meth:`submit` for asyncio: the preprocessing runs in ``executor`` (the loop's
        default if ``None``), never in the event loop. Cancelling the awaiting task cancels
        the image's future, so the worker drops it if it has not started it."""
        loop = asyncio.get_running_loop()
        submit = partial(self.submit, image, deadline=deadline, scored=scored)
        future = await loop.run_in_executor(executor, submit)
        return await asyncio.wrap_future(future)

    def close(self, timeout: float = 10.0) -> None:
        """Take no more work, let the queued work finish for up to ``timeout`` seconds, then
        fail what is left (queued or running) with :class:`WorkerClosed`."""
        with self._changed:
            self._closed = True
            thread = self._thread
            self._changed.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, timeout))
        with self._changed:
            left = [*self._pending, *self._running]
            self._pending.clear()
            self._set_depth()
        for job in left:
            _settle(job.future, error=WorkerClosed("the inference worker closed before this image"))

    def describe(self) -> dict[str, float | int]:
        """The worker's settings and how many images wait now."""
        return {
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait_s * 1000,
            "max_queue": self.max_queue,
            "queued": len(self._pending),
        }

    # ------------------------------------------------------------------ the worker

    def _prepared(self, image: np.ndarray) -> torch.Tensor:
        if not isinstance(image, np.ndarray) or image.ndim != 2 or image.dtype != np.uint8:
            what = (
                f"a {image.ndim}-D {image.dtype} array"
                if isinstance(image, np.ndarray)
                else type(image).__name__
            )
            raise ImageError(f"the inference worker takes a 2-D uint8 grayscale image, not {what}")
        if image.size == 0:
            raise ImageError("the inference worker got an empty image (0 pixels)")
        return self._preprocess(image)

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception:  # never let the worker die: the next batch must still run
                log.exception("inference batch failed outside the model")
            finally:
                with self._changed:
                    self._running = []

    def _next_batch(self) -> list[_Job] | None:
        """The next batch to run, or ``None`` once closed and drained."""
        with self._changed:
            while not self._pending:
                if self._closed:
                    return None
                self._changed.wait()
            # Full, or the oldest image has waited long enough (closing: no more will come).
            while len(self._pending) < self.max_batch and not self._closed:
                left = self._pending[0].queued_at + self.max_wait_s - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            count = min(self.max_batch, len(self._pending))
            self._running = [self._pending.popleft() for _ in range(count)]
            self._set_depth()
            return list(self._running)

    def _run(self, batch: list[_Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                self._refused("cancelled")
            elif job.deadline is not None and now > job.deadline:
                self._refused("deadline")
                _settle(job.future, error=DeadlineExceeded("the deadline passed in the queue"))
            else:
                live.append(job)
        if not live:
            return
        if self.metrics is not None:
            self.metrics.batch_sizes.observe(len(live))
        started = time.perf_counter()
        try:
            scores = self.predictor.scores(torch.stack([j.image for j in live]))
            probabilities = np.asarray(scores.probabilities, dtype=np.float64)
            if probabilities.shape != (len(live), self._classes):
                raise RuntimeError(
                    f"the model answered {probabilities.shape} for a batch of {len(live)} "
                    f"images and {self._classes} labels"
                )
        except Exception as exc:
            for job in live:
                _settle(job.future, error=exc)
            return
        finally:
            if self.metrics is not None:
                self.metrics.batch_seconds.observe(time.perf_counter() - started)
        ood = scores.ood or [None] * len(live)
        for job, row, score in zip(live, probabilities, ood):
            _settle(job.future, result=Scored(row.copy(), score) if job.scored else row.copy())

    def _refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.refusals.labels(reason=reason).inc()

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._pending))


def _settle(future: Future, *, result=None, error: BaseException | None = None) -> None:
    """Resolve ``future`` unless it already is (close() may have failed it meanwhile)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def check_settings(
    max_batch: int, max_wait_ms: float, max_queue: int | None, *, options: bool = False
) -> None:
    """Raise :class:`ConfigError` unless the settings are usable; ``options`` names them as
    ``cxr serve``'s options (``--max-batch``) instead of parameters."""

    def named(name: str) -> str:
        return "--" + name.replace("_", "-") if options else name

    _check_count(named("max_batch"), max_batch)
    if isinstance(max_wait_ms, bool) or not (
        isinstance(max_wait_ms, (int, float)) and math.isfinite(max_wait_ms) and max_wait_ms >= 0
    ):
        raise ConfigError(
            f"{named('max_wait_ms')} must be 0 or a positive number, not {max_wait_ms!r}"
        )
    if max_queue is not None:
        _check_count(named("max_queue"), max_queue)


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a whole number of at least 1, not {value!r}")
