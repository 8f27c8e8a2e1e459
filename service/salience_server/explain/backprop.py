"""Backprop modifiers: how gradients pass through the model's ReLUs.

With `y` a ReLU's output and `g` the gradient arriving from above (reference
semantics, "backprop_modifier"):

| name | gradient passed down |
| --- | --- |
| "" (none) | `1[y>0] · g`, ordinary backprop |
| `guided` | `1[y>0] · 1[g>0] · g` (Springenberg et al. 2015) |
| `rectified` (aliases `deconv`, `relu`) | `1[g>0] · g` (Zeiler & Fergus 2014) |

A modifier applies to every ReLU of the model: a layer's `activation="relu"` (or
`"relu6"`), a `ReLU` layer (with `max_value`, a unit saturated at the maximum is
treated as inactive: the guided mask is `1[0<x<max]`) and an `Activation("relu")`
layer, also inside nested models. Sigmoid, tanh, softmax and linear activations
pass gradients ordinarily. Any other activation (LeakyReLU, PReLU, ELU layers; elu,
selu, gelu, silu/swish, softplus, leaky_relu, ...; a ReLU layer with a negative slope
or a threshold; a ReLU inside a recurrent cell or a layer wrapper) has no agreed
modified rule, so a model with one is refused with FAILED_PRECONDITION naming the
layers instead of answering with a silently wrong map. ReLUs computed inside a
custom layer's own code (not through an `activation`) cannot be seen.

The served model is never touched: the modifier is applied to a copy (new layers
with the weights copied, the ReLU activations swapped for `tf.custom_gradient`
functions; the forward pass is unchanged), built the first time a request asks for
it and kept on the runtime, one copy per modifier. Every explanation model of a
`Graph` with a backprop modifier is built on that copy: use `explain_model`.

Caveat: guided and rectified maps look sharp but barely change when the model's
weights are randomised (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"):
they are not faithful to the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from salience_server.errors import FailedPrecondition, InvalidArgument, allowed
from salience_server.explain import ancestry, common, wrt
from salience_server.explain.engine import Method
from salience_server.explain.options import ExplainOptions
from salience_server.explain.plan import Graph, Plan
from salience_server.explain.targets import TargetResolver, activation_name

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime

BackpropRule = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
"""`(y, g) -> gradient passed down` for a ReLU with output `y` and upstream gradient `g`."""

GUIDED = "guided"
RECTIFIED = "rectified"


def guided(y: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    """`1[y>0] · 1[g>0] · g`."""
    return tf.where(tf.logical_and(y > 0, g > 0), g, tf.zeros_like(g))


def rectified(y: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    """`1[g>0] · g`: the forward activation is ignored."""
    return tf.where(g > 0, g, tf.zeros_like(g))


BACKPROP_MODIFIERS: dict[str, BackpropRule] = {GUIDED: guided, RECTIFIED: rectified}
"""Canonical names → rules; operator plugins add theirs (`salience_server.plugins`)."""

ALIASES: dict[str, str] = {"deconv": RECTIFIED, "relu": RECTIFIED}

# Offending layers named in one error message at most.
LISTED = 12
# Activations whose gradient a modifier leaves as it is.
ORDINARY_ACTIVATIONS = frozenset({"linear", "sigmoid", "tanh", "softmax"})
# Activation functions that are a ReLU, with their upper clip.
RELU_ACTIVATIONS: dict[str, float | None] = {"relu": None, "relu6": 6.0}


def names() -> tuple[str, ...]:
    """Every name a request may use, canonical names first."""
    return (*BACKPROP_MODIFIERS, *ALIASES)


def canonical(name: str) -> str | None:
    """The canonical name of a modifier or alias; None when unknown."""
    if name in BACKPROP_MODIFIERS:
        return name
    return ALIASES.get(name)


def check_name(options: ExplainOptions) -> None:
    """InvalidArgument for an unknown modifier name (any model)."""
    name = options.backprop_modifier
    if name and canonical(name) is None:
        raise InvalidArgument(
            f"explanation.backprop_modifier={name!r} is unknown: use one of "
            f"{allowed(names())}, or leave it empty for ordinary backprop"
        )


# Which layers a modifier rewrites, and which it cannot handle -------------------


@dataclass(frozen=True)
class _Relu:
    """A ReLU the modified copy replaces; `max_value` is its upper clip (relu6: 6)."""

    max_value: float | None


def _classify(layer: keras.layers.Layer) -> _Relu | str | None:
    """A ReLU to replace, the reason a modifier cannot handle the layer, or None
    when gradients pass through it ordinarily.
    """
    if isinstance(layer, keras.layers.ReLU):
        slope = float(getattr(layer, "negative_slope", 0.0) or 0.0)
        threshold = float(getattr(layer, "threshold", 0.0) or 0.0)
        if slope or threshold:
            return f"ReLU with negative_slope={slope:g}, threshold={threshold:g}"
        max_value = getattr(layer, "max_value", None)
        return _Relu(None if max_value is None else float(max_value))
    if isinstance(layer, keras.layers.LeakyReLU | keras.layers.PReLU | keras.layers.ELU):
        return layer.__class__.__name__
    if isinstance(layer, keras.layers.Wrapper):
        # The copy cannot reach into the wrapped layer's activation.
        inner = _classify(layer.layer)
        if inner is None:
            return None
        what = "ReLU" if isinstance(inner, _Relu) else inner
        return f"{layer.__class__.__name__} around a layer with {what}"
    if isinstance(layer, keras.layers.RNN):
        # Nor into a recurrent cell: only the ordinary activations can pass.
        cell = getattr(layer, "cell", layer)
        inside = {
            str(getattr(fn, "__name__", "custom"))
            for fn in (
                getattr(cell, "activation", None),
                getattr(cell, "recurrent_activation", None),
            )
            if fn is not None
        }
        odd = sorted(inside - ORDINARY_ACTIVATIONS)
        if odd:
            return f"{layer.__class__.__name__} with activation {', '.join(map(repr, odd))}"
        return None
    if getattr(layer, "activation", None) is None:
        return None
    name = activation_name(layer) or "custom"
    if name in RELU_ACTIVATIONS:
        return _Relu(RELU_ACTIVATIONS[name])
    if name in ORDINARY_ACTIVATIONS:
        return None
    return f"activation {name!r}"


def _layers(model: keras.Model, prefix: str = "") -> list[tuple[str, keras.layers.Layer]]:
    """Every leaf layer with its path, nested models opened."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(_layers(layer, f"{prefix}{layer.name}/"))
        else:
            found.append((f"{prefix}{layer.name}", layer))
    return found


