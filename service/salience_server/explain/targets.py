"""Objectives resolved against a Keras model: which tensor the score is read from,
and the weight vector that turns it into a per-sample score.

Every objective's score is linear in the spatial mean of its target activation
`a`: `weight * Σ_{i ∈ filter_indices} mean_spatial(a)[..., i]`, and "no index"
(the mean of the whole output) is the same with weight/units on every unit. So one
compiled gradient function serves any filter indices and weights: they are tensor
arguments, and only the set of target tensors shapes the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from salience_server.errors import FailedPrecondition, InvalidArgument, allowed
from salience_server.explain.options import LayerSelector, Objective, ResolvedObjective
from salience_server.explain.plan import Target

# Final activations whose output can be raised by lowering the other units; the
# score is taken on their pre-activation unless the caller keeps the activation.
SQUASHING_ACTIVATIONS = frozenset({"softmax", "sigmoid"})


def activation_name(layer: keras.layers.Layer) -> str:
    """The name of a layer's activation function ("" when it has none)."""
    fn = getattr(layer, "activation", None)
    if fn is None:
        return ""
    if isinstance(fn, str):
        return fn
    return str(getattr(fn, "__name__", ""))


def output_names(model: keras.Model) -> list[str]:
    """The names of the model's outputs (their producing layers), in output order, as
    model metadata lists them.
    """
    names = []
    for i, tensor in enumerate(model.outputs):
        history = getattr(tensor, "_keras_history", None)
        names.append(history.operation.name if history is not None else f"output_{i}")
    return names


def output_layer(model: keras.Model, output_name: str = "") -> keras.layers.Layer:
    """The layer that produces the named model output; "" means the first output.

    Raises InvalidArgument (field `explanation.output`) for a name that is not an output.
    """
    names = output_names(model)
    if output_name and output_name not in names:
        raise InvalidArgument(
            f"explanation.output={output_name!r} is not an output of the model: "
            f"choose one of {allowed(names)}"
        )
    index = names.index(output_name) if output_name else 0
    history = getattr(model.outputs[index], "_keras_history", None)
    return history.operation if history is not None else model.layers[-1]


def resolve_layer(
    model: keras.Model, selector: LayerSelector, field: str, output_name: str = ""
) -> tuple[int, keras.layers.Layer]:
    """Finds a layer by name or index; `field` names the request field in errors.

    No selector means the layer of the output head `output_name` (the first output
    when empty).
    """
    layers = model.layers
    if selector is None:
        layer = output_layer(model, output_name)
        return layers.index(layer), layer
    if isinstance(selector, str):
        for index, layer in enumerate(layers):
            if layer.name == selector:
                return index, layer
        raise InvalidArgument(
            f"{field}.name={selector!r} is not a layer of the model: "
            f"choose one of {allowed([layer.name for layer in layers])}"
        )
    if not -len(layers) <= selector < len(layers):
        raise InvalidArgument(
            f"{field}.index={selector} is out of range: the model has {len(layers)} layers "
            f"(valid {-len(layers)}..{len(layers) - 1})"
        )
    index = selector % len(layers)
    return index, layers[index]


def _single_output(layer: keras.layers.Layer, field: str) -> Any:
    if isinstance(layer, keras.layers.InputLayer):
        raise InvalidArgument(
            f"{field} names the input layer {layer.name!r}: choose a layer that computes something"
        )
    try:
        out = layer.output
    except (AttributeError, ValueError) as err:
        raise InvalidArgument(
            f"{field} names layer {layer.name!r}, whose output is not one tensor of the "
            f"model's graph ({err})"
        ) from None
    if isinstance(out, list | tuple | dict):
        raise InvalidArgument(
            f"{field} names layer {layer.name!r}, which has several outputs: choose another"
        )
    if len(out.shape) < 2 or out.shape[-1] is None:
        raise InvalidArgument(
            f"{field} names layer {layer.name!r} with output shape {tuple(out.shape)}: "
            "a target needs a batch axis and a known last axis"
        )
    return out


