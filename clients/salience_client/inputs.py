"""INPUT files as the model reads them: `.npy` arrays and images, in the model's dtype.

An INPUT is a `.npy` file (one sample, or a batch with the batch axis first) or an
image Pillow can read. The model's metadata says how to read it: a `.npy` sample
gets a batch axis, floating-point values are cast to the model's float dtype, and
images become float values in [0, 1] with the model's channel count — or, for an
input that accepts uint8 on the wire, go as their uint8 pixels (a quarter of the
bytes, the same answers; `--float32` sends floats). Images are never resized: a
size mismatch is an error naming both sizes.

`UsageError` is what a user gave that cannot be used — an option value, an input
file, an output path. The command line reports it in one line with exit status 2;
it lives here, beside the input loading that raises it most, so that the modules
behind the commands (`review`, `audit`) raise it without importing the command line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from salience.v1 import salience_pb2 as pb
from salience_client import images, tensors


class UsageError(Exception):
    """A bad option, input file or output path: reported in one line, exit status 2."""


# Pillow modes by the channel count of a model's image input.
IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass(frozen=True)
class InputSpec:
    """The one model input the command line feeds: sample shape (None = free)."""

    model: str
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]
    # Images go as uint8 pixels (the input accepts them on the wire), and what a
    # pixel stands for as a float ("raw": p, else p / 255).
    uint8: bool = False
    wire_range: str = ""

    @classmethod
    def from_metadata(cls, metadata: pb.ModelMetadata, uint8: bool = False) -> InputSpec:
        """The input's spec; with `uint8`, images go as uint8 where it accepts them."""
        if len(metadata.inputs) != 1:
            names = ", ".join(repr(i.name) for i in metadata.inputs)
            raise UsageError(
                f"model {metadata.name!r} has {len(metadata.inputs)} inputs ({names}): the "
                "command line feeds models with one input; use the Python client"
            )
        spec = metadata.inputs[0]
        dtype = tensors.NUMPY_DTYPES.get(spec.dtype)
        if dtype is None or len(spec.shape) < 2:
            raise UsageError(
                f"model {metadata.name!r} input {spec.name!r} has dtype "
                f"{tensors.dtype_name(spec.dtype)} and shape {list(spec.shape)}, which the "
                "command line cannot feed"
            )
        shape = tuple(None if d < 0 else int(d) for d in spec.shape[1:])
        return cls(
            model=metadata.name,
            name=spec.name,
            dtype=np.dtype(dtype.name),
            shape=shape,
            uint8=uint8 and images.sends_uint8(spec),
            wire_range=spec.wire_range,
        )

    def describe(self, batch: bool = True) -> str:
        """The shape as `[N, 8, 8, 3]` (batch first) or `[8, 8, 3]` (one sample)."""
        dims = (None, *self.shape) if batch else self.shape
        return "[" + ", ".join("N" if d is None else str(d) for d in dims) + "]"

    @property
    def image_mode(self) -> str | None:
        """The Pillow mode an image must have for this input, or None (not an image)."""
        if len(self.shape) == 2:
            return "L"
        channels = self.shape[-1] if len(self.shape) == 3 else None
        return IMAGE_MODES.get(channels) if channels is not None else None


@dataclass(frozen=True)
class LoadedInput:
    """One INPUT file, batch first, in the model's dtype."""

    path: Path
    array: np.ndarray
    batched: bool
    """Whether the file held a batch (its samples are named `path[i]`)."""

    def labels(self) -> list[str]:
        if self.batched:
            return [f"{self.path.name}[{i}]" for i in range(len(self.array))]
        return [self.path.name]


@dataclass(frozen=True)
class InputBatch:
    """Every INPUT concatenated into the one batch a request carries."""

    array: np.ndarray
    sources: list[LoadedInput]

    def labels(self) -> list[str]:
        return [label for source in self.sources for label in source.labels()]


def _cast(array: np.ndarray, spec: InputSpec, path: Path) -> np.ndarray:
    """Casts to the model's dtype where no value changes meaning."""
    have, want = array.dtype, spec.dtype
    if have == want:
        return array
    if want.kind == "f" and have.kind in "biuf":
        return array.astype(want)
    if want.kind in "iu" and have.kind in "biu":
        info = np.iinfo(want)
        if array.size == 0 or (array.min() >= info.min and array.max() <= info.max):
            return array.astype(want)
    raise UsageError(
        f"{path} holds {have} values, but model {spec.model!r} input {spec.name!r} takes {want}"
    )


