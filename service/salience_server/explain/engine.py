"""The seam between explanation methods and whatever schedules them on the device.

An explanation runs in three steps, so that a scheduler (the batcher) can merge
requests between the first and the last:

1. **plan** (per request, on the host): check the options against the model,
   resolve objectives and layers, and produce a `Plan`: the `Graph` key of the
   compiled function to run, the per-sample `params` (batch-first arrays such as
   objective weights, seeds, baselines) and the per-request `Post` options.
2. **compute** (per device call): the compiled function of one `Graph`, on the
   concatenated inputs and params of every request that shares that graph. It
   returns the model outputs and a dict of raw per-sample tensors ("grads",
   "activations", ...), all batch-first, still on the device.
3. **finish** (per request, on the device): the request's own rows of the raw
   tensors become its maps (grad modifiers, channel reduction, resizing,
   normalisation, quantisation); only these final maps are copied to the host.

Everything that changes the traced graph is in `Graph`; everything in `params`
and `Post` may differ between requests batched together. Those three types live in
`explain.plan`, which imports no TensorFlow: the batcher and the protocol layer
handle plans without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from salience_server.explain.options import ExplainOptions
from salience_server.explain.plan import Graph, Plan

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime

Tensors = tuple[tf.Tensor, ...]
RawTensors = dict[str, tf.Tensor]
DeviceFunction = Callable[[Tensors, Mapping[str, tf.Tensor]], tuple[Tensors, RawTensors]]


class Method:
    """An explanation method. Subclasses are stateless; per-model state (compiled
    functions, modified model copies) lives in the runtime's caches.
    """

    name: str = ""
    default_grad_modifier: str = "absolute"
    # Whether the method needs the model's Keras layers (not only a gradient of
    # its outputs with respect to its inputs).
    needs_layers: bool = False
    # Whether `--xla` may compile the device function: false for methods whose loop
    # shapes follow tensor arguments (how many copies a request scores), which XLA
    # cannot compile without a graph per value; they run uncompiled under XLA.
    xla: bool = True

    def supported(self, runtime: ModelRuntime) -> str | None:
        """None when the method can explain this model, else the reason it cannot."""
        return None

    def plan(self, runtime: ModelRuntime, options: ExplainOptions, batch: int) -> Plan:
        """Checks options against the model; raises InvalidArgument/FailedPrecondition."""
        raise NotImplementedError

    def fresh(self, plan: Plan, options: ExplainOptions) -> Plan:
        """The plan for another request with the same options (the runtime caches
        plans by options and batch size): what `plan` draws per request, such as
        SmoothGrad's seed when the request sets none, drawn anew. Cheap and
        lock-free: it runs on the event loop.
        """
        return plan

    def build(
        self, runtime: ModelRuntime, graph: Graph, param_specs: dict[str, tf.TensorSpec]
    ) -> DeviceFunction:
        """The compiled device function for one graph; called once per graph."""
        raise NotImplementedError

    def finish(
        self, plan: Plan, raw: RawTensors
    ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        """One request's maps (by grad modifier) and extras, from its raw rows."""
        raise NotImplementedError


def param_specs(params: Mapping[str, np.ndarray]) -> dict[str, tf.TensorSpec]:
    """Signature of per-sample params with a free batch axis."""
    return {
        key: tf.TensorSpec(
            [None, *value.shape[1:]], tf.as_dtype(value.dtype), name=key.replace("/", "_")
        )
        for key, value in sorted(params.items())
    }


def per_sample(value: np.ndarray, batch: int) -> np.ndarray:
    """A per-request value repeated for every sample of the request."""
    return np.ascontiguousarray(np.broadcast_to(value, (batch, *value.shape)))
