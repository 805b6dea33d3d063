"""Prometheus metrics of a service (``GET /metrics``), with prometheus-client.

Each :class:`ServiceMetrics` has a registry of its own, so that two apps in one process (the
tests make many) never share counters. Request metrics are labelled by endpoint from a fixed
list (:data:`ENDPOINTS`, anything else is ``other``) and by status code: a client that asks
for random paths cannot grow the label set.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

ENDPOINTS = frozenset(
    {"/", "/healthz", "/metrics", "/v1/predict", "/v1/explain", "/v1/results", "/docs"}
)
# Seconds: a cached answer in milliseconds up to a DenseNet121 batch on a slow CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    """The service's counters, histograms and gauges, and the model's identity."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, namespace: str = "cxr"):
        self.registry = CollectorRegistry(auto_describe=True)
        common = {"namespace": namespace, "registry": self.registry}
        self.requests = Counter(
            "http_requests", "HTTP requests answered", ["endpoint", "status"], **common
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time from a request's arrival to its answer",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            **common,
        )
        self.batch_sizes = Histogram(
            "inference_batch_size", "Images per model call", buckets=BATCH_BUCKETS, **common
        )
        self.batch_seconds = Histogram(
            "inference_batch_duration_seconds",
            "Time of one model call (a whole batch)",
            buckets=LATENCY_BUCKETS,
            **common,
        )
        self.queue_depth = Gauge("inference_queue_depth", "Images waiting for the model", **common)
        self.refusals = Counter(
            "refusals",
            "Work refused or dropped: queue_full, deadline, cancelled, unauthorized",
            ["reason"],
            **common,
        )
        self.model = Info("model", "The model served: weights digest, backend, labels", **common)

    def describe_model(self, **values: str) -> None:
        self.model.info({key: str(value) for key, value in values.items()})

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by endpoint and status."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an app that raises before answering: the server answers 500

        async def tracked(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            self.metrics.observe_request(scope["path"], status, time.perf_counter() - started)
