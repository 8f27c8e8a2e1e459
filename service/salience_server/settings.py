"""Typed server settings, filled from command-line flags and `SALIENCE_*` variables.

Every field is declared once, with its documentation, in `Settings`; the flag
`--model-repository` and the variable `SALIENCE_MODEL_REPOSITORY` both set
`model_repository`. A flag wins over the environment, which wins over the default.
Values are validated at start-up, so a bad one stops the server with a message
instead of failing a request later.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from salience_server.explain.options import Limits

ENV_PREFIX = "SALIENCE_"
MIB = 1024 * 1024


class SettingsError(ValueError):
    """A setting has a value the server cannot start with."""


def _doc(text: str, **extra: Any) -> Any:
    return {"help": text, **extra}


@dataclass(frozen=True)
class Settings:
    """Everything the server can be configured with."""

    model_repository: Path | None = field(
        default=None,
        metadata=_doc(
            "Directory laid out DIR/<model>/<version>/model.keras; "
            "unset serves the bundled demo models"
        ),
    )
    host: str = field(default="0.0.0.0", metadata=_doc("Address the gRPC server binds"))
    port: int = field(default=50051, metadata=_doc("gRPC port; 0 picks a free one"))
    metrics_port: int = field(
        default=8000,
        metadata=_doc("Prometheus /metrics HTTP port; 0 picks a free one, -1 turns it off"),
    )
    max_message_bytes: int = field(
        default=64 * MIB,
        metadata=_doc(
            "Largest gRPC message received or sent, in bytes "
            "(a 1080p float32 map alone is 8 MB, so the 4 MB default of gRPC is too small)"
        ),
    )
    max_batch_size: int = field(
        default=64, metadata=_doc("Largest batch (first axis) one request may carry")
    )
    max_objectives: int = field(
        default=16, metadata=_doc("Most objectives one explanation may sum")
    )
    max_samples: int = field(
        default=128, metadata=_doc("Most SmoothGrad noisy copies one explanation may ask for")
    )
    max_steps: int = field(
        default=512,
        metadata=_doc("Most Integrated Gradients steps one explanation may ask for"),
    )
    worker_threads: int = field(
        default=2,
        metadata=_doc("Threads that run TensorFlow off the event loop"),
    )
    shutdown_grace_seconds: float = field(
        default=10.0,
        metadata=_doc("How long in-flight calls may run on after SIGTERM before they are cut"),
    )
    log_level: str = field(
        default="INFO", metadata=_doc("Logging level: DEBUG, INFO, WARNING or ERROR")
    )

    @property
    def limits(self) -> Limits:
        """The per-request caps explanation options are checked against."""
        return Limits(
            max_objectives=self.max_objectives,
            max_samples=self.max_samples,
            max_steps=self.max_steps,
        )

    def __post_init__(self) -> None:
        if self.model_repository is not None and not self.model_repository.is_dir():
            raise SettingsError(
                f"model_repository={str(self.model_repository)!r} is not a directory"
            )
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port={self.port} is out of range: use 0..65535")
        if not -1 <= self.metrics_port <= 65535:
            raise SettingsError(
                f"metrics_port={self.metrics_port} is out of range: use -1 (off) or 0..65535"
            )
        if self.max_message_bytes < 4 * MIB:
            raise SettingsError(
                f"max_message_bytes={self.max_message_bytes} is too small: use at least {4 * MIB}"
            )
        for name in (
            "max_batch_size",
            "max_objectives",
            "max_samples",
            "max_steps",
            "worker_threads",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name}={getattr(self, name)} must be at least 1")
        if self.shutdown_grace_seconds < 0:
            raise SettingsError(
                f"shutdown_grace_seconds={self.shutdown_grace_seconds} must not be negative"
            )
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(
                f"log_level={self.log_level!r} is not one of DEBUG, INFO, WARNING, ERROR"
            )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Declares one flag per field; unset flags fall back to environment and default."""
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = f.default
            parser.add_argument(
                flag,
                dest=f.name,
                default=None,
                metavar=f.name.upper(),
                help=f"{f.metadata['help']} (env {ENV_PREFIX}{f.name.upper()}; default {default})",
            )

    @classmethod
    def load(
        cls,
        flags: argparse.Namespace | Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Builds validated settings from flags over environment over defaults."""
        env = os.environ if environ is None else environ
        given = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags or {})
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = given.get(f.name)
            source = f"--{f.name.replace('_', '-')}"
            if raw is None:
                raw = env.get(ENV_PREFIX + f.name.upper())
                source = ENV_PREFIX + f.name.upper()
            if raw is None:
                continue
            values[f.name] = _parse(f, raw, source)
        return cls(**values)


def _parse(f: dataclasses.Field[Any], raw: Any, source: str) -> Any:
    if not isinstance(raw, str):
        return raw
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("Path"):
            return Path(raw).expanduser() if raw else None
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise SettingsError(f"{source}={raw!r} is not a valid {kind}") from None
    return raw


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Settings for `python -m salience_server`."""
    parser = argparse.ArgumentParser(prog="salience-server", description=__doc__.splitlines()[0])
    Settings.add_arguments(parser)
    return Settings.load(parser.parse_args(argv))
