"""A model's input preprocessing (`[preprocess]` of its config.toml), as ops inside
its compiled functions.

For one input, in order: resize the spatial axes to the model's (bilinear,
`tf.image.resize` with half-pixel centres and no antialiasing), reverse the channel
axis (`channel_order = "bgr"`, as the keras-vis self-driving example fed its
network), then `x * scale + offset` (one value, or one per channel in the model's
channel order).

The ops run inside the model's forward and explanation functions, in front of the
model, so every gradient is taken with respect to the input *as the request sent
it*: a map is in the sender's input space — its shape is the request's, also when
the input was resized — and it is the chain rule through the preprocessing (with
scale `a` and `bgr`, `∂s/∂x[..., c] = a[c'] · ∂s/∂x'[..., c']` where `c' = C−1−c`).
The model itself and its layers are untouched: layer names and indices stay those
of the model file.

An input may also accept narrower dtypes on the wire (`[inputs.<name>]
wire_dtypes`, `WireCast`): a uint8 image is cast (and with `wire_range = "unit"`
divided by 255) inside the compiled function, in front of the preprocessing, so
the tensor that crosses to the device is the uint8 one, a quarter of the float32
bytes. Maps are then in the space of the float input the cast makes: with respect
to `x = float(v)` (raw) or `x = v / 255` (unit), shaped like the input, the same
map a float request sending that `x` gets; not per step of the integer value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from salience_server.errors import allowed
from salience_server.model_config import (
    BGR,
    RANGE_UNIT,
    RESIZE_BILINEAR,
    ModelConfig,
    ModelConfigError,
    PreprocessConfig,
)

if TYPE_CHECKING:
    from salience_server.runtime import TensorInfo


class Preprocessing:
    """The preprocessing of one model, checked against its inputs.

    `sender_inputs` are the inputs as requests send them: the model's, except that a
    resized input takes any height and width.
    """

    def __init__(self, config: PreprocessConfig, inputs: Sequence[TensorInfo]) -> None:
        self.config = config
        self.sender_inputs: tuple[TensorInfo, ...] = tuple(inputs)
        self.index: int | None = None
        self._size: tuple[int, int] | None = None
        self._scale: np.ndarray | None = None
        self._offset: np.ndarray | None = None
        if not config.active:
            return
        names = [info.name for info in inputs]
        if config.input:
            if config.input not in names:
                raise ModelConfigError(
                    f"preprocess.input={config.input!r} is not an input of the model: "
                    f"choose one of {allowed(names)}"
                )
            index = names.index(config.input)
        elif len(names) > 1:
            raise ModelConfigError(
                f"preprocess.input is required: the model has inputs {allowed(names)}"
            )
        else:
            index = 0
        info = inputs[index]
        if np.dtype(info.dtype).kind != "f":
            raise ModelConfigError(
                f"[preprocess] applies to floating-point inputs: input {info.name!r} has dtype "
                f"{info.dtype}"
            )
        if len(info.shape) < 2:
            raise ModelConfigError(
                f"[preprocess] needs samples with a channel axis: input {info.name!r} has "
                f"shape {list(info.shape)}"
            )
        channels = info.shape[-1]
        self._scale = self._per_channel("scale", config.scale, channels, info)
        self._offset = self._per_channel("offset", config.offset, channels, info)
        if config.resize == RESIZE_BILINEAR:
            height, width = info.shape[1:3] if len(info.shape) == 4 else (None, None)
            if height is None or width is None:
                raise ModelConfigError(
                    f"preprocess.resize='bilinear' needs an image input [N, H, W, C] with a "
                    f"known H and W: input {info.name!r} has shape "
                    f"{['N', *('any' if d is None else d for d in info.shape[1:])]}"
                )
            self._size = (height, width)
            sender = dataclasses.replace(info, shape=(info.shape[0], None, None, channels))
            self.sender_inputs = (*inputs[:index], sender, *inputs[index + 1 :])
        self.index = index

    @staticmethod
    def _per_channel(
        key: str, values: tuple[float, ...], channels: int | None, info: TensorInfo
    ) -> np.ndarray | None:
        if not values:
            return None
        if len(values) > 1 and len(values) != channels:
            raise ModelConfigError(
                f"preprocess.{key} has {len(values)} values but input {info.name!r} has "
                f"{channels if channels is not None else 'an unknown number of'} channels: "
                f"give one value{f' or {channels}' if channels is not None else ''}"
            )
        return np.asarray(values, dtype=info.dtype)

    @property
    def active(self) -> bool:
        return self.index is not None

    def _one(self, x: Any) -> Any:
        dtype = self.sender_inputs[self.index or 0].dtype
        if self._size is not None:
            x = keras.ops.cast(
                keras.ops.image.resize(x, self._size, interpolation="bilinear"), dtype
            )
        if self.config.channel_order == BGR:
            x = keras.ops.flip(x, axis=-1)
        if self._scale is not None:
            x = x * self._scale
        if self._offset is not None:
            x = x + self._offset
        return x

    def apply(self, inputs: Sequence[Any]) -> list[Any]:
        """The inputs as the model takes them (TensorFlow or symbolic Keras tensors)."""
        feed = list(inputs)
        if self.index is not None:
            feed[self.index] = self._one(feed[self.index])
        return feed

    def wrap(self, model: keras.Model) -> keras.Model:
        """`model` behind the preprocessing: a model of the sender's inputs. Only
        called, never searched for layers (its one inner layer is `model`).
        """
        if self.index is None:
            return model
        raw = [
            keras.Input(shape=info.shape[1:], dtype=info.dtype, name=info.name)
            for info in self.sender_inputs
        ]
        feed = self.apply(raw)
        outputs = model(feed if len(feed) > 1 else feed[0])
        return keras.Model(
            raw if len(raw) > 1 else raw[0], outputs, name=f"{model.name}_preprocessed"
        )


class WireCast:
    """The dtypes each input accepts on the wire, checked against the inputs
    requests send (`sender_inputs`), and the cast that turns them into the model's.
    """

    def __init__(self, config: ModelConfig, inputs: Sequence[TensorInfo]) -> None:
        names = [info.name for info in inputs]
        for entry in config.inputs:
            if entry.name not in names:
                raise ModelConfigError(
                    f"inputs.{entry.name} is not an input of the model: choose one of "
                    f"{allowed(names)}"
                )
        self.inputs = tuple(inputs)
        # Per input: the accepted dtypes, the model's own first.
        self.accepted: tuple[tuple[str, ...], ...] = tuple(
            (info.dtype, *config.input_config(info.name).wire_dtypes) for info in inputs
        )
        self._divisor: dict[int, dict[str, float]] = {}
        for k, info in enumerate(inputs):
            entry = config.input_config(info.name)
            for dtype in entry.wire_dtypes:
                if np.dtype(info.dtype).kind != "f" or not np.can_cast(
                    dtype, info.dtype, casting="safe"
                ):
                    raise ModelConfigError(
                        f"inputs.{info.name}.wire_dtypes has {dtype!r}, which does not cast "
                        f"exactly to the input's dtype {info.dtype}: wire dtypes apply to "
                        "floating-point inputs"
                    )
                if entry.wire_range == RANGE_UNIT:
                    self._divisor.setdefault(k, {})[dtype] = float(np.iinfo(dtype).max)

    @property
    def active(self) -> bool:
        """Whether any input accepts a dtype besides the model's."""
        return any(len(dtypes) > 1 for dtypes in self.accepted)

    def is_native(self, dtypes: Sequence[str]) -> bool:
        """Whether inputs of these dtypes are the model's own (no cast)."""
        return all(d == info.dtype for d, info in zip(dtypes, self.inputs, strict=True))

    def variants(self) -> list[tuple[str, ...]]:
        """Each non-native wire dtype combination warm-up runs: one per wire dtype,
        every input at once (the others' first wire dtype, or their own).
        """
        widest = max((len(d) for d in self.accepted), default=1)
        return [tuple(d[min(j, len(d) - 1)] for d in self.accepted) for j in range(1, widest)]

    def cast(self, inputs: Sequence[Any]) -> tuple[Any, ...]:
        """TensorFlow tensors of wire dtypes as the model's inputs."""
        cast = []
        for k, (x, info) in enumerate(zip(inputs, self.inputs, strict=True)):
            wire = x.dtype.name
            if wire != info.dtype:
                divisor = self._divisor.get(k, {}).get(wire)
                # Divided in float32 like the client's image reading, so a uint8 image
                # and the float image it stands for are the same values bit for bit.
                x = tf.cast(x, tf.float32)
                if divisor is not None:
                    x = x / tf.constant(divisor, tf.float32)
                x = tf.cast(x, info.dtype)
            cast.append(x)
        return tuple(cast)
