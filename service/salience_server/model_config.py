"""Per-model configuration: the optional `DIR/<model>/config.toml` of a repository.

The file is TOML, parsed with the standard library's `tomllib`; every key is
optional. A full example (the README documents each key):

    version_policy = "latest"        # or "all", or a table:
    # [version_policy]
    # policy = "specific"            # "latest", "all" or "specific"
    # versions = [1, 3]              # specific: exactly these
    # count = 2                      # latest: how many of the highest (default 1)

    labels = ["cat", "dog"]          # or labels_file = "labels.txt" (one per line)
    labels_output = "probs"          # the output they name; default the first

    [batching]                       # the server's batching settings, for this model
    enabled = true
    max_device_batch_size = 16
    max_queue_delay_ms = 2.0
    batch_buckets = [1, 4, 16]
    max_queue_size = 128
    max_queue_cost = 268435456       # element-evaluations (salience_server.cost)
    max_call_cost = 16777216
    light_request_cost = 16777216

    [explain]                        # defaults for options a request leaves unset
    method = "smoothgrad"
    grad_modifiers = ["absolute"]
    normalize = true
    output_dtype = "float16"
    samples = 32
    noise = 0.1
    steps = 128

    [limits]                         # per-request caps; they only lower the server's
    max_batch_size = 16
    max_objectives = 4
    max_samples = 64
    max_steps = 256
    max_request_cost = 67108864      # element-evaluations (salience_server.cost)
    max_map_bytes = 67108864

    [preprocess]                     # applied inside the model's compiled functions
    input = "image"                  # which input (default: the only one)
    resize = "bilinear"              # "none" (exact shape) or "bilinear"
    channel_order = "bgr"            # "rgb" (as sent) or "bgr" (reverse the last axis)
    scale = 0.00392156862745098      # x * scale + offset; one value or one per channel
    offset = [-0.5, -0.5, -0.5]

    [inputs.image]                   # one table per input, by name
    wire_dtypes = ["uint8"]          # dtypes accepted besides the model's own; cast on
                                     # the device, inside the compiled functions
    wire_range = "unit"              # what an integer value v stands for: "raw" (the
                                     # float v) or "unit" (v / 255 for uint8, the [0, 1]
                                     # floats the client reads an image file as)

An unknown key or a bad value makes the model fail to load, with a message that
names the key (`batching.max_queue_size`) and the allowed values; the other models
of the repository load as usual. Parsing needs no TensorFlow: what can only be
checked against the loaded model (the preprocessed input, the channel count, the
label count, operator-registered grad modifiers) is checked when it is loaded.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import stat
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from salience_server.cost import CostLimits
from salience_server.errors import allowed
from salience_server.explain.options import (
    DEFAULT_SAMPLES,
    DEFAULT_STEPS,
    METHOD_NAMES,
    OUTPUT_DTYPES,
    ExplainOptions,
    Limits,
)
from salience_server.settings import BatchingConfig

CONFIG_FILE = "config.toml"
# A labels file larger than this is refused rather than read (a million short
# labels fit); it is an operator's file, but a wrong path should not eat memory.
MAX_LABELS_FILE_BYTES = 16 * 1024 * 1024

LATEST = "latest"
ALL = "all"
SPECIFIC = "specific"
POLICIES = (LATEST, ALL, SPECIFIC)

RGB = "rgb"
BGR = "bgr"
CHANNEL_ORDERS = (RGB, BGR)
RESIZE_NONE = "none"
RESIZE_BILINEAR = "bilinear"
RESIZE_POLICIES = (RESIZE_NONE, RESIZE_BILINEAR)

# Dtypes an input may accept on the wire besides the model's own (`[inputs.<name>]`).
WIRE_DTYPES = ("uint8",)
RANGE_RAW = "raw"
RANGE_UNIT = "unit"
WIRE_RANGES = (RANGE_RAW, RANGE_UNIT)

# The same bound the server's settings put on the queue delay.
MAX_QUEUE_DELAY_MS = 60_000.0


class ModelConfigError(ValueError):
    """A model's configuration cannot be used; the message names the key and what is
    allowed. The model fails to load; the rest of the repository does not.
    """


@dataclass(frozen=True)
class VersionPolicy:
    """Which of the version directories on disk are served.

    `latest` serves the `count` highest (1 by default, as TensorFlow Serving and
    Triton do), `all` every one, `specific` exactly `versions` (those present).
    """

    policy: str = LATEST
    count: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: Iterable[int]) -> tuple[int, ...]:
        """The versions to serve among those present, ascending."""
        present = sorted(set(available))
        if self.policy == ALL:
            return tuple(present)
        if self.policy == SPECIFIC:
            return tuple(v for v in present if v in self.versions)
        return tuple(present[-self.count :]) if present else ()

    def describe(self) -> str:
        """`latest 2`, `all` or `specific 1, 3`, for logs and messages."""
        if self.policy == LATEST:
            return f"latest {self.count}"
        if self.policy == SPECIFIC:
            return f"specific {', '.join(map(str, self.versions))}"
        return ALL


@dataclass(frozen=True)
class BatchingOverrides:
    """The server's batching settings (same names) overridden for one model; None
    keeps the server's value.
    """

    enabled: bool | None = None
    max_device_batch_size: int | None = None
    max_queue_delay_ms: float | None = None
    batch_buckets: tuple[int, ...] | None = None
    max_queue_size: int | None = None
    max_queue_cost: int | None = None
    max_call_cost: int | None = None
    light_request_cost: int | None = None

    def apply(self, base: BatchingConfig) -> BatchingConfig:
        """The model's batching: `base` (the server's) with these overrides.

        Buckets left unset are the powers of two up to the model's device batch
        size, as the server's default; the largest bucket is always that size.
        """
        size = self.max_device_batch_size or base.max_device_batch_size
        if self.batch_buckets is not None:
            buckets: Iterable[int] = self.batch_buckets
        elif self.max_device_batch_size is not None:
            buckets = (2**k for k in range(size.bit_length()))
        else:
            buckets = base.buckets
        return BatchingConfig(
            enabled=base.enabled if self.enabled is None else self.enabled,
            max_device_batch_size=size,
            max_queue_delay=base.max_queue_delay
            if self.max_queue_delay_ms is None
            else self.max_queue_delay_ms / 1000.0,
            buckets=tuple(sorted({*(b for b in buckets if b <= size), size})),
            max_queue_size=base.max_queue_size
            if self.max_queue_size is None
            else self.max_queue_size,
            max_queue_cost=base.max_queue_cost
            if self.max_queue_cost is None
            else self.max_queue_cost,
            max_call_cost=base.max_call_cost if self.max_call_cost is None else self.max_call_cost,
            light_request_cost=base.light_request_cost
            if self.light_request_cost is None
            else self.light_request_cost,
            heavy_share=base.heavy_share,
        )


@dataclass(frozen=True)
class ExplainDefaults:
    """Explanation options used when a request leaves them unset (None: the
    server's default). Only options a request can leave unset are here: a request
    cannot say "keepdims=false" apart from "unset", so a default of true could never
    be turned off.
    """

    method: str | None = None
    grad_modifiers: tuple[str, ...] | None = None
    normalize: bool | None = None
    output_dtype: str | None = None
    samples: int | None = None
    noise: float | None = None
    steps: int | None = None

    def values(self) -> dict[str, Any]:
        """The configured defaults by ExplainOptions field name."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    def apply(self, options: ExplainOptions) -> ExplainOptions:
        """`options` with every field the request left unset (`options.unset`) taken
        from these defaults.
        """
        chosen = {name: v for name, v in self.values().items() if name in options.unset}
        if not chosen:
            return options
        return dataclasses.replace(options, **chosen, unset=options.unset.difference(chosen))


@dataclass(frozen=True)
class ModelLimits:
    """Per-request caps of one model; each only lowers the server's (None: the
    server's).
    """

    max_batch_size: int | None = None
    max_objectives: int | None = None
    max_samples: int | None = None
    max_steps: int | None = None
    max_request_cost: int | None = None
    max_map_bytes: int | None = None

    def cost(self, server: CostLimits) -> CostLimits:
        """The server's caps in cost and map bytes, lowered by this model's."""
        lowered = {
            name: own
            for name in ("max_request_cost", "max_map_bytes")
            if (own := getattr(self, name)) is not None and own < getattr(server, name)
        }
        if not lowered:
            return server
        return dataclasses.replace(
            server, **lowered, model_caps=server.model_caps | frozenset(lowered)
        )

    def batch_size(self, server: int) -> int:
        """The largest batch one request to this model may carry."""
        return server if self.max_batch_size is None else min(server, self.max_batch_size)

    def apply(self, server: Limits) -> Limits:
        """The server's explanation caps, lowered by this model's."""

        def cap(name: str) -> int:
            own = getattr(self, name)
            value: int = getattr(server, name)
            return value if own is None else min(value, own)

        lowered = frozenset(
            name
            for name in ("max_objectives", "max_samples", "max_steps")
            if getattr(self, name) is not None and getattr(self, name) < getattr(server, name)
        )
        return dataclasses.replace(
            server,
            max_objectives=cap("max_objectives"),
            max_samples=cap("max_samples"),
            max_steps=cap("max_steps"),
            model_caps=server.model_caps | lowered,
        )


@dataclass(frozen=True)
class PreprocessConfig:
    """What the server does to a request's input before the model sees it.

    In order: `resize` the spatial axes to the model's (bilinear) or require the
    model's exact shape (none); reverse the channel axis (`channel_order = "bgr"`);
    then `x * scale + offset`, with one value or one per channel (in the model's
    channel order). Empty scale/offset: 1 and 0.
    """

    input: str = ""
    scale: tuple[float, ...] = ()
    offset: tuple[float, ...] = ()
    channel_order: str = RGB
    resize: str = RESIZE_NONE

    @property
    def active(self) -> bool:
        """Whether any preprocessing is configured."""
        return bool(
            self.scale or self.offset or self.channel_order != RGB or self.resize != RESIZE_NONE
        )


@dataclass(frozen=True)
class InputConfig:
    """What one input accepts on the wire (`[inputs.<name>]`).

    `wire_dtypes` are accepted besides the model's own dtype and cast to it on the
    device, inside the compiled functions, so that the smaller tensor is what
    crosses to the device. An integer value `v` reaches the model (and its
    `[preprocess]`) as the float `v` (`wire_range = "raw"`) or `v / 255` for uint8
    (`"unit"`: the [0, 1] floats the client reads an image file as), so that a
    uint8 image and the float image it stands for get the same answer.
    """

    name: str
    wire_dtypes: tuple[str, ...] = ()
    wire_range: str = RANGE_RAW


@dataclass(frozen=True)
class ModelConfig:
    """Everything `config.toml` sets for one model; the defaults are those of a
    model without the file.
    """

    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    batching: BatchingOverrides = field(default_factory=BatchingOverrides)
    explain: ExplainDefaults = field(default_factory=ExplainDefaults)
    limits: ModelLimits = field(default_factory=ModelLimits)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # What inputs accept on the wire besides the model's dtype, in file order.
    inputs: tuple[InputConfig, ...] = ()
    # Class names of the last axis of output `labels_output` ("": the first output).
    labels: tuple[str, ...] = ()
    labels_output: str = ""

    def input_config(self, name: str) -> InputConfig:
        """The `[inputs.<name>]` of one input (the defaults when it has none)."""
        return next((c for c in self.inputs if c.name == name), InputConfig(name))

    def labelled_output(self, output_names: Sequence[str]) -> int | None:
        """The index of the output the labels name (None: no labels)."""
        if not self.labels:
            return None
        return output_names.index(self.labels_output) if self.labels_output else 0

    def top_labels(self, output_names: Sequence[str], outputs: Sequence[np.ndarray]) -> list[str]:
        """Per sample, the label of the arg-max unit of the labelled output; empty
        without labels. For an output with axes between the batch and the labelled
        last axis, a unit's value is its mean over them.
        """
        index = self.labelled_output(output_names)
        if index is None:
            return []
        values = np.asarray(outputs[index])
        if values.ndim > 2:
            values = values.reshape(values.shape[0], -1, values.shape[-1]).mean(axis=1)
        return [self.labels[int(k)] for k in np.argmax(values, axis=-1)]


# Reading --------------------------------------------------------------------------


class _Table:
    """One TOML table, read key by key; `finish` refuses the keys nobody read."""

    def __init__(self, data: Mapping[str, Any], prefix: str, keys: Iterable[str]) -> None:
        self.data = data
        self.prefix = prefix
        self.keys = tuple(keys)

    def field(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def has(self, key: str) -> bool:
        return key in self.data

    def error(self, key: str, problem: str) -> ModelConfigError:
        return ModelConfigError(f"{self.field(key)}={self.data[key]!r} {problem}")

    def finish(self) -> None:
        unknown = [key for key in self.data if key not in self.keys]
        if unknown:
            where = f"table [{self.prefix[:-1]}]" if self.prefix else "the top level"
            raise ModelConfigError(
                f"{self.field(unknown[0])} is not a key of {where}: use "
                f"{allowed(self.keys, limit=20)}"
            )

    def table(self, key: str, keys: Iterable[str]) -> _Table:
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, "is not a table: write it as [" + self.field(key) + "]")
        return _Table(value, f"{self.field(key)}.", keys)

    def choice(self, key: str, choices: Iterable[str]) -> str | None:
        value = self.data.get(key)
        options = tuple(choices)
        if value is None:
            return None
        if not isinstance(value, str) or value not in options:
            raise self.error(key, f"is not allowed: use one of {allowed(options)}")
        return value

    def boolean(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self.error(key, "is not a boolean: use true or false")
        return value

    def integer(self, key: str, minimum: int = 1) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"is not allowed: use an integer of at least {minimum}")
        return value

    def number(self, key: str, low: float, high: float = math.inf) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not low <= value <= high
        ):
            bounds = f"{low:g}..{high:g}" if math.isfinite(high) else f"a finite value >= {low:g}"
            raise self.error(key, f"is not allowed: use {bounds}")
        return float(value)

    def integers(self, key: str, minimum: int = 1) -> tuple[int, ...] | None:
        value = self.data.get(key)
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or not value
            or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in value)
        ):
            raise self.error(
                key, f"is not allowed: use a non-empty list of integers of at least {minimum}"
            )
        if len(set(value)) != len(value):
            raise self.error(key, "lists a value twice: list each once")
        return tuple(value)

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, "is not allowed: use a list of strings")
        return tuple(value)

    def numbers(self, key: str) -> tuple[float, ...] | None:
        """One finite number, or a non-empty list of them (one per channel)."""
        value = self.data.get(key)
        if value is None:
            return None
        values = value if isinstance(value, list) else [value]
        if not values or any(
            isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            for v in values
        ):
            raise self.error(
                key, "is not allowed: use a finite number or a list of them (one per channel)"
            )
        return tuple(float(v) for v in values)


