"""Procedural data sets for the demo models.

Every generator are pure functions of ``(n, seed)``: every random draw comes from one
``np.random.default_rng(seed)`` consumed image by image, so the first ``k`` samples of
``generate_*(n, seed)`` equal ``generate_*(k, seed)``. Each sample comes with a mask
of the pixels that carry the answer, which lets saliency maps be scored against a
known ground truth.

This module deliberately avoids TensorFlow so that data can be produced and tested
without loading a deep learning runtime.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SHAPE_SIZE = 64
SHAPE_IMAGE_SHAPE = (SHAPE_SIZE, SHAPE_SIZE, 3)

ROAD_SHAPE = (66, 200, 3)

# The background cue of `generate_cued_shapes`: one texture per class, so that in
# training (cue="class") texture k always comes with class k.
CUE_KINDS: tuple[str, ...] = ("horizontal", "vertical", "checker", "diagonal")
CUE_MODES: tuple[str, ...] = ("class", "random", "none")
CUE_SIZE = 12
# Gap between the cue patch and the image border.
_CUE_MARGIN = 2

# Shapes: circumradius range of the object in pixels. The lower bound keeps the
# smallest object several times larger than any distractor blob.
_MIN_RADIUS = 9.0
_MAX_RADIUS = 22.0
_MAX_BLOB_RADIUS = 3.5
# Euclidean RGB distance the object colour must keep from the background under it;
# without it some objects would be invisible and the label unlearnable.
_MIN_CONTRAST = 0.4

# Roads: a pinhole camera above a flat ground plane. Units are metres and pixels.
_FOCAL_PX = 140.0
_CAMERA_HEIGHT_M = 1.5
_HORIZON_ROW = 22.0
_MARK_MAX_DIST_M = 60.0
_FOG_START_M = 35.0
_FOG_END_M = 90.0
_MAX_CURVATURE = 0.02  # 1/m; a 50 m radius bend at the extremes
_MAX_OFFSET_M = 0.8
# Steering target: angle = tanh(curvature / _CURVATURE_SCALE + offset / _OFFSET_SCALE).
_CURVATURE_SCALE = 0.015
_OFFSET_SCALE = 4.0


@dataclass(frozen=True)
class ShapesData:
    """Images of one shape each, its class index, and the object's visible pixels."""

    images: np.ndarray  # float32 (n, 64, 64, 3) in [0, 1]
    labels: np.ndarray  # int64 (n,) indices into SHAPE_CLASSES
    masks: np.ndarray  # bool (n, 64, 64)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class CuedShapesData:
    """Shapes with a background cue (the "tree" beside the "bird"): a small textured
    patch in the image corner farthest from the object, whose texture is one of
    CUE_KINDS. ``cue_kinds`` is -1 where the cue is absent (and ``cue_masks`` empty).
    """

    images: np.ndarray  # float32 (n, 64, 64, 3) in [0, 1]
    labels: np.ndarray  # int64 (n,) indices into SHAPE_CLASSES
    masks: np.ndarray  # bool (n, 64, 64): the object
    cue_masks: np.ndarray  # bool (n, 64, 64): the cue patch
    cue_kinds: np.ndarray  # int64 (n,) indices into CUE_KINDS, -1 when absent

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class RoadsData:
    """Road scenes seen from the car, the steering target, and lane-marking pixels."""

    images: np.ndarray  # float32 (n, 66, 200, 3) in [0, 1]
    angles: np.ndarray  # float32 (n,) in [-1, 1]; positive steers right
    masks: np.ndarray  # bool (n, 66, 200)
    curvatures: np.ndarray  # float32 (n,) 1/m; positive bends right
    offsets: np.ndarray  # float32 (n,) m; road centre's position right of the car

    def __len__(self) -> int:
        return int(self.angles.shape[0])


