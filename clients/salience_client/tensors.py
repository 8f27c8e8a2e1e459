"""numpy ⇄ `salience.v1.Tensor`: dtype + shape + raw little-endian bytes.

The one codec both ends use. Values never travel as repeated floats: encoding is
one `tobytes`, decoding one `np.frombuffer` (zero-copy where the bytes allow).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from salience.v1 import salience_pb2 as pb

# The little-endian numpy dtype of every wire dtype.
NUMPY_DTYPES: dict[pb.DataType, np.dtype] = {
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    pb.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    pb.DATA_TYPE_UINT8: np.dtype("u1"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
    pb.DATA_TYPE_BOOL: np.dtype("?"),
}
# Keyed by kind and size, so any byte order of a supported dtype is accepted.
_WIRE_DTYPES = {(dt.kind, dt.itemsize): k for k, dt in NUMPY_DTYPES.items()}

# Short names used by the CLI, the client keyword arguments and error messages.
DTYPE_NAMES: dict[pb.DataType, str] = {
    pb.DATA_TYPE_FLOAT32: "float32",
    pb.DATA_TYPE_FLOAT16: "float16",
    pb.DATA_TYPE_FLOAT64: "float64",
    pb.DATA_TYPE_UINT8: "uint8",
    pb.DATA_TYPE_INT32: "int32",
    pb.DATA_TYPE_INT64: "int64",
    pb.DATA_TYPE_BOOL: "bool",
}
DTYPES_BY_NAME: dict[str, pb.DataType] = {name: k for k, name in DTYPE_NAMES.items()}

# Most axes a tensor may have: numpy allows 64, no model input has more than a few,
# and a shape is echoed in error messages, which must stay short.
MAX_RANK = 32
# Bytes an empty tensor's shape may describe, counting its zero-sized axes as 1:
# the most `data` can hold (protobuf's 2 GiB), so numpy can always represent it.
MAX_EMPTY_BYTES = 2**31


class TensorError(ValueError):
    """A tensor cannot be encoded or decoded; the message names the field."""


def dtype_name(wire: int) -> str:
    """The short name of a wire dtype ("float32"), or its number when unknown."""
    return DTYPE_NAMES.get(wire, f"<unknown dtype {wire}>")  # type: ignore[call-overload]


def wire_dtype(dtype: np.dtype | type | str) -> pb.DataType:
    """The wire dtype of a numpy dtype; raises TensorError for unsupported ones."""
    dt = np.dtype(dtype)
    try:
        return _WIRE_DTYPES[(dt.kind, dt.itemsize)]
    except KeyError:
        raise TensorError(
            f"dtype {dt} is not supported: use one of {', '.join(DTYPES_BY_NAME)}"
        ) from None


def encode(array: np.ndarray, name: str = "") -> pb.Tensor:
    """Encodes an array as C-order little-endian bytes."""
    arr = np.asarray(array)
    wire = wire_dtype(arr.dtype)
    little = np.ascontiguousarray(arr, dtype=NUMPY_DTYPES[wire])
    return pb.Tensor(name=name, dtype=wire, shape=list(arr.shape), data=little.tobytes())


def checked_shape(dims: Sequence[int], itemsize: int, field: str = "tensor") -> tuple[int, ...]:
    """A request tensor's shape, refused (TensorError naming `field`) when it has too
    many axes, a negative one, or is empty with other axes too large for any tensor.
    Shared with the Open Inference Protocol's tensors, whose values arrive elsewhere.
    """
    # Checked before the shape is read: a message may carry millions of axes.
    if len(dims) > MAX_RANK:
        raise TensorError(f"{field}.shape has {len(dims)} axes: use at most {MAX_RANK}")
    shape = tuple(int(d) for d in dims)
    if any(d < 0 for d in shape):
        raise TensorError(
            f"{field}.shape={list(shape)} has a negative dimension: use sizes of 0 or more"
        )
    # Python integers: exact, where an int64 product of large axes wraps around and
    # could match the byte length of a much smaller tensor.
    if math.prod(shape) == 0 and math.prod(max(d, 1) for d in shape) * itemsize > MAX_EMPTY_BYTES:
        raise TensorError(
            f"{field}.shape={list(shape)} is empty but its other axes are too large for "
            f"any tensor: their product × itemsize must be at most {MAX_EMPTY_BYTES} bytes"
        )
    return shape


def decode(tensor: pb.Tensor, field: str = "tensor") -> np.ndarray:
    """Decodes a tensor, checking dtype, shape and byte length.

    `field` names the tensor in error messages (`inputs[0]`). The result is a
    read-only view of the message's bytes in native byte order.
    """
    dt = NUMPY_DTYPES.get(tensor.dtype)
    if dt is None:
        raise TensorError(
            f"{field}.dtype={dtype_name(tensor.dtype)} is not supported: "
            f"use one of {', '.join(DTYPES_BY_NAME)}"
        )
    shape = checked_shape(tensor.shape, dt.itemsize, field)
    count = math.prod(shape)
    expected = count * dt.itemsize
    # Read once: each read of a bytes field copies it out of the message.
    data = tensor.data
    if len(data) != expected:
        raise TensorError(
            f"{field}.data has {len(data)} bytes, but dtype {dtype_name(tensor.dtype)} "
            f"× shape {list(shape)} needs {expected}"
        )
    array = np.frombuffer(data, dtype=dt, count=count).reshape(shape)
    if dt.byteorder == "<" and not dt.isnative:
        array = array.astype(dt.newbyteorder("="))
    return array
