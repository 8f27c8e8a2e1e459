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
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from salience_server.cost import CostLimits
from salience_server.explain.options import Limits

ENV_PREFIX = "SALIENCE_"
MIB = 1024 * 1024


class SettingsError(ValueError):
    """A setting has a value the server cannot start with."""


# The `device` setting's forms (whether the GPU exists is checked at start-up).
DEVICE_SETTING = re.compile(r"^(auto|cpu|gpu|gpu:\d+)$")
MIXED_PRECISION = ("off", "on", "float16", "bfloat16")

# A device call pads at most 1/4 of its rows (see BatchingConfig.take).
MAX_PADDING_DENOMINATOR = 4


@dataclass(frozen=True)
class BatchingConfig:
    """How requests to one model are queued and merged into device calls.

    One object per model, so that per-model configuration can set it later.
    """

    enabled: bool = True
    # Samples per device call (requests are merged up to it, larger ones split).
    max_device_batch_size: int = 32
    # Seconds the oldest request of a forming batch may wait for company.
    max_queue_delay: float = 0.0
    # Sizes a device call is padded up to; sorted, the largest is max_device_batch_size.
    buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    # Samples that may wait per model and lane before requests are refused.
    max_queue_size: int = 256
    # Cost (element-evaluations, `salience_server.cost`) that may wait per model and lane.
    max_queue_cost: int = 2**30
    # Most cost of one device call: a heavier request's rows are split over calls
    # (at least one row a call), so light work never waits behind more than this.
    max_call_cost: int = 2**25
    # Explanations costing at most this ride the light lane (Predicts always do).
    light_request_cost: int = 2**25
    # The heavy lane's share of the device's cost while both lanes have work waiting.
    heavy_share: float = 0.25

    def bucket(self, rows: int) -> int:
        """The padded size of a device call of `rows` samples."""
        return next((b for b in self.buckets if b >= rows), rows)

    def take(self, queued: int) -> int:
        """How many of `queued` samples (at most a full call) the next device call takes.

        All of them when padding them up to their bucket costs at most a quarter of
        the call; otherwise the bucket below, and the rest wait for the next call,
        where newcomers join them. So a device never computes mostly padding (17
        samples are not padded to 32), and under steady load calls settle on
        bucket sizes.
        """
        rows = min(queued, self.max_device_batch_size)
        padded = self.bucket(rows)
        if (padded - rows) * MAX_PADDING_DENOMINATOR <= padded:
            return rows
        return max((b for b in self.buckets if b <= rows), default=rows)


def _doc(text: str, **extra: Any) -> Any:
    return {"help": text, **extra}


