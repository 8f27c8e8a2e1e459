"""Gradient × Input (Shrikumar et al. 2016): `x ⊙ ∂s/∂x`, then grad modifiers,
channel reduction and normalisation as for vanilla saliency.

For a linear score `s(x) = ⟨w, x⟩ + b` the product is each input element's exact
contribution `w ⊙ x`; it is Integrated Gradients with a zero baseline and one step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from salience_server.explain import backprop, common
from salience_server.explain.engine import DeviceFunction, Method, RawTensors
from salience_server.explain.methods import copies
from salience_server.explain.options import GRADIENT_X_INPUT, ExplainOptions
from salience_server.explain.plan import Graph, Plan

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime


class GradientXInput(Method):
    name = GRADIENT_X_INPUT

    def plan(self, runtime: ModelRuntime, options: ExplainOptions, batch: int) -> Plan:
        common.refuse_wrt(
            self,
            options,
            "it multiplies the gradient by the model input, so the gradient is taken with "
            "respect to that input",
        )
        return backprop.plan_gradient(runtime, self, options, batch, with_wrt=False)

    def build(
        self, runtime: ModelRuntime, graph: Graph, param_specs: dict[str, tf.TensorSpec]
    ) -> DeviceFunction:
        model = backprop.explain_model(runtime, graph)
        n_targets = len(graph.targets)
        explained = graph.input_index

        @tf.function(input_signature=[runtime.input_specs, param_specs])
        def gradient_x_input(inputs: tuple[tf.Tensor, ...], params: Mapping[str, tf.Tensor]) -> Any:
            runtime.count_trace()
            x = inputs[explained]
            with tf.GradientTape() as tape:
                tape.watch(x)
                feed = list(inputs)
                feed[explained] = x
                results = copies.call_model(model, feed)
                score = tf.reduce_sum(common.per_sample_score(results[:n_targets], params))
            grads = tape.gradient(score, x)
            if grads is None:
                # The score does not depend on this input at all: its gradient is zero.
                grads = tf.zeros_like(x)
            product = tf.cast(grads * x, tf.float32)
            return tuple(results[n_targets:]), {"grads": product}

        return gradient_x_input

    def finish(
        self, plan: Plan, raw: RawTensors
    ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        return common.gradient_finish(plan, raw)
