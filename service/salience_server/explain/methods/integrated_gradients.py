"""Integrated Gradients (Sundararajan et al. 2017).

`IG(x) = (x − x') ⊙ ∫₀¹ ∂s/∂x at x' + α(x − x') dα`, with baseline `x'` (zeros by
default, or the request's baseline: one sample for the whole batch or one per
sample) and `m` steps (default 64).

Quadrature: the trapezoid rule on `m` equal intervals, i.e. the `m + 1` points
`α_k = k/m`, `k = 0..m`, weighted `1/(2m)` at both ends and `1/m` inside. The
right Riemann sum of the paper's formula, `mean_{k=1..m}` (what PAIR's saliency
and Captum's `riemann_right` do), has an O(1/m) error; the trapezoid rule
(TensorFlow's IG tutorial, Captum's `riemann_trapezoid`) has O(1/m²) for smooth
scores, so the completeness residual shrinks much faster with `m` for one extra
gradient evaluation. The points are `α·x + (1 − α)·x'`, which is exactly `x` at
α = 1 and exactly `x'` at α = 0.

Completeness: `Σ IG(x) = s(x) − s(x')` for the exact integral. Every response
reports, per sample, `score_difference = s(x) − s(x')` and
`completeness_residual = Σ IG − (s(x) − s(x'))` of the raw attributions (before
grad modifiers and normalisation), the quadrature error the caller can check
(and lower with more steps). With a backprop modifier (guided, rectified) the
gradients are not those of `s` and the residual says by how much.

Only the explained input moves along the path; a multi-input model's other inputs
keep their values.
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
from salience_server.explain.options import DEFAULT_STEPS, INTEGRATED_GRADIENTS, ExplainOptions
from salience_server.explain.plan import Graph, Plan

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime

BASELINE = "baseline"
ATTRIBUTIONS = "attributions"
RESIDUAL = "completeness_residual"
SCORE_DIFFERENCE = "score_difference"
ZEROS = "zeros"  # graph extra: the default all-zeros baseline, made on the device


def trapezoid_weights(steps: int) -> np.ndarray:
    """The weights of the `steps + 1` points `k/steps` (they sum to 1)."""
    weights = np.full(steps + 1, 1.0 / steps, dtype=np.float64)
    weights[[0, -1]] /= 2
    return weights.astype(np.float32)


def path_weights(steps: tf.Tensor) -> tf.Tensor:
    """`trapezoid_weights` computed in the graph for a step count it takes as a tensor,
    in float64 as there, so the two agree to the last bit.
    """
    count = tf.cast(steps, tf.float64)
    weights = tf.ones([steps + 1], tf.float64) / count
    ends = tf.reduce_sum(tf.one_hot(tf.stack([0, steps]), steps + 1, dtype=tf.float64), axis=0)
    halved = tf.where(ends > 0, tf.constant(0.5, tf.float64), tf.constant(1.0, tf.float64))
    return tf.cast(weights * halved, tf.float32)


def checked_baseline(
    runtime: ModelRuntime, index: int, baseline: np.ndarray, batch: int
) -> np.ndarray:
    """The request's baseline as one row per sample; InvalidArgument when its dtype or
    shape fits neither one sample of the explained input nor one per sample.
    """
    info = runtime.inputs[index]
    sample = ["any" if d is None else d for d in info.shape[1:]]
    expected = f"{sample} (one sample) or {[batch, *sample]} (one per sample)"
    if baseline.dtype != np.dtype(info.dtype):
        raise InvalidArgument(
            f"explanation.baseline.dtype={baseline.dtype} is not accepted: input {info.name!r} "
            f"takes {info.dtype}, so the baseline must be {info.dtype} of shape {expected}"
        )
    bad_shape = InvalidArgument(
        f"explanation.baseline.shape={list(baseline.shape)} does not fit input "
        f"{info.name!r}: use shape {expected}"
    )
    rank = len(info.shape) - 1
    if baseline.ndim == rank:
        baseline = per_sample(baseline, batch)
    elif baseline.ndim != rank + 1 or baseline.shape[0] != batch:
        raise bad_shape
    for got, want in zip(baseline.shape[1:], info.shape[1:], strict=True):
        if want is not None and got != want:
            raise bad_shape
    if baseline.dtype.kind == "f" and not np.isfinite(baseline).all():
        raise InvalidArgument(
            "explanation.baseline holds NaN or infinite values: only finite values are accepted"
        )
    return np.ascontiguousarray(baseline)


class IntegratedGradients(Method):
    name = INTEGRATED_GRADIENTS

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
        index = common.input_index(runtime, options)
        if options.baseline is None:
            baseline = None
            extra: tuple[Any, ...] = (ZEROS,)
        else:
            baseline = checked_baseline(runtime, index, options.baseline, batch)
            # The sample shape keys the graph: the param's signature is fixed at trace
            # time, and inputs with free axes may come in other sizes.
            extra = (BASELINE, tuple(baseline.shape[1:]))
        plan = backprop.plan_gradient(runtime, self, options, batch, with_wrt=False, extra=extra)
        # steps + 1 points on the path, both ends included.
        copies.plan_count(plan, "steps", steps, steps + 1, runtime.placement.xla)
        if baseline is not None:
            plan.params[BASELINE] = baseline
        plan.resolved = dataclasses.replace(plan.resolved, steps=steps)
        return plan

    def build(
        self, runtime: ModelRuntime, graph: Graph, param_specs: dict[str, tf.TensorSpec]
    ) -> DeviceFunction:
        model = backprop.explain_model(runtime, graph)
        n_targets = len(graph.targets)
        explained = graph.input_index
        zeros = graph.extra == (ZEROS,)
        static_weights = tf.constant(trapezoid_weights(graph.steps)) if graph.steps else None

        @tf.function(input_signature=[runtime.input_specs, param_specs])
        def integrated(inputs: tuple[tf.Tensor, ...], params: Mapping[str, tf.Tensor]) -> Any:
            runtime.count_trace()
            x = inputs[explained]
            points = copies.copy_count(graph.steps + 1 if graph.steps else 0, params)
            steps = points - 1
            weights = static_weights if static_weights is not None else path_weights(steps)
            baseline = tf.zeros_like(x) if zeros else params[BASELINE]
            batch = tf.shape(x)[0]
            # One forward pass over [x; x'] gives the predictions and both end scores.
            ends = [tf.concat([t, t], axis=0) for t in inputs]
            ends[explained] = tf.concat([x, baseline], axis=0)
            end_weights = {
                key: tf.concat([w, w], axis=0) for key, w in copies.score_weights(params).items()
            }
            results = copies.call_model(model, ends)
            scores = common.per_sample_score(results[:n_targets], end_weights)
            difference = scores[:batch] - scores[batch:]
            outputs = tuple(r[:batch] for r in results[n_targets:])
            rank = len(x.shape)

            def perturb(rows: tf.Tensor, row_sample: tf.Tensor, row_copy: tf.Tensor) -> tf.Tensor:
                alpha = tf.cast(row_copy, rows.dtype) / tf.cast(steps, rows.dtype)
                alpha = tf.reshape(alpha, [-1] + [1] * (rank - 1))
                return alpha * rows + (1 - alpha) * tf.gather(baseline, row_sample)

            def contribute(grads: tf.Tensor, copy_index: tf.Tensor) -> dict[str, tf.Tensor]:
                w = tf.reshape(tf.gather(weights, copy_index), [-1] + [1] * rank)
                return {"mean": tf.reduce_sum(w * grads, axis=0)}

            totals = copies.sum_over_copies(
                model,
                inputs,
                explained,
                n_targets,
                params,
                points,
                perturb,
                contribute,
                {"mean": copies.zeros_like_float(x)},
                static_chunks=runtime.placement.xla,
            )
            attributions = tf.cast(x - baseline, tf.float32) * totals["mean"]
            total = tf.reduce_sum(tf.reshape(attributions, [batch, -1]), axis=1)
            return outputs, {
                ATTRIBUTIONS: attributions,
                RESIDUAL: total - difference,
                SCORE_DIFFERENCE: difference,
            }

        if zeros:
            return integrated
        expected = graph.extra[1]
        name = runtime.inputs[explained].name

        def checked(inputs: tuple[tf.Tensor, ...], params: Mapping[str, tf.Tensor]) -> Any:
            # An input with free axes is only known here: the baseline (checked against
            # the model's input spec when planned) must match this request's samples.
            shape = tuple(inputs[explained].shape[1:])
            if shape != expected:
                raise InvalidArgument(
                    f"explanation.baseline has sample shape {list(expected)} but input "
                    f"{name!r} has samples of shape {list(shape)}: send a baseline of the "
                    "inputs' sample shape"
                )
            return integrated(inputs, params)

        return checked

    def finish(
        self, plan: Plan, raw: RawTensors
    ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        maps = common.finish_gradient_maps(plan, raw[ATTRIBUTIONS])
        return maps, {RESIDUAL: raw[RESIDUAL], SCORE_DIFFERENCE: raw[SCORE_DIFFERENCE]}