# Separates the names of a path to a layer inside nested sub-models: "backbone/conv".
# Keras layer names cannot contain it.
PATH_SEPARATOR = "/"


def is_submodel(layer: keras.layers.Layer) -> bool:
    """Whether a layer is a Functional or Sequential model with a graph of its own."""
    return isinstance(layer, keras.Model) and bool(getattr(layer, "inputs", None))


def _nested_layers(
    model: keras.Model, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], keras.layers.Layer]]:
    """Every layer inside the model's sub-models (any depth), with its name path."""
    found: list[tuple[tuple[str, ...], keras.layers.Layer]] = []
    for layer in model.layers:
        if is_submodel(layer):
            path = (*prefix, layer.name)
            found.extend(((*path, inner.name), inner) for inner in layer.layers)
            found.extend(_nested_layers(layer, path))
    return found


def nested_layer(
    model: keras.Model, name: str, field: str
) -> tuple[int, tuple[str, ...], keras.layers.Layer] | None:
    """A layer inside a sub-model (a Functional model used as a layer), by its path
    `outer/inner[/...]` or by its bare name when that is unique among nested layers:
    the index of the top-level sub-model, the names inside it, and the layer. None
    when `name` is no nested layer (top-level names are not looked up here).
    """
    if PATH_SEPARATOR in name:
        wanted = tuple(name.split(PATH_SEPARATOR))
        found = [(path, layer) for path, layer in _nested_layers(model) if path == wanted]
    else:
        found = [(path, layer) for path, layer in _nested_layers(model) if path[-1] == name]
    if len(found) > 1:
        raise InvalidArgument(
            f"{field}.name={name!r} names several layers inside sub-models: choose one of "
            f"{allowed(PATH_SEPARATOR.join(path) for path, _ in found)}"
        )
    if not found:
        return None
    path, layer = found[0]
    index = next(i for i, outer in enumerate(model.layers) if outer.name == path[0])
    return index, path[1:], layer


