"""Vanilla saliency (Simonyan et al. 2014; keras-vis `visualize_saliency`).

`G = ∂s/∂x` for the per-sample score `s(x) = Σ_t ⟨w_t, mean_spatial(a_t(x))⟩`
over the resolved targets `a_t`, in inference mode. Differentiating the batch sum
of per-sample scores gives every sample its own gradient, so a map never depends on
the batch it was computed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from salience_server.explain.engine import DeviceFunction, Graph, Method, Plan, RawTensors
from salience_server.explain.methods import common
from salience_server.explain.options import VANILLA, ExplainOptions

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime


class Vanilla(Method):
    name = VANILLA

    def plan(self, runtime: ModelRuntime, options: ExplainOptions, batch: int) -> Plan:
        return common.plan_targets(runtime, self, options, batch)

    def build(
        self, runtime: ModelRuntime, graph: Graph, param_specs: dict[str, tf.TensorSpec]
    ) -> DeviceFunction:
        model = common.explain_model(runtime, graph.targets)
        n_targets = len(graph.targets)
        explained = graph.input_index

        @tf.function(input_signature=[runtime.input_specs, param_specs])
        def gradients(inputs: tuple[tf.Tensor, ...], params: Mapping[str, tf.Tensor]) -> Any:
            runtime.count_trace()
            x = inputs[explained]
            with tf.GradientTape() as tape:
                tape.watch(x)
                feed = list(inputs)
                feed[explained] = x
                results = model(feed if len(feed) > 1 else feed[0], training=False)
                results = results if isinstance(results, list | tuple) else [results]
                score = tf.reduce_sum(common.per_sample_score(results[:n_targets], params))
            grads = tape.gradient(score, x)
            if grads is None:
                # The score does not depend on this input at all: its gradient is zero.
                grads = tf.zeros_like(x)
            return tuple(results[n_targets:]), {"grads": tf.cast(grads, tf.float32)}

        return gradients

    def finish(
        self, plan: Plan, raw: RawTensors
    ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        return common.gradient_finish(plan, raw)
