"""The wire codec: dtype + shape + little-endian bytes, checked on the way in."""

from __future__ import annotations

import numpy as np
import pytest

from salience.v1 import salience_pb2 as pb
from salience_client import tensors


@pytest.mark.parametrize(
    "dtype", ["float32", "float16", "float64", "uint8", "int32", "int64", "bool"]
)
def test_round_trip_keeps_values_dtype_and_shape(dtype: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    decoded = tensors.decode(tensors.encode(array, "x"))
    assert decoded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decoded, array)


def test_bytes_are_little_endian_whatever_the_input_order() -> None:
    big = np.array([1.5, -2.0], dtype=">f4")
    message = tensors.encode(big)
    assert message.data == np.array([1.5, -2.0], dtype="<f4").tobytes()
    assert message.dtype == pb.DATA_TYPE_FLOAT32
    np.testing.assert_array_equal(tensors.decode(message), [1.5, -2.0])


def test_non_contiguous_arrays_are_encoded_in_c_order() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T
    np.testing.assert_array_equal(tensors.decode(tensors.encode(array)), array)


def test_wrong_byte_length_names_the_field_and_sizes() -> None:
    message = tensors.encode(np.zeros((2, 3), np.float32))
    message.data = message.data[:-1]
    with pytest.raises(tensors.TensorError, match=r"inputs\[0\]\.data has 23 bytes.*needs 24"):
        tensors.decode(message, "inputs[0]")


def test_unknown_and_unsupported_dtypes_are_refused() -> None:
    with pytest.raises(tensors.TensorError, match="dtype=<unknown dtype 99>"):
        tensors.decode(pb.Tensor(dtype=99, shape=[1], data=b"\0"))
    with pytest.raises(tensors.TensorError, match="complex64 is not supported"):
        tensors.encode(np.zeros(2, np.complex64))


def test_negative_dimension_is_refused() -> None:
    with pytest.raises(tensors.TensorError, match="negative dimension"):
        tensors.decode(pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[-1], data=b""))