def _version_policy(top: _Table) -> VersionPolicy:
    if not top.has("version_policy"):
        return VersionPolicy()
    if isinstance(top.data["version_policy"], str):
        # The short form names a policy with its defaults.
        policy = top.choice("version_policy", POLICIES)
        if policy == SPECIFIC:
            raise top.error(
                "version_policy",
                'needs its versions: write [version_policy] with policy = "specific" and '
                "versions = [...]",
            )
        return VersionPolicy(policy=policy or LATEST)
    table = top.table("version_policy", ("policy", "count", "versions"))
    policy = table.choice("policy", POLICIES) or LATEST
    count = table.integer("count")
    versions = table.integers("versions")
    table.finish()
    if count is not None and policy != LATEST:
        raise table.error("count", f"does not apply to policy {policy!r}: only to 'latest'")
    if versions is not None and policy != SPECIFIC:
        raise table.error("versions", f"does not apply to policy {policy!r}: only to 'specific'")
    if policy == SPECIFIC and versions is None:
        raise ModelConfigError(
            "version_policy.versions is missing: policy 'specific' serves exactly the listed "
            "versions, such as versions = [1, 3]"
        )
    return VersionPolicy(policy=policy, count=count or 1, versions=tuple(sorted(versions or ())))


def _batching(top: _Table) -> BatchingOverrides:
    table = top.table(
        "batching",
        (
            "enabled",
            "max_device_batch_size",
            "max_queue_delay_ms",
            "batch_buckets",
            "max_queue_size",
            "max_queue_cost",
            "max_call_cost",
            "light_request_cost",
        ),
    )
    overrides = BatchingOverrides(
        enabled=table.boolean("enabled"),
        max_device_batch_size=table.integer("max_device_batch_size"),
        max_queue_delay_ms=table.number("max_queue_delay_ms", 0.0, MAX_QUEUE_DELAY_MS),
        batch_buckets=table.integers("batch_buckets"),
        max_queue_size=table.integer("max_queue_size"),
        max_queue_cost=table.integer("max_queue_cost"),
        max_call_cost=table.integer("max_call_cost"),
        light_request_cost=table.integer("light_request_cost"),
    )
    table.finish()
    size = overrides.max_device_batch_size
    if overrides.batch_buckets is not None and size is not None:
        over = [b for b in overrides.batch_buckets if b > size]
        if over:
            raise table.error(
                "batch_buckets",
                f"has {over[0]}, over batching.max_device_batch_size={size}: use 1..{size}",
            )
    return overrides


