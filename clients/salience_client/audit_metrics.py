"""Scores of saliency maps for `salience audit`, in plain numpy (no TensorFlow).

Where a map lands:

- `energy_share(maps, masks)`: per map, the share of its (non-negative) mass inside
  the mask, `Σ_mask S / Σ S`. A map equal to the mask scores 1; a constant map
  (and an all-zero map, which is a constant one) scores the mask's area share, the
  score of a map that knows nothing.
- `pointing_game(maps, masks)`: whether the map's maximum lies in the mask (Zhang
  et al. 2016, without their tolerance); with ties, whether any maximal pixel does.

Whether a map is faithful (Petsiuk et al. 2018, RISE):

- `perturbation_series(image, baseline, order, steps, mode)`: the `steps + 1`
  images of a deletion curve (step t replaces the first `round(t·P/steps)` of the
  `P` pixels in `order` with the baseline's) or of an insertion curve (starts from
  the baseline and puts the image's pixels back in that order).
- `curve_area(scores)`: the trapezoidal area under a curve sampled at `t/steps`,
  `t = 0..steps`, over [0, 1]. A faithful map gives a low deletion area (the score
  collapses once its top pixels go) and a high insertion area.
- `saliency_order(map)` ranks pixels by decreasing saliency; `random_order` is the
  baseline ordering a map has to beat.

Sanity check (Adebayo et al. 2018): `spearman(a, b)`, the rank correlation of two
maps, with tied values given their average rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

DELETION = "deletion"
INSERTION = "insertion"


def _pixels(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, P) float64 maps and bool masks; a single map is a batch of one."""
    m = np.asarray(maps, dtype=np.float64)
    k = np.asarray(masks, dtype=bool)
    if m.shape != k.shape:
        raise ValueError(f"maps have shape {m.shape} but masks {k.shape}: they must agree")
    if m.ndim < 2:
        raise ValueError(f"maps need at least 2 axes (H, W), got shape {m.shape}")
    if m.ndim == 2:
        m, k = m[None], k[None]
    return m.reshape(len(m), -1), k.reshape(len(k), -1)


def energy_share(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per map, `Σ_mask S / Σ S` (N,); negative values count as zero (a map's sign
    is not energy), and a map with no mass at all scores the mask's area share.
    """
    m, k = _pixels(maps, masks)
    m = np.clip(m, 0.0, None)
    total = m.sum(axis=1)
    inside = (m * k).sum(axis=1)
    area = k.mean(axis=1)
    safe = np.where(total > 0, total, 1.0)
    out: np.ndarray = np.where(total > 0, inside / safe, area)
    return out


def pointing_game(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per map, whether a pixel holding its maximum lies in the mask (N,) bool."""
    m, k = _pixels(maps, masks)
    top = m == m.max(axis=1, keepdims=True)
    hit: np.ndarray = (top & k).any(axis=1)
    return hit


def saliency_order(saliency: np.ndarray) -> np.ndarray:
    """Flat pixel indices from the most to the least salient; ties keep pixel order,
    so the ordering is deterministic.
    """
    flat = np.asarray(saliency, dtype=np.float64).ravel()
    order: np.ndarray = np.argsort(-flat, kind="stable")
    return order


def random_order(pixels: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random ordering of `pixels` flat indices (the map to beat)."""
    order: np.ndarray = rng.permutation(pixels)
    return order


def step_counts(pixels: int, steps: int) -> np.ndarray:
    """Pixels changed at each step `t = 0..steps`: `round(t·pixels/steps)`."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    counts: np.ndarray = np.rint(np.arange(steps + 1) * pixels / steps).astype(np.int64)
    return counts


def perturbation_series(
    image: np.ndarray, baseline: np.ndarray, order: np.ndarray, steps: int, mode: str
) -> np.ndarray:
    """The `steps + 1` images of a deletion or insertion curve, (steps + 1, H, W, C).

    A pixel is a spatial position: all its channels move together. Deletion starts
    from `image` and replaces pixels with `baseline`'s in `order`; insertion starts
    from `baseline` and puts `image`'s pixels back in the same order.
    """
    if mode not in (DELETION, INSERTION):
        raise ValueError(f"mode must be {DELETION!r} or {INSERTION!r}, got {mode!r}")
    image = np.asarray(image)
    baseline = np.broadcast_to(np.asarray(baseline, dtype=image.dtype), image.shape)
    height, width = image.shape[:2]
    pixels = height * width
    if sorted(order.shape) != [pixels]:
        raise ValueError(f"order has shape {order.shape}: it must order all {pixels} pixels")
    start, other = (image, baseline) if mode == DELETION else (baseline, image)
    # rank[p] = position of pixel p in the order; step t changes pixels of rank < count.
    rank = np.empty(pixels, dtype=np.int64)
    rank[order] = np.arange(pixels)
    changed = rank[None, :] < step_counts(pixels, steps)[:, None]  # (steps + 1, P)
    changed = changed.reshape(steps + 1, height, width, *([1] * (image.ndim - 2)))
    series: np.ndarray = np.where(changed, other[None], start[None])
    return series


def curve_area(scores: np.ndarray) -> np.ndarray:
    """Trapezoidal area over [0, 1] of curves sampled at equal steps (last axis)."""
    y = np.asarray(scores, dtype=np.float64)
    steps = y.shape[-1] - 1
    if steps < 1:
        raise ValueError("a curve needs at least 2 points")
    area: np.ndarray = (y.sum(axis=-1) - (y[..., 0] + y[..., -1]) / 2) / steps
    return area


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an (H, W, C) image over its spatial axes (edges reflected):
    RISE's insertion baseline, an image with the content but none of the detail.
    """
    image = np.asarray(image, dtype=np.float64)
    if sigma <= 0:
        return image.copy()
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    out = image
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        size = out.shape[axis]
        out = sum(
            w * np.take(padded, np.arange(k, k + size), axis=axis) for k, w in enumerate(kernel)
        )
    return np.asarray(out)


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a flat array, ties given their average rank."""
    v = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    # Runs of equal values share the mean of the ranks they span.
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], len(v)]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(v), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (flattened). A constant map carries no
    ordering at all, so it correlates 0 with anything: a map that a randomised model
    wipes out has changed completely, not undefinedly.
    """
    ra, rb = rankdata(a), rankdata(b)
    if ra.shape != rb.shape:
        raise ValueError(f"maps of {ra.size} and {rb.size} values cannot be compared")
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float((ra**2).sum()) * float((rb**2).sum()))
    if denom == 0.0:
        return 0.0
    return float((ra * rb).sum() / denom)


def summary(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Mean, median, quartiles, extremes and count of finite values (JSON-ready)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, "mean": None, "median": None, "q1": None, "q3": None}
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "median": float(median),
        "q1": float(q1),
        "q3": float(q3),
        "min": float(v.min()),
        "max": float(v.max()),
    }
