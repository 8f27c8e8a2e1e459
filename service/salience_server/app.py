"""Server wiring: the Salience servicer, the standard health service, server
reflection, message size limits, metrics, and an ordered shutdown.

Shutdown on SIGTERM/SIGINT: health goes NOT_SERVING, the server stops accepting and
lets in-flight calls finish within the grace period (the batchers send what is
queued without waiting), then the batchers and threads are drained and the models
released — never the model before the calls.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from salience.v1 import salience_pb2, salience_pb2_grpc
from salience_server.core import InferenceCore
from salience_server.demo import bundled_repository
from salience_server.errors import ErrorInterceptor
from salience_server.metrics import Metrics
from salience_server.plugins import load_plugins
from salience_server.repository import ModelRepository
from salience_server.servicer import SalienceServicer
from salience_server.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = salience_pb2.DESCRIPTOR.services_by_name["Salience"].full_name


class SalienceServer:
    """A running salience server; `start` loads the models and binds the port."""

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
        self.port = 0
        self.metrics_port: int | None = None

    @property
    def repository_root(self) -> Path:
        return self.settings.model_repository or bundled_repository()

    def _observe(self, rpc: str, code: grpc.StatusCode, seconds: float) -> None:
        self.metrics.requests.labels(rpc, code.name).inc()
        self.metrics.request_seconds.labels(rpc).observe(seconds)

    async def start(self) -> int:
        """Loads and warms up every model, then serves; returns the bound port."""
        # Plugins first: their modifiers must exist before models list what they support.
        await asyncio.to_thread(load_plugins, self.settings.plugins)
        repository = self._repository
        if repository is None:
            # Loading is blocking TensorFlow work: keep it off the event loop.
            repository = await asyncio.to_thread(ModelRepository.load, self.repository_root)
        self.core = InferenceCore(repository, self.settings, self.metrics)
        limit = self.settings.max_message_bytes
        server = aio.server(
            interceptors=[ErrorInterceptor(self._observe)],
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
            ],
        )
        salience_pb2_grpc.add_SalienceServicer_to_server(SalienceServicer(self.core), server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as err:  # grpcio reports a failed bind as a bare RuntimeError
            raise OSError(f"cannot listen on {address}: {err}") from None
        await server.start()
        self._server = server
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(self.settings.metrics_port, self.settings.host)
        log.info(
            "serving %s on %s:%d (metrics on %s) from %s",
            ", ".join(repository.names()),
            self.settings.host,
            self.port,
            self.metrics_port if self.metrics_port is not None else "off",
            self.repository_root,
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Ordered shutdown: NOT_SERVING, drain in-flight calls, then release models."""
        if self._server is None:
            return
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.core is not None:
            # Queued requests go to the device at once, so in-flight calls can
            # finish within the grace instead of waiting for batch company.
            self.core.drain()
        await self._server.stop(grace)
        if self.core is not None:
            await self.core.aclose()
        self._server = None
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def run(settings: Settings) -> None:
    """Serves until SIGTERM or SIGINT, then shuts down in order."""
    server = SalienceServer(settings)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info(
        "shutting down: finishing in-flight calls for up to %.1fs", settings.shutdown_grace_seconds
    )
    await server.stop()


def serve(settings: Settings) -> None:
    """Blocking entry point used by `salience serve` and `python -m salience_server`."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(run(settings))
