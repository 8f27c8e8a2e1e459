"""ModelInfer's request parameters → our explanation options: each parameter sets
one field of an `Explanation` (the Explain RPC's message), which the servicer then
converts and checks exactly as Explain's; docs/oip.md lists every name and kind.

The `grad_modifiers` parameter is not a field as such: it chooses the map of the
`saliency` output, beside the `saliency/<grad modifier>` outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from inference.v2 import grpc_service_pb2 as oip
from salience.v1 import salience_pb2 as pb
from salience_client import tensors
from salience_server import convert
from salience_server.errors import InvalidArgument, allowed
from salience_server.explain.options import Limits
from salience_server.oip.codec import MAP_DATATYPES
from salience_server.oip.outputs import SALIENCY, SALIENCY_PREFIX, Wanted
from salience_server.seam import ModelDevice

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _kind(name: str, param: oip.InferParameter) -> str:
    kind = param.WhichOneof("parameter_choice")
    if kind is None:
        raise InvalidArgument(
            f"parameters[{name!r}] has no value: set one of bool_param, int64_param, "
            "string_param, double_param or uint64_param"
        )
    return kind


def _wrong_kind(name: str, kind: str, wanted: str) -> InvalidArgument:
    return InvalidArgument(f"parameters[{name!r}] is a {kind}: use {wanted}")


def _string(name: str, param: oip.InferParameter) -> str:
    kind = _kind(name, param)
    if kind != "string_param":
        raise _wrong_kind(name, kind, "a string_param")
    convert.check_name(f"parameters[{name!r}]", param.string_param)
    return param.string_param


def _bool(name: str, param: oip.InferParameter) -> bool:
    kind = _kind(name, param)
    if kind != "bool_param":
        raise _wrong_kind(name, kind, "a bool_param")
    return param.bool_param


def _whole(name: str, param: oip.InferParameter, high: int) -> int:
    """A whole number from 0 to `high`, from int64_param or uint64_param."""
    kind = _kind(name, param)
    if kind not in ("int64_param", "uint64_param"):
        raise _wrong_kind(name, kind, "an int64_param (a whole number)")
    value: int = getattr(param, kind)
    if not 0 <= value <= high:
        raise InvalidArgument(
            f"parameters[{name!r}]={value} is not allowed: use a whole number from 0 to {high}"
        )
    return value


def _number(name: str, param: oip.InferParameter) -> float:
    """A real number: double_param, int64_param, or a string_param that parses as one
    (the published protocol has no double, so its clients send "0.2").
    """
    kind = _kind(name, param)
    if kind == "double_param":
        return param.double_param
    if kind in ("int64_param", "uint64_param"):
        return float(getattr(param, kind))
    if kind == "string_param":
        text = _string(name, param)
        try:
            return float(text)
        except ValueError:
            raise InvalidArgument(
                f"parameters[{name!r}]={text!r} is not a number: use e.g. '0.2'"
            ) from None
    raise _wrong_kind(name, kind, "a double_param, an int64_param or a string_param")


def _layer(name: str, param: oip.InferParameter, ref: pb.LayerRef) -> None:
    """A layer by index (int64_param, or a string of an integer) or by name."""
    kind = _kind(name, param)
    if kind == "int64_param":
        index = param.int64_param
        if not -(2**31) <= index < 2**31:
            raise InvalidArgument(
                f"parameters[{name!r}]={index} is not a layer index: models have far fewer layers"
            )
        ref.index = index
        return
    if kind != "string_param":
        raise _wrong_kind(name, kind, "a string_param (a layer name) or an int64_param (index)")
    text = _string(name, param)
    if not text.strip():
        raise InvalidArgument(f"parameters[{name!r}] is empty: name a layer, or give its index")
    # As the command line reads --layer: an integer is an index, anything else a name.
    try:
        index = int(text)
    except ValueError:
        ref.name = text
        return
    if not -(2**31) <= index < 2**31:
        raise InvalidArgument(
            f"parameters[{name!r}]={index} is not a layer index: models have far fewer layers"
        )
    ref.index = index


def _indices(name: str, param: oip.InferParameter) -> list[int]:
    """Units or channels: one int64_param, or a string of comma-separated integers."""
    kind = _kind(name, param)
    if kind == "int64_param":
        return [param.int64_param]
    if kind != "string_param":
        raise _wrong_kind(name, kind, "a string_param ('1,3') or an int64_param")
    text = param.string_param
    if len(text) > convert.MAX_NAME_CHARS * 16:
        raise InvalidArgument(
            f"parameters[{name!r}] has {len(text)} characters: list at most the units the "
            "server's max_filter_indices allows, as '1,3'"
        )
    try:
        indices = [int(part) for part in text.split(",")] if text.strip() else []
    except ValueError:
        raise InvalidArgument(
            f"parameters[{name!r}]={text!r} is not a list of integers: use e.g. '1,3'"
        ) from None
    # The schema's filter_indices are int64: a larger one would fail in protobuf.
    for index in indices:
        if not INT64_MIN <= index <= INT64_MAX:
            raise InvalidArgument(
                f"parameters[{name!r}] has {index}, which is out of range: use indices "
                f"from {INT64_MIN} to {INT64_MAX}"
            )
    return indices


def _seed(name: str, param: oip.InferParameter) -> int:
    return _whole(name, param, UINT64_MAX)


def _count(name: str, param: oip.InferParameter) -> int:
    return _whole(name, param, UINT32_MAX)


# What each explanation parameter sets of an Explanation (one objective).
Setter = Callable[[str, oip.InferParameter, pb.Explanation], None]


def _set_objective_layer(name: str, p: oip.InferParameter, e: pb.Explanation) -> None:
    _layer(name, p, e.objectives[0].layer)


def _set_filter_indices(name: str, p: oip.InferParameter, e: pb.Explanation) -> None:
    e.objectives[0].filter_indices.extend(_indices(name, p))


def _set_output_dtype(name: str, p: oip.InferParameter, e: pb.Explanation) -> None:
    text = _string(name, p)
    if text not in MAP_DATATYPES:
        raise InvalidArgument(
            f"parameters[{name!r}]={text!r} is not a datatype of maps: use one of "
            f"{allowed(MAP_DATATYPES)}"
        )
    e.output_dtype = tensors.DTYPES_BY_NAME[MAP_DATATYPES[text]]


def _set_noise(name: str, p: oip.InferParameter, e: pb.Explanation) -> None:
    e.noise = _number(name, p)  # explain_options refuses what float32 cannot hold


def _scales(name: str, param: oip.InferParameter) -> list[float]:
    """XRAI's segmentation scales: one number, or a string of comma-separated numbers."""
    kind = _kind(name, param)
    if kind != "string_param":
        return [_number(name, param)]
    text = _string(name, param)
    try:
        return [float(part) for part in text.split(",")] if text.strip() else []
    except ValueError:
        raise InvalidArgument(
            f"parameters[{name!r}]={text!r} is not a list of numbers: use e.g. '50,100,150'"
        ) from None