def unsupported_layers(model: keras.Model) -> tuple[str, ...]:
    """`'name' (why)` for every layer whose activation no modifier can handle."""
    found = []
    for path, layer in _layers(model):
        kind = _classify(layer)
        if isinstance(kind, str):
            found.append(f"{path!r} ({kind})")
    return tuple(found)


def _unsupported(runtime: ModelRuntime) -> tuple[str, ...]:
    return runtime.derive(("backprop-scan",), lambda: unsupported_layers(runtime.model))


def supported_modifiers(runtime: ModelRuntime) -> tuple[str, ...]:
    """The canonical modifiers this model can be explained with (none when it has an
    activation they cannot handle).
    """
    return () if _unsupported(runtime) else tuple(BACKPROP_MODIFIERS)


def unsupported_reason(runtime: ModelRuntime) -> str | None:
    """Why no backprop modifier applies to this model; None when they all do."""
    bad = _unsupported(runtime)
    if not bad:
        return None
    shown = ", ".join(bad[:LISTED])
    if len(bad) > LISTED:
        shown += f", … ({len(bad) - LISTED} more)"
    return (
        "a backprop modifier changes the gradient of ReLUs only, and the model has layers "
        f"with activations it cannot handle: {shown}"
    )


def resolve(runtime: ModelRuntime, options: ExplainOptions) -> str:
    """The request's modifier by its canonical name ("" for none); FailedPrecondition
    when the model has activations a modifier cannot handle.
    """
    check_name(options)
    name = canonical(options.backprop_modifier) if options.backprop_modifier else ""
    if name:
        reason = unsupported_reason(runtime)
        if reason is not None:
            raise FailedPrecondition(
                f"explanation.backprop_modifier={options.backprop_modifier!r} cannot be used "
                f"on model {runtime.name!r}: {reason}; explain without a backprop modifier"
            )
    return name or ""


# The modified copy --------------------------------------------------------------


def modified_relu(rule: BackpropRule, max_value: float | None) -> Callable[[tf.Tensor], tf.Tensor]:
    """A ReLU (clipped at `max_value` when set) whose gradient is `rule(y, g)`.

    With a clip, a saturated unit is passed to the rule as inactive (y = 0): in
    ordinary backprop it passes no gradient either.
    """

    @tf.custom_gradient  # type: ignore[untyped-decorator, unused-ignore]
    def relu(x: tf.Tensor) -> Any:
        y = tf.nn.relu(x)
        if max_value is not None:
            top = tf.cast(max_value, y.dtype)
            y = tf.minimum(y, top)

        def grad(g: tf.Tensor) -> tf.Tensor:
            active = y if max_value is None else tf.where(x < top, y, tf.zeros_like(y))
            return tf.cast(rule(active, g), g.dtype)

        return y, grad

    relu.__name__ = "modified_relu"
    return relu


