"""Blur IG (Xu et al. 2020, "Attribution in Scale and Space"), as PAIR's saliency
library defines it (`saliency.core.BlurIG`).

The path runs from the image `x` (σ = 0) to `x` blurred by a Gaussian of standard
deviation `σ_max` (default 50 pixels) over the height and width axes, in `m` steps
(default 64) at `σ_i = i·σ_max/m`, `i = 0..m−1`:

    BlurIG(x) = −Σ_i (σ_{i+1} − σ_i) · ∂s/∂x at b(x, σ_i)
                      ⊙ (b(x, σ_i + h) − b(x, σ_i)) / h

with `b(x, σ)` scipy's `ndimage.gaussian_filter(x, [σ, σ, 0], mode="constant")`
(zero padding, the kernel truncated at `int(4σ + 0.5)` pixels and normalised over
its full support) and `h` the finite-difference step of `∂b/∂σ` (default 0.01).
The sum is PAIR's left Riemann sum, the derivative its forward difference.

On the device the blur of every copy is two matrix products, `K_H(σ) · x · K_W(σ)ᵀ`
per channel, with the exact truncated kernels as banded matrices built in float64
(cheaper than a convolution of a kernel up to 8001 taps wide, and the same numbers).
The finite difference is `((K_H(σ+h) − K_H(σ)) x K_W(σ+h)ᵀ + K_H(σ) x (K_W(σ+h) −
K_W(σ))ᵀ) / h`, so that its float32 products never subtract two nearly equal images.

Completeness: the path integral is `s(x) − s(b(x, σ_max))`; every response reports
per sample `score_difference = s(x) − s(b(x, σ_max))` and `completeness_residual =
Σ BlurIG(x) − score_difference` of the raw attributions, as Integrated Gradients does.

The explained input must hold images: samples of shape (height, width, channels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from salience_server.errors import FailedPrecondition, InvalidArgument
from salience_server.explain import backprop, common
from salience_server.explain.engine import DeviceFunction, Method, RawTensors, per_sample
from salience_server.explain.methods import copies
from salience_server.explain.methods.integrated_gradients import (
    ATTRIBUTIONS,
    RESIDUAL,
    SCORE_DIFFERENCE,
)
from salience_server.explain.options import (
    BLUR_IG,
    DEFAULT_BLUR_GRAD_STEP,
    DEFAULT_BLUR_MAX_SIGMA,
    DEFAULT_STEPS,
    MAX_BLUR_GRAD_STEP,
    MAX_BLUR_SIGMA,
    ExplainOptions,
    in_range,
)
from salience_server.explain.plan import Graph, Plan

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime

MAX_SIGMA = "blur/max_sigma"
GRAD_STEP = "blur/grad_step"
TRUNCATE = 4.0  # scipy's default: the kernel reaches int(4σ + 0.5) pixels
# The widest kernel radius any allowed σ + h has: its normalising sum runs over a
# range of fixed length, so that XLA knows every shape.
MAX_RADIUS = int(TRUNCATE * (MAX_BLUR_SIGMA + MAX_BLUR_GRAD_STEP) + 0.5)


def image_input(runtime: ModelRuntime, method: str, index: int) -> tuple[int | None, ...]:
    """The explained input's sample shape; FailedPrecondition unless it is an image
    (height, width, channels) batch.
    """
    info = runtime.inputs[index]
    if len(info.shape) != 4:
        shape = ["any" if d is None else d for d in info.shape[1:]]
        raise FailedPrecondition(
            f"explanation.method={method!r} explains images: input {info.name!r} has samples "
            f"of shape {shape}, not (height, width, channels)"
        )
    return tuple(info.shape[1:])


def image_reason(runtime: ModelRuntime) -> str | None:
    """Why no input of the model is a batch of floating-point images; None if one is."""
    for info in runtime.inputs:
        if len(info.shape) == 4 and np.dtype(info.dtype).kind == "f":
            return None
    return "it has no floating-point image input (samples of shape height, width, channels)"


def gaussian_matrices(sigma: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
    """`(..., n, n)` float64 matrices `K` with `K·v` scipy's `gaussian_filter1d(v, σ,
    mode="constant")` along one axis of length `n`, for float64 sigmas `(...)`.
    """
    index = tf.range(n, dtype=tf.float64)
    distance = index[:, None] - index[None, :]
    radius = tf.floor(TRUNCATE * sigma + 0.5)[..., None, None]
    # Below σ = 0.125 the radius is 0: the filter is the identity (and σ = 0 is PAIR's
    # no blur), whatever the floor keeps the exponent from dividing by.
    scale = (-0.5 / tf.square(tf.maximum(sigma, 0.01)))[..., None, None]
    weights = tf.where(
        tf.abs(distance) <= radius, tf.exp(scale * tf.square(distance)), tf.zeros((), tf.float64)
    )
    taps = tf.range(-MAX_RADIUS, MAX_RADIUS + 1, dtype=tf.float64)
    support = tf.exp(scale[..., 0] * tf.square(taps))
    total = tf.reduce_sum(tf.where(tf.abs(taps) <= radius[..., 0], support, 0.0), axis=-1)
    return weights / total[..., None, None]


def blur(images: tf.Tensor, rows: tf.Tensor, columns: tf.Tensor) -> tf.Tensor:
    """`K_H · image · K_Wᵀ` per channel, for images `(..., H, W, C)` and matrices
    `(..., H, H)`, `(..., W, W)` of the same leading axes.
    """
    return tf.einsum(
        "...vw,...hwc->...hvc", columns, tf.einsum("...hi,...iwc->...hwc", rows, images)
    )


def blur_at(images: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
    """Images `(..., H, W, C)` blurred at float64 sigmas `(...)`, in their dtype."""
    shape = tf.shape(images)
    rows = gaussian_matrices(sigma, shape[-3])
    columns = gaussian_matrices(sigma, shape[-2])
    return blur(images, tf.cast(rows, images.dtype), tf.cast(columns, images.dtype))


class BlurIG(Method):
    name = BLUR_IG

    def supported(self, runtime: ModelRuntime) -> str | None:
        return image_reason(runtime)

    def plan(self, runtime: ModelRuntime, options: ExplainOptions, batch: int) -> Plan:
        common.refuse_wrt(
            self, options, "its path blurs the model input and its completeness is measured there"
        )
        if options.baseline is not None:
            raise InvalidArgument(
                "explanation.baseline does not apply to method 'blur-ig': its path ends at the "
                "input blurred at blur_max_sigma; leave it unset"
            )
        steps = options.steps or DEFAULT_STEPS
        if steps < 1:
            raise InvalidArgument(
                f"explanation.steps={options.steps} is not allowed: use a positive count "
                f"(0 for the default, {DEFAULT_STEPS})"
            )
        max_sigma = in_range(
            "blur_max_sigma",
            options.blur_max_sigma,
            DEFAULT_BLUR_MAX_SIGMA,
            0,
            MAX_BLUR_SIGMA,
            True,
        )
        grad_step = in_range(
            "blur_grad_step",
            options.blur_grad_step,
            DEFAULT_BLUR_GRAD_STEP,
            0,
            MAX_BLUR_GRAD_STEP,
            True,
        )
        index = common.input_index(runtime, options)
        image_input(runtime, self.name, index)
        plan = backprop.plan_gradient(runtime, self, options, batch, with_wrt=False)
        copies.plan_count(plan, "steps", steps, steps, runtime.placement.xla)
        plan.params[MAX_SIGMA] = per_sample(np.array(max_sigma, np.float64), batch)
        plan.params[GRAD_STEP] = per_sample(np.array(grad_step, np.float64), batch)
        plan.resolved = dataclasses.replace(
            plan.resolved, steps=steps, blur_max_sigma=max_sigma, blur_grad_step=grad_step
        )
        return plan

    def build(
        self, runtime: ModelRuntime, graph: Graph, param_specs: dict[str, tf.TensorSpec]
    ) -> DeviceFunction:
        model = backprop.explain_model(runtime, graph)
        n_targets = len(graph.targets)
        explained = graph.input_index

        @tf.function(input_signature=[runtime.input_specs, param_specs])
        def blur_ig(inputs: tuple[tf.Tensor, ...], params: Mapping[str, tf.Tensor]) -> Any:
            runtime.count_trace()
            x = inputs[explained]
            steps = copies.copy_count(graph.steps, params)
            count = tf.cast(steps, tf.float64)
            max_sigma = params[MAX_SIGMA]
            grad_step = params[GRAD_STEP]
            batch = tf.shape(x)[0]
            # One forward pass over [x; b(x, σ_max)]: the predictions and both end scores.
            ends = [tf.concat([t, t], axis=0) for t in inputs]
            ends[explained] = tf.concat([x, blur_at(x, max_sigma)], axis=0)
            end_weights = {
                key: tf.concat([w, w], axis=0) for key, w in copies.score_weights(params).items()
            }
            results = copies.call_model(model, ends)
            scores = common.per_sample_score(results[:n_targets], end_weights)
            difference = scores[:batch] - scores[batch:]
            outputs = tuple(r[:batch] for r in results[n_targets:])
            images = tf.cast(x, tf.float32)
            height, width = tf.shape(x)[1], tf.shape(x)[2]

            def sigma(copy: tf.Tensor, sample_sigma: tf.Tensor) -> tf.Tensor:
                # float(i) * max_sigma / float(steps), in PAIR's order of operations.
                return tf.cast(copy, tf.float64) * sample_sigma / count

            def perturb(rows: tf.Tensor, row_sample: tf.Tensor, row_copy: tf.Tensor) -> tf.Tensor:
                return blur_at(rows, sigma(row_copy, tf.gather(max_sigma, row_sample)))

            def contribute(grads: tf.Tensor, copy_index: tf.Tensor) -> dict[str, tf.Tensor]:
                # (copies, B) sigmas: copy i of every sample, each at its own σ_max.
                at = sigma(copy_index[:, None], max_sigma[None, :])
                after = sigma(copy_index[:, None] + 1, max_sigma[None, :])
                ahead = at + grad_step[None, :]
                rows_at = gaussian_matrices(at, height)
                columns_at = gaussian_matrices(at, width)
                rows_ahead = gaussian_matrices(ahead, height)
                columns_ahead = gaussian_matrices(ahead, width)
                step = grad_step[None, :, None, None]
                d_rows = tf.cast((rows_ahead - rows_at) / step, tf.float32)
                d_columns = tf.cast((columns_ahead - columns_at) / step, tf.float32)
                rows_at = tf.cast(rows_at, tf.float32)
                columns_ahead = tf.cast(columns_ahead, tf.float32)
                shaped = tf.broadcast_to(images[None], tf.shape(grads))
                along_h = tf.einsum("cbhi,cbiwk->cbhwk", rows_at, shaped)
                derivative = blur(shaped, d_rows, columns_ahead) + tf.einsum(
                    "cbvw,cbhwk->cbhvk", d_columns, along_h
                )
                width_of_step = tf.cast(after - at, tf.float32)[:, :, None, None, None]
                return {"sum": tf.reduce_sum(width_of_step * derivative * grads, axis=0)}

            totals = copies.sum_over_copies(
                model,
                inputs,
                explained,
                n_targets,
                params,
                steps,
                perturb,
                contribute,
                {"sum": copies.zeros_like_float(x)},
                static_chunks=runtime.placement.xla,
            )
            attributions = -totals["sum"]
            total = tf.reduce_sum(tf.reshape(attributions, [batch, -1]), axis=1)
            return outputs, {
                ATTRIBUTIONS: attributions,
                RESIDUAL: total - difference,
                SCORE_DIFFERENCE: difference,
            }

        return blur_ig

    def finish(
        self, plan: Plan, raw: RawTensors
    ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        maps = common.finish_gradient_maps(plan, raw[ATTRIBUTIONS])
        return maps, {RESIDUAL: raw[RESIDUAL], SCORE_DIFFERENCE: raw[SCORE_DIFFERENCE]}
