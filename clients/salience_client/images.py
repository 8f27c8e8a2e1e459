"""Image files as model inputs, in the dtype that crosses the wire.

An input whose metadata lists uint8 among its `accepted_dtypes` (the model's
config.toml `[inputs.<name>] wire_dtypes`) is sent an image's uint8 pixels as they
are: a quarter of the float32 bytes (150 KB instead of 600 KB for a 224² RGB
image), cast on the server's device. Any other floating-point input, or any input
with `float32=True`, is sent floats: the value each uint8 pixel `p` stands for,
`p / 255` (the [0, 1] floats images are read as) or, for an input whose
`wire_range` is "raw", `p` itself. The uint8 and the float request of one image
therefore get the same predictions and maps.

    from salience_client import SalienceClient
    from salience_client.images import read_image

    with SalienceClient("localhost:50051") as client:
        spec = client.metadata("shapes").inputs[0]
        batch = read_image("circle.png", spec)            # (1, 64, 64, 3) uint8
        client.predict("shapes", batch)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from salience.v1 import salience_pb2 as pb
from salience_client import tensors

# The Pillow mode of an image input by its channel count.
IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
RANGE_RAW = "raw"


def sends_uint8(spec: pb.TensorSpec) -> bool:
    """Whether the input accepts uint8 pixels besides its own dtype."""
    return spec.dtype != pb.DATA_TYPE_UINT8 and pb.DATA_TYPE_UINT8 in spec.accepted_dtypes


def as_float(pixels: np.ndarray, dtype: np.dtype, wire_range: str = "") -> np.ndarray:
    """uint8 pixels as the floats of `dtype` they stand for: `p / 255`, or `p` for
    `wire_range = "raw"` (divided in float32, as the server's cast divides).
    """
    if wire_range == RANGE_RAW:
        return pixels.astype(dtype)
    return (pixels.astype(np.float32) / np.float32(255)).astype(dtype)


def image_pixels(
    image: Any, mode: str, dtype: np.dtype, *, uint8: bool = False, wire_range: str = ""
) -> np.ndarray:
    """A Pillow image's pixels in `mode`: uint8 as they are (with `uint8`, or for an
    integer `dtype`), else floats of `dtype` standing for the same pixels (`as_float`).
    A 16-bit grey image goes as floats to a floating-point input, even with `uint8`:
    its values do not fit in 8 bits.
    """
    if mode == "L" and image.mode.startswith("I;16"):
        # Pillow converts 16-bit grey to "L" by clipping, not scaling: scale here.
        values = np.asarray(image, dtype=np.float64) / 65535.0
        if dtype.kind == "f":
            return (values * 255.0 if wire_range == RANGE_RAW else values).astype(dtype)
        return np.round(values * 255.0).astype(np.uint8)
    pixels = np.asarray(image if image.mode == mode else image.convert(mode))
    if dtype.kind == "f" and not uint8:
        return as_float(pixels, dtype, wire_range)
    return pixels


def read_image(path: str | Path, spec: pb.TensorSpec, *, float32: bool = False) -> np.ndarray:
    """One image file as a batch of one sample for the input `spec` describes
    (from `metadata(model).inputs`): uint8 where the input accepts it, unless
    `float32`; floats of the input's dtype otherwise. Raises ValueError when the
    image's size or the input's shape does not fit (images are never resized).
    """
    from PIL import Image

    shape = [None if d < 0 else int(d) for d in spec.shape[1:]]
    channels = shape[-1] if len(shape) == 3 else 1 if len(shape) == 2 else None
    mode = IMAGE_MODES.get(channels) if channels is not None else None
    dtype = tensors.NUMPY_DTYPES.get(spec.dtype)
    if mode is None or dtype is None:
        raise ValueError(
            f"input {spec.name!r} takes shape {list(spec.shape)} of "
            f"{tensors.dtype_name(spec.dtype)}, which is not an image"
        )
    with Image.open(path) as image:
        image.load()
        height, width = shape[0], shape[1]
        if (height is not None and image.height != height) or (
            width is not None and image.width != width
        ):
            raise ValueError(
                f"{path} is {image.width}×{image.height} pixels (width×height), but input "
                f"{spec.name!r} takes {width or 'any'}×{height or 'any'}"
            )
        pixels = image_pixels(
            image,
            mode,
            np.dtype(dtype.name),
            uint8=sends_uint8(spec) and not float32,
            wire_range=spec.wire_range,
        )
    if len(shape) == 3 and pixels.ndim == 2:
        pixels = pixels[..., np.newaxis]
    return np.ascontiguousarray(pixels[np.newaxis])
