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
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from salience_server.errors import FailedPrecondition, InvalidArgument, allowed
from salience_server.explain.options import LayerSelector, Objective, ResolvedObjective

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


def output_layer(model: keras.Model) -> keras.layers.Layer:
    """The layer that produces the model's first output."""
    history = getattr(model.outputs[0], "_keras_history", None)
    return history.operation if history is not None else model.layers[-1]


def resolve_layer(
    model: keras.Model, selector: LayerSelector, field: str
) -> tuple[int, keras.layers.Layer]:
    """Finds a layer by name or index; `field` names the request field in errors."""
    layers = model.layers
    if selector is None:
        layer = output_layer(model)
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


@dataclass(frozen=True)
class Target:
    """A tensor of the explain graph that scores are read from."""

    layer_index: int
    used_logits: bool


class TargetResolver:
    """Resolves objectives against one model and builds their target tensors.

    Linear twins of softmax/sigmoid layers are built once per layer and kept, so
    the served model itself is never modified.
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self._twins: dict[int, Any] = {}

    def resolve(
        self, objectives: Sequence[Objective], keep_activation: bool
    ) -> tuple[tuple[Target, ...], tuple[np.ndarray, ...], tuple[ResolvedObjective, ...]]:
        """Targets (the graph key), one weight vector per target, and the echo."""
        slots: dict[Target, np.ndarray] = {}
        resolved = []
        for k, objective in enumerate(objectives):
            field = f"objectives[{k}]"
            index, layer = resolve_layer(self.model, objective.layer, f"{field}.layer")
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
            target = Target(index, used_logits)
            slots[target] = slots.get(target, 0) + weights
            resolved.append(
                ResolvedObjective(
                    layer_name=layer.name,
                    layer_index=index,
                    filter_indices=tuple(objective.filter_indices),
                    weight=float(objective.weight),
                    used_logits=used_logits,
                    reduction=reduction,
                )
            )
        targets = tuple(sorted(slots, key=lambda t: (t.layer_index, t.used_logits)))
        return targets, tuple(slots[t] for t in targets), tuple(resolved)

    def tensor(self, target: Target) -> Any:
        """The symbolic tensor a target reads: the layer output or its pre-activation."""
        layer = self.model.layers[target.layer_index]
        if not target.used_logits:
            return layer.output
        if self._pre_activation_kind(layer) == "input":
            return layer.input
        if target.layer_index not in self._twins:
            self._twins[target.layer_index] = self._linear_twin(layer)
        return self._twins[target.layer_index]

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
