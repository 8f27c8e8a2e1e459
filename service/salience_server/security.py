"""Transport security and caller authentication of the gRPC port.

- **TLS** (`tls_cert_file` + `tls_key_file`): the port speaks only TLS.
- **Mutual TLS** (`tls_client_ca_file` too): a client must present a certificate
  signed by that CA, or its handshake fails — before any RPC, health included.
- **Bearer tokens** (`auth_token_file`, one token per line): every RPC must carry
  `authorization: Bearer <token>` naming one of them, else it is answered
  UNAUTHENTICATED. The standard health service (`grpc.health.v1.Health`) stays open,
  so load balancers and Kubernetes probes need no secret; reflection is not, since
  it is only for people and tools that are let in anyway.

Tokens are read from a file rather than a flag or an environment variable: a flag
is visible to every user of the machine in `ps`, and the environment of a process
leaks into crash reports and child processes. A mounted Kubernetes Secret is such a
file. Rotation without refusing anyone: add the new token as a second line, roll
the servers, move the clients over, remove the old line, roll again.

Only SHA-256 digests of the tokens are kept, and a presented token is compared
with every one of them with `hmac.compare_digest`: equal-length digests, so the time
taken says nothing about how much of a token matched, nor about its length. No
token — configured or presented — is ever logged, put in a message or a metric.

The /metrics endpoint can be secured the same way, with settings of its own
(`metrics_tls_cert_file`, `metrics_tls_key_file`, `metrics_tls_client_ca_file`,
`metrics_auth_token_file`): `metrics_security`.

Every problem with these files stops start-up with a SettingsError naming the
setting, instead of a server that refuses every call later.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health

from salience_server.errors import ServiceError
from salience_server.settings import Settings, SettingsError

log = logging.getLogger(__name__)

# Methods any caller may use without a token: the load balancer's and the probes'.
OPEN_SERVICES = (health.SERVICE_NAME,)
# A token is one HTTP/2 header value: printable ASCII, no spaces.
TOKEN_PATTERN = re.compile(r"[\x21-\x7e]+")
# Shorter secrets can be guessed; `openssl rand -hex 32` gives 64 characters.
MIN_TOKEN_LENGTH = 16
PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN ([A-Z]+ )?PRIVATE KEY-----")

MISSING_TOKEN = (
    "this server requires a bearer token: send the metadata `authorization: Bearer <token>`"
)
MALFORMED_TOKEN = "the authorization metadata must be `Bearer <token>`"
WRONG_TOKEN = "the bearer token is not valid for this server"


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise SettingsError(
            f"{setting}={str(path)!r} cannot be read: {err.strerror or err}"
        ) from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials of the gRPC port (requiring client certificates when
    `tls_client_ca_file` is set), or None for plaintext.
    """
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None  # Settings refuses one without the other
    chain = _read(settings.tls_cert_file, "tls_cert_file")
    if PEM_CERTIFICATE not in chain:
        raise SettingsError(
            f"tls_cert_file={str(settings.tls_cert_file)!r} holds no PEM certificate "
            "(-----BEGIN CERTIFICATE-----)"
        )
    key = _read(settings.tls_key_file, "tls_key_file")
    if not PEM_PRIVATE_KEY.search(key):
        raise SettingsError(
            f"tls_key_file={str(settings.tls_key_file)!r} holds no PEM private key "
            "(-----BEGIN PRIVATE KEY-----)"
        )
    client_ca = None
    if settings.tls_client_ca_file is not None:
        client_ca = _read(settings.tls_client_ca_file, "tls_client_ca_file")
        if PEM_CERTIFICATE not in client_ca:
            raise SettingsError(
                f"tls_client_ca_file={str(settings.tls_client_ca_file)!r} holds no PEM "
                "certificate (-----BEGIN CERTIFICATE-----)"
            )
    credentials = grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
    _check_usable(credentials, settings)
    return credentials


def _check_usable(credentials: grpc.ServerCredentials, settings: Settings) -> None:
    """Binds a throw-away port with the credentials: gRPC checks the key against the
    certificate only then, and reports a mismatch as a bare "failed to bind".
    """
    probe = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        probe.add_secure_port("127.0.0.1:0", credentials)
    except RuntimeError:
        ca = settings.tls_client_ca_file
        also = f" or tls_client_ca_file={str(ca)!r}" if ca is not None else ""
        raise SettingsError(
            f"tls_key_file={str(settings.tls_key_file)!r} is not the private key of "
            f"tls_cert_file={str(settings.tls_cert_file)!r}, or one of them{also} is not "
            "valid PEM"
        ) from None
    finally:
        probe.stop(None)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


def load_token_digests(path: Path, setting: str = "auth_token_file") -> tuple[bytes, ...]:
    """The SHA-256 digests of the tokens in `path`: one per line, blank lines and
    lines starting with # ignored. Messages name lines, never their content.
    """
    source = f"{setting}={str(path)!r}"
    try:
        text = _read(path, setting).decode("ascii")
    except UnicodeDecodeError:
        raise SettingsError(
            f"{source} is not ASCII: tokens are printable ASCII without spaces"
        ) from None
    digests = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not TOKEN_PATTERN.fullmatch(token):
            raise SettingsError(
                f"{source} line {number} is not a token: use printable ASCII without spaces"
            )
        if len(token) < MIN_TOKEN_LENGTH:
            raise SettingsError(
                f"{source} line {number} is shorter than {MIN_TOKEN_LENGTH} characters, "
                "too short for a secret: use a random one, such as `openssl rand -hex 32`"
            )
        digests.append(_digest(token))
    if not digests:
        raise SettingsError(
            f"{source} holds no token: write one per line (lines starting with # are comments)"
        )
    return tuple(dict.fromkeys(digests))


