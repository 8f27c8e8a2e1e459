"""Bounds on the client connections of the gRPC port, so that a flood of them (a
few thousand silent TCP connections) cannot take the process's file descriptors
and, with them, every other client, the metrics endpoint and model loading.

- **File descriptors.** At start-up the soft RLIMIT_NOFILE is raised to the hard
  limit (`raise_fd_limit`): many systems start processes at 1024, which 1 000
  idle connections exhaust, while the hard limit is usually far higher.
- **A cap** (`max_connections`, gRPC's `grpc.max_allowed_incoming_connections`):
  connections beyond it are closed as they arrive. By default it is the
  descriptor limit less `reserved_file_descriptors`, which stay free for what
  else the server opens: the /metrics endpoint's scrapes, model files being
  (re)loaded, log files, TensorFlow's own. A flood at the cap so refuses new
  gRPC connections (callers retry UNAVAILABLE elsewhere; connections already
  open are served) while /metrics still answers.
- **Time-outs.** A connection that has not finished its handshake (TLS, and the
  HTTP/2 preface and settings) within `connection_handshake_timeout_seconds` is
  closed (gRPC's default waits 120 s), so silent connections free their slot;
  `connection_idle_seconds` optionally closes connections without calls for
  that long (GOAWAY: a client reconnects when it next calls).
"""

from __future__ import annotations

import logging
import resource

from salience_server.settings import Settings

log = logging.getLogger(__name__)

# Linux refuses a soft limit above fs.nr_open (1 048 576 by default): an unlimited
# hard limit is met with this.
MAX_SOFT_LIMIT = 1 << 20


def raise_fd_limit() -> tuple[int, int]:
    """Raises the soft limit on open files to the hard limit; returns (before,
    after). Where it cannot be raised, it stays as it was (and is reported so).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_SOFT_LIMIT if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as err:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, err)
            return soft, soft
        return soft, target
    return soft, soft


def connection_cap(settings: Settings, fd_limit: int) -> int:
    """The most client connections the gRPC port holds: `max_connections`, within
    what the descriptor limit leaves after the reserve.
    """
    room = max(1, fd_limit - settings.reserved_file_descriptors)
    if settings.max_connections <= 0:
        return room
    if settings.max_connections > room:
        log.warning(
            "max_connections=%d is more than the %d file descriptors left after "
            "reserved_file_descriptors=%d: at most %d connections are held",
            settings.max_connections,
            room,
            settings.reserved_file_descriptors,
            room,
        )
        return room
    return settings.max_connections


def channel_options(settings: Settings, cap: int) -> list[tuple[str, int]]:
    """The gRPC server options of these bounds."""
    options = [
        ("grpc.max_allowed_incoming_connections", cap),
        (
            "grpc.server_handshake_timeout_ms",
            round(settings.connection_handshake_timeout_seconds * 1e3),
        ),
    ]
    if settings.connection_idle_seconds > 0:
        options.append(
            ("grpc.max_connection_idle_ms", round(settings.connection_idle_seconds * 1e3))
        )
    return options
