"""The options and plumbing every `salience` command shares: exit statuses, the
`UsageError` a command raises for a bad option or file, the parsers of option values,
the connection options (target, deadline, TLS, token) and the client they open.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from salience_client.channel import DEFAULT_TARGET, TARGET_ENV, TLS, default_target
from salience_client.client import DEFAULT_TIMEOUT_SECONDS, SalienceClient
from salience_client.inputs import UsageError
from salience_client.results import Objective

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
# `salience models --wait`: a model failed to load, or still loads when the wait ends.
EXIT_NOT_READY = 3

TOKEN_ENV = "SALIENCE_TOKEN"
OBJECTIVE_FORMAT = "LAYER:I[,I...][:WEIGHT]"


# Option values ------------------------------------------------------------------


def parse_layer(text: str) -> str | int:
    """A layer reference: an integer index when the text parses as one, else a name."""
    if not text.strip():
        raise argparse.ArgumentTypeError("a layer is a name or an integer index, not empty")
    try:
        return int(text)
    except ValueError:
        return text


def parse_indices(text: str) -> tuple[int, ...]:
    """A comma-separated list of integers: "2" or "1,4,7"."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers (such as 2 or 1,4,7)"
        ) from None


def parse_objective(text: str) -> Objective:
    """`LAYER:I[,I...][:WEIGHT]` as an Objective.

    Empty indices mean the layer mean, an empty LAYER the model's output layer, and
    WEIGHT (default 1) may be negative.
    """
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(
            f"{text!r} is malformed: use {OBJECTIVE_FORMAT}, such as predictions:2, "
            "predictions:2:-1 or conv1: (the layer mean)"
        )
    layer = parse_layer(parts[0]) if parts[0] else None
    try:
        indices = parse_indices(parts[1]) if parts[1].strip() else ()
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} has indices {parts[1]!r}, which are not a comma-separated list of "
            f"integers: use {OBJECTIVE_FORMAT}, such as predictions:1,3"
        ) from None
    weight = 1.0
    if len(parts) == 3:
        try:
            weight = float(parts[2])
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} has weight {parts[2]!r}, which is not a number: use {OBJECTIVE_FORMAT}"
            ) from None
        if not math.isfinite(weight):
            raise argparse.ArgumentTypeError(
                f"{text!r} has weight {parts[2]!r}: use a finite number"
            )
    return Objective(layer=layer, filter_indices=indices, weight=weight)


def parse_names(text: str) -> list[str]:
    """A comma-separated list of names: "absolute,relu"."""
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of names (such as absolute,relu)"
        )
    return names


def parse_count(text: str) -> int:
    """A non-negative integer (samples, steps, seed)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: use 0 or more")
    return value


def parse_non_negative(text: str) -> float:
    """A finite number >= 0 (SmoothGrad's noise level, review's jump threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not allowed: use a finite value >= 0")
    return value


def parse_timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def parse_positive(text: str) -> int:
    """An integer of at least 1 (concurrency, requests, batch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: use 1 or more")
    return value


def parse_version(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a model version: use a positive integer (0 means the highest)"
        )
    return value


def parse_alpha(text: str) -> float:
    from salience_client.overlay import check_alpha

    try:
        return check_alpha(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def connection_parser() -> argparse.ArgumentParser:
    """--target, --timeout, the TLS options and the token: every command that calls."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--target",
        default=default_target(),
        metavar="HOST:PORT",
        help=f"server address (default ${TARGET_ENV}, else {DEFAULT_TARGET})",
    )
    connection.add_argument(
        "--timeout",
        type=parse_timeout,
        default=DEFAULT_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help=f"deadline of each call (default {DEFAULT_TIMEOUT_SECONDS:g})",
    )
    connection.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, trusting the system's CAs (implied by the --tls-* options)",
    )
    connection.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help="PEM CA certificates to verify the server's certificate with",
    )
    connection.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="PEM client certificate, for a server that requires one (mutual TLS)",
    )
    connection.add_argument(
        "--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert"
    )
    connection.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="the name the server's certificate must carry, when not the --target host",
    )
    connection.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help=f"file holding the bearer token to send (default ${TOKEN_ENV}, the token itself)",
    )
    connection.add_argument(
        "--allow-plaintext-token",
        action="store_true",
        help="send the token without TLS to another machine (where the network is "
        "protected otherwise, such as by a service mesh)",
    )
    return connection


def model_parser() -> argparse.ArgumentParser:
    """--model, --version and the INPUT files of `predict` and `explain`."""
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", required=True, metavar="NAME", help="model name")
    model.add_argument(
        "--version",
        type=parse_version,
        default=0,
        metavar="V",
        help="model version (default: the highest served)",
    )
    model.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help="a .npy file (a sample or a batch) or an image file; all form one batch",
    )
    model.add_argument(
        "--float32",
        action="store_true",
        help="send images as float32 even where the model accepts uint8 pixels (by default "
        "they go as uint8 there, a quarter of the bytes, with the same answers)",
    )
    return model


def read_token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token-file's first line, else $SALIENCE_TOKEN, else None.

    Messages never include it.
    """
    path: Path | None = getattr(args, "token_file", None)
    if path is None:
        return os.environ.get(TOKEN_ENV, "").strip() or None
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "not ASCII text"
        raise UsageError(f"--token-file {path} cannot be read: {reason}") from None
    token = text.strip()
    if not token:
        raise UsageError(f"--token-file {path} is empty: write the token into it")
    return token


def client_security(args: argparse.Namespace) -> dict[str, Any]:
    """The `tls`, `token` and `allow_plaintext_token` arguments of the client."""
    ca, cert, key = (getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key"))
    server_name = getattr(args, "tls_server_name", None)
    tls = None
    if getattr(args, "tls", False) or any(v is not None for v in (ca, cert, key, server_name)):
        try:
            tls = TLS.from_files(ca, cert, key, server_name=server_name)
        except ValueError as err:
            raise UsageError(f"{err} (--tls-ca, --tls-cert, --tls-key)") from None
    return {
        "tls": tls,
        "token": read_token(args),
        "allow_plaintext_token": getattr(args, "allow_plaintext_token", False),
    }


@contextmanager
def open_client(args: argparse.Namespace) -> Iterator[SalienceClient]:
    try:
        client = SalienceClient(args.target, timeout=args.timeout, **client_security(args))
    except ValueError as err:  # a token over plaintext, a malformed token
        raise UsageError(str(err)) from None
    with client:
        yield client


def print_lines(lines: Sequence[str]) -> None:
    for line in lines:
        print(line)
