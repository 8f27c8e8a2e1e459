"""Prometheus metrics, created against a registry that is passed in.

Nothing registers globally, so every server (and every test) gets its own set.
Latencies are histograms with their unit in the name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Spans a cached small-model call (ms) to a large batch on CPU (tens of seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Queue waits start well below a millisecond (the batching delay is a few ms).
QUEUE_WAIT_BUCKETS = (0.0001, 0.00025, 0.0005, *LATENCY_BUCKETS)
# Samples per device call: the default padding buckets, and beyond.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


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
            "Time a model spends on one device call (a batch of requests), finish included",
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
        self.queue_wait_seconds = Histogram(
            "salience_queue_wait_seconds",
            "Time a request waits in its model's queue before its device call starts",
            ["model"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "salience_batch_size",
            "Samples in one device call (padding not counted)",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_requests = Histogram(
            "salience_batch_requests",
            "Requests merged into one device call (a request split across calls counts in each)",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "salience_queue_depth",
            "Samples waiting in a model's queue for the device",
            ["model"],
            registry=registry,
        )
        self.refused = Counter(
            "salience_requests_refused",
            "Requests that never reached the device: queue_full (refused at once), "
            "deadline_exceeded or cancelled (dropped from the queue)",
            ["model", "reason"],
            registry=registry,
        )

    def track_device_memory(self, device: str, read: Callable[[], Mapping[str, int]]) -> None:
        """Adds `salience_device_memory_bytes{device, stat}`: the bytes TensorFlow holds
        on `device` now (`current`) and at most (`peak`), read at every scrape. Only
        devices that report it (GPUs) get it; a CPU has no such gauge.
        """
        gauge = Gauge(
            "salience_device_memory_bytes",
            "Device memory held by TensorFlow: current and peak bytes",
            ["device", "stat"],
            registry=self.registry,
        )

        def stat(key: str) -> Callable[[], float]:
            def value() -> float:
                try:
                    return float(read()[key])
                except Exception:  # a scrape must not fail because the device did
                    return math.nan

            return value

        for key in ("current", "peak"):
            gauge.labels(device, key).set_function(stat(key))

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Exposes /metrics over HTTP on a daemon thread; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])
