"""`salience_client.images`: an image file becomes uint8 pixels for an input that
accepts them on the wire, else the floats the pixels stand for, by the metadata's
`accepted_dtypes` and `wire_range`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from salience.v1 import salience_pb2 as pb
from salience_client.images import read_image


def spec(accepted: tuple[int, ...] = (), wire_range: str = "") -> pb.TensorSpec:
    return pb.TensorSpec(
        name="image",
        dtype=pb.DATA_TYPE_FLOAT32,
        shape=[-1, 4, 5, 3],
        accepted_dtypes=list(accepted),
        wire_range=wire_range,
    )


UINT8 = (pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_UINT8)


@pytest.fixture
def png(tmp_path: Path) -> tuple[Path, np.ndarray]:
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    return path, pixels


def test_uint8_where_accepted(png: tuple[Path, np.ndarray]) -> None:
    path, pixels = png
    got = read_image(path, spec(UINT8, "unit"))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, pixels[np.newaxis])


def test_float32_stands_for_the_same_pixels(png: tuple[Path, np.ndarray]) -> None:
    path, pixels = png
    forced = read_image(path, spec(UINT8, "unit"), float32=True)
    assert forced.dtype == np.float32
    np.testing.assert_array_equal(forced[0], pixels.astype(np.float32) / np.float32(255))
    # An input without uint8 gets the same [0, 1] floats; a raw range the pixel values.
    np.testing.assert_array_equal(read_image(path, spec()), forced)
    raw = read_image(path, spec(UINT8, "raw"), float32=True)
    np.testing.assert_array_equal(raw[0], pixels.astype(np.float32))
    assert read_image(path, spec(UINT8, "raw")).dtype == np.uint8


def test_sixteen_bit_grey_goes_as_floats(tmp_path: Path) -> None:
    values = np.array([[0, 65535, 257, 1000, 30000]] * 4, dtype=np.uint16)
    path = tmp_path / "grey.png"
    Image.fromarray(values).save(path)
    grey = pb.TensorSpec(
        name="image", dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, 4, 5], accepted_dtypes=UINT8
    )
    got = read_image(path, grey)
    # 8 bits would lose its levels: floats, scaled to [0, 1].
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[0], values / 65535.0, rtol=1e-6)


def test_a_size_mismatch_names_both_sizes(png: tuple[Path, np.ndarray]) -> None:
    path, _ = png
    wrong = pb.TensorSpec(name="image", dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, 8, 8, 3])
    with pytest.raises(ValueError, match=r"is 5×4 pixels \(width×height\), but input 'image' "):
        read_image(path, wrong)
