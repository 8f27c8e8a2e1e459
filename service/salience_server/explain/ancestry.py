"""Which layers of a model a layer's output is computed from.

A gradient `∂s/∂(layer output)` exists only when the score is computed from that
output. Checking it on the Keras graph when a request is planned lets `wrt` and the
Grad-CAM layer be refused with a message naming the layers that would work, instead
of a `None` gradient on the device.
"""

from __future__ import annotations

from typing import Any

import keras


def single_output(layer: keras.layers.Layer) -> Any | None:
    """The layer's one symbolic output in the model's graph; None when it has several
    (or none that the graph knows of).
    """
    try:
        out = layer.output
    except (AttributeError, ValueError):
        return None
    if isinstance(out, list | tuple | dict):
        return None
    return out


def _walk(model: keras.Model, index: int) -> tuple[frozenset[int], frozenset[int]]:
    """Layer positions and ids of the input tensors that `model.layers[index]`'s
    output is computed from, walking the Keras nodes back from the layer's first
    call (the call the model's graph, and so `layer.output`, refers to).
    """
    positions = {id(layer): i for i, layer in enumerate(model.layers)}
    nodes = getattr(model.layers[index], "_inbound_nodes", None) or []
    found: set[int] = set()
    tensors: set[int] = set()
    seen: set[int] = set()
    stack = list(nodes[0].input_tensors) if nodes else []
    while stack:
        tensor = stack.pop()
        tensors.add(id(tensor))
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            continue
        operation = history.operation
        position = positions.get(id(operation))
        if position is not None:
            found.add(position)
        inbound = getattr(operation, "_inbound_nodes", None) or []
        if history.node_index >= len(inbound):
            continue
        node = inbound[history.node_index]
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(node.input_tensors)
    return frozenset(found), frozenset(tensors)


def ancestors(model: keras.Model, index: int) -> frozenset[int]:
    """Indices (in `model.layers`) of every layer whose output `model.layers[index]`'s
    output is computed from, the layer itself excluded.
    """
    return _walk(model, index)[0]


def input_position(model: keras.Model, layer: keras.layers.Layer) -> int | None:
    """Which of the model's inputs an input layer produces; None for other layers."""
    if not isinstance(layer, keras.layers.InputLayer):
        return None
    out = single_output(layer)
    for k, tensor in enumerate(model.inputs):
        if tensor is out:
            return k
    return None


def depends_on_input(model: keras.Model, index: int, input_index: int) -> bool:
    """Whether `model.layers[index]`'s output is computed from the model's input `input_index`."""
    if input_position(model, model.layers[index]) == input_index:
        return True
    return id(model.inputs[input_index]) in _walk(model, index)[1]
