"""Shapes a decoder must refuse rather than hand to numpy: too many axes, products
that wrap around in int64, and empty tensors whose other axes no array could have.
"""

from __future__ import annotations

import numpy as np
import pytest

from salience.v1 import salience_pb2 as pb
from salience_client import tensors


def tensor(
    shape: list[int], data: bytes = b"", dtype: pb.DataType = pb.DATA_TYPE_FLOAT32
) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def refusal(message: pb.Tensor) -> str:
    with pytest.raises(tensors.TensorError) as err:
        tensors.decode(message, "t")
    return str(err.value)


def test_more_axes_than_allowed_are_refused_without_echoing_them() -> None:
    assert refusal(tensor([1] * 65, b"\0" * 4)) == "t.shape has 65 axes: use at most 32"
    assert refusal(tensor([1] * 33, b"\0" * 4)) == "t.shape has 33 axes: use at most 32"


def test_the_most_axes_allowed_decode() -> None:
    decoded = tensors.decode(tensor([1] * 31 + [2], np.array([1, 2], "<f4").tobytes()))
    assert decoded.shape == (1,) * 31 + (2,)
    np.testing.assert_array_equal(decoded.ravel(), [1.0, 2.0])


@pytest.mark.parametrize(
    ("shape", "needed"),
    [
        # int64 products: 2**64 wraps to 0, and 2**62 · 4 bytes to 0 as well.
        ([2**32, 2**32], 2**66),
        ([2**62, 1], 2**64),
        ([3, 2**62, 2], 3 * 2**65),
    ],
)
def test_shape_products_are_exact(shape: list[int], needed: int) -> None:
    assert refusal(tensor(shape)) == (
        f"t.data has 0 bytes, but dtype float32 × shape {shape} needs {needed}"
    )


def test_empty_tensors_with_axes_no_array_can_have_are_refused() -> None:
    assert refusal(tensor([0, 2**62])) == (
        f"t.shape=[0, {2**62}] is empty but its other axes are too large for any tensor: "
        "their product × itemsize must be at most 2147483648 bytes"
    )
    # Within the limit an empty tensor decodes, with its shape.
    assert tensors.decode(tensor([0, 2**29])).shape == (0, 2**29)
    assert "too large" in refusal(tensor([0, 2**29 + 1]))
    assert tensors.decode(tensor([0, 2**31], dtype=pb.DATA_TYPE_UINT8)).shape == (0, 2**31)


def test_negative_dimensions_say_what_is_allowed() -> None:
    assert refusal(tensor([2, -1])) == (
        "t.shape=[2, -1] has a negative dimension: use sizes of 0 or more"
    )