def _explain(top: _Table) -> ExplainDefaults:
    table = top.table(
        "explain",
        ("method", "grad_modifiers", "normalize", "output_dtype", "samples", "noise", "steps"),
    )
    grad_modifiers = table.strings("grad_modifiers")
    if grad_modifiers is not None:
        if not grad_modifiers:
            raise table.error("grad_modifiers", "is empty: list at least one grad modifier")
        if len(set(grad_modifiers)) != len(grad_modifiers):
            raise table.error("grad_modifiers", "lists a modifier twice: list each once")
    defaults = ExplainDefaults(
        method=table.choice("method", METHOD_NAMES),
        grad_modifiers=grad_modifiers,
        normalize=table.boolean("normalize"),
        output_dtype=table.choice("output_dtype", OUTPUT_DTYPES),
        samples=table.integer("samples"),
        noise=table.number("noise", 0.0),
        steps=table.integer("steps"),
    )
    table.finish()
    if defaults.output_dtype == "uint8" and defaults.normalize is False:
        raise table.error(
            "output_dtype", "needs explain.normalize = true: raw gradients do not fit in 0..255"
        )
    return defaults


def _limits(top: _Table) -> ModelLimits:
    table = top.table(
        "limits",
        (
            "max_batch_size",
            "max_objectives",
            "max_samples",
            "max_steps",
            "max_request_cost",
            "max_map_bytes",
        ),
    )
    limits = ModelLimits(
        max_batch_size=table.integer("max_batch_size"),
        max_objectives=table.integer("max_objectives"),
        max_samples=table.integer("max_samples"),
        max_steps=table.integer("max_steps"),
        max_request_cost=table.integer("max_request_cost"),
        max_map_bytes=table.integer("max_map_bytes"),
    )
    table.finish()
    return limits


