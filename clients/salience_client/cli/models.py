"""`salience models`: the served models, their versions, inputs and outputs."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from salience.v1 import salience_pb2 as pb
from salience_client import tensors
from salience_client.cli.options import (
    EXIT_OK,
    open_client,
    print_lines,
)

# Class labels `salience models` prints per output before shortening the list.
LABELS_SHOWN = 8


def add_parser(commands: Any, connection: argparse.ArgumentParser) -> None:
    """Adds `models` to the `salience` subcommands."""
    models = commands.add_parser(
        "models", parents=[connection], help="list the served models, their inputs and outputs"
    )
    models.add_argument("--json", action="store_true", help="print a JSON list")
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


def run(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        models = client.list_models()
    if args.json:
        print(json.dumps(models_json(models), indent=2))
    else:
        print_lines(format_models(models))
    return EXIT_OK
