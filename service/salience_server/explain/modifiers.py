"""Grad modifiers, channel reduction, normalisation and quantisation, on the device.

Each grad modifier is an element-wise function of the raw gradient `G`
(reference semantics, "grad_modifier"). All the modifiers of one request are
applied to the same `G` inside one compiled function, so asking for three maps
costs one backward pass and one small element-wise kernel each.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import tensorflow as tf

from salience_server.explain import catalog

EPSILON = 1e-7

GradModifier = Callable[[tf.Tensor], tf.Tensor]

GRAD_MODIFIERS: dict[str, GradModifier] = {
    "absolute": tf.abs,
    "none": tf.identity,
    "negate": tf.negative,
    "relu": tf.nn.relu,
    "invert": lambda g: 1.0 / (g + EPSILON),
    "small_values": lambda g: tf.abs(1.0 / (g + EPSILON)),
}
catalog.check_implemented("grad modifiers", GRAD_MODIFIERS, catalog.grad_modifiers())

# Output dtypes by the wire codec's short names.
_OUTPUT_DTYPES = {"float32": tf.float32, "float16": tf.float16, "uint8": tf.uint8}


def _per_sample(reduce: Callable[..., tf.Tensor], s: tf.Tensor) -> tf.Tensor:
    axes = list(range(1, len(s.shape)))
    return reduce(s, axis=axes, keepdims=True)


def finish_map(
    grads: tf.Tensor,
    modifier: str,
    reduce_channels: bool,
    normalize: bool,
    output_dtype: str,
) -> tf.Tensor:
    """One map from the raw gradient: modify, reduce channels, normalise, quantise.

    Normalisation is per sample: (S - min S) / (max S - min S + eps), so a map
    never depends on what it was batched with.
    """
    s = GRAD_MODIFIERS[modifier](grads)
    if reduce_channels:
        # Max of the *modified* gradient, not of |G|: the two only agree for
        # the default `absolute` modifier.
        s = tf.reduce_max(s, axis=-1)
    if normalize:
        low = _per_sample(tf.reduce_min, s)
        high = _per_sample(tf.reduce_max, s)
        s = (s - low) / (high - low + EPSILON)
    if output_dtype == "uint8":
        return tf.cast(tf.round(tf.clip_by_value(s, 0.0, 1.0) * 255.0), tf.uint8)
    return tf.cast(s, _OUTPUT_DTYPES[output_dtype])


@lru_cache(maxsize=256)
def map_function(
    modifiers: tuple[str, ...],
    reduce_channels: bool,
    normalize: bool,
    output_dtype: str,
    grads_rank: int,
) -> Callable[[tf.Tensor], tuple[tf.Tensor, ...]]:
    """A compiled function from raw gradients to one map per modifier.

    Traced once per distinct set of options (they change the graph) and gradient
    rank; any batch size and spatial size reuse the same trace.
    """

    @tf.function(
        input_signature=[tf.TensorSpec([None] * grads_rank, tf.float32)],
        reduce_retracing=True,
    )
    def maps(grads: tf.Tensor) -> tuple[tf.Tensor, ...]:
        return tuple(
            finish_map(grads, m, reduce_channels, normalize, output_dtype) for m in modifiers
        )

    return maps
