"""The Open Inference Protocol (KServe v2 gRPC, `inference.GRPCInferenceService`),
served on the same port as `salience.v1.Salience`, so that Triton's and KServe's
clients and tools work unchanged.

Decode, await the same core as the Salience servicer, encode: a ModelInfer request
is checked like a Predict (the same shape, byte-length and input checks), goes
through the same batcher and model runtime, and asks for saliency maps by naming
extra outputs (`saliency`, `saliency/<grad modifier>`) with the explanation options
as request parameters, which become an `Explanation` checked exactly as Explain's.
docs/oip.md documents every name, parameter and status.

Errors are ServiceErrors, reported by the interceptor in `errors` like every
RPC's; messages name this protocol's fields (`model_name`, `inputs[0].datatype`,
`raw_input_contents[1]`, `parameters['samples']`), the core's messages translated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata as importlib_metadata

import numpy as np
from grpc import aio

from inference.v2 import grpc_service_pb2 as oip
from inference.v2 import grpc_service_pb2_grpc
from salience.v1 import salience_pb2 as pb
from salience_client import tensors
from salience_client.tensors import TensorError
from salience_server import convert
from salience_server.core import InferenceCore
from salience_server.errors import InvalidArgument, ServiceError, allowed, label_call
from salience_server.explain import catalog
from salience_server.explain.options import OUTPUT_DTYPES, VANILLA
from salience_server.seam import ModelDevice
from salience_server.servicer import deadline

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "salience"
# What ServerMetadata lists: ModelInfer's saliency outputs and explanation parameters.
EXTENSIONS = ("saliency",)

# The output that carries a saliency map, and the prefix naming its grad modifier.
SALIENCY = "saliency"
SALIENCY_PREFIX = SALIENCY + "/"

# Request datatypes, as salience's element types (the others have no model to feed).
INPUT_DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# The protocol's name of every numpy dtype a model may take or give (metadata and
# outputs may use more types than requests: the protocol names them all).
DATATYPES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "bfloat16": "BF16",
}
# The InferTensorContents field that holds each datatype's values. FP16 and BF16
# have none: their values travel only as raw bytes.
CONTENTS: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
# The maps' element types (`output_dtype`), by the protocol's names.
MAP_DATATYPES: dict[str, str] = {DATATYPES[name]: name for name in OUTPUT_DTYPES}

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
VERSION = re.compile(r"[0-9]+")


def datatype(dtype: np.dtype | str) -> str:
    """The protocol's datatype of a numpy dtype ("FP32")."""
    name = np.dtype(dtype).name
    try:
        return DATATYPES[name]
    except KeyError:
        raise InvalidArgument(f"dtype {name} has no Open Inference Protocol datatype") from None


def parse_version(field: str, text: str) -> int:
    """A request's version string as salience's number: "" is 0, the highest."""
    if text == "":
        return 0
    convert.check_name(field, text)
    if VERSION.fullmatch(text) is None or int(text) == 0:
        raise InvalidArgument(
            f"{field}={text!r} is not a version: use a positive whole number such as '1', "
            "or '' for the highest"
        )
    return int(text)


# Messages of the core, in this protocol's words --------------------------------

# The Salience field names the core's messages use, and their names here. The
# explanation's fields are request parameters (`ExplanationParameters`).
# Each pattern's group 1 is the parameter's name.
_EXPLANATION_RENAMES = (
    # The target resolver names objectives without the `explanation.` prefix.
    re.compile(r"(?:\bexplanation\.|\b)objectives\[0\]\.(layer|filter_indices)(?:\.name|\.index)?"),
    re.compile(r"\bexplanation\.(wrt|penultimate_layer)(?:\.name|\.index)?"),
    re.compile(r"\bexplanation\.(grad_modifiers)(?:\[\d+\])?"),
    re.compile(
        r"\bexplanation\.(method|backprop_modifier|seed|samples|noise|steps|keepdims|"
        r"chunk_size|top_channels|window|stride|occlusion_value|"
        r"normalize|keep_activation|output_dtype|input|output)\b"
    ),
    re.compile(
        r"\bexplanation\.(blur_max_sigma|blur_grad_step|guided_fraction|guided_max_dist|"
        r"xrai_scales|xrai_sigma|xrai_min_size|xrai_dilation_radius|xrai_area_threshold)\b"
    ),
)


