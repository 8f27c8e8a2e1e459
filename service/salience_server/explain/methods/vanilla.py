"""Vanilla saliency (Simonyan et al. 2014; keras-vis `visualize_saliency`).

`G = ∂s/∂x` for the per-sample score `s(x) = Σ_t ⟨w_t, mean_spatial(a_t(x))⟩`
over the resolved targets `a_t`, in inference mode. Differentiating the batch sum
of per-sample scores gives every sample its own gradient, so a map never depends on
the batch it was computed in.

With a backprop modifier the gradient passes through the model's ReLUs by its rule
(`explain.backprop`); with `wrt` it is taken with respect to that layer's output and
has its shape (`explain.wrt`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from salience_server.explain import backprop, common
from salience_server.explain.engine import DeviceFunction, Method, RawTensors
from salience_server.explain.options import VANILLA, ExplainOptions
from salience_server.explain.plan import Graph, Plan

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime


class Vanilla(Method):
    name = VANILLA

    def plan(self, runtime: ModelRuntime, options: ExplainOptions, batch: int) -> Plan:
        return backprop.plan_gradient(runtime, self, options, batch)

    def build(
        self, runtime: ModelRuntime, graph: Graph, param_specs: dict[str, tf.TensorSpec]
    ) -> DeviceFunction:
        # The wrt layer's output is an extra output of the explain model: the same
        # tensor the targets are computed from, so the tape differentiates through it.
        extra = () if graph.wrt is None else (graph.wrt,)
        model = backprop.explain_model(runtime, graph, extra)
        n_targets = len(graph.targets)
        n_head = n_targets + len(extra)
        explained = graph.input_index

        @tf.function(input_signature=[runtime.input_specs, param_specs])
        def gradients(inputs: tuple[tf.Tensor, ...], params: Mapping[str, tf.Tensor]) -> Any:
            runtime.count_trace()
            x = inputs[explained]
            with tf.GradientTape() as tape:
                tape.watch(x)
                if extra:
                    # A wrt layer may sit on another input's branch: record that too.
                    for k, t in enumerate(inputs):
                        if k != explained and t.dtype.is_floating:
                            tape.watch(t)
                feed = list(inputs)
                feed[explained] = x
                results = model(feed if len(feed) > 1 else feed[0], training=False)
                results = results if isinstance(results, list | tuple) else [results]
                score = tf.reduce_sum(common.per_sample_score(results[:n_targets], params))
            source = results[n_targets] if extra else x
            grads = tape.gradient(score, source)
            if grads is None:
                # The score does not depend on this input at all: its gradient is zero.
                grads = tf.zeros_like(source)
            return tuple(results[n_head:]), {"grads": tf.cast(grads, tf.float32)}

        return gradients

    def finish(
        self, plan: Plan, raw: RawTensors
    ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        return common.gradient_finish(plan, raw)
