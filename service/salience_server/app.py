"""Server wiring: the Salience servicer and, on the same port, the Open Inference
Protocol's (`oip`), the standard health service, server reflection, message size
limits, metrics, readiness and an ordered shutdown.

Start-up: the device is chosen (and GPU memory growth turned on) before any op,
then the port is bound and the health service answers at once, NOT_SERVING, while
the models load in the background. Each model turns SERVING under its own health
service name (the model's name) once every loaded version of it is warmed up; the
server (services "" and `salience.v1.Salience`) turns SERVING when every model is
ready or failed, at least one ready. A model that fails is logged and reported; if
none loads, `wait_ready` raises RepositoryError and `run` stops the server.

Hot reload: once loaded, a repository given by `model_repository` is polled every
`repository_poll_seconds` (`reload`): new, changed and removed models and versions
are loaded, swapped in and retired while the server serves; a model's health entry
follows it (SERVING once served, NOT_SERVING once removed).

Shutdown on SIGTERM/SIGINT: new requests are refused (UNAVAILABLE: retry on another
server) and health goes NOT_SERVING, while in-flight calls finish within the grace
period (the batchers send what is queued without waiting); then the gRPC server
stops, cutting calls still running (UNAVAILABLE) and health Watch streams, which
would otherwise hold the shutdown for the whole grace. Then the batchers and
threads are drained and the models released — never the model before the calls; a
device call in progress finishes first, so a process outlives its grace by at most
one device call. Further signals change nothing: the grace already bounds the
shutdown.

Logs: repeated warnings (refused calls, under a flood) are rate-limited with a
count of what was left out (`logs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import time
from pathlib import Path

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from inference.v2 import grpc_service_pb2_grpc
from salience.v1 import salience_pb2, salience_pb2_grpc
from salience_server import connections, devices, logs
from salience_server.core import InferenceCore
from salience_server.demo import bundled_repository
from salience_server.devices import Placement
from salience_server.errors import Call, ErrorInterceptor
from salience_server.logs import RepeatLimiter
from salience_server.metrics import Metrics
from salience_server.oip import SERVICE_NAME as OIP_SERVICE_NAME
from salience_server.oip import OipServicer
from salience_server.plugins import load_plugins
from salience_server.reload import RepositoryWatcher, cancel
from salience_server.repository import (
    LOADING,
    READY,
    ModelRepository,
    RepositoryError,
    relative_paths,
    scan,
)
from salience_server.security import load_security, metrics_security
from salience_server.servicer import SalienceServicer
from salience_server.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = salience_pb2.DESCRIPTOR.services_by_name["Salience"].full_name
# Clients may ping an idle connection every 10 s or more (the salience client pings
# after 30 s without traffic, to notice connections dropped by NATs and load
# balancers); gRPC's server defaults — 5 min, and no pings at all without calls in
# flight — answer such pings with GOAWAY too_many_pings.
MIN_CLIENT_PING_INTERVAL_MS = 10_000


class SalienceServer:
    """A running salience server: `start` binds the port and starts loading the
    models, `wait_ready` waits until they are loaded and warmed up.
    """

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        repository: ModelRepository | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics(registry if registry is not None else CollectorRegistry())
        self._repository = repository
        self._server: aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self.core: InferenceCore | None = None
        self.placement = Placement()
        self._loading: asyncio.Task[None] | None = None
        self.watcher: RepositoryWatcher | None = None
        self._watching: asyncio.Task[None] | None = None
        self.port = 0
        self.metrics_port: int | None = None
        # Calls the interceptor sees (the RPCs that do work) still running: a
        # shutdown waits for these, not for health Watch streams (`_stop_serving`).
        self._working = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # What the Open Inference Protocol's ServerReady and ModelReady report: the
        # server health's SERVING, and whether shutdown has begun.
        self._serving = False
        self._stopping = False

    @property
    def repository_root(self) -> Path:
        return self.settings.model_repository or bundled_repository()

    def _observe(self, call: Call) -> None:
        self.metrics.observe(call, self._known_models)
        self._working += -1 if call.done else 1
        if self._working:
            self._idle.clear()
        else:
            self._idle.set()

    def _known_models(self, name: str) -> bool:
        return self.core is not None and self.core.repository.knows(name)

    def _version_states(self) -> list[tuple[str, str]]:
        """(model, state) for every version, as ListModels reports them: a loaded
        version stays `loading` until its model is warmed up.
        """
        core = self.core
        if core is None:
            return []
        repository = core.repository
        found = []
        for name in sorted(repository.known()):
            warming = core.state(name) == LOADING
            for status in repository.statuses(name):
                state = LOADING if warming and status.state == READY else status.state
                found.append((name, state))
        return found

    async def start(self) -> int:
        """Binds the port with every health status NOT_SERVING, starts loading the
        models in the background, and returns the bound port (see `wait_ready`).

        Raises SettingsError when the device asked for is absent, or a TLS or token
        file cannot be used.
        """
        # First, so a bad certificate or token file stops start-up at once.
        security = await asyncio.to_thread(load_security, self.settings)
        metrics_secured = await asyncio.to_thread(metrics_security, self.settings)
        # Before any TensorFlow op: memory growth can only be set on a fresh GPU.
        self.placement = await asyncio.to_thread(devices.configure, self.settings)
        # Plugins next: their modifiers must exist before models list what they support.
        await asyncio.to_thread(load_plugins, self.settings.plugins)
        if self._repository is not None:
            expected = self._repository.names()
        else:
            expected = sorted(
                await asyncio.to_thread(
                    scan, self.repository_root, self.settings.allow_links_outside_repository
                )
            )
        self.core = InferenceCore(None, self.settings, self.metrics)
        self.core.expect(expected)
        self.metrics.track_model_versions(self._version_states)
        # Before the port opens: a flood must meet the cap, not the descriptor limit.
        before, fd_limit = connections.raise_fd_limit()
        cap = connections.connection_cap(self.settings, fd_limit)
        log.info(
            "open-files limit %d%s; at most %d client connections",
            fd_limit,
            f" (raised from {before})" if fd_limit != before else "",
            cap,
        )
        limit = self.settings.max_message_bytes
        options: list[tuple[str, int]] = [
            # The port is this server's alone: with gRPC's default SO_REUSEPORT a second
            # server started on a taken port would bind it too and split the traffic
            # silently; without it, that second bind fails and is refused (BindError).
            ("grpc.so_reuseport", 0),
            *connections.channel_options(self.settings, cap),
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
            # One connection cannot hold an unbounded number of calls (and their
            # streams' windows of frames); other connections are not affected.
            ("grpc.max_concurrent_streams", self.settings.max_concurrent_streams),
        ]
        if self.settings.max_connection_age_seconds > 0:
            options += [
                (
                    "grpc.max_connection_age_ms",
                    round(self.settings.max_connection_age_seconds * 1e3),
                ),
                (
                    "grpc.max_connection_age_grace_ms",
                    round(self.settings.shutdown_grace_seconds * 1e3),
                ),
            ]
        interceptors: list[aio.ServerInterceptor] = [ErrorInterceptor(self._observe)]
        if security.interceptor is not None:
            # Inside the error interceptor, which so counts refused calls as UNAUTHENTICATED.
            interceptors.append(security.interceptor)
        server = aio.server(interceptors=interceptors, options=options)
        salience_pb2_grpc.add_SalienceServicer_to_server(SalienceServicer(self.core), server)
        # The Open Inference Protocol on the same port, over the same core.
        oip = OipServicer(
            self.core, lambda: self._serving and not self._stopping, lambda: self._stopping
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(oip, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, OIP_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            if security.credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, security.credentials)
        except RuntimeError as err:  # grpcio reports a failed bind as a bare RuntimeError
            raise BindError("gRPC", address, "port", str(err)) from None
        for service in ("", SERVICE_NAME, *self._model_services(expected)):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        if self.placement.is_gpu:
            device = self.placement.device
            self.metrics.track_device_memory(device, lambda: devices.memory_info(device))
        if self.settings.metrics_port >= 0:
            try:
                self.metrics_port = self.metrics.serve(
                    self.settings.metrics_port,
                    self.settings.metrics_host or self.settings.host,
                    tls=metrics_secured.tls,
                    token_digests=metrics_secured.token_digests,
                )
            except OSError as err:
                # Stopped before refusing: a started gRPC server left for the garbage
                # collector fails noisily once the event loop is gone.
                await server.stop(0)
                self._server = None
                host = self.settings.metrics_host or self.settings.host
                address = f"{host}:{self.settings.metrics_port}"
                raise BindError(
                    "metrics", address, "metrics_port", err.strerror or str(err)
                ) from None
        log.info(
            "listening on %s:%d (%s; metrics on %s); loading %s from %s",
            self.settings.host,
            self.port,
            security.describe(),
            "off"
            if self.metrics_port is None
            else f"{self.metrics_port} ({metrics_secured.describe()}, "
            f"{self.settings.metrics_host or self.settings.host})",
            ", ".join(expected) or "nothing",
            self.repository_root,
        )
        self._loading = asyncio.create_task(self._load(), name="salience-load")
        poll = self.settings.repository_poll_seconds
        if poll > 0 and self._repository is None and self.settings.model_repository is not None:
            self._watching = asyncio.create_task(self._watch(poll), name="salience-watch")
        return self.port

    @staticmethod
    def _model_services(names: list[str]) -> list[str]:
        """Health service names of the models: their own names, except one that would
        shadow a service of the server.
        """
        reserved = {"", SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME}
        for name in sorted(set(names) & reserved):
            log.warning("model %s gets no health entry of its own: the name is a service's", name)
        return [name for name in names if name not in reserved]

    def _load_repository(self) -> ModelRepository:
        """Loads the repository with the server's placement (blocking TensorFlow work)."""
        with devices.placing(self.placement):
            return ModelRepository.load(
                self.repository_root,
                warm_up=False,
                allow_links_outside=self.settings.allow_links_outside_repository,
            )

    async def _load(self) -> None:
        """Loads the models, warms each up and turns it SERVING; then the server."""
        core, health_servicer = self.core, self._health
        assert core is not None  # set by start
        assert health_servicer is not None
        serving = health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        try:
            repository = self._repository
            if repository is None:
                repository = await asyncio.to_thread(self._load_repository)
        except Exception as err:
            log.error(
                "no model can be served: %s", err, exc_info=not isinstance(err, RepositoryError)
            )
            # Told to clients: paths relative to the repository, never the server's.
            core.fail_loading(relative_paths(str(err), self.repository_root) or type(err).__name__)
            if isinstance(err, RepositoryError):
                raise
            raise RepositoryError(f"loading the models failed: {err}") from err
        core.attach(repository)
        services = set(self._model_services(repository.names()))
        for name in repository.names():
            try:
                for version in repository.versions(name):
                    runtime = repository.get(name, version)
                    await asyncio.to_thread(core.warm_up, runtime)
            except Exception as err:
                reason = " ".join(str(err).split())[:300] or type(err).__name__
                reason = relative_paths(reason, self.repository_root)
                log.error("model %s failed to warm up: %s", name, reason, exc_info=True)
                core.set_failed(name, reason)
                continue
            core.set_ready(name)
            if name in services:
                await health_servicer.set(name, serving)
            log.info(
                "model %s is ready, %.1fs after the port opened", name, time.monotonic() - started
            )
        ready = core.ready_names()
        if not ready:
            raise RepositoryError(
                f"no model under {self.repository_root} could be served: every one failed "
                "to load or warm up (see the log above)"
            )
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, serving)
        self._serving = True
        log.info(
            "serving %s on %s:%d, %.1fs after the port opened",
            ", ".join(ready),
            self.settings.host,
            self.port,
            time.monotonic() - started,
        )

    async def wait_ready(self) -> None:
        """Returns once every model is loaded and warmed up, or failed with at least
        one ready; raises RepositoryError when no model can be served.
        """
        if self._loading is not None:
            await asyncio.shield(self._loading)

    async def _watch(self, poll_seconds: float) -> None:
        """Hot reload, from the end of the first load (none when it served nothing)."""
        assert self._loading is not None  # set by start
        assert self.core is not None
        try:
            await asyncio.shield(self._loading)
        except Exception:
            return  # logged by _load, and the run stops
        self.watcher = RepositoryWatcher(
            self.repository_root,
            self.core,
            poll_seconds,
            placement=self.placement,
            on_serving=self._model_serving,
            allow_links_outside=self.settings.allow_links_outside_repository,
        )
        await self.watcher.run()

    async def _model_serving(self, name: str, serving: bool) -> None:
        """A model reloaded into service, or removed: its health entry follows."""
        if self._health is not None and self._model_services([name]):
            status = health_pb2.HealthCheckResponse
            await self._health.set(name, status.SERVING if serving else status.NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Ordered shutdown: refuse new requests and go NOT_SERVING, let in-flight
        calls finish within the grace, then release the models.
        """
        if self._server is None:
            return
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        self._stopping = True
        if self.core is not None:
            # New requests are refused (UNAVAILABLE) from before health says
            # NOT_SERVING, so a caller that saw NOT_SERVING is never admitted; queued
            # ones go to the device at once, so in-flight calls can finish within
            # the grace instead of waiting for batch company.
            self.core.drain()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._loading is not None:
            if not self._loading.done():
                # A load still running on its thread finishes there, unused.
                self._loading.cancel()
            elif not self._loading.cancelled():
                self._loading.exception()  # retrieved: it was logged when it happened
        # No reload may swap models in while they are being released.
        await cancel(self._watching)
        if self.core is not None:
            self.core.drain()  # again: batchers a reload made meanwhile
        await self._stop_serving(self._server, grace)
        if self.watcher is not None:
            await self.watcher.aclose()  # versions being retired, now without requests
        if self.core is not None:
            await self.core.aclose()
        self.metrics.close()
        self._server = None
        log.info("stopped")

    async def _stop_serving(self, server: aio.Server, grace: float) -> None:
        """Lets the calls in flight finish within `grace` while new ones are refused
        (UNAVAILABLE, by the drained batchers), then stops the gRPC server, cutting
        what is left: calls that outlast the grace, and health Watch streams, which
        never end by themselves and would hold every shutdown for the whole grace.

        The port stays open until then: a stopping gRPC server answers a call that
        reaches one of its open connections with CANCELLED, which callers do not
        retry, where UNAVAILABLE sends them to another server.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        await server.stop(0)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _held(address: str) -> bool:
    """Whether something else listens on `address` (host:port) now: a plain bind of
    it fails with EADDRINUSE.
    """
    host, _, port = address.rpartition(":")
    try:
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host.strip("[]"), int(port)))
    except OSError as err:
        return err.errno == errno.EADDRINUSE
    except ValueError:
        return False
    return False