def _as_parameter(match: re.Match[str]) -> str:
    return f"parameters[{match.group(1)!r}]"


def _rename(message: str, name_field: str, version_field: str) -> str:
    message = re.sub(r"\bmodel\.name\b", name_field, message)
    message = re.sub(r"\bmodel\.version\b", version_field, message)
    # explanation.randomization.layers / .seed are the parameters randomize_layers / _seed.
    message = re.sub(
        r"\bexplanation\.randomization\.(layers|seed)\b",
        lambda m: f"parameters['randomize_{m.group(1)}']",
        message,
    )
    message = message.replace("(or 0 for the highest)", "(or '' for the highest)")
    for pattern in _EXPLANATION_RENAMES:
        message = pattern.sub(_as_parameter, message)
    return message


@contextmanager
def _protocol_words(name_field: str, version_field: str) -> Iterator[None]:
    """Re-raises the core's ServiceErrors with this protocol's field names."""
    try:
        yield
    except ServiceError as err:
        message = _rename(err.message, name_field, version_field)
        if message == err.message:
            raise
        raise type(err)(message, err.code) from None


# Inputs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """A request's tensors by name, and whether they came as raw bytes."""

    arrays: dict[str, np.ndarray]
    raw: bool


def _native(array: np.ndarray) -> np.ndarray:
    dt = array.dtype
    return array.astype(dt.newbyteorder("=")) if dt.byteorder == "<" and not dt.isnative else array


InputTensor = oip.ModelInferRequest.InferInputTensor


def _typed_values(k: int, tensor: InputTensor, name: str, count: int) -> np.ndarray:
    """The values of an input sent in `contents` (the field of its datatype)."""
    field = CONTENTS.get(name)
    if field is None:
        raise InvalidArgument(
            f"inputs[{k}].datatype={name!r} has no typed contents field: send its values "
            "as bytes in raw_input_contents"
        )
    contents = tensor.contents
    for descriptor, _ in contents.ListFields():
        if descriptor.name != field:
            raise InvalidArgument(
                f"inputs[{k}].contents.{descriptor.name} is set, but datatype {name} takes "
                f"its values in contents.{field}"
            )
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"inputs[{k}].contents.{field} has {len(values)} values, but shape "
            f"{list(tensor.shape)} needs {count}"
        )
    dtype = INPUT_DATATYPES[name]
    if name == "UINT8" and count and max(values) > 255:
        raise InvalidArgument(
            f"inputs[{k}].contents.{field} holds {max(values)}, outside UINT8's range 0..255"
        )
    return np.array(values, dtype=dtype.newbyteorder("="))