def _preprocess(top: _Table) -> PreprocessConfig:
    table = top.table("preprocess", ("input", "scale", "offset", "channel_order", "resize"))
    name = table.data.get("input", "")
    if not isinstance(name, str):
        raise table.error("input", "is not allowed: use the name of a model input")
    config = PreprocessConfig(
        input=name,
        scale=table.numbers("scale") or (),
        offset=table.numbers("offset") or (),
        channel_order=table.choice("channel_order", CHANNEL_ORDERS) or RGB,
        resize=table.choice("resize", RESIZE_POLICIES) or RESIZE_NONE,
    )
    table.finish()
    return config


def _inputs(top: _Table) -> tuple[InputConfig, ...]:
    tables = top.table("inputs", ())
    configs = []
    for name in tables.data:
        table = tables.table(name, ("wire_dtypes", "wire_range"))
        dtypes = table.strings("wire_dtypes") or ()
        for k, dtype in enumerate(dtypes):
            if dtype not in WIRE_DTYPES:
                raise ModelConfigError(
                    f"{table.field('wire_dtypes')}[{k}]={dtype!r} is not allowed: use "
                    f"{allowed(WIRE_DTYPES)}"
                )
        if len(set(dtypes)) != len(dtypes):
            raise table.error("wire_dtypes", "lists a dtype twice: list each once")
        wire_range = table.choice("wire_range", WIRE_RANGES)
        table.finish()
        if wire_range is not None and not dtypes:
            raise table.error("wire_range", "is set without wire_dtypes: add wire_dtypes")
        configs.append(InputConfig(name, tuple(dtypes), wire_range or RANGE_RAW))
    return tuple(configs)