class BindError(OSError):
    """A port the server cannot listen on: names the setting that chose it, its
    address, and what to do about it.
    """

    def __init__(self, what: str, address: str, setting: str, reason: str) -> None:
        flag = "--" + setting.replace("_", "-")
        env = "SALIENCE_" + setting.upper()
        cause = "another process holds it" if _held(address) else reason
        super().__init__(
            f"cannot listen for {what} on {address} ({flag} / {env}): {cause}. "
            f"Choose a free port with {flag} or {env} (0 picks one), or stop the process "
            "that holds it"
        )


async def run(settings: Settings, limiter: RepeatLimiter | None = None) -> None:
    """Serves until SIGTERM or SIGINT, then shuts down in order; `limiter`'s
    summaries of the warnings it left out are written as their windows end.
    """
    server = SalienceServer(settings)
    await server.start()
    summaries = None
    if limiter is not None and limiter.burst > 0:
        summaries = asyncio.create_task(_summarise(limiter), name="salience-log-summaries")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    # A signal may come while the models load; a load that serves nothing ends the run.
    ready = asyncio.create_task(server.wait_ready())
    stopped = asyncio.create_task(stopping.wait())
    await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
    error = ready.exception() if ready.done() else None
    if error is not None:
        stopped.cancel()
        if summaries is not None:
            summaries.cancel()
        await server.stop(grace=0)
        raise error
    await stopped
    ready.cancel()
    if summaries is not None:
        summaries.cancel()
    log.info(
        "shutting down: finishing in-flight calls for up to %.1fs", settings.shutdown_grace_seconds
    )
    await server.stop()


async def _summarise(limiter: RepeatLimiter) -> None:
    """Writes the limiter's summaries as their windows end."""
    while True:
        await asyncio.sleep(limiter.window)
        limiter.flush(expired_only=True)


def serve(settings: Settings) -> None:
    """Blocking entry point used by `salience serve` and `python -m salience_server`."""
    limiter = logs.setup(
        settings.log_level, settings.log_repeat_burst, settings.log_repeat_window_seconds
    )
    try:
        asyncio.run(run(settings, limiter))
    finally:
        limiter.flush()  # what was left out since the last summary
