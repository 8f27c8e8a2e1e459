"""Prometheus metrics, created against a registry that is passed in.

Nothing registers globally, so every server (and every test) gets its own set.
Latencies are histograms with their unit in the name.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

# Spans a cached small-model call (ms) to a large batch on CPU (tens of seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The server's metric families."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "salience_requests",
            "RPCs answered, by method and status code",
            ["rpc", "code"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "salience_request_duration_seconds",
            "Time from receiving an RPC to answering it",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_seconds = Histogram(
            "salience_compute_duration_seconds",
            "Time a model spends computing one request on its device, checks included",
            ["model", "kind"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.samples = Counter(
            "salience_samples",
            "Samples (batch rows) computed, by model and kind (predict or explain)",
            ["model", "kind"],
            registry=registry,
        )

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Exposes /metrics over HTTP on a daemon thread; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])