def request_inputs(request: oip.ModelInferRequest) -> Inputs:
    """Decodes the input tensors, raw or typed, with Predict's checks of names, shapes
    and byte lengths; datatypes other than salience's are refused.
    """
    inputs = request.inputs
    if not inputs:
        raise InvalidArgument("inputs is empty: send one tensor per model input")
    if len(inputs) > convert.MAX_INPUTS:
        raise InvalidArgument(
            f"inputs has {len(inputs)} tensors: send one per model input, at most "
            f"{convert.MAX_INPUTS}"
        )
    raw_contents = request.raw_input_contents
    raw = len(raw_contents) > 0
    if raw and len(raw_contents) != len(inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw_contents)} entries, but inputs has {len(inputs)}: "
            "send one per input, in the order of inputs (or none, with every input's values "
            "in its contents)"
        )
    arrays: dict[str, np.ndarray] = {}
    for k, tensor in enumerate(inputs):
        convert.check_name(f"inputs[{k}].name", tensor.name)
        if tensor.name in arrays:
            raise InvalidArgument(f"inputs[{k}].name={tensor.name!r} is given twice")
        convert.check_name(f"inputs[{k}].datatype", tensor.datatype)
        dtype = INPUT_DATATYPES.get(tensor.datatype)
        if dtype is None:
            raise InvalidArgument(
                f"inputs[{k}].datatype={tensor.datatype!r} is not supported: use one of "
                f"{allowed(INPUT_DATATYPES)}"
            )
        if tensor.parameters:
            key = sorted(tensor.parameters)[0]
            convert.check_name(f"inputs[{k}].parameters key", key)
            raise InvalidArgument(
                f"inputs[{k}].parameters[{key!r}] is not supported: salience takes no input "
                "parameters (nor shared memory); send the values in raw_input_contents or "
                "contents"
            )
        try:
            shape = tensors.checked_shape(tensor.shape, dtype.itemsize, f"inputs[{k}]")
        except TensorError as err:
            raise InvalidArgument(str(err)) from None
        count = math.prod(shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(
                    f"inputs[{k}].contents is set, but raw_input_contents is used: send every "
                    "input's values one way"
                )
            data = raw_contents[k]
            expected = count * dtype.itemsize
            if len(data) != expected:
                raise InvalidArgument(
                    f"raw_input_contents[{k}] has {len(data)} bytes, but datatype "
                    f"{tensor.datatype} × shape {list(shape)} needs {expected}"
                )
            array = _native(np.frombuffer(data, dtype=dtype, count=count)).reshape(shape)
        else:
            array = _typed_values(k, tensor, tensor.datatype, count).reshape(shape)
        arrays[tensor.name] = array
    return Inputs(arrays, raw)


def check_datatypes(request: oip.ModelInferRequest, runtime: ModelDevice) -> None:
    """Each named input's datatype against the model's, in this protocol's words
    (unknown and missing inputs are left to the runtime's checks).
    """
    by_name = {info.name: info for info in runtime.inputs}
    if len(runtime.inputs) == 1:
        by_name[""] = runtime.inputs[0]
    for k, tensor in enumerate(request.inputs):
        info = by_name.get(tensor.name)
        if info is not None and INPUT_DATATYPES[tensor.datatype].name != info.dtype:
            raise InvalidArgument(
                f"inputs[{k}].datatype={tensor.datatype!r} is not accepted: input "
                f"{info.name!r} of model {runtime.name!r} takes {datatype(info.dtype)}"
            )


# Requested outputs -------------------------------------------------------------


@dataclass(frozen=True)
class Wanted:
    """The outputs a request asks for, in its order: model outputs by name, maps by
    grad modifier ("" is the `saliency` output: the explanation's first map).
    """

    names: tuple[str, ...]
    model_outputs: tuple[str, ...]  # all of the model's when none are requested
    modifiers: tuple[str, ...]  # of the `saliency/<m>` outputs, in request order
    default_map: bool  # `saliency` is requested

    @property
    def explains(self) -> bool:
        return self.default_map or bool(self.modifiers)


def saliency_outputs() -> list[str]:
    """Every saliency output name: the default map, then one per grad modifier."""
    return [SALIENCY, *(SALIENCY_PREFIX + m for m in catalog.grad_modifiers())]


def requested_outputs(request: oip.ModelInferRequest, runtime: ModelDevice) -> Wanted:
    """Which outputs to return; a model output of the same name wins over a map's."""
    model = [info.name for info in runtime.outputs]
    outputs = request.outputs
    if not outputs:
        return Wanted(tuple(model), tuple(model), (), False)
    limit = len(model) + 1 + len(catalog.grad_modifiers())
    if len(outputs) > limit:
        raise InvalidArgument(
            f"outputs has {len(outputs)} entries, but model {runtime.name!r} has {limit} "
            "outputs to request: list each once"
        )
    names: list[str] = []
    modifiers: list[str] = []
    default_map = False
    for k, output in enumerate(outputs):
        name = output.name
        convert.check_name(f"outputs[{k}].name", name)
        if name in names:
            raise InvalidArgument(f"outputs[{k}].name={name!r} is requested twice: list it once")
        if output.parameters:
            key = sorted(output.parameters)[0]
            convert.check_name(f"outputs[{k}].parameters key", key)
            raise InvalidArgument(
                f"outputs[{k}].parameters[{key!r}] is not supported: salience takes no output "
                "parameters (nor classification or shared memory)"
            )
        if name in model:
            pass
        elif name == SALIENCY:
            default_map = True
        elif (
            name.startswith(SALIENCY_PREFIX)
            and name[len(SALIENCY_PREFIX) :] in catalog.grad_modifiers()
        ):
            modifiers.append(name[len(SALIENCY_PREFIX) :])
        else:
            raise InvalidArgument(
                f"outputs[{k}].name={name!r} is not an output of model {runtime.name!r}: use "
                f"one of {allowed(model)}, or a saliency map: {allowed(saliency_outputs())}"
            )
        names.append(name)
    return Wanted(
        tuple(names), tuple(n for n in names if n in model), tuple(modifiers), default_map
    )


# Explanation parameters --------------------------------------------------------


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


def grad_modifiers(runtime: ModelDevice, params: ExplanationParameters, wanted: Wanted) -> str:
    """Sets the explanation's grad modifiers for the maps requested; returns the grad
    modifier of the `saliency` output ("" when it is Explain's default, unset).
    """
    explanation = params.explanation
    default = params.default_modifier
    if wanted.default_map and default is None and wanted.modifiers:
        # The default map beside others: named as Explain would resolve it (the
        # model's configured default, else the method's).
        configured = runtime.config.explain
        if configured.grad_modifiers:
            default = configured.grad_modifiers[0]
        else:
            method = explanation.method or configured.method or VANILLA
            # An unknown method is refused by the options' checks, naming it.
            default = catalog.METHODS.get(method, "")
    chosen = [default] if wanted.default_map and default else []
    chosen += [m for m in wanted.modifiers if m not in chosen]
    explanation.grad_modifiers.extend(chosen)
    return default or ""


# Outputs -----------------------------------------------------------------------


def _output_tensor(
    response: oip.ModelInferResponse, name: str, array: np.ndarray, raw: bool
) -> None:
    kind = datatype(array.dtype)
    tensor = response.outputs.add(name=name, datatype=kind, shape=list(array.shape))
    if raw:
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        response.raw_output_contents.append(little.tobytes())
    else:
        getattr(tensor.contents, CONTENTS[kind]).extend(array.ravel().tolist())


def _parameter(value: str | int | bool) -> oip.InferParameter:
    if isinstance(value, bool):
        return oip.InferParameter(bool_param=value)
    if isinstance(value, int):
        if value < 2**63:
            return oip.InferParameter(int64_param=value)
        return oip.InferParameter(uint64_param=value)
    return oip.InferParameter(string_param=value)


# The servicer ------------------------------------------------------------------


class OipServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers the protocol's six RPCs from the same core as the Salience servicer.

    `server_ready` says whether the server serves (every model loaded or failed, at
    least one ready, not shutting down); `stopping` whether shutdown has begun.
    """

    def __init__(
        self,
        core: InferenceCore,
        server_ready: Callable[[], bool],
        stopping: Callable[[], bool],
    ) -> None:
        self.core = core
        self._server_ready = server_ready
        self._stopping = stopping
        try:
            self.version = importlib_metadata.version("salience")
        except importlib_metadata.PackageNotFoundError:
            self.version = "unknown"

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        # Answering at all is being live: the port opens before the models load.
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._server_ready())

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        # Not ready is an answer, not an error: loading, failed and unknown models
        # (Triton's convention) and versions not served are all `ready: false`.
        label_call(request.name, "")
        convert.check_name("name", request.name)
        version = parse_version("version", request.version)
        name = request.name
        ready = not self._stopping() and self.core.version_ready(name, version)
        return oip.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(
            name=SERVER_NAME, version=self.version, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        label_call(request.name, "")
        convert.check_name("name", request.name)
        version = parse_version("version", request.version)
        with _protocol_words("name", "version"):
            runtime = self.core.runtime(request.name, version)
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=runtime.name,
            versions=[str(v) for v in self.core.repository.versions(runtime.name)],
            platform=runtime.platform,
            inputs=[
                tensor(
                    name=i.name,
                    datatype=datatype(i.dtype),
                    shape=[-1 if d is None else d for d in i.shape],
                )
                for i in runtime.inputs
            ],
            outputs=[
                tensor(
                    name=o.name,
                    datatype=datatype(o.dtype),
                    shape=[-1 if d is None else d for d in o.shape],
                )
                for o in runtime.outputs
            ],
        )

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: aio.ServicerContext
    ) -> oip.ModelInferResponse:
        # Labelled first, so requests that fail to decode are counted by model too.
        label_call(request.model_name, "predict")
        with _protocol_words("model_name", "model_version"):
            return await self._infer(request, context)

    async def _infer(
        self, request: oip.ModelInferRequest, context: aio.ServicerContext
    ) -> oip.ModelInferResponse:
        name = request.model_name
        convert.check_name("model_name", name)
        version = parse_version("model_version", request.model_version)
        # Resolved first, to check the requested outputs before any work is done; the
        # core resolves the request again, and the answer follows the runtime it used
        # (a reload in between that dropped an output is caught below).
        runtime = self.core.runtime(name, version)
        wanted = requested_outputs(request, runtime)
        params = explanation_parameters(request, wanted)
        if wanted.explains:
            # As Explain labels its calls: the method asked for, "" for an unknown one.
            method = params.explanation.method or VANILLA
            label_call(name, method if method in catalog.METHODS else "")
        inputs = request_inputs(request)
        check_datatypes(request, runtime)
        maps: dict[str, np.ndarray] = {}
        response = oip.ModelInferResponse(id=request.id)
        if not wanted.explains:
            runtime, outputs = await self.core.predict(
                name, version, inputs.arrays, deadline(context)
            )
        else:
            default = grad_modifiers(runtime, params, wanted)
            options = convert.explain_options(params.explanation, self.core.settings.limits)
            runtime, result = await self.core.explain(
                name, version, inputs.arrays, options, deadline(context)
            )
            outputs = result.outputs
            if wanted.default_map:
                # Unset, the explanation's only map is the default one, whatever its name.
                maps[SALIENCY] = result.maps[default or next(iter(result.maps))]
            for modifier in wanted.modifiers:
                maps[SALIENCY_PREFIX + modifier] = result.maps[modifier]
            resolved = result.resolved
            response.parameters["method"].CopyFrom(_parameter(resolved.method))
            response.parameters["grad_modifiers"].CopyFrom(
                _parameter(",".join(resolved.grad_modifiers))
            )
            if resolved.seed is not None:
                response.parameters["seed"].CopyFrom(_parameter(resolved.seed))
        by_name = {info.name: array for info, array in zip(runtime.outputs, outputs, strict=True)}
        chosen: list[tuple[str, np.ndarray]] = []
        for output in wanted.names:
            array = maps.get(output) if output not in by_name else by_name[output]
            if array is None:  # a reload changed the model's outputs meanwhile
                raise InvalidArgument(
                    f"{output!r} is not an output of model {name!r} version {runtime.version}: "
                    f"use one of {allowed(by_name)}"
                )
            chosen.append((output, np.asarray(array)))
        # Raw when the request was raw, and whenever a value has no typed field
        # (FP16): the protocol answers either way for the whole response.
        raw = inputs.raw or any(datatype(a.dtype) not in CONTENTS for _, a in chosen)
        response.model_name = runtime.name
        response.model_version = str(runtime.version)
        for output, array in chosen:
            _output_tensor(response, output, array, raw)
        return response
