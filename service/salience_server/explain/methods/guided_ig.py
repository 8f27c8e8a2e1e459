"""Guided Integrated Gradients (Kapishnikov et al. 2021, "Guided Integrated
Gradients: an Adaptive Path Method for Removing Noise"), as PAIR's saliency library
defines it (`saliency.core.GuidedIG`, `guided_ig_impl`).

The path starts at the baseline `x'` (zeros by default, or the request's baseline
as for Integrated Gradients) and reaches the input `x` in `m` steps (default 64).
At step `k` (α = (k+1)/m) the gradient `g = ∂s/∂x` is taken once at the current
point; then, until the L1 distance to `x` is down to `(1 − α)·‖x − x'‖₁`, the
features with the smallest `|g|` (a `fraction` of them, default 0.25: those at or
below the `fraction` quantile, numpy's "lower" method) move towards `x`, each at
most to the point of the straight path at `α + max_dist` (default 0.02) and none
left behind `α − max_dist`. Every move `Δx` adds `Δx ⊙ g` to the attribution.
`max_dist = 0` is the straight path (Integrated Gradients with a left Riemann sum),
`max_dist = 1` the unbounded method.

On the device every sample of a batch walks its own path at once: one gradient
evaluation of the batch per step (the path is sequential: each step's gradient is
taken where the previous one ended), and each sample's inner selection loop masked
out once its target distance is reached. The path state is float64, as in PAIR's
code; the model sees it in its own dtype. The inner loop moves at least a
`fraction` of the features each round (or all that may still move), so it ends
within `ceil(1/fraction) + 2` rounds; it is capped there.

Completeness: `Σ GuidedIG(x) ≈ s(x) − s(x')`; every response reports per sample
`score_difference` and `completeness_residual` as Integrated Gradients does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from salience_server.errors import InvalidArgument
from salience_server.explain import backprop, common
from salience_server.explain.engine import DeviceFunction, Method, RawTensors, per_sample
from salience_server.explain.methods import copies
from salience_server.explain.methods.integrated_gradients import (
    ATTRIBUTIONS,
    BASELINE,
    RESIDUAL,
    SCORE_DIFFERENCE,
    ZEROS,
    checked_baseline,
)
from salience_server.explain.options import (
    DEFAULT_GUIDED_FRACTION,
    DEFAULT_GUIDED_MAX_DIST,
    DEFAULT_STEPS,
    GUIDED_IG,
    ExplainOptions,
    in_range,
)
from salience_server.explain.plan import Graph, Plan

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime

FRACTION = "guided/fraction"
MAX_DIST = "guided/max_dist"
EPSILON = 1e-9  # PAIR's tolerance of the L1 target (math.isclose, relative and absolute)


class GuidedIG(Method):
    name = GUIDED_IG

    def plan(self, runtime: ModelRuntime, options: ExplainOptions, batch: int) -> Plan:
        common.refuse_wrt(
            self,
            options,
            "its path runs from the baseline to the model input and its completeness is "
            "measured there",
        )
        steps = options.steps or DEFAULT_STEPS
        if steps < 1:
            raise InvalidArgument(
                f"explanation.steps={options.steps} is not allowed: use a positive count "
                f"(0 for the default, {DEFAULT_STEPS})"
            )
        fraction = in_range(
            "guided_fraction", options.guided_fraction, DEFAULT_GUIDED_FRACTION, 0, 1, True
        )
        max_dist = in_range(
            "guided_max_dist", options.guided_max_dist, DEFAULT_GUIDED_MAX_DIST, 0, 1, False
        )
        index = common.input_index(runtime, options)
        if options.baseline is None:
            baseline = None
            extra: tuple[Any, ...] = (ZEROS,)
        else:
            baseline = checked_baseline(runtime, index, options.baseline, batch)
            extra = (BASELINE, tuple(baseline.shape[1:]))
        plan = backprop.plan_gradient(runtime, self, options, batch, with_wrt=False, extra=extra)
        copies.plan_count(plan, "steps", steps, steps, runtime.placement.xla)
        if baseline is not None:
            plan.params[BASELINE] = baseline
        plan.params[FRACTION] = per_sample(np.array(fraction, np.float64), batch)
        plan.params[MAX_DIST] = per_sample(np.array(max_dist, np.float64), batch)
        plan.resolved = dataclasses.replace(
            plan.resolved, steps=steps, guided_fraction=fraction, guided_max_dist=max_dist
        )
        return plan

    def build(
        self, runtime: ModelRuntime, graph: Graph, param_specs: dict[str, tf.TensorSpec]
    ) -> DeviceFunction:
        model = backprop.explain_model(runtime, graph)
        n_targets = len(graph.targets)
        explained = graph.input_index
        zeros = graph.extra == (ZEROS,)

        @tf.function(input_signature=[runtime.input_specs, param_specs])
        def guided_ig(inputs: tuple[tf.Tensor, ...], params: Mapping[str, tf.Tensor]) -> Any:
            runtime.count_trace()
            x = inputs[explained]
            baseline = tf.zeros_like(x) if zeros else params[BASELINE]
            steps = copies.copy_count(graph.steps, params)
            batch = tf.shape(x)[0]
            weights = copies.score_weights(params)
            # One forward pass over [x; x'] gives the predictions and both end scores.
            ends = [tf.concat([t, t], axis=0) for t in inputs]
            ends[explained] = tf.concat([x, baseline], axis=0)
            end_weights = {key: tf.concat([w, w], axis=0) for key, w in weights.items()}
            results = copies.call_model(model, ends)
            scores = common.per_sample_score(results[:n_targets], end_weights)
            difference = scores[:batch] - scores[batch:]
            outputs = tuple(r[:batch] for r in results[n_targets:])

            target = tf.reshape(tf.cast(x, tf.float64), [batch, -1])
            start = tf.reshape(tf.cast(baseline, tf.float64), [batch, -1])
            total_diff = target - start
            l1_total = tf.reduce_sum(tf.abs(total_diff), axis=1)
            features = tf.shape(target)[1]
            fraction = params[FRACTION]
            max_dist = params[MAX_DIST]
            # numpy's quantile, method "lower": the element at floor((n − 1)·q) sorted.
            rank = tf.cast(tf.floor(tf.cast(features - 1, tf.float64) * fraction), tf.int32)
            rounds = tf.cast(tf.math.ceil(1.0 / tf.reduce_min(fraction)), tf.int32) + 2
            moving = tf.not_equal(total_diff, 0.0)
            safe_diff = tf.where(moving, total_diff, 1.0)
            infinity = tf.constant(np.inf, tf.float64)
            sort_dtype = tf.float64 if x.dtype == tf.float64 else tf.float32

            def gradient(point: tf.Tensor) -> tf.Tensor:
                feed = list(inputs)
                rows = tf.cast(tf.reshape(point, tf.shape(x)), x.dtype)
                with tf.GradientTape() as tape:
                    tape.watch(rows)
                    feed[explained] = rows
                    score = tf.reduce_sum(
                        common.per_sample_score(copies.call_model(model, feed)[:n_targets], weights)
                    )
                grads = tape.gradient(score, rows)
                if grads is None:
                    grads = tf.zeros_like(rows)
                return tf.reshape(tf.cast(grads, tf.float64), [batch, -1])

            def step(k: tf.Tensor, point: tf.Tensor, attr: tf.Tensor) -> Any:
                grad_actual = gradient(point)
                # One sort per step: within the step |g| only ever turns to inf, so each
                # round's quantile is read off this order (PAIR sorts every round). |g|
                # comes from gradients in the input's dtype: sorted in that dtype (at
                # least float32), the order and values are exact.
                order = tf.argsort(tf.cast(tf.abs(grad_actual), sort_dtype), axis=1, stable=True)
                ordered = tf.gather(tf.abs(grad_actual), order, axis=1, batch_dims=1)
                alpha = (tf.cast(k, tf.float64) + 1.0) / tf.cast(steps, tf.float64)
                alpha_min = tf.maximum(alpha - max_dist, 0.0)[:, None]
                alpha_max = tf.minimum(alpha + max_dist, 1.0)[:, None]
                x_min = start + total_diff * alpha_min
                x_max = start + total_diff * alpha_max
                l1_target = l1_total * (
                    1.0 - (tf.cast(k, tf.float64) + 1.0) / tf.cast(steps, tf.float64)
                )
                # A sample whose input equals its baseline has no path: attribution 0.
                active = l1_total > 0

                def inner(
                    round_: tf.Tensor,
                    active: tf.Tensor,
                    point: tf.Tensor,
                    attr: tf.Tensor,
                    grad: tf.Tensor,
                ) -> Any:
                    old = point
                    x_alpha = tf.where(moving, (point - start) / safe_diff, alpha_max)
                    behind = tf.logical_and(active[:, None], x_alpha < alpha_min)
                    point = tf.where(behind, x_min, point)
                    l1_current = tf.reduce_sum(tf.abs(point - target), axis=1)
                    gap = tf.abs(l1_target - l1_current)
                    close = gap <= tf.maximum(
                        EPSILON * tf.maximum(tf.abs(l1_target), tf.abs(l1_current)), EPSILON
                    )
                    grad = tf.where(tf.equal(point, x_max), infinity, grad)
                    magnitude = tf.abs(grad)
                    # The quantile of |g| with the excluded (inf) features sorted last: the
                    # rank-th of the features still finite, in the step's sorted order.
                    finite = tf.gather(grad != infinity, order, axis=1, batch_dims=1)
                    seen = tf.cumsum(tf.cast(finite, tf.int32), axis=1)
                    position = tf.argmax(seen > rank[:, None], axis=1, output_type=tf.int32)
                    threshold = tf.where(
                        seen[:, -1] > rank,
                        tf.gather(ordered, position, axis=1, batch_dims=1),
                        infinity,
                    )
                    selected = tf.logical_and(magnitude <= threshold[:, None], grad != infinity)
                    l1_s = tf.reduce_sum(
                        tf.abs(point - x_max) * tf.cast(selected, tf.float64), axis=1
                    )
                    gamma = tf.where(
                        l1_s > 0, (l1_current - l1_target) / tf.where(l1_s > 0, l1_s, 1.0), infinity
                    )
                    partial = point + (x_max - point) * gamma[:, None]
                    moved = tf.where(gamma[:, None] > 1.0, x_max, partial)
                    going = tf.logical_and(active, tf.logical_not(close))
                    point = tf.where(tf.logical_and(going[:, None], selected), moved, point)
                    attr = attr + tf.where(active[:, None], (point - old) * grad_actual, 0.0)
                    active = tf.logical_and(going, gamma > 1.0)
                    return round_ + 1, active, point, attr, grad

                _, _, point, attr, _ = tf.while_loop(
                    lambda round_, active, *_: tf.logical_and(
                        round_ < rounds, tf.reduce_any(active)
                    ),
                    inner,
                    (tf.constant(0), active, point, attr, grad_actual),
                )
                return k + 1, point, attr

            _, _, attr = tf.while_loop(
                lambda k, *_: k < steps,
                step,
                (tf.constant(0), start, tf.zeros_like(start)),
            )
            attributions = tf.reshape(tf.cast(attr, tf.float32), tf.shape(x))
            total = tf.cast(tf.reduce_sum(attr, axis=1), tf.float32)
            return outputs, {
                ATTRIBUTIONS: attributions,
                RESIDUAL: total - difference,
                SCORE_DIFFERENCE: difference,
            }

        if zeros:
            return guided_ig
        expected = graph.extra[1]
        name = runtime.inputs[explained].name

        def checked(inputs: tuple[tf.Tensor, ...], params: Mapping[str, tf.Tensor]) -> Any:
            shape = tuple(inputs[explained].shape[1:])
            if shape != expected:
                raise InvalidArgument(
                    f"explanation.baseline has sample shape {list(expected)} but input "
                    f"{name!r} has samples of shape {list(shape)}: send a baseline of the "
                    "inputs' sample shape"
                )
            return guided_ig(inputs, params)

        return checked

    def finish(
        self, plan: Plan, raw: RawTensors
    ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        maps = common.finish_gradient_maps(plan, raw[ATTRIBUTIONS])
        return maps, {RESIDUAL: raw[RESIDUAL], SCORE_DIFFERENCE: raw[SCORE_DIFFERENCE]}
