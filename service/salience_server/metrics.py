"""Prometheus metrics, created against a registry that is passed in.

Nothing registers globally, so every server (and every test) gets its own set.
Latencies are histograms with their unit in the name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from salience_server.errors import Call

log = logging.getLogger(__name__)

# Spans a cached small-model call (ms) to a large batch on CPU (tens of seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Queue waits start well below a millisecond (the batching delay is a few ms).
QUEUE_WAIT_BUCKETS = (0.0001, 0.00025, 0.0005, *LATENCY_BUCKETS)
# Samples per device call: the default padding buckets, and beyond.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Message sizes: an empty metadata request (bytes) to the default 64 MiB message cap.
BYTES_BUCKETS = tuple(float(4**i) for i in range(2, 14))
# Every state a model version can be in (repository.VersionStatus.state).
VERSION_STATES = ("loading", "ready", "failed", "unloading")


class Metrics:
    """The server's metric families."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Label children by label values, so a request's updates skip `labels()`;
        # bounded as the label sets are (known models, methods, codes).
        self._by_rpc: dict[str, tuple[Any, Any, Any]] = {}
        self._call_children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
        # `model` is a model the repository knows, else "" (a caller cannot grow the
        # label set by naming models); `method` is the explanation method for
        # Explain, "predict" for Predict and "" for the other RPCs.
        self.requests = Counter(
            "salience_requests",
            "RPCs answered, by RPC, model, method and status code",
            ["rpc", "model", "method", "code"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "salience_request_duration_seconds",
            "Time from receiving an RPC to answering it",
            ["rpc", "model", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_bytes = Histogram(
            "salience_request_bytes",
            "Serialized size of each request message",
            ["rpc"],
            buckets=BYTES_BUCKETS,
            registry=registry,
        )
        self.response_bytes = Histogram(
            "salience_response_bytes",
            "Serialized size of each response message (answered with OK)",
            ["rpc"],
            buckets=BYTES_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "salience_requests_in_flight",
            "RPCs received and not yet answered",
            ["rpc"],
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
        self.padding = Counter(
            "salience_padding_samples",
            "Pad rows added to device calls to reach a batch bucket: device work that no "
            "request asked for",
            ["model"],
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
        # Its queue's max_queue_size, so "how full" is depth / capacity in one query
        # even where models are configured with different sizes.
        self.queue_capacity = Gauge(
            "salience_queue_capacity",
            "Most samples a model's queue holds (max_queue_size); more are refused",
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

    def observe(self, call: Call, known: Callable[[str], bool]) -> None:
        """Counts an RPC as it starts and once it is answered; `known(model)` says
        whether a model may appear as a label.
        """
        if not call.done:
            self._rpc_children(call.rpc)[0].inc()
            return
        in_flight, request_bytes, response_bytes = self._rpc_children(call.rpc)
        in_flight.dec()
        model = call.model if call.model and known(call.model) else ""
        code = call.code.name
        key = (call.rpc, model, call.method, code)
        children = self._call_children.get(key)
        if children is None:
            children = (
                self.requests.labels(*key),
                self.request_seconds.labels(call.rpc, model, call.method),
            )
            self._call_children[key] = children
        children[0].inc()
        children[1].observe(call.seconds)
        request_bytes.observe(call.request_bytes)
        if code == "OK":
            response_bytes.observe(call.response_bytes)

    def _rpc_children(self, rpc: str) -> tuple[Any, Any, Any]:
        """The per-RPC series, looked up once: `labels()` costs more than the update,
        and this runs twice per request.
        """
        children = self._by_rpc.get(rpc)
        if children is None:
            children = (
                self.in_flight.labels(rpc),
                self.request_bytes.labels(rpc),
                self.response_bytes.labels(rpc),
            )
            self._by_rpc[rpc] = children
        return children

    def track_model_versions(self, read: Callable[[], Iterable[tuple[str, str]]]) -> None:
        """Adds `salience_model_versions{model, state}`: how many versions of each
        model are in each state, read from `read` ((model, state) per version) at
        every scrape, so it follows loads, reloads and failures without hooks.
        """
        self.registry.register(_VersionsCollector(read))

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


class _VersionsCollector(Collector):
    """Counts model versions by state at scrape time."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str]]]) -> None:
        self._read = read

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Described without reading: registration happens before anything loaded.
        return [self._family()]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "salience_model_versions",
            "Model versions the server knows, by state (loading, ready, failed, unloading)",
            labels=["model", "state"],
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        counts: dict[tuple[str, str], int] = {}
        try:
            for model, state in self._read():
                counts[model, state] = counts.get((model, state), 0) + 1
        except Exception:  # a scrape must not fail because a reload changed the repository
            log.debug("model versions not readable during this scrape", exc_info=True)
            counts = {}
        # Every state of a known model is present (0 too), so alerts need no absent().
        for model in sorted({m for m, _ in counts}):
            for state in VERSION_STATES:
                family.add_metric([model, state], counts.get((model, state), 0))
        yield family