def _set_number(field: str) -> Setter:
    """Sets a real-valued path-method parameter (the method checks its range)."""
    return lambda n, p, e: setattr(e, field, _number(n, p))


def _set_count(field: str) -> Setter:
    return lambda n, p, e: setattr(e, field, _count(n, p))


PARAMETERS: dict[str, Setter] = {
    "method": lambda n, p, e: setattr(e, "method", _string(n, p)),
    "layer": _set_objective_layer,
    "filter_indices": _set_filter_indices,
    "backprop_modifier": lambda n, p, e: setattr(e, "backprop_modifier", _string(n, p)),
    "wrt": lambda n, p, e: _layer(n, p, e.wrt),
    "penultimate_layer": lambda n, p, e: _layer(n, p, e.penultimate_layer),
    "input": lambda n, p, e: setattr(e, "input", _string(n, p)),
    "output": lambda n, p, e: setattr(e, "output", _string(n, p)),
    "seed": lambda n, p, e: setattr(e, "seed", _seed(n, p)),
    "samples": lambda n, p, e: setattr(e, "samples", _count(n, p)),
    "noise": _set_noise,
    "steps": lambda n, p, e: setattr(e, "steps", _count(n, p)),
    # Score-CAM, Faster-ScoreCAM and occlusion (Explanation fields 19-23).
    "chunk_size": lambda n, p, e: setattr(e, "chunk_size", _count(n, p)),
    "top_channels": lambda n, p, e: setattr(e, "top_channels", _count(n, p)),
    "window": lambda n, p, e: setattr(e, "window", _count(n, p)),
    "stride": lambda n, p, e: setattr(e, "stride", _count(n, p)),
    "occlusion_value": lambda n, p, e: setattr(e, "occlusion_value", _number(n, p)),
    "keepdims": lambda n, p, e: setattr(e, "keepdims", _bool(n, p)),
    "normalize": lambda n, p, e: setattr(e, "normalize", _bool(n, p)),
    "keep_activation": lambda n, p, e: setattr(e, "keep_activation", _bool(n, p)),
    "output_dtype": _set_output_dtype,
    # The audit's sanity check: explain a copy with the top k weighted layers
    # re-initialised (Explanation.randomization).
    "randomize_layers": lambda n, p, e: setattr(e.randomization, "layers", _count(n, p)),
    "randomize_seed": lambda n, p, e: setattr(e.randomization, "seed", _seed(n, p)),
    # Blur IG's, Guided IG's and XRAI's own parameters (Explanation fields 30-38).
    "blur_max_sigma": _set_number("blur_max_sigma"),
    "blur_grad_step": _set_number("blur_grad_step"),
    "guided_fraction": _set_number("guided_fraction"),
    "guided_max_dist": _set_number("guided_max_dist"),
    "xrai_scales": lambda n, p, e: e.xrai_scales.extend(_scales(n, p)),
    "xrai_sigma": _set_number("xrai_sigma"),
    "xrai_min_size": _set_count("xrai_min_size"),
    "xrai_dilation_radius": _set_count("xrai_dilation_radius"),
    "xrai_area_threshold": _set_number("xrai_area_threshold"),
}
# Not an Explanation field as such: it chooses the map of the `saliency` output.
GRAD_MODIFIERS_PARAMETER = "grad_modifiers"
PARAMETER_NAMES = sorted([*PARAMETERS, GRAD_MODIFIERS_PARAMETER])