class TargetResolver:
    """Resolves objectives against one model and builds their target tensors.

    Linear twins of softmax/sigmoid layers are built once per layer and kept, so
    the served model itself is never modified.
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self._twins: dict[int, Any] = {}
        self._inner: dict[int, TargetResolver] = {}  # resolvers of sub-models, by index
        self._lifted: dict[Target, Any] = {}  # nested targets in this model's graph

    def resolve(
        self, objectives: Sequence[Objective], keep_activation: bool, output_name: str = ""
    ) -> tuple[tuple[Target, ...], tuple[np.ndarray, ...], tuple[ResolvedObjective, ...]]:
        """Targets (the graph key), one weight vector per target, and the echo.

        Objectives without a layer score the output head `output_name` ("": the first).
        """
        self.output_name(output_name)  # an unknown head is an error even if unused
        slots: dict[Target, np.ndarray] = {}
        resolved = []
        for k, objective in enumerate(objectives):
            field = f"objectives[{k}]"
            path: tuple[str, ...] = ()
            nested = None
            if isinstance(objective.layer, str) and objective.layer not in {
                layer.name for layer in self.model.layers
            }:
                nested = nested_layer(self.model, objective.layer, f"{field}.layer")
            if nested is not None:
                index, path, layer = nested
            else:
                index, layer = resolve_layer(
                    self.model, objective.layer, f"{field}.layer", output_name
                )
            out = _single_output(layer, f"{field}.layer")
            units = int(out.shape[-1])
            weights = np.zeros(units, dtype=np.float32)
            for j, unit in enumerate(objective.filter_indices):
                if not 0 <= unit < units:
                    what = "units" if len(out.shape) == 2 else "channels"
                    raise InvalidArgument(
                        f"{field}.filter_indices[{j}]={unit} is out of range: layer "
                        f"{layer.name!r} has {units} {what} (valid 0..{units - 1})"
                    )
                weights[unit] += 1.0
            if objective.filter_indices:
                reduction = "units" if len(out.shape) == 2 else "channel_mean"
            else:
                weights[:] = 1.0 / units
                reduction = "layer_mean"
            weights *= np.float32(objective.weight)
            used_logits = not keep_activation and self._pre_activation_kind(layer) is not None
            target = Target(index, used_logits, path)
            slots[target] = slots.get(target, 0) + weights
            resolved.append(
                ResolvedObjective(
                    layer_name=PATH_SEPARATOR.join((self.model.layers[index].name, *path))
                    if path
                    else layer.name,
                    layer_index=index,
                    filter_indices=tuple(objective.filter_indices),
                    weight=float(objective.weight),
                    used_logits=used_logits,
                    reduction=reduction,
                )
            )
        targets = tuple(sorted(slots, key=lambda t: (t.layer_index, t.path, t.used_logits)))
        return targets, tuple(slots[t] for t in targets), tuple(resolved)

    def output_name(self, output_name: str = "") -> str:
        """The checked name of the output head objectives without a layer refer to."""
        output_layer(self.model, output_name)  # raises for an unknown head
        return output_name or output_names(self.model)[0]

    def tensor(self, target: Target) -> Any:
        """The symbolic tensor a target reads: the layer output or its pre-activation."""
        if target.path:
            return self._nested_tensor(target)
        layer = self.model.layers[target.layer_index]
        if not target.used_logits:
            return layer.output
        if self._pre_activation_kind(layer) == "input":
            return layer.input
        if target.layer_index not in self._twins:
            self._twins[target.layer_index] = self._linear_twin(layer)
        return self._twins[target.layer_index]

    def _nested_tensor(self, target: Target) -> Any:
        """A layer inside a sub-model, as a tensor of this model's graph.

        The sub-model's own graph is cut at the layer (a model from its inputs to the
        layer's output, sharing its weights) and applied to the tensors this model
        feeds the sub-model; the served model is not modified.
        """
        if target in self._lifted:
            return self._lifted[target]
        container = self.model.layers[target.layer_index]
        nodes = getattr(container, "_inbound_nodes", None) or []
        if len(nodes) != 1:
            raise FailedPrecondition(
                f"layer {PATH_SEPARATOR.join((container.name, *target.path))!r} is inside "
                f"sub-model {container.name!r}, which the model calls {len(nodes)} times: "
                "its activation is not one tensor; choose a layer outside it"
            )
        inner = self._inner.setdefault(target.layer_index, TargetResolver(container))
        names = [layer.name for layer in container.layers]
        inner_target = Target(names.index(target.path[0]), target.used_logits, target.path[1:])
        cut = keras.Model(
            container.inputs,
            inner.tensor(inner_target),
            name=f"{container.name}__to_{target.path[-1]}",
        )
        feed = list(nodes[0].input_tensors)
        lifted = cut(feed if len(feed) > 1 else feed[0])
        self._lifted[target] = lifted
        return lifted

    @staticmethod
    def _pre_activation_kind(layer: keras.layers.Layer) -> str | None:
        """How to reach a squashing layer's pre-activation: "input" for a standalone
        Softmax/Activation layer, "twin" for a layer with a fused activation.
        """
        if isinstance(layer, keras.layers.Softmax):
            return "input"
        if activation_name(layer) not in SQUASHING_ACTIVATIONS:
            return None
        return "input" if isinstance(layer, keras.layers.Activation) else "twin"

    @staticmethod
    def _linear_twin(layer: keras.layers.Layer) -> Any:
        """The layer's pre-activation: a copy with a linear activation, same weights."""
        config = layer.get_config()
        config["activation"] = "linear"
        config["name"] = f"{layer.name}__pre_activation"
        try:
            twin = layer.__class__.from_config(config)
            pre = twin(layer.input)
            twin.set_weights(layer.get_weights())
        except Exception as err:
            raise FailedPrecondition(
                f"cannot take logits of layer {layer.name!r} ({layer.__class__.__name__}: {err}); "
                "set keep_activation to explain its activated output"
            ) from None
        return pre
