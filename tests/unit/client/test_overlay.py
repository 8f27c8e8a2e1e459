"""Overlay rendering, checked by value: the blend ends, colormap lookups, map scaling,
resizing, validation messages and the PNG round trip."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from salience_client.overlay import normalized_map, overlay, save_overlay


def rng_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, shape)


def cmap_bytes(values: np.ndarray, name: str = "jet") -> np.ndarray:
    return np.asarray(matplotlib.colormaps[name](values, bytes=True))[..., :3]


def test_alpha_zero_returns_the_uint8_image_exactly() -> None:
    image = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    out = overlay(image, rng_image((6, 5), seed=2), alpha=0.0)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, image)


def test_alpha_zero_returns_a_float_image_as_rounded_uint8() -> None:
    image = rng_image((4, 7, 3))
    out = overlay(image, rng_image((4, 7), seed=3), alpha=0)
    np.testing.assert_array_equal(out, np.round(image * 255).astype(np.uint8))


def test_alpha_one_returns_exactly_the_colormap_colours_of_the_normalised_map() -> None:
    saliency = np.random.default_rng(4).normal(size=(5, 6)) * 7 + 3
    expected = cmap_bytes(
        (saliency - saliency.min()) / (saliency.max() - saliency.min()), "viridis"
    )
    out = overlay(rng_image((5, 6, 3)), saliency, colormap="viridis", alpha=1.0)
    np.testing.assert_array_equal(out, expected)


def test_blend_is_the_weighted_mean_of_image_and_colours() -> None:
    image = np.random.default_rng(5).integers(0, 256, (3, 3, 3), dtype=np.uint8)
    saliency = np.arange(9, dtype=np.float32).reshape(3, 3)
    colours = cmap_bytes(saliency / 8).astype(np.float64)
    expected = np.round(0.7 * image + 0.3 * colours).astype(np.uint8)
    np.testing.assert_array_equal(overlay(image, saliency, alpha=0.3), expected)


def test_hottest_pixel_gets_the_top_colour_and_coldest_the_bottom_one() -> None:
    saliency = np.zeros((4, 4), dtype=np.float32)
    saliency[1, 2] = 0.25  # any range: min-max normalisation makes it 1
    out = overlay(np.zeros((4, 4, 3)), saliency, alpha=1.0)
    top = np.array(matplotlib.colormaps["jet"](1.0, bytes=True)[:3])
    bottom = np.array(matplotlib.colormaps["jet"](0.0, bytes=True)[:3])
    np.testing.assert_array_equal(out[1, 2], top)
    np.testing.assert_array_equal(out[0, 0], bottom)


def test_uint8_map_is_read_as_0_to_255_not_stretched() -> None:
    saliency = np.full((2, 2), 51, dtype=np.uint8)  # 0.2 everywhere
    saliency[0, 0] = 102  # 0.4: min-max would make these 0 and 1
    out = overlay(np.zeros((2, 2)), saliency, alpha=1.0)
    np.testing.assert_array_equal(out[0, 0], cmap_bytes(np.array(0.4)))
    np.testing.assert_array_equal(out[1, 1], cmap_bytes(np.array(0.2)))


def test_constant_map_shows_as_zeros() -> None:
    out = overlay(np.zeros((3, 3, 3)), np.full((3, 3), 5.0), alpha=1.0)
    np.testing.assert_array_equal(out, np.broadcast_to(cmap_bytes(np.array(0.0)), (3, 3, 3)))


def test_channels_of_the_map_are_reduced_by_max() -> None:
    saliency = np.zeros((2, 3, 3))
    saliency[0, 1, 2] = 1.0
    saliency[1, 0, 0] = 0.5
    np.testing.assert_allclose(normalized_map(saliency), [[0, 1, 0], [0.5, 0, 0]])


def test_image_outside_unit_range_is_min_max_scaled_and_grey_is_repeated() -> None:
    image = np.array([[-2.0, 0.0], [1.0, 2.0]])
    out = overlay(image, np.zeros((2, 2)), alpha=0.0)
    expected = np.round(np.array([[0, 0.5], [0.75, 1.0]]) * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=-1))
    single = overlay(image[..., None], np.zeros((2, 2)), alpha=0.0)
    np.testing.assert_array_equal(single, out)


def test_map_of_another_size_is_resized_bilinearly() -> None:
    saliency = np.array([[0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    values = normalized_map(saliency, (4, 8))
    assert values.shape == (4, 8)
    # Bilinear: the left edge stays cold, the right edge hot, every row the same and
    # monotonic in between.
    assert values[:, 0] == pytest.approx(0.0)
    assert values[:, -1] == pytest.approx(1.0)
    np.testing.assert_allclose(values, np.broadcast_to(values[0], values.shape))
    assert np.all(np.diff(values[0]) >= 0)
    out = overlay(rng_image((4, 8, 3)), saliency, alpha=1.0)
    np.testing.assert_array_equal(out, cmap_bytes(values))


@pytest.mark.parametrize("name", ["no-such-map", ""])
def test_unknown_colormap_is_a_value_error_naming_it(name: str) -> None:
    with pytest.raises(ValueError, match=f"colormap='{name}'"):
        overlay(np.zeros((2, 2)), np.zeros((2, 2)), colormap=name)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_range_is_a_value_error_naming_it(alpha: float) -> None:
    with pytest.raises(ValueError, match=f"alpha={alpha!r}"):
        overlay(np.zeros((2, 2)), np.zeros((2, 2)), alpha=alpha)


def test_shapes_that_are_not_images_or_maps_are_value_errors() -> None:
    with pytest.raises(ValueError, match="image shape"):
        overlay(np.zeros((2, 2, 5)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="saliency shape"):
        overlay(np.zeros((2, 2)), np.zeros(4))


def test_png_reads_back_identical(tmp_path: Path) -> None:
    image = rng_image((9, 7, 3))
    saliency = rng_image((9, 7), seed=8)
    path = save_overlay(tmp_path / "x.png", image, saliency, colormap="inferno", alpha=0.6)
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.mode == "RGB"
        read = np.asarray(png)
    np.testing.assert_array_equal(read, overlay(image, saliency, colormap="inferno", alpha=0.6))


# Annotated overlays (`salience explain`'s default) ------------------------------------


def test_an_annotated_overlay_is_enlarged_titled_and_has_the_colour_bar() -> None:
    from salience_client.report import (
        MIN_OVERLAY_SIDE,
        annotated_overlay,
        colorbar_colours,
        enlarge,
        overlay_layout,
    )

    rng = np.random.default_rng(4)
    rgb = overlay(rng.random((66, 200, 3)), rng.random((66, 200)), colormap="viridis")
    drawn = annotated_overlay(rgb, "steering -0.576", "viridis")
    layout = overlay_layout((66, 200), "steering -0.576")
    assert layout.scale == 3  # 66 px → 198, the least whole factor reaching 192
    assert min(66, 200) * layout.scale >= MIN_OVERLAY_SIDE
    assert drawn.shape == (layout.size[1], layout.size[0], 3)
    left, top, right, bottom = layout.image
    np.testing.assert_array_equal(drawn[top:bottom, left:right], enlarge(rgb, 3))
    left, top, right, bottom = layout.colorbar
    bar = drawn[top:bottom, left:right]
    expected = colorbar_colours(bottom - top, "viridis")
    for column in range(right - left):
        np.testing.assert_array_equal(bar[:, column], expected)
    # The colour bar runs from the colormap's top (high saliency) down to its bottom.
    cmap = matplotlib.colormaps["viridis"]
    np.testing.assert_array_equal(expected[0], cmap(1.0, bytes=True)[:3])
    np.testing.assert_array_equal(expected[-1], cmap(0.0, bytes=True)[:3])
    # The title is drawn above the image, and another title draws other pixels.
    title_rows = drawn[: layout.image[1]]
    assert (title_rows < 128).any()
    other = annotated_overlay(rgb, "steering +0.576", "viridis")
    assert not np.array_equal(other[: layout.image[1]], title_rows)
    np.testing.assert_array_equal(other[layout.image[1] :], drawn[layout.image[1] :])


def test_a_large_overlay_is_not_enlarged() -> None:
    from salience_client.report import overlay_layout

    assert overlay_layout((256, 320), "x").scale == 1
    assert overlay_layout((8, 8), "x").scale == 24


def test_value_titles_name_the_predicted_value() -> None:
    from salience_client.report import value_titles

    steering = {"steering": np.array([[-0.5764], [0.25]])}
    assert value_titles(steering) == ["steering -0.576", "steering +0.250"]
    scores = {"logits": np.array([[0.5, 2.25, -1.0], [3.0, 0.0, 1.0]]), "probs": np.zeros((2, 3))}
    assert value_titles(scores, filter_indices=[1]) == [
        "logits[1] 2.250",
        "logits[1] 0.000 · argmax 0 3.000",
    ]
    assert value_titles(scores) == ["logits argmax 1 2.250", "logits argmax 0 3.000"]
    assert value_titles(scores, output="probs", filter_indices=[2])[0] == (
        "probs[2] 0.000 · argmax 0 0.000"
    )
