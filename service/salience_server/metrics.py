"""Prometheus metrics, created against a registry that is passed in.

Nothing registers globally, so every server (and every test) gets its own set.
Latencies are histograms with their unit in the name.

The /metrics endpoint (`Metrics.serve`) binds its own address
(`metrics_host`, default the gRPC port's), and, like the gRPC port, may speak TLS
(`metrics_tls_cert_file`, with client certificates: `metrics_tls_client_ca_file`)
and ask for a bearer token (`metrics_auth_token_file`; Prometheus sends one with
`authorization: {credentials_file: ...}`), since it shows model names, versions and
traffic. It is bounded like the gRPC port: a connection that sends nothing for
`METRICS_TIMEOUT_SECONDS` is closed, and at most `MAX_METRICS_CONNECTIONS` are
served at once (more are closed at once), so a flood of silent connections holds
neither its threads nor the process's file descriptors.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from salience_server import readiness
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
# Every state a model version can be in, listed for each known model.
VERSION_STATES = readiness.VERSION_STATES


class Metrics:
    """The server's metric families."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Label children by label values, so a request's updates skip `labels()`;
        # bounded as the label sets are (known models, methods, codes).
        self._by_rpc: dict[str, tuple[Any, Any, Any]] = {}
        self._call_children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
        self._http: _MetricsServer | None = None  # the /metrics endpoint, once served
        # What /metrics shows: the registry, or with front-end processes the registry
        # and theirs merged (`procs.owner`).
        self.exposed: CollectorRegistry = registry
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
            # Front-end processes (`procs`): the sum over those alive.
            multiprocess_mode="livesum",
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
        # In the cost model's unit (salience_server.cost): what requests asked the
        # device to do, admitted to a lane's queue or refused before any work.
        self.cost_admitted = Counter(
            "salience_request_cost_admitted",
            "Element-evaluations (rows x evaluations x input elements) of requests "
            "admitted to a model's queue, by lane (light: Predicts and cheap explanations)",
            ["model", "lane"],
            registry=registry,
        )
        self.cost_refused = Counter(
            "salience_request_cost_refused",
            "Element-evaluations of requests refused before any device work: over_cap "
            "(over max_request_cost or max_map_bytes, INVALID_ARGUMENT) or queue_full "
            "(RESOURCE_EXHAUSTED)",
            ["model", "reason"],
            registry=registry,
        )
        self.queue_cost = Gauge(
            "salience_queue_cost",
            "Element-evaluations waiting in a model's queue for the device, by lane",
            ["model", "lane"],
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

    def serve(
        self,
        port: int,
        host: str = "0.0.0.0",
        *,
        tls: ssl.SSLContext | None = None,
        token_digests: Sequence[bytes] = (),
    ) -> int:
        """Exposes /metrics over HTTP (HTTPS with `tls`; asking for a bearer token
        whose SHA-256 digest is one of `token_digests`, when given) on a daemon
        thread; returns the bound port.
        """
        app = make_wsgi_app(self.exposed)
        if token_digests:
            app = _bearer_guard(app, tuple(token_digests))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("MetricsServer", (_MetricsServer,), {"address_family": family})
        server: WSGIServer = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        assert isinstance(server, _MetricsServer)
        server.tls = tls
        thread = threading.Thread(target=server.serve_forever, name="salience-metrics", daemon=True)
        thread.start()
        self._http = server
        return int(server.server_address[1])

    def close(self) -> None:
        """Stops the /metrics endpoint, if it was served."""
        server, self._http = self._http, None
        if server is not None:
            server.shutdown()
            server.server_close()


# A scrape that sends nothing (or does not finish its TLS handshake) this long is
# dropped; Prometheus's own scrape timeout is 10 s by default.
METRICS_TIMEOUT_SECONDS = 10.0
# Scrapes served at once: a few scrapers need a handful; more are closed at once.
MAX_METRICS_CONNECTIONS = 32


class _QuietHandler(WSGIRequestHandler):
    """No line per scrape on stderr; a time-out per connection."""

    timeout = METRICS_TIMEOUT_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per scrape, at most MAX_METRICS_CONNECTIONS at once; the TLS
    handshake runs on that thread (never on the accepting one, which a silent
    client would otherwise hold).
    """

    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_METRICS_CONNECTIONS)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if isinstance(request, ssl.SSLSocket):
                request.settimeout(METRICS_TIMEOUT_SECONDS)
                try:
                    request.do_handshake()
                except (OSError, ssl.SSLError):
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away or timed out is not the server's error.
        log.debug("metrics request from %s failed", client_address, exc_info=True)


Wsgi = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

MISSING_METRICS_TOKEN = (
    b"this endpoint requires a bearer token: send `Authorization: Bearer <token>`\n"
)
WRONG_METRICS_TOKEN = b"the bearer token is not valid for this endpoint\n"


def _bearer_guard(app: Wsgi, digests: tuple[bytes, ...]) -> Wsgi:
    """`app`, answering 401 to a request without one of the tokens (compared by
    SHA-256 digest, every one in constant time, as the gRPC port does).
    """

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        scheme, _, credential = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            body = MISSING_METRICS_TOKEN
        else:
            presented = hashlib.sha256(credential.encode("utf-8", "replace")).digest()
            matched = False
            for digest in digests:
                matched |= hmac.compare_digest(presented, digest)
            if matched:
                return app(environ, start_response)
            body = WRONG_METRICS_TOKEN
        start_response(
            "401 Unauthorized",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("WWW-Authenticate", 'Bearer realm="salience metrics"'),
                ("Content-Length", str(len(body))),
            ],
        )
        return [body]

    return guarded


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
