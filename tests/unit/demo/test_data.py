"""Tests of the procedural demo data: determinism, value ranges and ground-truth masks."""

from __future__ import annotations

import numpy as np
import pytest

from salience_server.demo import data as data_module
from salience_server.demo.data import (
    ROAD_SHAPE,
    SHAPE_CLASSES,
    RoadsData,
    ShapesData,
    generate_roads,
    generate_shapes,
    steering_angle,
)

N_SHAPES = 240
N_ROADS = 120


@pytest.fixture(scope="module")
def shapes() -> ShapesData:
    return generate_shapes(N_SHAPES, seed=123)


@pytest.fixture(scope="module")
def roads() -> RoadsData:
    return generate_roads(N_ROADS, seed=123)


def test_data_module_does_not_import_a_deep_learning_runtime() -> None:
    # The generators must stay usable (and cheap to import) without TensorFlow.
    source = data_module.__file__
    assert source is not None
    with open(source, encoding="utf-8") as fh:
        text = fh.read()
    for banned in ("import tensorflow", "from tensorflow", "import keras", "from keras"):
        assert banned not in text


# --------------------------------------------------------------------------- shapes


def test_shapes_types_and_ranges(shapes: ShapesData) -> None:
    assert len(shapes) == N_SHAPES
    assert shapes.images.shape == (N_SHAPES, 64, 64, 3)
    assert shapes.images.dtype == np.float32
    assert shapes.labels.shape == (N_SHAPES,)
    assert shapes.labels.dtype == np.int64
    assert shapes.masks.shape == (N_SHAPES, 64, 64)
    assert shapes.masks.dtype == np.bool_
    assert shapes.images.min() >= 0.0
    assert shapes.images.max() <= 1.0
    assert np.isfinite(shapes.images).all()
    # Real colour content, not a constant or saturated image.
    assert 0.2 < shapes.images.mean() < 0.8
    assert shapes.images.std() > 0.15


def test_shapes_same_seed_is_identical_and_prefix_stable() -> None:
    a = generate_shapes(12, seed=7)
    b = generate_shapes(12, seed=7)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.masks, b.masks)
    prefix = generate_shapes(5, seed=7)
    np.testing.assert_array_equal(prefix.images, a.images[:5])
    np.testing.assert_array_equal(prefix.masks, a.masks[:5])


def test_shapes_other_seed_differs() -> None:
    a = generate_shapes(12, seed=7)
    b = generate_shapes(12, seed=8)
    assert np.abs(a.images - b.images).mean() > 0.1
    assert (a.masks != b.masks).any()


def test_generators_do_not_touch_global_numpy_random_state() -> None:
    before = np.random.get_state(legacy=False)
    generate_shapes(3, seed=1)
    generate_roads(1, seed=1)
    after = np.random.get_state(legacy=False)
    assert before["state"]["pos"] == after["state"]["pos"]
    np.testing.assert_array_equal(before["state"]["key"], after["state"]["key"])


def test_every_class_present_and_roughly_balanced(shapes: ShapesData) -> None:
    counts = np.bincount(shapes.labels, minlength=len(SHAPE_CLASSES))
    assert len(counts) == len(SHAPE_CLASSES)
    assert counts.min() >= N_SHAPES / len(SHAPE_CLASSES) * 0.6


def test_shape_masks_are_objects_inside_the_image(shapes: ShapesData) -> None:
    areas = shapes.masks.sum(axis=(1, 2))
    # Smallest object: a star of circumradius 9 covers well over 60 pixels.
    assert areas.min() >= 60
    assert areas.max() <= 0.5 * 64 * 64
    border = (
        shapes.masks[:, 0, :].any(axis=1)
        | shapes.masks[:, -1, :].any(axis=1)
        | shapes.masks[:, :, 0].any(axis=1)
        | shapes.masks[:, :, -1].any(axis=1)
    )
    assert not border.any(), "objects must lie fully inside the image"


def test_mask_pixels_carry_one_object_colour(shapes: ShapesData) -> None:
    # The object is painted last in one colour plus faint shading, so its pixels are
    # nearly uniform; any distractor leaking into the mask would break this.
    for image, mask in zip(shapes.images, shapes.masks, strict=True):
        pixels = image[mask]
        assert pixels.std(axis=0).max() < 0.06


def test_objects_stand_out_from_their_surroundings(shapes: ShapesData) -> None:
    distances = []
    for image, mask in zip(shapes.images, shapes.masks, strict=True):
        grown = mask.copy()
        for axis in (0, 1):
            for shift in (-2, 2):
                grown |= np.roll(mask, shift, axis=axis)
        ring = grown & ~mask
        distances.append(np.linalg.norm(image[mask].mean(axis=0) - image[ring].mean(axis=0)))
    assert np.median(distances) > 0.3
    assert np.mean(np.asarray(distances) > 0.1) > 0.9


def test_circle_masks_look_like_discs(shapes: ShapesData) -> None:
    circle = SHAPE_CLASSES.index("circle")
    for mask in shapes.masks[shapes.labels == circle]:
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        height = rows[-1] - rows[0] + 1
        width = cols[-1] - cols[0] + 1
        assert abs(height - width) <= 1
        fill = mask.sum() / (height * width)
        assert 0.72 < fill < 0.85  # pi / 4 for an ideal disc