def build_modified_model(model: keras.Model, rule: BackpropRule) -> keras.Model:
    """A copy of `model` with every ReLU's gradient replaced by `rule`; same weights,
    same forward pass. The caller has checked `unsupported_layers(model)` is empty.
    """
    copies: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        kind = _classify(layer)
        if isinstance(kind, _Relu) and isinstance(layer, keras.layers.ReLU):
            new = keras.layers.Activation(
                modified_relu(rule, kind.max_value), name=layer.name, dtype=layer.dtype_policy
            )
        else:
            new = layer.__class__.from_config(layer.get_config())
            if isinstance(kind, _Relu):
                new.activation = modified_relu(rule, kind.max_value)
        copies.append((layer, new))
        return new

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for original, new in copies:
        new.set_weights(original.get_weights())
    return copy


@dataclass
class _Modified:
    model: keras.Model
    resolver: TargetResolver


def _modified(runtime: ModelRuntime, name: str) -> _Modified:
    """The runtime's copy for modifier `name`, built once and kept."""

    def make() -> _Modified:
        model = build_modified_model(runtime.model, BACKPROP_MODIFIERS[name])
        if [layer.name for layer in model.layers] != [layer.name for layer in runtime.model.layers]:
            # Layer indices key targets and graphs: the copy must keep them.
            raise FailedPrecondition(
                f"explanation.backprop_modifier={name!r}: the modified copy of model "
                f"{runtime.name!r} does not keep its layers in order"
            )
        return _Modified(model, TargetResolver(model))

    return runtime.derive(("backprop-copy", name), make)


def model_for(runtime: ModelRuntime, graph: Graph) -> keras.Model:
    """The Keras model a graph's explain model is built from: the served model, or
    its copy for `graph.backprop_modifier` (same layers, same indices).
    """
    if not graph.backprop_modifier:
        return runtime.model
    return _modified(runtime, graph.backprop_modifier).model


def resolver_for(runtime: ModelRuntime, graph: Graph) -> TargetResolver:
    """The target resolver of `model_for(runtime, graph)`."""
    if not graph.backprop_modifier:
        return runtime.resolver
    return _modified(runtime, graph.backprop_modifier).resolver


def explain_model(runtime: ModelRuntime, graph: Graph, layers: Sequence[int] = ()) -> keras.Model:
    """A model from the inputs to `[*targets, *outputs of layers, *model outputs]`,
    built on `model_for(runtime, graph)`: the backprop modifier applies to it.

    Use it instead of `common.explain_model` in a method that honours
    `graph.backprop_modifier`; `layers` are layer indices (e.g. `graph.wrt`).
    The model's input preprocessing runs in front, so gradients are with respect
    to the inputs as requests send them.
    """
    if not runtime.has_layers:
        # No Keras graph to cut (a SavedModel signature): the targets are outputs, and
        # layer options were refused before planning.
        return runtime.output_model(graph.targets)
    with runtime.exclusive():
        model = model_for(runtime, graph)
        resolver = resolver_for(runtime, graph)
        tensors = [resolver.tensor(t) for t in graph.targets]
        extra = [ancestry.single_output(model.layers[i]) for i in layers]
        suffix = f"_{graph.backprop_modifier}" if graph.backprop_modifier else ""
        return runtime.preprocessing.wrap(
            keras.Model(
                model.inputs,
                [*tensors, *extra, *model.outputs],
                name=f"{runtime.name}_explain{suffix}",
            )
        )


def plan_gradient(
    runtime: ModelRuntime,
    method: Method,
    options: ExplainOptions,
    batch: int,
    *,
    with_wrt: bool = True,
    **graph: Any,
) -> Plan:
    """`common.plan_targets` plus the backprop modifier (graph key and echo) and, when
    `with_wrt`, the `wrt` layer (graph.wrt, echo, and the channel axis of its shape).

    A method that does not take `wrt` leaves `with_wrt` off; the runtime then refuses
    requests that set it.
    """
    modifier = resolve(runtime, options)
    plan = common.plan_targets(runtime, method, options, batch, backprop_modifier=modifier, **graph)
    resolved = replace(plan.resolved, backprop_modifier=modifier)
    if with_wrt:
        index, name, rank = wrt.resolve(
            runtime, options, plan.graph.targets, plan.graph.input_index
        )
        plan.graph = replace(plan.graph, wrt=index)
        resolved = replace(resolved, wrt=name, channels_reduced=not options.keepdims and rank >= 3)
    plan.resolved = resolved
    return plan
