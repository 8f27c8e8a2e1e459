"""`wrt`: the gradient with respect to a layer's output instead of the input.

keras-vis called it `wrt_tensor`. `G = ∂s/∂(layer output)` has that layer's shape,
and the map is finished on that shape as usual (grad modifiers, the channel max
when the output has rank ≥ 3 and keepdims is off, normalisation). Naming the
explained input's own input layer is the same as not setting `wrt`.

The score must depend on the layer — it has to be an ancestor of a target layer
(or the target itself, when the score is read from its output rather than its
logits) — otherwise there is no gradient; that is checked on the Keras graph when
the request is planned, and the error names the layers that would work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from salience_server.errors import InvalidArgument, allowed
from salience_server.explain import ancestry
from salience_server.explain.options import ExplainOptions, LayerSelector
from salience_server.explain.targets import Target, resolve_layer

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime

FIELD = "explanation.wrt"


def field_value(field: str, selector: LayerSelector) -> str:
    """`field.name='x'` or `field.index=3`, as error messages name a layer reference."""
    if isinstance(selector, str):
        return f"{field}.name={selector!r}"
    return f"{field}.index={selector}"


def gradient_layers(runtime: ModelRuntime, targets: Sequence[Target]) -> list[int]:
    """Indices of the layers the score of `targets` is computed from (sorted)."""
    usable: set[int] = set()
    for target in targets:
        usable |= ancestry.ancestors(runtime.model, target.layer_index)
        # The target's own output, when the score reads it (not its logits, nor a
        # layer inside it when it is a sub-model).
        if not target.used_logits and not target.path:
            usable.add(target.layer_index)
    return sorted(usable)


def resolve(
    runtime: ModelRuntime, options: ExplainOptions, targets: Sequence[Target], input_index: int
) -> tuple[int | None, str, int]:
    """The wrt layer's index (None: the explained input), its name for the echo ("" when
    unset) and the rank of the gradient it gives.
    """
    input_rank = len(runtime.inputs[input_index].shape)
    if options.wrt is None:
        return None, "", input_rank
    model = runtime.model
    index, layer = resolve_layer(model, options.wrt, FIELD)
    where = field_value(FIELD, options.wrt)
    position = ancestry.input_position(model, layer)
    if position is not None:
        if position != input_index:
            raise InvalidArgument(
                f"{where} names the input layer of {runtime.inputs[position].name!r}, but the "
                f"maps are for input {runtime.inputs[input_index].name!r}: set explanation.input "
                f"to {runtime.inputs[position].name!r}, or choose a layer"
            )
        return None, layer.name, input_rank
    out = ancestry.single_output(layer)
    if out is None:
        raise InvalidArgument(
            f"{where} names layer {layer.name!r}, which has several outputs: choose a layer "
            "with one output"
        )
    if "float" not in str(out.dtype):
        raise InvalidArgument(
            f"{where} names layer {layer.name!r}, whose output has dtype {out.dtype}: a "
            "gradient needs a floating-point layer"
        )
    usable = gradient_layers(runtime, targets)
    if index not in usable:
        layers = model.layers
        target_names = sorted({layers[t.layer_index].name for t in targets})
        raise InvalidArgument(
            f"{where} names layer {layer.name!r}, which the explained score does not depend "
            f"on (it comes after the objectives' layer {allowed(target_names)} or lies on "
            f"another branch), so it has no gradient: choose one of "
            f"{allowed([layers[i].name for i in usable])}"
        )
    return index, layer.name, len(out.shape)
