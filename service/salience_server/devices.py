"""Where models live and how they compute: the device, mixed precision and XLA.

`configure` runs once at start-up, before TensorFlow runs any op: it turns GPU
memory growth on (so one server does not take a whole GPU's memory up front, and
TensorFlow allows it only before a GPU is initialised), checks that the chosen
device exists, and returns the `Placement` every model is loaded with.

A model's weights are created under `tf.device(placement.device)` and stay there for
its lifetime; every compiled call runs in the same scope (the runtime enters it, and
a model's device thread lives inside it), so a batch's inputs cross to the device
once and only outputs and final maps come back.

Mixed precision (`on`): float16 compute on a GPU (its tensor cores), bfloat16 on a
CPU, the only reduced type CPUs compute natively (AVX512-BF16, AMX); variables stay
float32 and layers that produce a model output stay float32, so predictions keep
their dtype and softmax its range. Only layers that computed in float32 change; a
float64 model keeps float64. XLA (`xla`) compiles each device function with
`jit_compile=True`; XLA compiles per input shape, which is why warm-up runs every
batch bucket.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from salience_server.settings import Settings, SettingsError

log = logging.getLogger(__name__)

CPU = "/CPU:0"
FLOAT32 = "float32"
FLOAT16 = "float16"
BFLOAT16 = "bfloat16"
# Keras policy names of the reduced compute dtypes.
POLICIES = {FLOAT16: "mixed_float16", BFLOAT16: "mixed_bfloat16"}
DEVICE_SETTING = re.compile(r"^(auto|cpu|gpu|gpu:(\d+))$")


@dataclass(frozen=True)
class Placement:
    """The device a model's weights and compiled calls live on, and how it computes."""

    device: str = CPU  # a TensorFlow device name: /CPU:0, /GPU:1
    compute_dtype: str = FLOAT32  # float32, float16 or bfloat16 (mixed precision)
    xla: bool = False

    @property
    def is_gpu(self) -> bool:
        return "GPU" in self.device.upper()

    @property
    def policy(self) -> str | None:
        """The Keras mixed-precision policy layers switch to (None: float32)."""
        return POLICIES.get(self.compute_dtype)

    @property
    def jit_compile(self) -> bool | None:
        """`tf.function`'s argument: True compiles with XLA, None leaves TensorFlow's default."""
        return True if self.xla else None

    def scope(self) -> Any:
        """The `tf.device` scope of this placement (thread-local, re-entrant)."""
        return tf.device(self.device)

    def describe(self) -> str:
        extras = [f"mixed precision {self.compute_dtype}"] if self.policy else []
        extras += ["XLA"] if self.xla else []
        return self.device + (f" ({', '.join(extras)})" if extras else "")


_CURRENT: ContextVar[Placement | None] = ContextVar("salience_placement", default=None)


def current() -> Placement:
    """The placement of models constructed now (see `placing`); outside it, the
    default of the `device` setting: the first GPU if any, else the CPU.
    """
    placement = _CURRENT.get()
    if placement is None:
        gpus = len(tf.config.list_physical_devices("GPU"))
        placement = Placement(device=resolve_device("auto", gpus))
    return placement


@contextmanager
def placing(placement: Placement) -> Iterator[None]:
    """Models constructed and loaded inside take `placement`, and their weights are
    created on its device, whatever loader the repository uses for their format.
    """
    token = _CURRENT.set(placement)
    try:
        with placement.scope():
            yield
    finally:
        _CURRENT.reset(token)


def resolve_device(setting: str, gpus: int) -> str:
    """The TensorFlow device name of the `device` setting, given how many GPUs exist.

    Raises SettingsError naming what this machine has when the device is absent.
    """
    match = DEVICE_SETTING.match(setting.strip().lower())
    if match is None:
        raise SettingsError(f"device={setting!r} is not allowed: use auto, cpu, gpu or gpu:N")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        return "/GPU:0" if gpus else CPU
    if kind == "cpu":
        return CPU
    n = int(index) if index is not None else 0
    if n >= gpus:
        have = (
            "no GPU (TensorFlow sees none: is this the GPU build, with a driver?)"
            if not gpus
            else f"{gpus} GPU{'s' if gpus > 1 else ''} ("
            + ", ".join(f"gpu:{k}" for k in range(gpus))
            + ")"
        )
        raise SettingsError(
            f"device={setting!r} is not available: this machine has {have}; use cpu"
        )
    return f"/GPU:{n}"


def resolve_compute_dtype(setting: str, device: str) -> str:
    """float32, float16 or bfloat16 for the `mixed_precision` setting on `device`."""
    value = setting.strip().lower()
    if value == "off":
        return FLOAT32
    if value == "on":
        return FLOAT16 if "GPU" in device else BFLOAT16
    if value in POLICIES:
        return value
    raise SettingsError(
        f"mixed_precision={setting!r} is not allowed: use off, on, float16 or bfloat16"
    )


def configure(settings: Settings) -> Placement:
    """Turns GPU memory growth on and resolves the settings into a placement; raises
    SettingsError when the device asked for does not exist. Call before any op.
    """
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            # Already initialised: an earlier server in this process set it.
            log.debug("memory growth of %s is already fixed", gpu.name)
    device = resolve_device(settings.device, len(gpus))
    if device == CPU and gpus:
        try:
            # No op may land on a GPU by soft placement, nor take its memory.
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:
            log.debug("GPU visibility is already fixed")
    placement = Placement(
        device=device,
        compute_dtype=resolve_compute_dtype(settings.mixed_precision, device),
        xla=settings.xla,
    )
    log.info(
        "models go to %s; GPUs seen: %s",
        placement.describe(),
        ", ".join(g.name for g in gpus) or "none",
    )
    return placement


def memory_info(device: str) -> Mapping[str, int]:
    """Bytes of device memory TensorFlow holds now ("current") and at most ("peak")."""
    info: Mapping[str, int] = tf.config.experimental.get_memory_info(device.lstrip("/"))
    return info


def apply_mixed_precision(model: keras.Model, policy: str) -> int:
    """Switches every float32 layer of `model` (nested models included) to `policy`,
    except the layers producing its outputs; returns how many switched.

    Variables keep float32 (a mixed policy's variable dtype); each layer casts its
    inputs to the reduced type. The served model is changed in place: it was loaded
    for this runtime alone.
    """
    switched = 0
    outputs = {
        id(history.operation)
        for t in model.outputs
        if (history := getattr(t, "_keras_history", None)) is not None
    }
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or id(layer) in outputs:
            continue
        if isinstance(layer, keras.Model) and getattr(layer, "outputs", None):
            switched += apply_mixed_precision(layer, policy)
            continue
        if layer.dtype_policy.name != FLOAT32:
            continue  # float64 or integer layers keep what they were built with
        layer.dtype_policy = policy
        switched += 1
    return switched


def weights_device(model: Any) -> str:
    """The device the first weight of a model lives on ("" without weights)."""
    for variable in getattr(model, "weights", ()):
        value = getattr(variable, "value", variable)
        device = getattr(value, "device", "")
        if device:
            return str(device)
    return ""
