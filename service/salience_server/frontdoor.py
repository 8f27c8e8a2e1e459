"""The gRPC port's side of the server, without TensorFlow: the `aio` server with
its options, interceptors, servicers (Salience, the Open Inference Protocol,
health, reflection) and the bind, over any core with `InferenceCore`'s API.

The single-process server (`app`) builds it over its `InferenceCore`; each
front-end process (`procs.frontend`) over a `RemoteCore` that forwards to the
device owner. Either way the same code answers every RPC.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

from grpc import aio
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from inference.v2 import grpc_service_pb2_grpc
from salience.v1 import salience_pb2, salience_pb2_grpc
from salience_server import connections
from salience_server.core import InferenceCore
from salience_server.errors import ErrorInterceptor, Observer
from salience_server.oip import SERVICE_NAME as OIP_SERVICE_NAME
from salience_server.oip import OipServicer
from salience_server.security import Security
from salience_server.servicer import SalienceServicer
from salience_server.settings import Settings

SERVICE_NAME = salience_pb2.DESCRIPTOR.services_by_name["Salience"].full_name
# Clients may ping an idle connection every 10 s or more (the salience client pings
# after 30 s without traffic, to notice connections dropped by NATs and load
# balancers); gRPC's server defaults — 5 min, and no pings at all without calls in
# flight — answer such pings with GOAWAY too_many_pings.
MIN_CLIENT_PING_INTERVAL_MS = 10_000


def grpc_options(settings: Settings, cap: int, reuseport: bool) -> list[tuple[str, int]]:
    """The server's channel options. `reuseport` only for front ends, which share the
    port with each other (the device owner reserved it: `procs.owner`).
    """
    limit = settings.max_message_bytes
    options: list[tuple[str, int]] = [
        # The port is this server's alone: with gRPC's default SO_REUSEPORT a second
        # server started on a taken port would bind it too and split the traffic
        # silently; without it, that second bind fails and is refused (BindError).
        # Front ends join the group the owner made after a plain bind found it free.
        ("grpc.so_reuseport", 1 if reuseport else 0),
        *connections.channel_options(settings, cap),
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        # One connection cannot hold an unbounded number of calls (and their
        # streams' windows of frames); other connections are not affected.
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
    ]
    if settings.max_connection_age_seconds > 0:
        options += [
            ("grpc.max_connection_age_ms", round(settings.max_connection_age_seconds * 1e3)),
            ("grpc.max_connection_age_grace_ms", round(settings.shutdown_grace_seconds * 1e3)),
        ]
    return options


def build_server(
    settings: Settings,
    security: Security,
    core: InferenceCore,
    observe: Observer,
    cap: int,
    oip_ready: Callable[[], bool],
    oip_stopping: Callable[[], bool],
    reuseport: bool = False,
) -> tuple[aio.Server, health.aio.HealthServicer]:
    """The gRPC server with every service over `core` (not bound yet)."""
    interceptors: list[aio.ServerInterceptor] = [ErrorInterceptor(observe)]
    if security.interceptor is not None:
        # Inside the error interceptor, which so counts refused calls as UNAUTHENTICATED.
        interceptors.append(security.interceptor)
    server = aio.server(interceptors=interceptors, options=grpc_options(settings, cap, reuseport))
    salience_pb2_grpc.add_SalienceServicer_to_server(SalienceServicer(core), server)
    # The Open Inference Protocol on the same port, over the same core.
    oip = OipServicer(core, oip_ready, oip_stopping)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(oip, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, OIP_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return server, health_servicer


def bind(server: aio.Server, settings: Settings, security: Security, port: int) -> int:
    """Binds `server` to the settings' host and `port`; returns the port bound."""
    address = f"{settings.host}:{port}"
    try:
        if security.credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, security.credentials)
    except RuntimeError as err:  # grpcio reports a failed bind as a bare RuntimeError
        raise BindError("gRPC", address, "port", str(err)) from None


def held(address: str) -> bool:
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
        cause = "another process holds it" if held(address) else reason
        super().__init__(
            f"cannot listen for {what} on {address} ({flag} / {env}): {cause}. "
            f"Choose a free port with {flag} or {env} (0 picks one), or stop the process "
            "that holds it"
        )
