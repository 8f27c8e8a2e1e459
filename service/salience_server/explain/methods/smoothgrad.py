"""SmoothGrad (Smilkov et al. 2017): the mean of the modified gradient over noisy copies.

For each grad modifier `m`, `map = mean_{j<n} m(∂s/∂x at x + ε_j)`, with Gaussian
noise `ε_j` of standard deviation `σ · (max x − min x)` (the sample's own value
range), then channel reduction and normalisation as for vanilla saliency. The
modifier is applied to every copy's gradient *before* the mean (the reference
semantics): `mean |G|` is not `|mean G|`.

Defaults: `n = 16` copies, `σ = 0.15` (PAIR's noise level; PAIR's `n = 25` and
squared-gradient variant are not used, tf-keras-vis uses σ = 0.20).

Reproducible noise. The request's seed (an unsigned 64-bit integer; when it is
absent the server draws one and echoes it in `resolved.seed`) is the Philox key
`k = [seed mod 2³², seed >> 32]` (two int32 bit patterns), and copy `j` of a
sample gets

    ε_j = tf.random.stateless_normal(sample shape,
              seed=tf.random.experimental.stateless_fold_in(k, j, alg="philox"),
              alg="philox", dtype=float32) · σ · (max x − min x)

drawn on the device inside the compiled function. The noise of a sample thus
depends on the request's seed and the copy index only: never on the sample's
position in the batch or on the requests it was batched with, and the first `n`
copies are the same whatever `n` is. (All samples of one request share the
noise pattern, each scaled by its own value range.)
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from salience_server.errors import InvalidArgument
from salience_server.explain import backprop, common, modifiers
from salience_server.explain.engine import DeviceFunction, Method, RawTensors, per_sample
from salience_server.explain.methods import copies
from salience_server.explain.options import (
    DEFAULT_NOISE,
    DEFAULT_SAMPLES,
    SMOOTHGRAD,
    ExplainOptions,
)
from salience_server.explain.plan import Graph, Plan

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime

SEED = "seed"
NOISE = "noise"
MEAN = "mean/"  # raw key prefix of the mean modified gradient, by modifier
SEED_LIMIT = 2**64  # the schema's seed is a uint64
RNG = "philox"  # pinned: "auto_select" may pick a different generator per device


def philox_key(seed: int) -> np.ndarray:
    """The stateless-RNG key of a 64-bit seed: its two 32-bit halves as int32."""
    return np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint32).view(np.int32)


def copy_noise(key: tf.Tensor, copy: tf.Tensor, shape: tf.Tensor) -> tf.Tensor:
    """Unit Gaussian noise of copy `copy` for a sample with RNG key `key`."""
    seed = tf.random.experimental.stateless_fold_in(key, copy, alg=RNG)
    return tf.random.stateless_normal(shape, seed=seed, alg=RNG, dtype=tf.float32)


def finish_mean_maps(plan: Plan, raw: RawTensors, prefix: str) -> dict[str, tf.Tensor]:
    """Maps of already modified (and averaged) gradients, one per grad modifier:
    channel max, normalisation and dtype only.
    """
    p = plan.post
    maps = {}
    for name in p.grad_modifiers:
        grads = raw[f"{prefix}{name}"]
        rank = len(grads.shape)
        finish = modifiers.map_function(
            ("none",), not p.keepdims and rank >= 3, p.normalize, p.output_dtype, rank
        )
        maps[name] = finish(grads)[0]
    return maps


class SmoothGrad(Method):
    name = SMOOTHGRAD

    def plan(self, runtime: ModelRuntime, options: ExplainOptions, batch: int) -> Plan:
        common.refuse_wrt(
            self,
            options,
            "its noise is added to the model input, so its gradients are taken with respect "
            "to that input",
        )
        noise = DEFAULT_NOISE if options.noise is None else float(options.noise)
        if not (np.isfinite(noise) and noise >= 0):
            raise InvalidArgument(
                f"explanation.noise={options.noise} is not allowed: use a finite value >= 0 "
                f"(a fraction of each sample's value range; unset means {DEFAULT_NOISE})"
            )
        samples = options.samples or DEFAULT_SAMPLES
        if samples < 1:
            raise InvalidArgument(
                f"explanation.samples={options.samples} is not allowed: use a positive count "
                f"(0 for the default, {DEFAULT_SAMPLES})"
            )
        seed = secrets.randbits(63) if options.seed is None else int(options.seed)
        if not 0 <= seed < SEED_LIMIT:
            raise InvalidArgument(
                f"explanation.seed={options.seed} is out of range: use 0..{SEED_LIMIT - 1}"
            )
        # The modifiers go into the graph: each copy's gradient must be modified
        # before the mean, and the alternative — returning the B x n per-copy
        # gradients for finish to modify — costs B*n input-sized tensors
        # (8 x 16 x 224x224x3 floats = 77 MB) where this keeps one accumulator per
        # modifier. Requests asking for other modifier sets just use another graph.
        grad_modifiers = common.post(self, options).grad_modifiers
        plan = backprop.plan_gradient(
            runtime, self, options, batch, with_wrt=False, extra=tuple(sorted(grad_modifiers))
        )
        copies.plan_count(plan, "samples", samples, samples, runtime.placement.xla)
        plan.params[SEED] = per_sample(philox_key(seed), batch)
        plan.params[NOISE] = per_sample(np.array(noise, np.float32), batch)
        plan.resolved = dataclasses.replace(plan.resolved, seed=seed, samples=samples, noise=noise)
        return plan

    def fresh(self, plan: Plan, options: ExplainOptions) -> Plan:
        if options.seed is not None:
            return plan  # the request's own seed: the same noise every time
        seed = secrets.randbits(63)
        params = dict(plan.params)
        params[SEED] = per_sample(philox_key(seed), plan.batch)
        return dataclasses.replace(
            plan, params=params, resolved=dataclasses.replace(plan.resolved, seed=seed)
        )

    def build(
        self, runtime: ModelRuntime, graph: Graph, param_specs: dict[str, tf.TensorSpec]
    ) -> DeviceFunction:
        model = backprop.explain_model(runtime, graph)
        n_targets = len(graph.targets)
        explained = graph.input_index
        grad_modifiers: tuple[str, ...] = graph.extra

        @tf.function(input_signature=[runtime.input_specs, param_specs])
        def smoothgrad(inputs: tuple[tf.Tensor, ...], params: Mapping[str, tf.Tensor]) -> Any:
            runtime.count_trace()
            x = inputs[explained]
            samples = copies.copy_count(graph.samples, params)
            outputs = copies.call_model(model, inputs)[n_targets:]
            axes = list(range(1, len(x.shape)))
            spread = tf.cast(tf.reduce_max(x, axes) - tf.reduce_min(x, axes), tf.float32)
            scale = params[NOISE] * spread  # (B,): each sample's own noise level

            def perturb(rows: tf.Tensor, row_sample: tf.Tensor, row_copy: tf.Tensor) -> tf.Tensor:
                shape = tf.shape(rows)[1:]
                noise = tf.map_fn(
                    lambda row: copy_noise(row[0], row[1], shape),
                    (tf.gather(params[SEED], row_sample), row_copy),
                    fn_output_signature=tf.float32,
                )
                row_scale = tf.reshape(tf.gather(scale, row_sample), [-1] + [1] * len(axes))
                return rows + tf.cast(noise * row_scale, rows.dtype)

            def contribute(grads: tf.Tensor, copy_index: tf.Tensor) -> dict[str, tf.Tensor]:
                return {
                    m: tf.reduce_sum(modifiers.GRAD_MODIFIERS[m](grads), axis=0)
                    for m in grad_modifiers
                }

            totals = copies.sum_over_copies(
                model,
                inputs,
                explained,
                n_targets,
                params,
                samples,
                perturb,
                contribute,
                {m: copies.zeros_like_float(x) for m in grad_modifiers},
                static_chunks=runtime.placement.xla,
            )
            count = tf.cast(samples, tf.float32)
            raw = {f"{MEAN}{m}": totals[m] / count for m in grad_modifiers}
            return tuple(outputs), raw

        return smoothgrad

    def finish(
        self, plan: Plan, raw: RawTensors
    ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        return finish_mean_maps(plan, raw, MEAN), {}