def _load_npy(path: Path, spec: InputSpec) -> LoadedInput:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise UsageError(f"cannot read {path} as a .npy array: {err}") from None
    if not isinstance(loaded, np.ndarray):
        loaded.close()  # an .npz archive under a .npy name
        raise UsageError(
            f"{path} is an .npz archive, not a .npy array: save one array with np.save"
        )
    array = loaded
    rank = len(spec.shape)
    if array.ndim not in (rank, rank + 1):
        raise UsageError(
            f"{path} has shape {list(array.shape)}: model {spec.model!r} input {spec.name!r} "
            f"takes one sample of shape {spec.describe(batch=False)} or a batch of shape "
            f"{spec.describe()}"
        )
    batched = array.ndim == rank + 1
    if not batched:
        array = array[np.newaxis]
    for got, want in zip(array.shape[1:], spec.shape, strict=True):
        if want is not None and got != want:
            raise UsageError(
                f"{path} has shape {list(array.shape if batched else array.shape[1:])}: "
                f"model {spec.model!r} input {spec.name!r} takes a sample of shape "
                f"{spec.describe(batch=False)} or a batch of shape {spec.describe()}"
            )
    return LoadedInput(path, _cast(array, spec, path), batched)


def image_pixels(image: Any, mode: str, spec: InputSpec) -> np.ndarray:
    """Pixels in the input's mode: uint8 where the input takes them on the wire
    (`spec.uint8`), else floats in [0, 1] (or 0..255 for a "raw" wire range) for a
    floating-point input.
    """
    return images.image_pixels(
        image, mode, spec.dtype, uint8=spec.uint8, wire_range=spec.wire_range
    )


def _load_image(path: Path, spec: InputSpec) -> LoadedInput:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except UnidentifiedImageError:
        raise UsageError(f"{path} is neither a .npy file nor an image Pillow can read") from None
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err}") from None
    with image:
        mode = spec.image_mode
        if mode is None:
            raise UsageError(
                f"{path} is an image, but model {spec.model!r} input {spec.name!r} takes shape "
                f"{spec.describe()}, which is not an image (H×W or H×W×C with C in 1, 3, 4): "
                "pass a .npy file"
            )
        height, width = spec.shape[0], spec.shape[1]
        if (height is not None and image.height != height) or (
            width is not None and image.width != width
        ):
            want = f"{width or 'any'}×{height or 'any'}"
            raise UsageError(
                f"{path} is {image.width}×{image.height} pixels (width×height), but model "
                f"{spec.model!r} takes {want} images: resize it first (images are never "
                "resized for you)"
            )
        pixels = image_pixels(image, mode, spec)
    if len(spec.shape) == 3 and pixels.ndim == 2:
        pixels = pixels[..., np.newaxis]
    if spec.uint8 and pixels.dtype == np.uint8:
        return LoadedInput(path, pixels[np.newaxis], batched=False)  # cast by the server
    return LoadedInput(path, _cast(pixels, spec, path)[np.newaxis], batched=False)


def check_readable(paths: Sequence[Path]) -> None:
    """Fails on a missing input before any call, so the message is about the file."""
    for path in paths:
        if not path.exists():
            raise UsageError(f"input {path} does not exist")
        if not path.is_file():
            raise UsageError(f"input {path} is not a file")
        if not os.access(path, os.R_OK):
            raise UsageError(f"input {path} is not readable")


def load_input(path: Path, spec: InputSpec) -> LoadedInput:
    """One INPUT file: `.npy` by its suffix, anything else as an image."""
    check_readable([path])
    if path.suffix.lower() == ".npy":
        return _load_npy(path, spec)
    return _load_image(path, spec)


def load_inputs(
    paths: Sequence[Path], metadata: pb.ModelMetadata, float32: bool = False
) -> InputBatch:
    """Every INPUT read for the model `metadata` describes, as one batch: images as
    uint8 where the input accepts them (unless `float32`), a quarter of the bytes.
    """
    spec = InputSpec.from_metadata(metadata, uint8=not float32)
    sources = [load_input(path, spec) for path in paths]
    if len({s.array.dtype for s in sources}) > 1:
        # Images with .npy files: one batch of the model's dtype, the same values.
        sources = [
            LoadedInput(s.path, images.as_float(s.array, spec.dtype, spec.wire_range), s.batched)
            if s.array.dtype == np.uint8 and spec.dtype.kind == "f"
            else s
            for s in sources
        ]
    first = sources[0]
    for source in sources[1:]:
        if source.array.shape[1:] != first.array.shape[1:]:
            raise UsageError(
                f"{source.path} has samples of shape {list(source.array.shape[1:])} but "
                f"{first.path} of {list(first.array.shape[1:])}: one batch needs one shape"
            )
    array = np.concatenate([s.array for s in sources]) if len(sources) > 1 else first.array
    return InputBatch(np.ascontiguousarray(array), sources)
