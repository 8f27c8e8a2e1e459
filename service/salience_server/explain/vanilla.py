"""Vanilla saliency (Simonyan et al. 2014; keras-vis `visualize_saliency`).

`G = ∂s/∂x` for the per-sample score `s(x) = Σ_t ⟨w_t, mean_spatial(a_t(x))⟩`
over the resolved targets `a_t`, in inference mode. Differentiating the batch sum
of per-sample scores gives every sample its own gradient, so a map never depends on
the batch it was computed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

GradientFunction = Callable[..., tuple[tuple[tf.Tensor, ...], tf.Tensor]]


def per_sample_score(activations: Sequence[tf.Tensor], weights: Sequence[tf.Tensor]) -> tf.Tensor:
    """`Σ_t ⟨w_t, mean over spatial axes of a_t⟩` for every sample: shape (batch,)."""
    total = None
    for a, w in zip(activations, weights, strict=True):
        a = tf.cast(a, tf.float32)
        spatial = list(range(1, len(a.shape) - 1))
        pooled = tf.reduce_mean(a, axis=spatial) if spatial else a
        score = tf.linalg.matvec(pooled, w)
        total = score if total is None else total + score
    assert total is not None  # at least one target: ExplainOptions never has none
    return total


def build_gradient_function(
    explain_model: keras.Model,
    input_specs: Sequence[tf.TensorSpec],
    weight_specs: Sequence[tf.TensorSpec],
    explained_input: int,
    on_trace: Callable[[], None] = lambda: None,
) -> GradientFunction:
    """A compiled `(inputs, weights) -> (model outputs, G)` for one set of targets.

    `explain_model` maps the model inputs to `[*targets, *model outputs]`; the
    gradient is taken with respect to input number `explained_input` and returned
    as float32. The signature leaves the batch axis free, so any batch size reuses
    the one trace.
    """
    n_targets = len(weight_specs)

    @tf.function(input_signature=[tuple(input_specs), tuple(weight_specs)])
    def gradients(inputs: tuple[tf.Tensor, ...], weights: tuple[tf.Tensor, ...]) -> Any:
        on_trace()
        x = inputs[explained_input]
        with tf.GradientTape() as tape:
            tape.watch(x)
            feed = list(inputs)
            feed[explained_input] = x
            results = explain_model(feed if len(feed) > 1 else feed[0], training=False)
            results = results if isinstance(results, list | tuple) else [results]
            score = tf.reduce_sum(per_sample_score(results[:n_targets], weights))
        grads = tape.gradient(score, x)
        if grads is None:
            # The score does not depend on this input at all: its gradient is zero.
            grads = tf.zeros_like(x)
        return tuple(results[n_targets:]), tf.cast(grads, tf.float32)

    return gradients