@dataclass(frozen=True)
class Settings:
    """Everything the server can be configured with."""

    model_repository: Path | None = field(
        default=None,
        metadata=_doc(
            "Model repository: DIR/<model>/<version>/ holding model.keras, model.h5 or a "
            "SavedModel, and an optional DIR/<model>/config.toml; unset serves the bundled "
            "demo models"
        ),
    )
    repository_poll_seconds: float = field(
        default=2.0,
        metadata=_doc(
            "How often the model repository is checked for new, changed and removed "
            "models and versions, which are then loaded or unloaded without a restart, "
            "in seconds; 0 turns hot reload off"
        ),
    )
    allow_links_outside_repository: bool = field(
        default=False,
        metadata=_doc(
            "Follow model directories, version directories and files of the model "
            "repository that are links resolving outside it (true/false); off, they are "
            "skipped with a warning (a config.toml so linked fails its model), so a link "
            "cannot make the server read any file it can open"
        ),
    )
    host: str = field(default="0.0.0.0", metadata=_doc("Address the gRPC server binds"))
    port: int = field(default=50051, metadata=_doc("gRPC port; 0 picks a free one"))
    metrics_port: int = field(
        default=8000,
        metadata=_doc("Prometheus /metrics HTTP port; 0 picks a free one, -1 turns it off"),
    )
    metrics_host: str = field(
        default="",
        metadata=_doc(
            "Address the /metrics HTTP server binds (such as 127.0.0.1 to keep it on the "
            "machine, or a cluster-internal address); empty, the same as host"
        ),
    )
    metrics_tls_cert_file: Path | None = field(
        default=None,
        metadata=_doc(
            "PEM certificate chain of /metrics: set with metrics_tls_key_file, it is "
            "served over HTTPS only; unset, plain HTTP"
        ),
    )
    metrics_tls_key_file: Path | None = field(
        default=None, metadata=_doc("PEM private key of metrics_tls_cert_file")
    )
    metrics_tls_client_ca_file: Path | None = field(
        default=None,
        metadata=_doc(
            "PEM CA certificates for mutual TLS on /metrics: a scraper must present a "
            "certificate they signed (needs metrics_tls_cert_file)"
        ),
    )
    metrics_auth_token_file: Path | None = field(
        default=None,
        metadata=_doc(
            "File of bearer tokens for /metrics, one per line (# comments), as "
            "auth_token_file: a scrape without `Authorization: Bearer <token>` naming one "
            "is answered 401; unset, no token is asked for"
        ),
    )
    tls_cert_file: Path | None = field(
        default=None,
        metadata=_doc(
            "PEM certificate chain of the gRPC port: set with tls_key_file, the port speaks "
            "only TLS; unset, plaintext"
        ),
    )
    tls_key_file: Path | None = field(
        default=None, metadata=_doc("PEM private key of tls_cert_file")
    )
    tls_client_ca_file: Path | None = field(
        default=None,
        metadata=_doc(
            "PEM CA certificates for mutual TLS: every client must present a certificate "
            "they signed, or its connection is refused (needs tls_cert_file)"
        ),
    )
    auth_token_file: Path | None = field(
        default=None,
        metadata=_doc(
            "File of bearer tokens, one per line (# comments): every call but health "
            "checks must carry `authorization: Bearer <token>` with one of them, or is "
            "answered UNAUTHENTICATED; unset, no token is asked for"
        ),
    )
    max_connection_age_seconds: float = field(
        default=0.0,
        metadata=_doc(
            "Close each client connection after this long (gracefully: calls in flight "
            "get shutdown_grace_seconds to finish), so that clients resolve the "
            "server's name again and spread over new replicas; 0 never closes them"
        ),
    )
    # Bounds what one connection can hold open (each call's buffers, each stream's
    # window), well above what one batching client keeps in flight.
    max_concurrent_streams: int = field(
        default=1024,
        metadata=_doc(
            "Calls (unary or streams) one client connection may have open at once "
            "(HTTP/2 MAX_CONCURRENT_STREAMS); a client's further calls wait for one to end"
        ),
    )
    max_connections: int = field(
        default=0,
        metadata=_doc(
            "Client connections the gRPC port holds at once; more are closed as they "
            "arrive. 0: the process's open-files limit (raised to its hard limit at "
            "start-up) less reserved_file_descriptors"
        ),
    )
    reserved_file_descriptors: int = field(
        default=256,
        metadata=_doc(
            "File descriptors kept free of gRPC connections, for /metrics scrapes, model "
            "files and logs, so a connection flood leaves them working"
        ),
    )
    connection_handshake_timeout_seconds: float = field(
        default=10.0,
        metadata=_doc(
            "Close a connection that has not finished its handshake (TLS, HTTP/2 preface "
            "and settings) within this long, so silent connections free their place"
        ),
    )
    connection_idle_seconds: float = field(
        default=0.0,
        metadata=_doc(
            "Close a connection without calls for this long (GOAWAY; the client reconnects "
            "when it next calls); 0 never closes idle connections"
        ),
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
    max_free_axis_size: int = field(
        default=4096,
        metadata=_doc(
            "Largest size a request may give an input axis the model leaves free (such "
            "as the height and width of a fully convolutional model); the batch axis is "
            "max_batch_size's"
        ),
    )
    max_objectives: int = field(
        default=16, metadata=_doc("Most objectives one explanation may sum")
    )
    max_filter_indices: int = field(
        default=4096,
        metadata=_doc(
            "Most filter indices one objective may list (each is resolved and echoed, so "
            "an unbounded list is unbounded work)"
        ),
    )
    max_samples: int = field(
        default=128, metadata=_doc("Most SmoothGrad noisy copies one explanation may ask for")
    )
    max_steps: int = field(
        default=512,
        metadata=_doc("Most Integrated Gradients steps one explanation may ask for"),
    )
    max_windows: int = field(
        default=4096,
        metadata=_doc(
            "Most occluded copies (window positions) of one sample an occlusion "
            "explanation may ask for"
        ),
    )
    max_request_cost: int = field(
        default=2**28,
        metadata=_doc(
            "Most device work one request may ask for, in element-evaluations: rows x "
            "evaluations per row (1 for Predict, samples for SmoothGrad, steps + 1 for "
            "Integrated Gradients) x input elements per row; a request over it is refused "
            "at once with INVALID_ARGUMENT (docs/bad-input.md)"
        ),
    )
    max_map_bytes: int = field(
        default=256 * MIB,
        metadata=_doc(
            "Most bytes of maps one explanation may return (rows x elements of the "
            "explained input x grad modifiers x bytes of output_dtype); over it is refused "
            "at once with INVALID_ARGUMENT"
        ),
    )
    frontends: int = field(
        default=1,
        metadata=_doc(
            "Front-end processes serving the gRPC port (1: one process does everything); "
            "2 or more: that many TensorFlow-free processes decode, check and encode "
            "requests over one device-owner process that holds the models. Raise it on "
            "many-core hosts whose one process is CPU-bound (README: Process layout)"
        ),
    )
    worker_threads: int = field(
        default=2,
        metadata=_doc(
            "Threads that check and plan requests off the event loop (device calls run "
            "on one thread per model)"
        ),
    )
    batching: bool = field(
        default=True,
        metadata=_doc(
            "Merge concurrent requests to one model into shared device calls (true/false); "
            "off, every request is a device call of its own, still one at a time per model"
        ),
    )
    max_device_batch_size: int = field(
        default=32,
        metadata=_doc(
            "Most samples one device call computes: concurrent requests are merged up to "
            "it, and a request larger than it is split across calls"
        ),
    )
    max_queue_delay_ms: float = field(
        default=0.0,
        metadata=_doc(
            "How long the oldest queued request may wait for others to join its batch "
            "while the device is free, in milliseconds; 0 sends at once, and requests "
            "that arrive during a device call form the next batch"
        ),
    )
    batch_buckets: tuple[int, ...] = field(
        default=(),
        metadata=_doc(
            "Batch sizes a device call is padded up to, comma-separated (such as 1,4,16,32); "
            "empty means the powers of two up to max_device_batch_size"
        ),
    )
    max_queue_size: int = field(
        default=256,
        metadata=_doc(
            "Most samples waiting for the device per model and lane; a request that does "
            "not fit is refused at once with RESOURCE_EXHAUSTED (at least max_batch_size)"
        ),
    )
    max_queue_cost: int = field(
        default=2**30,
        metadata=_doc(
            "Most cost (element-evaluations, as max_request_cost) waiting for the device "
            "per model and lane; a request that does not fit is refused at once with "
            "RESOURCE_EXHAUSTED (at least max_request_cost)"
        ),
    )
    max_call_cost: int = field(
        default=2**25,
        metadata=_doc(
            "Most cost of one device call: the rows of a heavier request are split over "
            "several calls (at least one row each), between which lighter work goes first"
        ),
    )
    light_request_cost: int = field(
        default=2**25,
        metadata=_doc(
            "Explanations costing at most this are queued in the light lane with every "
            "Predict; heavier ones in the heavy lane, which gets heavy_lane_share of the "
            "device while both lanes wait"
        ),
    )
    heavy_lane_share: float = field(
        default=0.25,
        metadata=_doc(
            "The heavy lane's share of the device's cost while both lanes have work "
            "waiting (weighted fair queueing by cost), above 0 and below 1"
        ),
    )
    device: str = field(
        default="auto",
        metadata=_doc(
            "Where model weights live and compute runs: auto (the first GPU if any, else "
            "the CPU), cpu, gpu or gpu:N; a GPU that is absent stops start-up"
        ),
    )
    mixed_precision: str = field(
        default="off",
        metadata=_doc(
            "Compute in a reduced float type, weights kept float32: off, on (float16 on a "
            "GPU, bfloat16 on a CPU), float16 or bfloat16"
        ),
    )
    xla: bool = field(
        default=False,
        metadata=_doc(
            "Compile predict and every explanation function with XLA (true/false); for "
            "GPUs: on a CPU it is usually slower"
        ),
    )
    shutdown_grace_seconds: float = field(
        default=10.0,
        metadata=_doc("How long in-flight calls may run on after SIGTERM before they are cut"),
    )
    log_level: str = field(
        default="INFO", metadata=_doc("Logging level: DEBUG, INFO, WARNING or ERROR")
    )
    log_repeat_burst: int = field(
        default=10,
        metadata=_doc(
            "Warnings of one kind (same logger, level and message template, such as "
            "refused calls from any peer) written per log_repeat_window_seconds; further "
            "ones are counted, and one line per window says how many were not logged; "
            "0 writes every one"
        ),
    )
    log_repeat_window_seconds: float = field(
        default=60.0,
        metadata=_doc("The window of log_repeat_burst, in seconds"),
    )
    plugins: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "Python modules imported at start-up, comma-separated, that register operator "
            "grad and backprop modifiers (salience_server.plugins); a module that fails to "
            "load stops start-up"
        ),
    )

    def batching_for(self, model: str) -> BatchingConfig:
        """The batching knobs of one model (the same for every model for now)."""
        buckets = self.batch_buckets or tuple(
            2**k for k in range(self.max_device_batch_size.bit_length())
        )
        return BatchingConfig(
            enabled=self.batching,
            max_device_batch_size=self.max_device_batch_size,
            max_queue_delay=self.max_queue_delay_ms / 1000.0,
            buckets=tuple(sorted({*buckets, self.max_device_batch_size})),
            max_queue_size=self.max_queue_size,
            max_queue_cost=self.max_queue_cost,
            max_call_cost=self.max_call_cost,
            light_request_cost=self.light_request_cost,
            heavy_share=self.heavy_lane_share,
        )

    @property
    def cost_limits(self) -> CostLimits:
        """The per-request caps in cost and map bytes."""
        return CostLimits(max_request_cost=self.max_request_cost, max_map_bytes=self.max_map_bytes)

    @property
    def limits(self) -> Limits:
        """The per-request caps explanation options are checked against."""
        return Limits(
            max_objectives=self.max_objectives,
            max_filter_indices=self.max_filter_indices,
            max_samples=self.max_samples,
            max_steps=self.max_steps,
            max_windows=self.max_windows,
        )

    def __post_init__(self) -> None:
        if self.model_repository is not None and not self.model_repository.is_dir():
            raise SettingsError(
                f"model_repository={str(self.model_repository)!r} is not a directory"
            )
        if not 0 <= self.repository_poll_seconds <= 3600:
            raise SettingsError(
                f"repository_poll_seconds={self.repository_poll_seconds} is out of range: use "
                "0 (off) to 3600"
            )
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port={self.port} is out of range: use 0..65535")
        if not 1 <= self.frontends <= 64:
            raise SettingsError(f"frontends={self.frontends} is out of range: use 1..64")
        if not -1 <= self.metrics_port <= 65535:
            raise SettingsError(
                f"metrics_port={self.metrics_port} is out of range: use -1 (off) or 0..65535"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            given, missing = (
                ("tls_cert_file", "tls_key_file")
                if self.tls_key_file is None
                else ("tls_key_file", "tls_cert_file")
            )
            raise SettingsError(
                f"{given} is set without {missing}: TLS needs both the certificate and "
                "its private key"
            )
        if (self.metrics_tls_cert_file is None) != (self.metrics_tls_key_file is None):
            given, missing = (
                ("metrics_tls_cert_file", "metrics_tls_key_file")
                if self.metrics_tls_key_file is None
                else ("metrics_tls_key_file", "metrics_tls_cert_file")
            )
            raise SettingsError(
                f"{given} is set without {missing}: TLS needs both the certificate and "
                "its private key"
            )
        if self.metrics_tls_client_ca_file is not None and self.metrics_tls_cert_file is None:
            raise SettingsError(
                "metrics_tls_client_ca_file is set without metrics_tls_cert_file and "
                "metrics_tls_key_file: mutual TLS needs the endpoint's own certificate and key"
            )
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise SettingsError(
                "tls_client_ca_file is set without tls_cert_file and tls_key_file: mutual "
                "TLS needs the server's own certificate and key too"
            )
        if not 0 <= self.max_connection_age_seconds <= 30 * 86400:
            raise SettingsError(
                f"max_connection_age_seconds={self.max_connection_age_seconds} is out of "
                "range: use 0 (never) to 2592000 (30 days)"
            )
        if self.max_connections < 0:
            raise SettingsError(
                f"max_connections={self.max_connections} must not be negative (0: from the "
                "open-files limit)"
            )
        if self.reserved_file_descriptors < 16:
            raise SettingsError(
                f"reserved_file_descriptors={self.reserved_file_descriptors} is too small: "
                "use at least 16"
            )
        if not 0.1 <= self.connection_handshake_timeout_seconds <= 600:
            raise SettingsError(
                "connection_handshake_timeout_seconds="
                f"{self.connection_handshake_timeout_seconds} is out of range: use 0.1 to 600"
            )
        if not 0 <= self.connection_idle_seconds <= 30 * 86400:
            raise SettingsError(
                f"connection_idle_seconds={self.connection_idle_seconds} is out of range: use "
                "0 (never) to 2592000 (30 days)"
            )
        if self.max_message_bytes < 4 * MIB:
            raise SettingsError(
                f"max_message_bytes={self.max_message_bytes} is too small: use at least {4 * MIB}"
            )
        for name in (
            "max_concurrent_streams",
            "max_free_axis_size",
            "max_batch_size",
            "max_objectives",
            "max_filter_indices",
            "max_samples",
            "max_steps",
            "max_windows",
            "worker_threads",
            "max_device_batch_size",
            "max_request_cost",
            "max_map_bytes",
            "max_queue_cost",
            "max_call_cost",
            "light_request_cost",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name}={getattr(self, name)} must be at least 1")
        if not (0 <= self.max_queue_delay_ms <= 60_000):
            raise SettingsError(
                f"max_queue_delay_ms={self.max_queue_delay_ms} is out of range: use 0..60000"
            )
        bad = [b for b in self.batch_buckets if not 1 <= b <= self.max_device_batch_size]
        if bad:
            raise SettingsError(
                f"batch_buckets has {bad[0]}, outside 1..max_device_batch_size="
                f"{self.max_device_batch_size}"
            )
        if self.max_queue_size < self.max_batch_size:
            raise SettingsError(
                f"max_queue_size={self.max_queue_size} is below max_batch_size="
                f"{self.max_batch_size}: the largest request would never fit in the queue"
            )
        if self.max_queue_cost < self.max_request_cost:
            raise SettingsError(
                f"max_queue_cost={self.max_queue_cost} is below max_request_cost="
                f"{self.max_request_cost}: the costliest request would never fit in the queue"
            )
        if not 0 < self.heavy_lane_share < 1:
            raise SettingsError(
                f"heavy_lane_share={self.heavy_lane_share} is out of range: use more than 0 "
                "and less than 1"
            )
        if not DEVICE_SETTING.match(self.device.strip().lower()):
            raise SettingsError(
                f"device={self.device!r} is not allowed: use auto, cpu, gpu or gpu:N"
            )
        if self.mixed_precision.strip().lower() not in MIXED_PRECISION:
            raise SettingsError(
                f"mixed_precision={self.mixed_precision!r} is not allowed: use "
                f"{', '.join(MIXED_PRECISION)}"
            )
        if self.shutdown_grace_seconds < 0:
            raise SettingsError(
                f"shutdown_grace_seconds={self.shutdown_grace_seconds} must not be negative"
            )
        if self.log_repeat_burst < 0:
            raise SettingsError(
                f"log_repeat_burst={self.log_repeat_burst} must not be negative (0: no limit)"
            )
        if not 0 < self.log_repeat_window_seconds <= 86400:
            raise SettingsError(
                f"log_repeat_window_seconds={self.log_repeat_window_seconds} is out of range: "
                "use more than 0, up to 86400"
            )
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(
                f"log_level={self.log_level!r} is not one of DEBUG, INFO, WARNING, ERROR"
            )
        for module in self.plugins:
            if not all(part.isidentifier() for part in module.split(".")):
                raise SettingsError(
                    f"plugins has {module!r}, which is not a Python module name "
                    "(dotted identifiers, such as mycompany.salience_modifiers)"
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


BOOLEANS = {"true": True, "1": True, "on": True, "false": False, "0": False, "off": False}


def _parse(f: dataclasses.Field[Any], raw: Any, source: str) -> Any:
    if not isinstance(raw, str):
        return raw
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "bool":
        value = BOOLEANS.get(raw.strip().lower())
        if value is None:
            raise SettingsError(f"{source}={raw!r} is not a boolean: use true or false")
        return value
    if kind.startswith("tuple[str"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if kind.startswith("tuple[int"):
        try:
            return tuple(int(part) for part in raw.split(",") if part.strip())
        except ValueError:
            raise SettingsError(
                f"{source}={raw!r} is not a comma-separated list of integers"
            ) from None
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
