"""The listener's one door to the model: ``submit(gray) -> Future`` of the probability
vector, requests from the worker threads grouped into batches.

It has the interface of the service's shared batched worker (``cxr.serve.batching``'s
``BatchedPredictor(predictor, max_batch=..., max_wait_ms=...)``, ``start``, ``submit``,
``close``), so the listener can switch to that one without other changes. Each image is
preprocessed by :attr:`cxr.engine.inference.Predictor.preprocess` and the batch goes through
:meth:`~cxr.engine.inference.Predictor.probabilities`: what ``cxr predict`` does.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

import numpy as np
import torch

from cxr.errors import CxrError

_STOP = object()


class BatchedModel:
    def __init__(self, predictor, *, max_batch: int = 16, max_wait_ms: float = 10.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise CxrError(
                f"max_batch must be >= 1 and max_wait_ms >= 0 (got {max_batch}, {max_wait_ms})"
            )
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._requests: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="cxr-model", daemon=True)

    def start(self) -> BatchedModel:
        self._thread.start()
        return self

    def submit(self, gray: np.ndarray) -> Future:
        """The probabilities of one ``(H, W) uint8`` image, when its batch has run."""
        future: Future = Future()
        self._requests.put((self.predictor.preprocess(gray), future))
        return future

    def close(self) -> None:
        self._requests.put(_STOP)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            tensors, futures = zip(*batch)
            try:
                probabilities = self.predictor.probabilities(torch.stack(tensors))
            except Exception as exc:  # every waiting caller learns why
                for future in futures:
                    future.set_exception(exc)
                continue
            for future, row in zip(futures, probabilities):
                future.set_result(row)

    def _next_batch(self) -> list | None:
        first = self._requests.get()
        if first is _STOP:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                item = self._requests.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is _STOP:
                self._requests.put(_STOP)  # stop after this batch
                break
            batch.append(item)
        return batch
