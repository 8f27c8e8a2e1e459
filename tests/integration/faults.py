"""Keras layers that misbehave on purpose, for the tests that try to break the server.

Both are the identity on their input, so a model's answers stay those of the same
model without them, and both are registered Keras objects: a `model.keras` that
holds them loads in safe mode in any process that imported this module — a test's
own, or a `salience serve` child started with `--plugins tests.integration.faults`.

- `Gate`: every forward pass waits while the file `hold` exists, then sleeps
  `delay` seconds, and appends one line to the file `log` (when set) as it enters.
  A test holds the model's device thread for as long as it likes, knows when a
  device call has started, and can make every call slow — across processes, since
  a file is all they share.
- `Tripwire`: a forward pass whose input holds the value `assert_value` fails a
  TensorFlow assertion (InvalidArgumentError, the model refusing an input), one
  that holds `error_value` fails with an error of the layer's own code (a
  RuntimeError in a `tf.py_function`: UnknownError), and one that holds
  `oom_value` with the ResourceExhaustedError TensorFlow raises when a device runs
  out of memory.

Values are checked on the layer's input; requests carry values in [-1, 1], which
never trip it. The layers add `stop_gradient` of their side computation, so
gradients are the identity's and the maps equal those of the model without them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

PACKAGE = "salience_tests"
POLL_SECONDS = 0.005


@keras.saving.register_keras_serializable(package=PACKAGE)
class Gate(keras.layers.Layer):
    """The identity, held while the file `hold` exists (see the module docstring)."""

    def __init__(self, hold: str = "", delay: float = 0.0, log: str = "", **kwargs: Any):
        super().__init__(**kwargs)
        self.hold = hold
        self.delay = delay
        self.log = log

    def _pass(self, rows: tf.Tensor) -> tf.Tensor:
        if self.log:
            with open(self.log, "a") as sink:
                sink.write(f"{int(rows.numpy())}\n")
        if self.hold:
            # Polled rather than waited on: the holder may be another process.
            while Path(self.hold).exists():
                time.sleep(POLL_SECONDS)
        if self.delay:
            time.sleep(self.delay)
        return tf.zeros((), tf.float32)

    def call(self, x: Any) -> Any:
        # A py_function's result has no static shape; the model's layers need one.
        side = tf.reshape(tf.py_function(self._pass, [tf.shape(x)[0]], tf.float32), [])
        # x + 0, computed after the side effect; the gradient is the identity's.
        return x + tf.cast(tf.stop_gradient(side), x.dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "hold": self.hold, "delay": self.delay, "log": self.log}


def _raise(oom: tf.Tensor, error: tf.Tensor) -> tf.Tensor:
    if bool(oom.numpy()):
        # TensorFlow turns a MemoryError in a py_function into ResourceExhaustedError
        # (an OpError raised here would reach the caller as UnknownError).
        raise MemoryError("OOM when allocating tensor (simulated by the test's Tripwire layer)")
    if bool(error.numpy()):
        raise RuntimeError("Tripwire: a bug in a custom layer")  # UnknownError
    return tf.zeros((), tf.float32)


@keras.saving.register_keras_serializable(package=PACKAGE)
class Tripwire(keras.layers.Layer):
    """The identity, failing on inputs that hold a trip value (see the module docstring)."""

    def __init__(
        self,
        assert_value: float = 99.0,
        oom_value: float = 77.0,
        error_value: float = 55.0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.assert_value = assert_value
        self.oom_value = oom_value
        self.error_value = error_value

    def _holds(self, x: Any, value: float) -> Any:
        return tf.reduce_any(tf.equal(x, tf.cast(value, x.dtype)))

    def call(self, x: Any) -> Any:
        check = tf.debugging.Assert(
            tf.logical_not(self._holds(x, self.assert_value)),
            ["Tripwire: input holds", self.assert_value],
        )
        flags = [self._holds(x, self.oom_value), self._holds(x, self.error_value)]
        with tf.control_dependencies([check]):
            side = tf.reshape(tf.py_function(_raise, flags, tf.float32), [])
        return x + tf.cast(tf.stop_gradient(side), x.dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "assert_value": self.assert_value,
            "oom_value": self.oom_value,
            "error_value": self.error_value,
        }


def entered(log: Path) -> list[int]:
    """The batch sizes of the forward passes a `Gate` logged so far, in order."""
    if not log.exists():
        return []
    return [int(line) for line in log.read_text().split()]


def trip_sample(shape: tuple[int, ...], value: float, rng: np.random.Generator) -> np.ndarray:
    """One ordinary float32 sample (batch of 1) with `value` in one element."""
    x = rng.uniform(-1, 1, (1, *shape)).astype(np.float32)
    x.reshape(-1)[int(rng.integers(x.size))] = value
    return x
