"""`salience models`: the served models, their versions, inputs and outputs.

    salience models --wait          # blocks until every model is ready or failed

With `--wait [SECONDS]` (default 300) it asks again until no version is loading or
unloading, retrying while no server answers yet (one just started), then prints the
list as without it. Its exit status then says whether everything is ready: 0 when
every version listed is ready, 3 (`EXIT_NOT_READY`) when one failed to load, or was
still loading when the wait ran out; 1 when no server answered within the wait.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from salience.v1 import salience_pb2 as pb
from salience_client import tensors
from salience_client.cli.options import (
    EXIT_NOT_READY,
    EXIT_OK,
    open_client,
    parse_timeout,
    print_lines,
)
from salience_client.client import SalienceClient
from salience_client.results import SalienceError

# Class labels `salience models` prints per output before shortening the list.
LABELS_SHOWN = 8
DEFAULT_WAIT_SECONDS = 300.0
# How often `--wait` asks again: often enough to return soon after the last load.
POLL_SECONDS = 0.25
# States a version passes through on its way to ready, failed or gone.
SETTLING = (pb.VERSION_STATE_LOADING, pb.VERSION_STATE_UNLOADING)


def add_parser(commands: Any, connection: argparse.ArgumentParser) -> None:
    """Adds `models` to the `salience` subcommands."""
    models = commands.add_parser(
        "models", parents=[connection], help="list the served models, their inputs and outputs"
    )
    models.add_argument("--json", action="store_true", help="print a JSON list")
    models.add_argument(
        "--wait",
        type=parse_timeout,
        nargs="?",
        const=DEFAULT_WAIT_SECONDS,
        metavar="SECONDS",
        help=f"block until every model is ready or failed, for at most SECONDS (default "
        f"{DEFAULT_WAIT_SECONDS:g}; a server not yet answering is waited for too); exit "
        f"status {EXIT_NOT_READY} when one failed or is still loading, 0 when all are ready",
    )
    models.set_defaults(run=run)


def _shape(values: Sequence[int]) -> list[int | None]:
    return [None if d < 0 else int(d) for d in values]


def _spec_json(spec: pb.TensorSpec) -> dict[str, Any]:
    found: dict[str, Any] = {
        "name": spec.name,
        "dtype": tensors.dtype_name(spec.dtype),
        "shape": _shape(spec.shape),
    }
    if spec.labels:
        found["labels"] = list(spec.labels)
    if len(spec.accepted_dtypes) > 1:
        # Also accepted on the wire, cast by the server (config.toml [inputs.<name>]).
        found["accepted_dtypes"] = [tensors.dtype_name(d) for d in spec.accepted_dtypes]
        found["wire_range"] = spec.wire_range
    return found


def version_state(status: pb.VersionStatus) -> str:
    """`loading`, `ready`, `failed` or `unloading`."""
    return pb.VersionState.Name(status.state).removeprefix("VERSION_STATE_").lower()


def models_json(models: Sequence[pb.ModelMetadata]) -> list[dict[str, Any]]:
    """`salience models --json`: shapes use null for a free dimension."""
    return [
        {
            "name": m.name,
            "versions": [int(v) for v in m.versions],
            "version": int(m.version),
            "inputs": [_spec_json(s) for s in m.inputs],
            "outputs": [_spec_json(s) for s in m.outputs],
            "max_batch_size": int(m.max_batch_size),
            "version_status": [
                {"version": int(s.version), "state": version_state(s), "reason": s.reason}
                for s in m.version_status
            ],
        }
        for m in models
    ]


def format_models(models: Sequence[pb.ModelMetadata]) -> list[str]:
    """`salience models`: one block per model, one line per input and output."""
    lines: list[str] = []
    for m in models:
        versions = ", ".join(str(v) for v in m.versions)
        if m.versions:
            lines.append(f"{m.name}  version {m.version} (served: {versions})")
        else:
            lines.append(f"{m.name}  not served")
        # Versions that are not simply served: loading, unloading, or failed with why.
        for status in m.version_status:
            if status.state == pb.VERSION_STATE_READY and not status.reason:
                continue
            which = f"version {status.version}" if status.version else "config.toml"
            line = f"  {which}: {version_state(status)}"
            lines.append(line + (f": {status.reason}" if status.reason else ""))
        rows = [("input", s) for s in m.inputs] + [("output", s) for s in m.outputs]
        width = max((len(s.name) for _, s in rows), default=0)
        for kind, s in rows:
            shape = ", ".join("N" if d is None else str(d) for d in _shape(s.shape))
            line = f"  {kind:<6} {s.name:<{width}}  {tensors.dtype_name(s.dtype):<7}  [{shape}]"
            if s.labels:
                shown = ", ".join(s.labels[:LABELS_SHOWN])
                more = len(s.labels) - LABELS_SHOWN
                line += f"  labels: {shown}" + (f", … ({more} more)" if more > 0 else "")
            lines.append(line)
    if not models:
        lines.append("no models served")
    return lines


@dataclass(frozen=True)
class Readiness:
    """What the listed versions say: which settle still, and which failed."""

    settling: list[str]
    failed: list[str]

    @classmethod
    def of(cls, models: Sequence[pb.ModelMetadata]) -> Readiness:
        settling, failed = [], []
        for m in models:
            for status in m.version_status:
                which = f"{m.name} version {status.version}" if status.version else m.name
                if status.state in SETTLING:
                    settling.append(f"{which} ({version_state(status)})")
                elif status.state == pb.VERSION_STATE_FAILED:
                    failed.append(f"{which} (failed)")
        return cls(settling, failed)

    @property
    def settled(self) -> bool:
        return not self.settling

    @property
    def ready(self) -> bool:
        return not self.settling and not self.failed


def wait_for_models(client: SalienceClient, seconds: float) -> list[pb.ModelMetadata]:
    """The model list once no version is loading or unloading, or when `seconds`
    have passed; a server that does not answer yet is asked again (and UNAVAILABLE
    raised when none answered within the wait).
    """
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        try:
            call = min(left, client.timeout) if client.timeout is not None else left
            models = client.list_models(timeout=max(call, POLL_SECONDS))
        except SalienceError as err:
            # No server yet: the channel retries UNAVAILABLE until the call's deadline.
            if err.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            if deadline - time.monotonic() <= 0:
                raise SalienceError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no answer within --wait {seconds:g} s ({err.code.name}: {err.details})",
                ) from None
        else:
            if Readiness.of(models).settled or left <= 0:
                return models
        time.sleep(max(0.0, min(POLL_SECONDS, deadline - time.monotonic())))


def run(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        wait = args.wait
        models = client.list_models() if wait is None else wait_for_models(client, wait)
    if args.json:
        print(json.dumps(models_json(models), indent=2))
    else:
        print_lines(format_models(models))
    if args.wait is None:
        return EXIT_OK
    readiness = Readiness.of(models)
    if readiness.ready:
        return EXIT_OK
    if readiness.settling:
        print(
            f"salience models: not ready after {args.wait:g} s: still "
            + ", ".join(readiness.settling),
            file=sys.stderr,
        )
    if readiness.failed:
        print(
            "salience models: not ready: "
            + ", ".join(readiness.failed)
            + " (the reasons are listed above)",
            file=sys.stderr,
        )
    return EXIT_NOT_READY
