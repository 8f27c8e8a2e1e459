"""The container health check: exits 0 when the server's gRPC health service says SERVING.

The image's HEALTHCHECK and the compose stack's healthcheck run it inside the container
(`python /opt/salience/healthcheck.py [SERVICE]`); Kubernetes asks the same health
service with its own gRPC probes instead. SERVICE is the health service name to ask:
"" (the default) is the whole server, SERVING once every model is loaded and warmed up
(or failed, with at least one ready) and NOT_SERVING again as soon as shutdown begins; a
model's name asks about that model alone.

The port is the one the server reads, `SALIENCE_PORT` or the default, through the
server's own settings, so the check follows a port changed in the environment (a port
given as a `--port` flag instead is not visible here). It speaks plaintext: with the
server's own TLS on, it reports so and fails. Exit status: 0 healthy, 1 not (Docker's
meanings); the reason is printed, and Docker keeps it in the health log.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from salience_server.settings import Settings

# Below Docker's --timeout, so a hung server is reported by this script, with a reason,
# rather than by Docker killing it.
TIMEOUT_SECONDS = 4.0
# A server bound to every address is reached over loopback.
WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def main(argv: list[str]) -> int:
    service = argv[1] if len(argv) > 1 else ""
    settings = Settings.load()
    host = "127.0.0.1" if settings.host in WILDCARD_HOSTS else settings.host
    target = f"{host}:{settings.port}"
    what = f"health of service {service!r}" if service else "health of the server"
    if settings.tls_cert_file is not None:
        # Said plainly rather than failing with a handshake error: this check, like
        # Kubernetes' gRPC probes, speaks plaintext.
        print(
            f"{what} at {target}: not checked, the port speaks TLS (tls_cert_file is set) "
            "and this check speaks plaintext"
        )
        return 1
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_SECONDS
            )
        except grpc.RpcError as err:
            print(f"{what} at {target}: {err.code().name} {err.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{what} at {target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