def special(mode: int) -> str:
    """What a file of this mode is when it is neither a regular file nor a directory
    (a FIFO, a socket, a device), else "".
    """
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "" if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else "not a regular file"


def read_regular(path: Path) -> bytes:
    """The bytes of a regular file; OSError for anything else. Opened without
    blocking and checked on the open descriptor, so that a FIFO (whose read would
    block for ever), even one put in the file's place after a check, is never read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = special(mode) or "a directory"
            raise OSError(errno.EINVAL, f"it is {kind}, not a regular file")
        os.set_blocking(fd, True)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _safe_relative(model_dir: Path, name: str, key: str) -> Path:
    """A file named in the configuration, which must stay inside the model directory."""
    relative = Path(name)
    if (
        not name
        or "\x00" in name
        or relative.is_absolute()
        or ".." in relative.parts
        or "\\" in name
    ):
        raise ModelConfigError(
            f"{key}={name!r} is not allowed: name a file inside the model directory, "
            "such as 'labels.txt' (no absolute path, no '..')"
        )
    path = model_dir / relative
    root = model_dir.resolve()
    if not path.resolve().is_relative_to(root):
        raise ModelConfigError(
            f"{key}={name!r} leads outside the model directory {model_dir.name!r}: "
            "keep the file inside it"
        )
    return path


def _read_labels_file(path: Path, key: str, name: str) -> tuple[str, ...]:
    try:
        size = path.stat().st_size
        if size > MAX_LABELS_FILE_BYTES:
            raise ModelConfigError(
                f"{key}={name!r} is {size} bytes, over the {MAX_LABELS_FILE_BYTES} allowed"
            )
        text = read_regular(path).decode("utf-8")
    except FileNotFoundError:
        raise ModelConfigError(f"{key}={name!r} does not exist in the model directory") from None
    except UnicodeDecodeError:
        raise ModelConfigError(f"{key}={name!r} is not UTF-8 text") from None
    except OSError as err:
        raise ModelConfigError(f"{key}={name!r} cannot be read: {err.strerror}") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line:
            raise ModelConfigError(
                f"{key}={name!r} has an empty line {number}: write one label per line"
            )
    if not lines:
        raise ModelConfigError(f"{key}={name!r} holds no labels: write one label per line")
    return tuple(lines)


def _labels(top: _Table, model_dir: Path | None) -> tuple[str, ...]:
    if top.has("labels") and top.has("labels_file"):
        raise ModelConfigError(
            "labels and labels_file are both set: give the labels in one of them"
        )
    labels = top.strings("labels")
    if labels is not None:
        if not labels or not all(labels):
            raise top.error("labels", "is not allowed: use a list of non-empty strings")
        return labels
    if not top.has("labels_file"):
        return ()
    name = top.data["labels_file"]
    if not isinstance(name, str):
        raise top.error("labels_file", "is not allowed: name a text file, one label per line")
    if model_dir is None:
        raise ModelConfigError("labels_file needs the model directory to be read from")
    return _read_labels_file(_safe_relative(model_dir, name, "labels_file"), "labels_file", name)


TOP_LEVEL_KEYS = (
    "version_policy",
    "labels",
    "labels_file",
    "labels_output",
    "batching",
    "explain",
    "limits",
    "preprocess",
    "inputs",
)


def parse_model_config(data: Mapping[str, Any], model_dir: Path | None = None) -> ModelConfig:
    """A ModelConfig from parsed TOML; `model_dir` resolves `labels_file`.

    Raises ModelConfigError naming the first bad key and what it allows.
    """
    top = _Table(data, "", TOP_LEVEL_KEYS)
    labels_output = data.get("labels_output", "")
    if not isinstance(labels_output, str):
        raise top.error("labels_output", "is not allowed: use the name of a model output")
    config = ModelConfig(
        version_policy=_version_policy(top),
        batching=_batching(top),
        explain=_explain(top),
        limits=_limits(top),
        preprocess=_preprocess(top),
        inputs=_inputs(top),
        labels=_labels(top, model_dir),
        labels_output=labels_output,
    )
    top.finish()
    if labels_output and not config.labels:
        raise ModelConfigError(
            f"labels_output={labels_output!r} is set without labels: add labels or labels_file"
        )
    _check_consistent(config)
    return config


def _check_consistent(config: ModelConfig) -> None:
    """Keys that are each fine but contradict one another."""
    for knob, cap, builtin in (
        ("samples", "max_samples", DEFAULT_SAMPLES),
        ("steps", "max_steps", DEFAULT_STEPS),
    ):
        limit = getattr(config.limits, cap)
        chosen = getattr(config.explain, knob)
        default = builtin if chosen is None else chosen
        if limit is not None and default > limit:
            source = f"explain.{knob}={chosen}" if chosen is not None else f"the built-in {builtin}"
            raise ModelConfigError(
                f"limits.{cap}={limit} is below the default {knob}, {source}, so requests "
                f"that leave {knob} unset would be refused: set explain.{knob} to at most {limit}"
            )
    queue = config.batching.max_queue_size
    largest = config.limits.max_batch_size
    if queue is not None and largest is not None and queue < largest:
        raise ModelConfigError(
            f"batching.max_queue_size={queue} is below limits.max_batch_size={largest}: the "
            "largest request would never fit in the queue"
        )
    queue_cost = config.batching.max_queue_cost
    costliest = config.limits.max_request_cost
    if queue_cost is not None and costliest is not None and queue_cost < costliest:
        raise ModelConfigError(
            f"batching.max_queue_cost={queue_cost} is below limits.max_request_cost="
            f"{costliest}: the costliest request would never fit in the queue"
        )


def load_model_config(model_dir: Path) -> ModelConfig:
    """The configuration of the model in `model_dir`: its `config.toml`, or the
    defaults when there is none. Raises ModelConfigError (naming the file) when it
    cannot be read or used.
    """
    path = model_dir / CONFIG_FILE
    if not path.exists():
        return ModelConfig()
    try:
        data = tomllib.loads(read_regular(path).decode("utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ModelConfigError(f"{CONFIG_FILE} is not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise ModelConfigError(f"{CONFIG_FILE} is not UTF-8 text") from None
    except OSError as err:
        raise ModelConfigError(f"{CONFIG_FILE} cannot be read: {err.strerror}") from None
    try:
        return parse_model_config(data, model_dir)
    except ModelConfigError as err:
        raise ModelConfigError(f"{CONFIG_FILE}: {err}") from None
