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
and `Post` may differ between requests batched together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from salience_server.explain.options import ExplainOptions, ResolvedExplanation
from salience_server.explain.targets import Target

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime

Tensors = tuple[tf.Tensor, ...]
RawTensors = dict[str, tf.Tensor]
DeviceFunction = Callable[[Tensors, Mapping[str, tf.Tensor]], tuple[Tensors, RawTensors]]


@dataclass(frozen=True)
class Graph:
    """What shapes a compiled explanation function. Requests with equal graphs
    can share one device call; the runtime keeps one trace per graph.
    """

    method: str
    targets: tuple[Target, ...] = ()
    input_index: int = 0
    backprop_modifier: str = ""
    wrt: int | None = None  # layer index; None: the input
    penultimate: int | None = None  # layer index, CAM methods only
    samples: int = 0
    steps: int = 0
    # Method-specific static options that change the graph (hashable).
    extra: tuple[Any, ...] = ()
    # (layers, seed) of a randomised copy of the model to explain instead (sanity
    # check); None: the trained model. The runtime builds the function on that copy.
    randomize: tuple[int, int] | None = None


@dataclass(frozen=True)
class Post:
    """Per-request post-processing; may differ between requests in one batch."""

    grad_modifiers: tuple[str, ...]
    keepdims: bool
    normalize: bool
    output_dtype: str


@dataclass
class Plan:
    """One request, ready to be computed alone or inside a batch."""

    graph: Graph
    params: dict[str, np.ndarray]  # per-sample, batch-first
    post: Post
    resolved: ResolvedExplanation
    batch: int


class Method:
    """An explanation method. Subclasses are stateless; per-model state (compiled
    functions, modified model copies) lives in the runtime's caches.
    """

    name: str = ""
    default_grad_modifier: str = "absolute"
    # Whether the method needs the model's Keras layers (not only a gradient of
    # its outputs with respect to its inputs).
    needs_layers: bool = False

    def supported(self, runtime: ModelRuntime) -> str | None:
        """None when the method can explain this model, else the reason it cannot."""
        return None

    def plan(self, runtime: ModelRuntime, options: ExplainOptions, batch: int) -> Plan:
        """Checks options against the model; raises InvalidArgument/FailedPrecondition."""
        raise NotImplementedError

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
