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
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from grpc import aio
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from salience_server import connections, devices, frontdoor, logs
from salience_server.core import InferenceCore
from salience_server.demo import bundled_repository
from salience_server.devices import Placement
from salience_server.errors import Call
from salience_server.frontdoor import MIN_CLIENT_PING_INTERVAL_MS, SERVICE_NAME, BindError
from salience_server.logs import RepeatLimiter
from salience_server.metrics import Metrics
from salience_server.plugins import load_plugins
from salience_server.reload import RepositoryWatcher, cancel
from salience_server.repository import (
    ModelRepository,
    RepositoryError,
    relative_paths,
    scan,
)
from salience_server.security import load_security, metrics_security
from salience_server.settings import Settings

if TYPE_CHECKING:
    from salience_server.procs.owner import FrontEnds

__all__ = ["MIN_CLIENT_PING_INTERVAL_MS", "SERVICE_NAME", "BindError", "SalienceServer", "run"]

log = logging.getLogger(__name__)


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
        self._frontends: FrontEnds | None = None  # with settings.frontends > 1
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
        """(model, state) for every version, as ListModels reports them
        (`readiness.shown`: a loaded version stays `loading` until its model is
        warmed up).
        """
        core = self.core
        if core is None:
            return []
        return [
            (name, status.state)
            for name in sorted(core.repository.known())
            for status in core.statuses(name)
        ]

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
        if self.settings.frontends > 1:
            # Front-end processes serve the port; this one owns the device (`procs`).
            from salience_server.procs.owner import FrontEnds, MirroredHealth

            self._health = MirroredHealth()
            for service in ("", SERVICE_NAME, *self._model_services(expected)):
                await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            self._frontends = FrontEnds(self, security, cap)
            self.port = await self._frontends.start()
        else:
            server, self._health = frontdoor.build_server(
                self.settings,
                security,
                self.core,
                self._observe,
                cap,
                lambda: self._serving and not self._stopping,
                lambda: self._stopping,
            )
            self.port = frontdoor.bind(server, self.settings, security, self.settings.port)
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
                if self._server is not None:
                    await self._server.stop(0)
                    self._server = None
                if self._frontends is not None:
                    await self._frontends.stop(0)
                    self._frontends = None
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
        if self._server is None and self._frontends is None:
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
        if self._frontends is not None:
            # Each front end lets its calls finish within the grace, then stops.
            await self._frontends.stop(grace)
        elif self._server is not None:
            await self._stop_serving(self._server, grace)
        if self.watcher is not None:
            await self.watcher.aclose()  # versions being retired, now without requests
        if self.core is not None:
            await self.core.aclose()
        self.metrics.close()
        self._server = None
        self._frontends = None
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
