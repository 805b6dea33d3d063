"""The DICOM node's counters for Prometheus (``cxr dicom listen --metrics-port``): read from
the node's own counts at each scrape, served on loopback only."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_COUNTERS = {
    "received": "Images acknowledged and spooled",
    "refused": "Instances refused with a failure status",
    "predicted": "Images predicted",
    "sent": "Reports the destination acknowledged",
    "failed": "Accepted images that got no report",
}


class NodeCollector:
    """Collects one node's counts, rejections by reason, and its queues' depths."""

    def __init__(self, node):
        self.node = node

    def collect(self):
        counts = self.node.counts
        with counts.lock:
            values = {name: getattr(counts, name) for name in _COUNTERS}
            rejected = dict(counts.rejected)
        for name, help_text in _COUNTERS.items():
            yield CounterMetricFamily(f"cxr_dicom_{name}", help_text, value=values[name])
        by_reason = CounterMetricFamily(
            "cxr_dicom_associations_rejected",
            "Associations rejected, by reason",
            labels=["reason"],
        )
        for reason, value in sorted(rejected.items()):
            by_reason.add_metric([reason], value)
        yield by_reason
        depth = GaugeMetricFamily(
            "cxr_dicom_queue_depth", "Images waiting, by stage", labels=["stage"]
        )
        for stage, size in self.node.queue_depths().items():
            depth.add_metric([stage], size)
        yield depth


def serve_metrics(node, port: int, host: str = "127.0.0.1"):
    """Serve ``/metrics`` for ``node`` on ``host:port`` (a daemon thread); returns the
    server (its ``server_address`` says the port when 0 was asked)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(NodeCollector(node))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
