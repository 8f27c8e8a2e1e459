"""The Open Inference Protocol's tensors ⇄ numpy arrays: datatypes, request inputs
(raw bytes or typed contents, with Predict's checks of names, shapes and byte
lengths), response outputs, parameter values and tensor metadata.

Raw contents are read with `np.frombuffer` and written with `tobytes`, little-endian
as the protocol says; typed contents only where the protocol has a field for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from inference.v2 import grpc_service_pb2 as oip
from salience_client import tensors
from salience_client.tensors import TensorError
from salience_server import convert
from salience_server.errors import InvalidArgument, allowed
from salience_server.explain.options import OUTPUT_DTYPES
from salience_server.model_config import InputConfig
from salience_server.seam import ModelDevice, TensorInfo

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

# The tensor-metadata parameters (salience's extension of TensorMetadata) that list
# what an input accepts on the wire besides the model's datatype.
ACCEPTED_DATATYPES = "accepted_datatypes"
WIRE_RANGE = "wire_range"


def datatype(dtype: np.dtype | str) -> str:
    """The protocol's datatype of a numpy dtype ("FP32")."""
    name = np.dtype(dtype).name
    try:
        return DATATYPES[name]
    except KeyError:
        raise InvalidArgument(f"dtype {name} has no Open Inference Protocol datatype") from None


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


def accepted_dtypes(runtime: ModelDevice, info: TensorInfo) -> tuple[str, ...]:
    """The numpy dtypes an input accepts on the wire: the model's own, then those its
    config.toml adds (`[inputs.<name>] wire_dtypes`, cast on the device).
    """
    return (info.dtype, *runtime.config.input_config(info.name).wire_dtypes)


def check_datatypes(request: oip.ModelInferRequest, runtime: ModelDevice) -> None:
    """Each named input's datatype against those the model's input accepts, in this
    protocol's words (unknown and missing inputs are left to the runtime's checks).
    """
    by_name = {info.name: info for info in runtime.inputs}
    if len(runtime.inputs) == 1:
        by_name[""] = runtime.inputs[0]
    for k, tensor in enumerate(request.inputs):
        info = by_name.get(tensor.name)
        if info is None:
            continue
        accepted = accepted_dtypes(runtime, info)
        if INPUT_DATATYPES[tensor.datatype].name not in accepted:
            takes = " or ".join(datatype(d) for d in accepted)
            raise InvalidArgument(
                f"inputs[{k}].datatype={tensor.datatype!r} is not accepted: input "
                f"{info.name!r} of model {runtime.name!r} takes {takes}"
            )


# Outputs -----------------------------------------------------------------------


def output_tensor(
    response: oip.ModelInferResponse, name: str, array: np.ndarray, raw: bool
) -> None:
    """Appends one output, as raw little-endian bytes or in its typed contents."""
    kind = datatype(array.dtype)
    tensor = response.outputs.add(name=name, datatype=kind, shape=list(array.shape))
    if raw:
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        response.raw_output_contents.append(little.tobytes())
    else:
        getattr(tensor.contents, CONTENTS[kind]).extend(array.ravel().tolist())


def needs_raw(arrays: list[np.ndarray]) -> bool:
    """Whether some value has no typed contents field (FP16): then all go raw."""
    return any(datatype(a.dtype) not in CONTENTS for a in arrays)


def parameter(value: str | int | bool) -> oip.InferParameter:
    """A value as the protocol's parameter, of the kind its type calls for."""
    if isinstance(value, bool):
        return oip.InferParameter(bool_param=value)
    if isinstance(value, int):
        if value < 2**63:
            return oip.InferParameter(int64_param=value)
        return oip.InferParameter(uint64_param=value)
    return oip.InferParameter(string_param=value)


# Metadata ----------------------------------------------------------------------

TensorMetadata = oip.ModelMetadataResponse.TensorMetadata


def _shape(info: TensorInfo) -> list[int]:
    return [-1 if d is None else d for d in info.shape]


def input_metadata(info: TensorInfo, wire: InputConfig) -> TensorMetadata:
    """An input's metadata: its model datatype, and, when its config.toml accepts more
    on the wire, every accepted datatype and the value range of integer ones.
    """
    tensor = TensorMetadata(name=info.name, datatype=datatype(info.dtype), shape=_shape(info))
    if wire.wire_dtypes:
        kinds = ",".join(datatype(d) for d in (info.dtype, *wire.wire_dtypes))
        tensor.parameters[ACCEPTED_DATATYPES].CopyFrom(parameter(kinds))
        tensor.parameters[WIRE_RANGE].CopyFrom(parameter(wire.wire_range))
    return tensor


def output_metadata(info: TensorInfo) -> TensorMetadata:
    return TensorMetadata(name=info.name, datatype=datatype(info.dtype), shape=_shape(info))