def steering_angle(curvature: np.ndarray | float, offset: np.ndarray | float) -> np.ndarray:
    """Map road geometry to the steering target in [-1, 1].

    A bend to the right (positive curvature) or a road centre to the right of the car
    (positive offset) both ask for a right turn; tanh keeps the target bounded while
    staying close to linear for gentle roads.
    """
    c = np.asarray(curvature, dtype=np.float64)
    d = np.asarray(offset, dtype=np.float64)
    return np.tanh(c / _CURVATURE_SCALE + d / _OFFSET_SCALE).astype(np.float32)


# --------------------------------------------------------------------------- shapes


def _upsample(coarse: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinearly stretch a small (h, w, c) grid to (height, width, c)."""
    gh, gw = coarse.shape[:2]
    ys = np.linspace(0.0, gh - 1.0, height)
    xs = np.linspace(0.0, gw - 1.0, width)
    y0 = np.minimum(np.floor(ys).astype(int), gh - 2)
    x0 = np.minimum(np.floor(xs).astype(int), gw - 2)
    ty = (ys - y0)[:, None, None]
    tx = (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - tx) + coarse[y0][:, x0 + 1] * tx
    bottom = coarse[y0 + 1][:, x0] * (1 - tx) + coarse[y0 + 1][:, x0 + 1] * tx
    out: np.ndarray = top * (1 - ty) + bottom * ty
    return out


def _mask_from(draw_fn: Callable[[ImageDraw.ImageDraw], None], size: tuple[int, int]) -> np.ndarray:
    """Rasterise whatever ``draw_fn`` paints into a boolean (h, w) mask."""
    canvas = Image.new("L", (size[1], size[0]), 0)
    draw_fn(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _shapes_background(rng: np.random.Generator) -> np.ndarray:
    """A smooth two-colour gradient with low-frequency blotches and pixel noise."""
    size = SHAPE_SIZE
    c0, c1 = rng.uniform(0.0, 1.0, size=(2, 3))
    theta = rng.uniform(0.0, 2.0 * math.pi)
    coords = (np.arange(size) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    # Projection onto the gradient direction, scaled so that t spans [0, 1] corner to corner.
    t = (xx * math.cos(theta) + yy * math.sin(theta)) / math.sqrt(2.0) + 0.5
    img = c0 + (c1 - c0) * t[..., None]
    img = img + _upsample(rng.normal(0.0, 0.08, size=(4, 4, 3)), size, size)
    img = img + rng.normal(0.0, rng.uniform(0.01, 0.05), size=(size, size, 3))
    return np.asarray(img)


def _draw_distractor(rng: np.random.Generator, img: np.ndarray) -> None:
    """Paint one stroke, scribble, arc or small blob; none of them is a class shape."""
    size = SHAPE_SIZE
    colour = rng.uniform(0.0, 1.0, size=3)
    kind = int(rng.integers(0, 4))
    if kind == 0:  # straight stroke, possibly crossing the border
        p = rng.uniform(-8.0, size + 8.0, size=4)
        width = int(rng.integers(1, 4))
        mask = _mask_from(lambda d: d.line(list(p), fill=255, width=width), (size, size))
    elif kind == 1:  # open scribble made of a short random walk
        start = rng.uniform(0.0, size, size=2)
        steps = rng.normal(0.0, 9.0, size=(int(rng.integers(2, 5)), 2))
        pts = np.vstack([start, start + np.cumsum(steps, axis=0)])
        flat = [float(v) for v in pts.ravel()]
        width = int(rng.integers(1, 3))
        mask = _mask_from(
            lambda d: d.line(flat, fill=255, width=width, joint="curve"), (size, size)
        )
    elif kind == 2:  # arc: a thin partial ring, never a closed disc
        cx, cy = rng.uniform(0.0, size, size=2)
        r = rng.uniform(5.0, 20.0)
        start_deg = rng.uniform(0.0, 360.0)
        span = rng.uniform(40.0, 200.0)
        width = int(rng.integers(1, 3))
        box = [cx - r, cy - r, cx + r, cy + r]
        mask = _mask_from(
            lambda d: d.arc(box, start_deg, start_deg + span, fill=255, width=width),
            (size, size),
        )
    else:  # small elongated blob, well below the smallest object
        cx, cy = rng.uniform(0.0, size, size=2)
        rx, ry = rng.uniform(1.0, _MAX_BLOB_RADIUS, size=2)
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        mask = _mask_from(lambda d: d.ellipse(box, fill=255), (size, size))
    alpha = rng.uniform(0.6, 1.0)
    img[mask] = (1 - alpha) * img[mask] + alpha * colour


def _shape_polygon(
    label: int, cx: float, cy: float, r: float, rng: np.random.Generator
) -> list[tuple[float, float]]:
    """Vertices of a rotated square, triangle or star with circumradius ``r``."""
    name = SHAPE_CLASSES[label]
    if name == "square":
        angles = rng.uniform(0.0, math.pi / 2) + np.arange(4) * math.pi / 2
        radii = np.full(4, r)
    elif name == "triangle":
        angles = rng.uniform(0.0, 2 * math.pi / 3) + np.arange(3) * 2 * math.pi / 3
        radii = np.full(3, r)
    elif name == "star":
        inner = rng.uniform(0.38, 0.5)
        angles = rng.uniform(0.0, 2 * math.pi / 5) + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * inner)
    else:
        raise ValueError(f"{name!r} is not a polygon")
    return [
        (cx + float(rr * math.cos(a)), cy + float(rr * math.sin(a)))
        for a, rr in zip(angles, radii, strict=True)
    ]


def _one_shape(rng: np.random.Generator) -> tuple[np.ndarray, int, np.ndarray]:
    size = SHAPE_SIZE
    label = int(rng.integers(0, len(SHAPE_CLASSES)))
    img = _shapes_background(rng)
    for _ in range(int(rng.integers(3, 9))):
        _draw_distractor(rng, img)

    r = float(rng.uniform(_MIN_RADIUS, _MAX_RADIUS))
    # One pixel of margin so that the rasterised object never touches the border.
    cx, cy = rng.uniform(r + 1.0, size - 1.0 - r, size=2)
    if SHAPE_CLASSES[label] == "circle":
        box = [cx - r, cy - r, cx + r, cy + r]
        mask = _mask_from(lambda d: d.ellipse(box, fill=255), (size, size))
    else:
        poly = _shape_polygon(label, float(cx), float(cy), r, rng)
        mask = _mask_from(lambda d: d.polygon(poly, fill=255), (size, size))

    under = img[mask].mean(axis=0)
    colour = rng.uniform(0.0, 1.0, size=3)
    for _ in range(32):
        if np.linalg.norm(colour - under) >= _MIN_CONTRAST:
            break
        colour = rng.uniform(0.0, 1.0, size=3)
    shade = rng.normal(0.0, 0.02, size=(int(mask.sum()), 3))
    img[mask] = colour + shade
    return img, label, mask


def generate_shapes(n: int, seed: int) -> ShapesData:
    """Generate ``n`` cluttered images, each holding exactly one shape of SHAPE_CLASSES."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, *SHAPE_IMAGE_SHAPE), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    masks = np.empty((n, SHAPE_SIZE, SHAPE_SIZE), dtype=bool)
    for i in range(n):
        img, label, mask = _one_shape(rng)
        images[i] = np.clip(img, 0.0, 1.0)
        labels[i] = label
        masks[i] = mask
    return ShapesData(images=images, labels=labels, masks=masks)


# --------------------------------------------------------------------------- cued shapes


def cue_texture(kind: int, size: int = CUE_SIZE) -> np.ndarray:
    """The boolean (size, size) pattern of cue `kind`: stripes of period 4 in three
    orientations and a checkerboard of 2-pixel cells, all half on, half off.
    """
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    name = CUE_KINDS[kind]
    if name == "horizontal":
        return np.asarray((yy // 2) % 2 == 0)
    if name == "vertical":
        return np.asarray((xx // 2) % 2 == 0)
    if name == "checker":
        return np.asarray((yy // 2 + xx // 2) % 2 == 0)
    return np.asarray(((yy + xx) // 2) % 2 == 0)


def _cue_corner(mask: np.ndarray) -> tuple[int, int]:
    """Top-left pixel of the cue patch in the corner farthest from the object.

    The object's circumradius is at most 22 px and its centre keeps 23 px from the
    border, so the farthest 12 px corner patch never touches it.
    """
    ys, xs = np.nonzero(mask)
    cy, cx = float(ys.mean()), float(xs.mean())
    far = SHAPE_SIZE - _CUE_MARGIN - CUE_SIZE
    corners = [(_CUE_MARGIN, _CUE_MARGIN), (_CUE_MARGIN, far), (far, _CUE_MARGIN), (far, far)]
    centre = CUE_SIZE / 2
    return max(corners, key=lambda c: (c[0] + centre - cy) ** 2 + (c[1] + centre - cx) ** 2)


def generate_cued_shapes(n: int, seed: int, cue: str = "class") -> CuedShapesData:
    """Generate ``n`` shapes images, each with a background cue, for a model that may
    learn the cue instead of the shape ("is it looking at the bird or the tree?").

    ``cue`` says how the cue's texture relates to the class: ``"class"`` (texture k
    with class k: a perfectly predictive shortcut, the training data), ``"random"``
    (texture drawn independently of the class: the cue is present but says nothing,
    the audit data) or ``"none"`` (no cue). The random draws are the same in every
    mode, so one seed gives the same scenes and objects whatever ``cue`` is, and
    accuracies across modes differ only by the cue.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if cue not in CUE_MODES:
        raise ValueError(f"cue must be one of {CUE_MODES}, got {cue!r}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, *SHAPE_IMAGE_SHAPE), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    masks = np.empty((n, SHAPE_SIZE, SHAPE_SIZE), dtype=bool)
    cue_masks = np.zeros((n, SHAPE_SIZE, SHAPE_SIZE), dtype=bool)
    cue_kinds = np.full(n, -1, dtype=np.int64)
    for i in range(n):
        img, label, mask = _one_shape(rng)
        # Drawn in every mode (see the docstring): the same stream whatever `cue` is.
        random_kind = int(rng.integers(0, len(CUE_KINDS)))
        on, off = rng.uniform(0.0, 1.0, size=(2, 3))
        if np.linalg.norm(on - off) < 2 * _MIN_CONTRAST:
            off = 1.0 - on  # a texture needs contrast to be seen at all
        if cue != "none":
            kind = label if cue == "class" else random_kind
            top, left = _cue_corner(mask)
            pattern = cue_texture(kind)
            patch = np.where(pattern[..., None], on, off)
            img[top : top + CUE_SIZE, left : left + CUE_SIZE] = patch
            cue_masks[i, top : top + CUE_SIZE, left : left + CUE_SIZE] = True
            cue_kinds[i] = kind
        images[i] = np.clip(img, 0.0, 1.0)
        labels[i] = label
        masks[i] = mask
    return CuedShapesData(
        images=images, labels=labels, masks=masks, cue_masks=cue_masks, cue_kinds=cue_kinds
    )


# --------------------------------------------------------------------------- roads


def _draw_roadside_object(
    rng: np.random.Generator,
    img: np.ndarray,
    occluded: np.ndarray,
    horizon: float,
    cx_px: float,
    lateral_m: float,
    dist_m: float,
) -> None:
    """Paint a tree or pole standing on the ground at (lateral_m, dist_m)."""
    h, w = ROAD_SHAPE[:2]
    scale = _FOCAL_PX / dist_m  # pixels per metre at that distance
    x = cx_px + lateral_m * scale
    base = horizon + _CAMERA_HEIGHT_M * scale
    if rng.random() < 0.5:  # pole
        height = rng.uniform(4.0, 8.0) * scale
        half = max(0.6, 0.12 * scale)
        box = [x - half, base - height, x + half, base]
        mask = _mask_from(lambda d: d.rectangle(box, fill=255), (h, w))
        colour = rng.uniform(0.2, 0.7) + rng.uniform(-0.05, 0.05, size=3)
        img[mask] = colour
    else:  # tree: trunk plus canopy
        trunk_h = rng.uniform(1.5, 3.0) * scale
        trunk_half = max(0.6, 0.2 * scale)
        trunk = [x - trunk_half, base - trunk_h, x + trunk_half, base]
        rx = rng.uniform(1.2, 2.5) * scale
        ry = rng.uniform(1.5, 3.5) * scale
        top = base - trunk_h
        canopy = [x - rx, top - 2 * ry, x + rx, top + 0.3 * ry]
        trunk_mask = _mask_from(lambda d: d.rectangle(trunk, fill=255), (h, w))
        canopy_mask = _mask_from(lambda d: d.ellipse(canopy, fill=255), (h, w))
        img[trunk_mask] = np.array([0.35, 0.25, 0.15]) * rng.uniform(0.6, 1.2)
        green = np.array([rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.6), rng.uniform(0.05, 0.2)])
        leaves = rng.normal(0.0, 0.04, size=(int(canopy_mask.sum()), 3))
        img[canopy_mask] = green + leaves
        mask = trunk_mask | canopy_mask
    occluded |= mask


def _one_road(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float, float]:
    h, w = ROAD_SHAPE[:2]
    curvature = float(rng.uniform(-_MAX_CURVATURE, _MAX_CURVATURE))
    offset = float(rng.uniform(-_MAX_OFFSET_M, _MAX_OFFSET_M))
    half_width = float(rng.uniform(3.0, 4.0))
    mark_width = float(rng.uniform(0.15, 0.3))
    has_centre = bool(rng.random() < 0.7)
    dash_len = float(rng.uniform(2.0, 4.0))
    dash_period = dash_len + float(rng.uniform(3.0, 8.0))
    dash_phase = float(rng.uniform(0.0, dash_period))
    horizon = _HORIZON_ROW + float(rng.uniform(-2.0, 2.0))  # camera pitch jitter
    cx_px = w / 2 + float(rng.uniform(-3.0, 3.0))  # camera yaw jitter

    rows = np.arange(h, dtype=np.float64) + 0.5
    cols = np.arange(w, dtype=np.float64) + 0.5
    below = rows - horizon
    ground_rows = below > 0.5
    # Distance to the ground seen by each row; rows at or above the horizon see sky.
    # Sky rows get a huge finite distance so that later arithmetic never meets inf - inf.
    dist = np.where(ground_rows, _FOCAL_PX * _CAMERA_HEIGHT_M / np.maximum(below, 0.5), 1e6)
    dist_grid = np.broadcast_to(dist[:, None], (h, w))
    lateral = (cols[None, :] - cx_px) * dist[:, None] / _FOCAL_PX
    centre = offset + 0.5 * curvature * dist[:, None] ** 2
    u = np.where(ground_rows[:, None], lateral - centre, np.inf)
    # Width of one pixel on the ground, so far markings stay at least one pixel wide.
    px_m = np.where(ground_rows, dist / _FOCAL_PX, 0.0)[:, None]
    half_line = np.maximum(mark_width / 2, 0.5 * px_m)
    near = dist_grid < _MARK_MAX_DIST_M

    # Sky: vertical gradient between a zenith and a horizon colour.
    zenith = np.array([rng.uniform(0.2, 0.6), rng.uniform(0.4, 0.75), rng.uniform(0.7, 1.0)])
    haze = np.clip(zenith + rng.uniform(0.1, 0.35) + rng.uniform(-0.08, 0.08, size=3), 0, 1)
    t_sky = np.clip(rows / max(horizon, 1.0), 0.0, 1.0)[:, None, None]
    img = np.broadcast_to(zenith * (1 - t_sky) + haze * t_sky, (h, w, 3)).copy()
    clouds = _upsample(rng.normal(0.0, 0.1, size=(3, 8, 1)), h, w)
    img += np.clip(clouds, 0.0, None) * (~ground_rows)[:, None, None]

    # Ground: grass, dry grass or sand, with blotches and grain.
    ground_palette = np.array([[0.25, 0.45, 0.15], [0.45, 0.42, 0.2], [0.62, 0.55, 0.38]])
    ground = ground_palette[int(rng.integers(0, 3))] * rng.uniform(0.75, 1.2)
    ground_tex = ground + _upsample(rng.normal(0.0, 0.06, size=(5, 12, 3)), h, w)
    ground_tex = ground_tex + rng.normal(0.0, 0.03, size=(h, w, 3))

    asphalt = rng.uniform(0.22, 0.5)
    road_tex = asphalt + _upsample(rng.normal(0.0, 0.04, size=(6, 16, 1)), h, w)
    road_tex = np.broadcast_to(road_tex, (h, w, 3)) + rng.normal(0.0, 0.025, size=(h, w, 1))
    shoulder = half_width + float(rng.uniform(0.3, 1.0))

    abs_u = np.abs(u)
    on_road = abs_u < shoulder
    is_ground = ground_rows[:, None] & ~on_road
    img = np.where(is_ground[..., None], ground_tex, img)
    img = np.where(on_road[..., None], road_tex, img)

    edges = (np.abs(abs_u - half_width) < half_line) & near
    centre_line = np.zeros_like(edges)
    if has_centre:
        dashes = np.mod(dist_grid + dash_phase, dash_period) < dash_len
        centre_line = (abs_u < half_line) & dashes & near
    markings = edges | centre_line
    paint = np.array([0.95, 0.95, 0.92])
    if rng.random() < 0.3:
        paint = np.array([0.95, 0.8, 0.25])  # yellow lines
    paint = paint * rng.uniform(0.8, 1.05)
    img[markings] = paint + rng.normal(0.0, 0.03, size=(int(markings.sum()), 3))

    # Shadows across the road: dark bands that are not lane markings.
    for _ in range(int(rng.integers(0, 3))):
        z0 = rng.uniform(5.0, 40.0)
        z1 = z0 + rng.uniform(1.0, 6.0)
        u0 = rng.uniform(-shoulder - 3.0, shoulder)
        u1 = u0 + rng.uniform(1.5, 6.0)
        band = (dist_grid > z0) & (dist_grid < z1) & (u > u0) & (u < u1)
        img[band] *= rng.uniform(0.45, 0.75)

    # Haze towards the horizon hides the far road, as in real footage.
    fog = np.clip((dist_grid - _FOG_START_M) / (_FOG_END_M - _FOG_START_M), 0.0, 0.85)
    fog = np.where(ground_rows[:, None], fog, 0.0)[..., None]
    img = img * (1 - fog) + haze * fog

    occluded = np.zeros((h, w), dtype=bool)
    objects = []
    for _ in range(int(rng.integers(0, 6))):
        dist_m = float(rng.uniform(6.0, 70.0))
        side = 1.0 if rng.random() < 0.5 else -1.0
        road_at = offset + 0.5 * curvature * dist_m**2
        lateral_m = road_at + side * (shoulder + float(rng.uniform(1.0, 6.0)))
        objects.append((dist_m, lateral_m))
    for dist_m, lateral_m in sorted(objects, reverse=True):  # far first, near on top
        _draw_roadside_object(rng, img, occluded, horizon, cx_px, lateral_m, dist_m)

    # Global lighting: exposure and colour cast, then sensor noise.
    img = img * rng.uniform(0.6, 1.25) * rng.uniform(0.9, 1.1, size=3)
    img = img + rng.normal(0.0, rng.uniform(0.005, 0.03), size=(h, w, 3))
    return img, markings & ~occluded, curvature, offset


def generate_roads(n: int, seed: int) -> RoadsData:
    """Generate ``n`` road scenes with their steering angle and lane-marking masks."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, *ROAD_SHAPE), dtype=np.float32)
    masks = np.empty((n, *ROAD_SHAPE[:2]), dtype=bool)
    curvatures = np.empty(n, dtype=np.float32)
    offsets = np.empty(n, dtype=np.float32)
    for i in range(n):
        img, mask, curvature, offset = _one_road(rng)
        images[i] = np.clip(img, 0.0, 1.0)
        masks[i] = mask
        curvatures[i] = curvature
        offsets[i] = offset
    return RoadsData(
        images=images,
        angles=steering_angle(curvatures, offsets),
        masks=masks,
        curvatures=curvatures,
        offsets=offsets,
    )
