"""How a client's channel is built: deadlines, retries, load balancing, keep-alive,
TLS and the bearer token, shared by the blocking and the asyncio client.

Everything here is plain gRPC configuration, so a channel built by hand with
`ChannelConfig(...).options()` and `.credentials()` behaves exactly like the
clients' own:

- **Retries** live in gRPC's service config (`methodConfig.retryPolicy`), not in a
  Python loop: gRPC replays a failed attempt only while no answer has started, with
  exponential backoff jittered by ±20 % (gRPC's own jitter), inside the call's one
  deadline, and only for UNAVAILABLE and RESOURCE_EXHAUSTED — the two statuses this
  server uses for "nothing was computed, try again" (a model loading, a server
  restarting, a full queue). Every other status is final: retrying INVALID_ARGUMENT
  cannot succeed. `retryThrottling` stops retrying while most calls fail, so
  clients do not multiply the load on a server that is already down.
- **Load balancing** is client-side `round_robin` over every address the target
  resolves to: with `dns:///salience-headless.ns.svc:50051` (a headless Service)
  each pod gets its share of the calls, where one long-lived HTTP/2 connection
  through a ClusterIP Service would pin a client to one pod.
- **Keep-alive** pings every 30 s on an idle connection, so a connection a NAT or a
  load balancer silently dropped is noticed before a call is sent down it. The
  server allows pings every 10 s or more (`salience_server.app`): a client that
  pings more often is disconnected with GOAWAY `too_many_pings`.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import grpc
from grpc import aio

from salience.v1 import salience_pb2 as pb

# Where a client connects when it is given no target: $SALIENCE_TARGET, else this.
TARGET_ENV = "SALIENCE_TARGET"
DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_SECONDS = 60.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def default_target() -> str:
    """$SALIENCE_TARGET when set (and not empty), else localhost:50051."""
    return os.environ.get(TARGET_ENV) or DEFAULT_TARGET


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Salience"].full_name

# The statuses the server answers when nothing was computed and a later attempt may
# succeed; any other status would come back the same.
RETRYABLE_CODES: Final = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
# gRPC ignores maxAttempts above 5.
MAX_ATTEMPTS_LIMIT = 5
# Retry throttling (gRFC A6): each failed call takes a token, each success gives
# back 0.1, and retries pause while fewer than half the tokens are left.
THROTTLE_MAX_TOKENS = 100
THROTTLE_TOKEN_RATIO = 0.1
# The shortest ping interval the server accepts without calls in flight
# (salience_server.app: grpc.http2.min_ping_interval_without_data_ms).
SERVER_MIN_PING_INTERVAL_SECONDS = 10.0
LOAD_BALANCING_POLICIES = ("round_robin", "pick_first")


class Default(enum.Enum):
    """The type of `DEFAULT`."""

    DEFAULT = "DEFAULT"


DEFAULT: Final = Default.DEFAULT
"""A call's `timeout=DEFAULT`: the client's default deadline (None means no deadline)."""

Timeout = float | None | Literal[Default.DEFAULT]
"""Seconds a call may take; None: no deadline at all; DEFAULT: the client's own."""