def test_stars_fill_less_of_their_box_than_circles(shapes: ShapesData) -> None:
    def fill(mask: np.ndarray) -> float:
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        return float(mask.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)))

    star = SHAPE_CLASSES.index("star")
    circle = SHAPE_CLASSES.index("circle")
    star_fill = max(fill(m) for m in shapes.masks[shapes.labels == star])
    circle_fill = min(fill(m) for m in shapes.masks[shapes.labels == circle])
    assert star_fill < circle_fill


def test_backgrounds_are_cluttered(shapes: ShapesData) -> None:
    # Outside the object the image is neither flat nor just noise around one colour.
    for image, mask in zip(shapes.images[:40], shapes.masks[:40], strict=True):
        background = image[~mask]
        assert background.std(axis=0).max() > 0.05


def test_generators_reject_negative_counts() -> None:
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate_shapes(-1, seed=0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate_roads(-1, seed=0)
    assert generate_shapes(0, seed=0).images.shape == (0, 64, 64, 3)
    assert generate_roads(0, seed=0).images.shape == (0, *ROAD_SHAPE)


# --------------------------------------------------------------------------- roads


def test_roads_types_and_ranges(roads: RoadsData) -> None:
    assert len(roads) == N_ROADS
    assert roads.images.shape == (N_ROADS, *ROAD_SHAPE)
    assert ROAD_SHAPE == (66, 200, 3)
    assert roads.images.dtype == np.float32
    assert roads.angles.shape == (N_ROADS,)
    assert roads.angles.dtype == np.float32
    assert roads.masks.shape == (N_ROADS, 66, 200)
    assert roads.masks.dtype == np.bool_
    assert roads.images.min() >= 0.0
    assert roads.images.max() <= 1.0
    assert np.isfinite(roads.images).all()
    assert np.all(np.abs(roads.angles) <= 1.0)


def test_roads_same_seed_is_identical_other_seed_differs() -> None:
    a = generate_roads(6, seed=5)
    b = generate_roads(6, seed=5)
    c = generate_roads(6, seed=6)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.angles, b.angles)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert not np.array_equal(a.angles, c.angles)
    assert np.abs(a.images - c.images).mean() > 0.02
    np.testing.assert_array_equal(generate_roads(3, seed=5).images, a.images[:3])


def test_angles_span_both_directions(roads: RoadsData) -> None:
    assert roads.angles.min() < -0.6
    assert roads.angles.max() > 0.6
    assert abs(float(roads.angles.mean())) < 0.15
    # Enough spread that always predicting the mean is a poor model.
    assert np.abs(roads.angles - roads.angles.mean()).mean() > 0.4


def test_angle_is_the_documented_function_of_geometry(roads: RoadsData) -> None:
    np.testing.assert_allclose(
        roads.angles, steering_angle(roads.curvatures, roads.offsets), rtol=0, atol=1e-6
    )
    assert float(steering_angle(0.0, 0.0)) == 0.0
    assert float(steering_angle(0.01, 0.0)) > 0.3  # right bend: steer right
    assert float(steering_angle(-0.01, 0.0)) < -0.3
    assert float(steering_angle(0.0, 0.5)) > 0.0  # road centre to the right: steer right
    assert float(steering_angle(0.0, -0.5)) < 0.0
    # Odd symmetry is what makes mirrored images valid training pairs.
    assert float(steering_angle(0.013, 0.4)) == pytest.approx(-float(steering_angle(-0.013, -0.4)))


def test_angle_sign_follows_the_drawn_curve(roads: RoadsData) -> None:
    # Far lane markings (rows just under the horizon) drift to the side the road bends
    # to; near ones stay around the car. Their horizontal shift must match the sign.
    checked = 0
    for mask, angle, curvature in zip(roads.masks, roads.angles, roads.curvatures, strict=True):
        if abs(curvature) < 0.008:
            continue
        far_cols = np.nonzero(mask[26:32])[1]
        near_cols = np.nonzero(mask[50:])[1]
        assert far_cols.size > 0
        assert near_cols.size > 0
        shift = far_cols.mean() - near_cols.mean()
        assert np.sign(shift) == np.sign(angle) == np.sign(curvature)
        checked += 1
    assert checked > N_ROADS // 3


def test_lane_masks_are_visible_markings_on_the_ground(roads: RoadsData) -> None:
    assert roads.masks.sum(axis=(1, 2)).min() >= 100
    # Nothing is painted in the sky band above the (jittered) horizon.
    assert not roads.masks[:, :18].any()
    for image, mask in zip(roads.images, roads.masks, strict=True):
        # A marking pixel must differ clearly from the surface a few pixels beside it.
        steps = []
        for shift in (-4, 4):
            beside = np.roll(image, shift, axis=1)
            edge = mask & ~np.roll(mask, shift, axis=1)
            edge[:, :4] = False
            edge[:, -4:] = False
            steps.append(np.linalg.norm(image[edge] - beside[edge], axis=-1))
        assert np.concatenate(steps).mean() > 0.25


def test_sky_is_above_ground(roads: RoadsData) -> None:
    top = roads.images[:, :3].mean(axis=(1, 2))
    assert np.mean(top[:, 2] > top[:, 0]) > 0.95  # bluish sky
    bottom = roads.images[:, -3:].mean(axis=(1, 2, 3))
    assert np.mean(bottom < roads.images[:, :3].mean(axis=(1, 2, 3))) > 0.8