@dataclass(frozen=True)
class ExplanationParameters:
    """The request's parameters as an Explanation, before grad modifiers are chosen."""

    explanation: pb.Explanation
    # The `grad_modifiers` parameter: the grad modifier of the `saliency` output.
    default_modifier: str | None


def explanation_parameters(request: oip.ModelInferRequest, wanted: Wanted) -> ExplanationParameters:
    """Reads the request parameters into an Explanation: every name must be one of
    PARAMETER_NAMES, and only a request for a saliency output may set any.
    """
    parameters = request.parameters
    if len(parameters) > len(PARAMETER_NAMES):
        raise InvalidArgument(
            f"parameters has {len(parameters)} entries, but there are {len(PARAMETER_NAMES)} "
            f"parameters: set each once, from {allowed(PARAMETER_NAMES)}"
        )
    explanation = pb.Explanation()
    default_modifier = None
    names = sorted(parameters)
    for name in names:
        convert.check_name("parameters key", name)
        if name not in PARAMETERS and name != GRAD_MODIFIERS_PARAMETER:
            raise InvalidArgument(
                f"parameters[{name!r}] is not a parameter salience knows: use one of "
                f"{allowed(PARAMETER_NAMES, limit=len(PARAMETER_NAMES))}"
            )
        if not wanted.explains:
            raise InvalidArgument(
                f"parameters[{name!r}] is an explanation option, but no saliency map is "
                f"requested: request output {SALIENCY!r} (or '{SALIENCY_PREFIX}<grad modifier>')"
            )
    if any(name in ("layer", "filter_indices") for name in names):
        explanation.objectives.add()
    for name in names:
        param = parameters[name]
        if name == GRAD_MODIFIERS_PARAMETER:
            default_modifier = _modifier(param, wanted)
        else:
            PARAMETERS[name](name, param, explanation)
    return ExplanationParameters(explanation, default_modifier)


def _modifier(param: oip.InferParameter, wanted: Wanted) -> str:
    name = GRAD_MODIFIERS_PARAMETER
    if not wanted.default_map:
        raise InvalidArgument(
            f"parameters[{name!r}] chooses the map of output {SALIENCY!r}, which is not "
            f"requested: request {SALIENCY!r}, or name each map as '{SALIENCY_PREFIX}<m>'"
        )
    text = _string(name, param)
    listed = [m.strip() for m in text.split(",")]
    if len(listed) != 1 or not listed[0]:
        shown = ", ".join(repr(SALIENCY_PREFIX + m) for m in listed if m)
        raise InvalidArgument(
            f"parameters[{name!r}]={text!r} must name one grad modifier: output {SALIENCY!r} is "
            f"one map; request {shown or repr(SALIENCY_PREFIX + '<m>')} for several"
        )
    return listed[0]


def grad_modifiers(
    runtime: ModelDevice, params: ExplanationParameters, wanted: Wanted, limits: Limits
) -> str:
    """Sets the explanation's grad modifiers for the maps requested; returns the grad
    modifier of the `saliency` output ("" when it is Explain's default, unset).
    """
    explanation = params.explanation
    default = params.default_modifier
    if wanted.default_map and default is None and wanted.modifiers:
        # The default map beside others: named as the model resolves a request that
        # names no grad modifier (its configured default, else the method's).
        default = runtime.default_grad_modifier(convert.explain_options(explanation, limits))
    chosen = [default] if wanted.default_map and default else []
    chosen += [m for m in wanted.modifiers if m not in chosen]
    explanation.grad_modifiers.extend(chosen)
    return default or ""