def _metadata_value(metadata: Sequence[tuple[str, Any]] | None, key: str) -> str | None:
    for name, value in metadata or ():
        if name == key:
            return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return None


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class TokenAuthInterceptor(aio.ServerInterceptor):
    """Answers UNAUTHENTICATED to calls without a valid bearer token, except to the
    open services (health).

    Placed after the error interceptor, so refused calls are counted in the metrics
    like any other, under their RPC with code UNAUTHENTICATED.
    """

    def __init__(self, digests: Sequence[bytes], open_services: Sequence[str] = OPEN_SERVICES):
        if not digests:
            raise ValueError("no token digests: authentication would refuse every call")
        self._digests = tuple(digests)
        self._open = tuple(f"/{service}/" for service in open_services)

    def refusal(self, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        """Why a call with this metadata is refused, or None when its token is valid."""
        value = _metadata_value(metadata, "authorization")
        if value is None:
            return MISSING_TOKEN
        scheme, _, credential = value.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            return MALFORMED_TOKEN
        presented = _digest(credential) if credential.isascii() else b""
        # Every digest is compared, so the time does not say which one matched.
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        return None if matched else WRONG_TOKEN

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(self._open):
            return handler  # unknown methods stay UNIMPLEMENTED
        reason = self.refusal(handler_call_details.invocation_metadata)
        if reason is None:
            return handler
        return _refusing(handler, method, reason)


def _refusing(handler: grpc.RpcMethodHandler, method: str, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""

    async def refuse(request: Any, context: aio.ServicerContext) -> None:
        # The peer and the reason, never the token.
        log.warning("refused %s from %s: %s", method, context.peer(), reason)
        if handler.unary_unary is not None:
            # The error interceptor answers it, counting the call before the status
            # is sent (an abort here would send it first).
            raise Unauthenticated(reason)
        # A coroutine serves a streaming RPC too: it ends with just the status.
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[handler.request_streaming, handler.response_streaming]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


@dataclass(frozen=True)
class Security:
    """What the server binds its port with: TLS credentials (None: plaintext) and
    the authentication interceptor (None: every caller is let in).
    """

    credentials: grpc.ServerCredentials | None
    interceptor: TokenAuthInterceptor | None
    mutual: bool = False

    def describe(self) -> str:
        """For the start-up log line: "plaintext", "TLS" or "mutual TLS", and tokens."""
        transport = "plaintext"
        if self.credentials is not None:
            transport = "mutual TLS" if self.mutual else "TLS"
        return transport + (" with bearer tokens" if self.interceptor is not None else "")


@dataclass(frozen=True)
class MetricsSecurity:
    """What /metrics is served with: a TLS context (None: plain HTTP) and the
    digests of the tokens it asks for (empty: none).
    """

    tls: ssl.SSLContext | None
    token_digests: tuple[bytes, ...]

    def describe(self) -> str:
        transport = "http"
        if self.tls is not None:
            transport = (
                "https, mutual TLS" if self.tls.verify_mode == ssl.CERT_REQUIRED else "https"
            )
        return transport + (" with bearer tokens" if self.token_digests else "")


def metrics_security(settings: Settings) -> MetricsSecurity:
    """Reads the /metrics certificate, key, CA and token files; raises SettingsError."""
    context = None
    cert, key = settings.metrics_tls_cert_file, settings.metrics_tls_key_file
    if cert is not None and key is not None:
        if PEM_CERTIFICATE not in _read(cert, "metrics_tls_cert_file"):
            raise SettingsError(
                f"metrics_tls_cert_file={str(cert)!r} holds no PEM certificate "
                "(-----BEGIN CERTIFICATE-----)"
            )
        if not PEM_PRIVATE_KEY.search(_read(key, "metrics_tls_key_file")):
            raise SettingsError(
                f"metrics_tls_key_file={str(key)!r} holds no PEM private key "
                "(-----BEGIN PRIVATE KEY-----)"
            )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError:
            raise SettingsError(
                f"metrics_tls_key_file={str(key)!r} is not the private key of "
                f"metrics_tls_cert_file={str(cert)!r}, or one of them is not valid PEM"
            ) from None
        ca = settings.metrics_tls_client_ca_file
        if ca is not None:
            if PEM_CERTIFICATE not in _read(ca, "metrics_tls_client_ca_file"):
                raise SettingsError(
                    f"metrics_tls_client_ca_file={str(ca)!r} holds no PEM certificate "
                    "(-----BEGIN CERTIFICATE-----)"
                )
            context.load_verify_locations(cafile=str(ca))
            context.verify_mode = ssl.CERT_REQUIRED
    digests: tuple[bytes, ...] = ()
    if settings.metrics_auth_token_file is not None:
        digests = load_token_digests(settings.metrics_auth_token_file, "metrics_auth_token_file")
    return MetricsSecurity(context, digests)


def load_security(settings: Settings) -> Security:
    """Reads the certificate, key, CA and token files; raises SettingsError."""
    credentials = server_credentials(settings)
    interceptor = None
    if settings.auth_token_file is not None:
        interceptor = TokenAuthInterceptor(load_token_digests(settings.auth_token_file))
    mutual = credentials is not None and settings.tls_client_ca_file is not None
    return Security(credentials, interceptor, mutual)
