"""Saliency maps rendered over their images, as RGB arrays or PNG files.

    rgb = overlay(image, result.maps["absolute"][0], colormap="jet", alpha=0.5)
    save_overlay("cat_absolute.png", image, result.maps["absolute"][0])

The map is coloured with a matplotlib colormap and blended with the image:
`out = (1 - alpha) * image + alpha * colormap(map)`, both as 0..255 colours, so
`alpha=0` gives back the image and `alpha=1` exactly the colormap's colours.

Only the colormap registry of matplotlib is used, never pyplot, so rendering
works without a display and never changes the caller's plotting backend.
"""

from __future__ import annotations

import math
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

DEFAULT_COLORMAP = "jet"
DEFAULT_ALPHA = 0.5


def _colormaps() -> Any:
    # Imported on first use: matplotlib costs a noticeable fraction of a second to
    # import, which every `salience` command would otherwise pay.
    import matplotlib

    return matplotlib.colormaps


def get_colormap(name: str) -> Any:
    """The matplotlib colormap called `name`; ValueError naming it when unknown."""
    registry = _colormaps()
    if not isinstance(name, str) or name not in registry:
        examples = "jet, viridis, inferno, magma, turbo, gray"
        raise ValueError(
            f"colormap={name!r} is not a matplotlib colormap: use one of {examples} "
            "(or any name in matplotlib.colormaps)"
        )
    return registry[name]


def check_alpha(alpha: float) -> float:
    """`alpha` as a float; ValueError naming it unless it is a number in [0, 1]."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha={alpha!r} is not a number: use a value in [0, 1]") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"alpha={alpha!r} is out of range: use a value in [0, 1]")
    return value


def _min_max(values: np.ndarray) -> np.ndarray:
    """Scales to [0, 1]; a constant array becomes zeros (there is nothing to show)."""
    low = float(values.min())
    high = float(values.max())
    if high <= low:
        return np.zeros_like(values, dtype=np.float64)
    return (values - low) / (high - low)


def image_to_rgb8(image: np.ndarray) -> np.ndarray:
    """An image as H×W×3 uint8 for display.

    Accepts H×W, H×W×1, H×W×3 or H×W×4 (alpha dropped). uint8 is taken as is; any
    other dtype is read as intensities in [0, 1], and min-max scaled when its values
    fall outside that range (a raw .npy input, a z-scored image).
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        array = array[..., :3] if array.shape[-1] == 4 else array
    elif array.ndim != 2:
        raise ValueError(
            f"image shape {array.shape} is not an image: use H×W, H×W×1, H×W×3 or H×W×4"
        )
    if array.dtype != np.uint8:
        values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if values.size and (values.min() < 0.0 or values.max() > 1.0):
            values = _min_max(values)
        array = np.round(values * 255.0).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., np.newaxis]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


def normalized_map(saliency: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """A saliency map as H×W float64 in [0, 1], resized bilinearly to `size` (H, W).

    Channels (H×W×C) are reduced by max. A uint8 map is read as 0..255, as the
    server quantises normalised maps; any other map is min-max normalised, and a
    constant one becomes zeros.
    """
    array = np.asarray(saliency)
    if array.ndim == 3:
        array = array.max(axis=-1)
    if array.ndim != 2:
        raise ValueError(
            f"saliency shape {np.asarray(saliency).shape} is not a map: use H×W or H×W×C"
        )
    if array.dtype == np.uint8:
        values = array.astype(np.float64) / 255.0
    else:
        values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        values = _min_max(values)
    if size is not None and values.shape != tuple(size):
        height, width = size
        # A float32 array becomes a mode "F" image, so the resize stays in floats;
        # normalising first keeps a uint8 map's absolute levels (bilinear weights
        # never leave [0, 1]).
        resized = Image.fromarray(values.astype(np.float32)).resize(
            (width, height), Image.Resampling.BILINEAR
        )
        values = np.clip(np.asarray(resized, dtype=np.float64), 0.0, 1.0)
    return values


def colorize(values: np.ndarray, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """H×W values in [0, 1] as H×W×3 uint8 colours of a matplotlib colormap."""
    cmap = get_colormap(colormap)
    rgba = np.asarray(cmap(np.asarray(values, dtype=np.float64), bytes=True), dtype=np.uint8)
    return rgba[..., :3]


def overlay(
    image: np.ndarray,
    saliency: np.ndarray,
    *,
    colormap: str = DEFAULT_COLORMAP,
    alpha: float = DEFAULT_ALPHA,
) -> np.ndarray:
    """The saliency map over its image, as H×W×3 uint8 RGB (see the module doc)."""
    get_colormap(colormap)  # fail on a bad name before any work
    weight = check_alpha(alpha)
    rgb = image_to_rgb8(image)
    colours = colorize(normalized_map(saliency, rgb.shape[:2]), colormap)
    blended = (1.0 - weight) * rgb.astype(np.float64) + weight * colours.astype(np.float64)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def save_overlay(
    path: str | PathLike[str],
    image: np.ndarray,
    saliency: np.ndarray,
    **kwargs: Any,
) -> Path:
    """Writes `overlay(image, saliency, **kwargs)` as a PNG; returns the path."""
    target = Path(path)
    Image.fromarray(overlay(image, saliency, **kwargs)).save(target, format="PNG")
    return target