def check_timeout(timeout: float | None, name: str = "timeout") -> float | None:
    """A deadline in seconds (positive and finite) or None; raises ValueError."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ValueError(f"{name}={timeout!r} is not a number of seconds (or None)")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(
            f"{name}={timeout!r} is not allowed: use a positive number of seconds, or None "
            "for no deadline"
        )
    return float(timeout)


def resolve_timeout(timeout: Timeout, default: float | None) -> float | None:
    """The deadline a call is sent with: `default` for DEFAULT, else `timeout` checked."""
    if timeout is DEFAULT:
        return default
    return check_timeout(timeout)


def _duration(seconds: float) -> str:
    """A protobuf JSON Duration ("0.1s"); gRPC reads at most nine decimals."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failed call is tried again.

    Attempt k+1 starts about `initial_backoff * backoff_multiplier**(k-1)` seconds
    (at most `max_backoff`, ±20 % jitter) after attempt k failed, for at most
    `max_attempts` attempts in all, and never past the call's deadline. A request
    larger than `buffer_bytes` is sent once: gRPC keeps a request's bytes to replay
    it, and only up to that size.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0
    buffer_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValueError(
                f"max_attempts={self.max_attempts} is not allowed: use 2 to "
                f"{MAX_ATTEMPTS_LIMIT} (gRPC's limit), or retry=None for no retries"
            )
        for name in ("initial_backoff", "max_backoff", "backoff_multiplier"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} is not allowed: use a positive number")
        if self.max_backoff < self.initial_backoff:
            raise ValueError(
                f"max_backoff={self.max_backoff} is below initial_backoff={self.initial_backoff}"
            )
        if self.buffer_bytes < 0:
            raise ValueError(f"buffer_bytes={self.buffer_bytes} must not be negative")

    def method_config(self) -> dict[str, Any]:
        """The `retryPolicy` of a service config's methodConfig entry."""
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": _duration(self.initial_backoff),
            "maxBackoff": _duration(self.max_backoff),
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(RETRYABLE_CODES),
        }


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 pings on a connection: one after `time` seconds without traffic, calls
    in flight or not; no acknowledgement within `timeout` seconds closes it, and
    the next call reconnects.
    """

    time: float = 30.0
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.time) and self.time >= SERVER_MIN_PING_INTERVAL_SECONDS):
            raise ValueError(
                f"keepalive time={self.time!r} is not allowed: use at least "
                f"{SERVER_MIN_PING_INTERVAL_SECONDS:g} seconds, the server's floor (pinging "
                "more often gets the connection closed with GOAWAY too_many_pings)"
            )
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"keepalive timeout={self.timeout!r} must be a positive number")


DEFAULT_RETRY: Final = RetryPolicy()
DEFAULT_KEEPALIVE: Final = Keepalive()


def _read_pem(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read the {what} {path}: {err.strerror or err}") from None


@dataclass(frozen=True)
class TLS:
    """Transport security: the server's certificate is verified against
    `root_certificates` (PEM; None: the system's trusted roots), and for mutual TLS
    the client presents `certificate_chain` with its `private_key` (PEM).

    `server_name` is the name the server's certificate must carry when it differs
    from the target's host, such as when dialling an IP address.
    """

    root_certificates: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError(
                "a client certificate needs its private key and a key its certificate: "
                "give both (mutual TLS) or neither"
            )

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TLS:
        """Reads the PEM files: `ca` the roots to trust, `cert`/`key` the client's."""
        return cls(
            root_certificates=_read_pem(ca, "CA file") if ca is not None else None,
            certificate_chain=_read_pem(cert, "client certificate") if cert is not None else None,
            private_key=_read_pem(key, "client key") if key is not None else None,
            server_name=server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


def target_hosts(target: str) -> list[str] | None:
    """The hosts a gRPC target names (`host:port`, `dns:///host:port`,
    `ipv4:a:p,b:p`, `ipv6:[a]:p`); [] for a Unix socket; None when unknown.
    """
    scheme, sep, rest = target.partition(":")
    if sep and scheme in ("unix", "unix-abstract"):
        return []
    if sep and scheme in ("ipv4", "ipv6"):
        return [_host(address) for address in rest.split(",")]
    if sep and scheme == "dns":
        # dns:[//authority/]host[:port]
        rest = rest.removeprefix("//")
        rest = rest.split("/", 1)[1] if "/" in rest else rest
        return [_host(rest)]
    if "://" in target:
        return None
    return [_host(target)]


def _host(address: str) -> str:
    address = address.strip()
    if address.startswith("["):
        return address[1 : address.find("]")] if "]" in address else address[1:]
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host
    return address  # no port, or a bare IPv6 address


def is_local_target(target: str) -> bool:
    """Whether every address of the target is this machine (loopback or a socket)."""
    hosts = target_hosts(target)
    if hosts is None:
        return False
    for host in hosts:
        if host.lower() == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False
    return True


@dataclass(frozen=True)
class ChannelConfig:
    """Everything a client's channel is built from (see the module docstring).

    `token` is sent as `authorization: Bearer <token>` with every call. Over
    plaintext it would cross the network readable by anyone on the path, so it is
    refused unless the target is this machine or `allow_plaintext_token` says the
    path is protected otherwise (a service mesh's mTLS, for one).
    """

    target: str
    tls: TLS | None = None
    token: str | None = field(default=None, repr=False)
    allow_plaintext_token: bool = False
    retry: RetryPolicy | None = field(default_factory=RetryPolicy)
    keepalive: Keepalive | None = field(default_factory=Keepalive)
    load_balancing: str = "round_robin"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    extra_options: Sequence[tuple[str, Any]] = ()

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("target is empty: use HOST:PORT or dns:///NAME:PORT")
        if self.load_balancing not in LOAD_BALANCING_POLICIES:
            raise ValueError(
                f"load_balancing={self.load_balancing!r} is not allowed: use "
                f"{' or '.join(LOAD_BALANCING_POLICIES)}"
            )
        if self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes={self.max_message_bytes} must be positive")
        if self.token is not None:
            if not self.token or any(not 0x21 <= ord(c) <= 0x7E for c in self.token):
                # The value travels as an HTTP/2 header. Never echo it: it is a secret.
                raise ValueError(
                    "the token is empty or holds whitespace or non-ASCII characters: a "
                    "bearer token is printable ASCII without spaces"
                )
            if (
                self.tls is None
                and not self.allow_plaintext_token
                and not is_local_target(self.target)
            ):
                raise ValueError(
                    f"a token over plaintext would cross the network to {self.target} "
                    "readable by anyone on the path: use TLS (tls=...), or pass "
                    "allow_plaintext_token=True where the path is protected otherwise"
                )

    def service_config(self) -> dict[str, Any]:
        """The service config: load balancing, and the retry policy of every
        `salience.v1.Salience` method.
        """
        config: dict[str, Any] = {"loadBalancingConfig": [{self.load_balancing: {}}]}
        if self.retry is not None:
            config["methodConfig"] = [
                {"name": [{"service": SERVICE_NAME}], "retryPolicy": self.retry.method_config()}
            ]
            config["retryThrottling"] = {
                "maxTokens": THROTTLE_MAX_TOKENS,
                "tokenRatio": THROTTLE_TOKEN_RATIO,
            }
        return config

    def options(self) -> list[tuple[str, Any]]:
        """The channel arguments; `extra_options` come last and win."""
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.service_config", json.dumps(self.service_config())),
            # A DNS TXT record must not replace the policy chosen here.
            ("grpc.service_config_disable_resolution", 1),
            ("grpc.enable_retries", 1 if self.retry is not None else 0),
        ]
        if self.retry is not None:
            options.append(("grpc.per_rpc_retry_buffer_size", self.retry.buffer_bytes))
        if self.keepalive is not None:
            options += [
                ("grpc.keepalive_time_ms", round(self.keepalive.time * 1000)),
                ("grpc.keepalive_timeout_ms", round(self.keepalive.timeout * 1000)),
                # Idle connections are the ones that die unnoticed.
                ("grpc.keepalive_permit_without_calls", 1),
                # Else gRPC stops pinging after two pings without data.
                ("grpc.http2.max_pings_without_data", 0),
            ]
        if self.tls is not None and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        options += list(self.extra_options)
        return options

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, or None for plaintext."""
        return self.tls.credentials() if self.tls is not None else None

    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The metadata sent with every call: the bearer token, if any."""
        if self.token is None:
            return None
        return (("authorization", f"Bearer {self.token}"),)

    def open(self) -> grpc.Channel:
        """A blocking channel."""
        credentials = self.credentials()
        if credentials is None:
            return grpc.insecure_channel(self.target, options=self.options())
        return grpc.secure_channel(self.target, credentials, options=self.options())

    def open_aio(self) -> aio.Channel:
        """An asyncio channel (create it inside the event loop that uses it)."""
        credentials = self.credentials()
        if credentials is None:
            return aio.insecure_channel(self.target, options=self.options())
        return aio.secure_channel(self.target, credentials, options=self.options())
