"""What the gradient methods share: objectives → targets and weights, the
per-sample score, the explain model, and the modifier/normalise finish.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from salience_server.errors import FailedPrecondition, InvalidArgument
from salience_server.explain import modifiers
from salience_server.explain.engine import Method, RawTensors, per_sample
from salience_server.explain.options import ExplainOptions, ResolvedExplanation
from salience_server.explain.plan import Graph, Plan, Post
from salience_server.explain.targets import Target

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime

WEIGHTS = "weights/"


def weight_key(k: int) -> str:
    return f"{WEIGHTS}{k}"


def per_sample_score(
    activations: Sequence[tf.Tensor], params: Mapping[str, tf.Tensor]
) -> tf.Tensor:
    """`Σ_t ⟨w_t, mean over spatial axes of a_t⟩` for every sample: shape (batch,).

    The weights are per sample (batch, units), so requests with different filter
    indices and objective weights share one device call.
    """
    total = None
    for k, a in enumerate(activations):
        a = tf.cast(a, tf.float32)
        spatial = list(range(1, len(a.shape) - 1))
        pooled = tf.reduce_mean(a, axis=spatial) if spatial else a
        score = tf.reduce_sum(pooled * params[weight_key(k)], axis=-1)
        total = score if total is None else total + score
    assert total is not None  # at least one target: ExplainOptions never has none
    return total


def input_index(runtime: ModelRuntime, options: ExplainOptions) -> int:
    """The explained input; it must be floating point to have a gradient."""
    names = [info.name for info in runtime.inputs]
    index = names.index(options.input_name) if options.input_name else 0
    if np.dtype(runtime.inputs[index].dtype).kind != "f":
        raise FailedPrecondition(
            f"input {names[index]!r} has dtype {runtime.inputs[index].dtype}: "
            "gradients need a floating-point input"
        )
    return index


def post(method: Method, options: ExplainOptions) -> Post:
    return Post(
        grad_modifiers=options.grad_modifiers or (method.default_grad_modifier,),
        keepdims=options.keepdims,
        normalize=options.normalize,
        output_dtype=options.output_dtype,
    )


def plan_targets(
    runtime: ModelRuntime, method: Method, options: ExplainOptions, batch: int, **graph: Any
) -> Plan:
    """The plan of a method whose graph is keyed by its targets and explained input
    (plus `graph` fields), with per-sample objective weights as params.
    """
    index = input_index(runtime, options)
    targets, weights, objectives = runtime.resolver.resolve(
        options.objectives, options.keep_activation, options.output_name
    )
    params = {weight_key(k): per_sample(w, batch) for k, w in enumerate(weights)}
    p = post(method, options)
    rank = len(runtime.inputs[index].shape)
    resolved = ResolvedExplanation(
        method=method.name,
        objectives=objectives,
        grad_modifiers=p.grad_modifiers,
        keepdims=options.keepdims,
        normalize=options.normalize,
        output_dtype=options.output_dtype,
        input_name=runtime.inputs[index].name,
        channels_reduced=not options.keepdims and rank >= 3,
        seed=options.seed,
        output_name=runtime.resolver.output_name(options.output_name),
    )
    return Plan(
        graph=Graph(method=method.name, targets=targets, input_index=index, **graph),
        params=params,
        post=p,
        resolved=resolved,
        batch=batch,
    )


def explain_model(
    runtime: ModelRuntime, targets: Sequence[Target], extra: Sequence[Any] = ()
) -> keras.Model:
    """A model from the inputs to `[*targets, *extra, *model outputs]`."""
    tensors = [runtime.resolver.tensor(t) for t in targets]
    return keras.Model(
        runtime.model.inputs,
        [*tensors, *extra, *runtime.model.outputs],
        name=f"{runtime.name}_explain",
    )


def finish_gradient_maps(plan: Plan, grads: tf.Tensor) -> dict[str, tf.Tensor]:
    """Maps of a raw gradient: each modifier, channel max, normalisation, dtype."""
    p = plan.post
    reduce_channels = not p.keepdims and len(grads.shape) >= 3
    finish = modifiers.map_function(
        p.grad_modifiers, reduce_channels, p.normalize, p.output_dtype, len(grads.shape)
    )
    return dict(zip(p.grad_modifiers, finish(grads), strict=True))


def gradient_finish(
    plan: Plan, raw: RawTensors
) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
    return finish_gradient_maps(plan, raw["grads"]), {}


def refuse_wrt(method: Method, options: ExplainOptions, why: str) -> None:
    """Refuses `wrt` for a method defined on the model input; `why` says how."""
    if options.wrt is not None:
        raise InvalidArgument(
            f"explanation.wrt is not supported by method {method.name!r}: {why}; leave wrt "
            "unset (use method 'vanilla' for the gradient of a layer)"
        )
