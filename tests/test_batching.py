"""The batched inference worker (cxr.serve.batching) with a real untrained model.

The reference for every probability is the model itself, called by the test on inputs made
by the independent preprocessing in conftest (PIL and numpy), then sigmoid(logits / T). A
"gate" wraps the predictor's ``probabilities`` so that the test decides when a model call
returns: the images submitted meanwhile must queue, which makes the batching deterministic
without relying on timing (timeouts below only guard against hangs).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import wait

import numpy as np
import pytest
import torch
from conftest import reference_input

from cxr.engine.inference import load_predictor
from cxr.errors import (
    ConfigError,
    DeadlineExceeded,
    ImageError,
    ServiceBusy,
    WorkerClosed,
)
from cxr.model.bundle import BundleMeta, save_bundle
from cxr.model.network import build_model
from cxr.serve.batching import BatchedPredictor
from cxr.serve.metrics import ServiceMetrics

LABELS = ["Effusion", "Mass", "Nodule"]  # not NIH's 14: the worker must not assume them
TEMPERATURE = 2.5
SIZE = 32
HANG_GUARD_S = 60


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("bundle3") / "model"
    meta = BundleMeta(image_size=SIZE, labels=LABELS, temperature=TEMPERATURE)
    save_bundle(folder, build_model(len(LABELS)), meta)
    return load_predictor(folder, backend="torch", device="cpu")


def images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(40, 52), (64, 48), (33, 33), (90, 70)]
    return [rng.integers(0, 256, shapes[i % len(shapes)], dtype=np.uint8) for i in range(count)]


def reference(predictor, gray: np.ndarray) -> np.ndarray:
    """One image through the model alone, preprocessed without cxr, calibrated by hand."""
    batch = torch.from_numpy(reference_input(gray, SIZE))[None]
    with torch.no_grad():
        logits = predictor.torch_model(batch).double()
    return torch.sigmoid(logits / TEMPERATURE).numpy()[0]


class Gate:
    """Wraps ``predictor.scores``: records each call's batch size; while closed, every
    call waits until the test opens the gate."""

    def __init__(self, predictor, monkeypatch, fail_first: bool = False):
        self.original = predictor.scores
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self.open = threading.Event()
        self.fail_first = fail_first
        monkeypatch.setattr(predictor, "scores", self)

    def __call__(self, batch):
        self.sizes.append(len(batch))
        self.entered.set()
        assert self.open.wait(HANG_GUARD_S), "the test never opened the gate"
        if self.fail_first and len(self.sizes) == 1:
            raise RuntimeError("the first batch fails")
        return self.original(batch)


def test_concurrent_images_are_batched_and_each_gets_its_own_probabilities(predictor, monkeypatch):
    gate = Gate(predictor, monkeypatch)
    metrics = ServiceMetrics()
    worker = BatchedPredictor(predictor, max_batch=4, max_wait_ms=0, metrics=metrics)
    grays = images(7)
    try:
        first = worker.submit(grays[0])
        assert gate.entered.wait(HANG_GUARD_S)  # the model is busy with image 0 ...
        rest = [worker.submit(g) for g in grays[1:]]  # ... so the other six queue
        assert metrics.registry.get_sample_value("cxr_inference_queue_depth") == 6
        gate.open.set()
        futures = [first, *rest]
        done, _ = wait(futures, timeout=HANG_GUARD_S)
        assert len(done) == 7
    finally:
        worker.close()
    assert gate.sizes == [1, 4, 2]
    for gray, future in zip(grays, futures):
        got = future.result()
        assert got.shape == (len(LABELS),) and got.dtype == np.float64
        np.testing.assert_allclose(got, reference(predictor, gray), rtol=0, atol=2e-6)
    text = metrics.render().decode()
    assert "cxr_inference_batch_size_count 3.0" in text
    assert "cxr_inference_batch_size_sum 7.0" in text
    assert "cxr_inference_queue_depth 0.0" in text


def test_a_full_queue_refuses_at_once(predictor, monkeypatch):
    gate = Gate(predictor, monkeypatch)
    metrics = ServiceMetrics()
    worker = BatchedPredictor(predictor, max_batch=2, max_wait_ms=0, max_queue=3, metrics=metrics)
    grays = images(5)
    try:
        running = worker.submit(grays[0])
        assert gate.entered.wait(HANG_GUARD_S)
        queued = [worker.submit(g) for g in grays[1:4]]
        with pytest.raises(ServiceBusy, match="queue is full"):
            worker.submit(grays[4])
        gate.open.set()
        assert len(wait([running, *queued], timeout=HANG_GUARD_S).done) == 4
        later = worker.submit(grays[4])  # room again
        np.testing.assert_allclose(
            later.result(HANG_GUARD_S), reference(predictor, grays[4]), atol=2e-6
        )
    finally:
        worker.close()
    assert 'cxr_refusals_total{reason="queue_full"} 1.0' in metrics.render().decode()


def test_expired_and_cancelled_images_never_reach_the_model(predictor, monkeypatch):
    gate = Gate(predictor, monkeypatch)
    metrics = ServiceMetrics()
    worker = BatchedPredictor(predictor, max_batch=8, max_wait_ms=0, metrics=metrics)
    grays = images(4)
    try:
        first = worker.submit(grays[0])
        assert gate.entered.wait(HANG_GUARD_S)
        expired = worker.submit(grays[1], deadline=0.0)  # long past on the monotonic clock
        cancelled = worker.submit(grays[2])
        assert cancelled.cancel()
        kept = worker.submit(grays[3])
        gate.open.set()
        assert len(wait([first, expired, kept], timeout=HANG_GUARD_S).done) == 3
    finally:
        worker.close()
    assert gate.sizes == [1, 1]  # the second call carried only the kept image
    with pytest.raises(DeadlineExceeded):
        expired.result()
    np.testing.assert_allclose(kept.result(), reference(predictor, grays[3]), atol=2e-6)
    text = metrics.render().decode()
    assert 'cxr_refusals_total{reason="deadline"} 1.0' in text
    assert 'cxr_refusals_total{reason="cancelled"} 1.0' in text


def test_a_failing_batch_fails_only_its_own_images(predictor, monkeypatch):
    gate = Gate(predictor, monkeypatch, fail_first=True)
    worker = BatchedPredictor(predictor, max_batch=4, max_wait_ms=0)
    grays = images(3)
    try:
        doomed = worker.submit(grays[0])
        assert gate.entered.wait(HANG_GUARD_S)
        fine = [worker.submit(g) for g in grays[1:]]
        gate.open.set()
        with pytest.raises(RuntimeError, match="first batch fails"):
            doomed.result(HANG_GUARD_S)
        for gray, future in zip(grays[1:], fine):
            np.testing.assert_allclose(
                future.result(HANG_GUARD_S), reference(predictor, gray), atol=2e-6
            )
    finally:
        worker.close()
    assert gate.sizes == [1, 2]


def test_close_drains_the_queue(predictor):
    worker = BatchedPredictor(predictor, max_batch=3, max_wait_ms=50)
    grays = images(5)
    futures = [worker.submit(g) for g in grays]
    worker.close(timeout=HANG_GUARD_S)
    for gray, future in zip(grays, futures):
        np.testing.assert_allclose(future.result(0), reference(predictor, gray), atol=2e-6)
    with pytest.raises(WorkerClosed):
        worker.submit(grays[0])


def test_close_never_hangs_on_a_stuck_model(predictor, monkeypatch):
    gate = Gate(predictor, monkeypatch)  # never opened before close
    worker = BatchedPredictor(predictor, max_batch=1, max_wait_ms=0)
    try:
        stuck = worker.submit(images(1)[0])
        assert gate.entered.wait(HANG_GUARD_S)
        queued = worker.submit(images(1, seed=1)[0])
        worker.close(timeout=0.1)
        # Both failed by close, not left pending for ever.
        for future in (stuck, queued):
            with pytest.raises(WorkerClosed):
                future.result(0)
    finally:
        gate.open.set()  # the abandoned call returns; its result goes nowhere


def test_predict_awaits_from_asyncio(predictor):
    worker = BatchedPredictor(predictor, max_batch=4, max_wait_ms=20)
    grays = images(6, seed=5)

    async def main():
        return await asyncio.gather(*(worker.predict(g) for g in grays))

    try:
        results = asyncio.run(asyncio.wait_for(main(), HANG_GUARD_S))
    finally:
        worker.close()
    for gray, got in zip(grays, results):
        np.testing.assert_allclose(got, reference(predictor, gray), atol=2e-6)


def test_only_2d_uint8_images_and_sane_settings_are_accepted(predictor):
    worker = BatchedPredictor(predictor)
    try:
        for bad in (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32), [[1, 2]]):
            with pytest.raises(ImageError, match="2-D uint8"):
                worker.submit(bad)
        with pytest.raises(ImageError, match="empty"):
            worker.submit(np.zeros((0, 5), np.uint8))
    finally:
        worker.close()
    for settings in ({"max_batch": 0}, {"max_batch": True}, {"max_wait_ms": -1},
                     {"max_wait_ms": float("nan")}, {"max_queue": 0}):  # fmt: skip
        with pytest.raises(ConfigError):
            BatchedPredictor(predictor, **settings)
