"""The audit's metrics on cases whose answers are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest

from salience_client import audit_metrics as am


def _disc_mask(size: int = 16) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.asarray((yy - 5) ** 2 + (xx - 9) ** 2 <= 9)


def test_energy_share_of_the_mask_itself_is_one() -> None:
    mask = _disc_mask()
    assert am.energy_share(mask.astype(float), mask)[0] == 1.0
    # Any map that is zero outside the mask puts all its mass inside.
    rng = np.random.default_rng(0)
    inside_only = rng.uniform(0.1, 1.0, mask.shape) * mask
    np.testing.assert_allclose(am.energy_share(inside_only, mask), [1.0])
    assert am.energy_share((~mask).astype(float), mask)[0] == 0.0


def test_energy_share_of_a_constant_map_is_the_area_share() -> None:
    mask = _disc_mask()
    area = mask.sum() / mask.size
    np.testing.assert_allclose(am.energy_share(np.full(mask.shape, 0.3), mask), [area])
    # An all-zero map (what normalisation makes of a constant one) scores the same.
    np.testing.assert_allclose(am.energy_share(np.zeros(mask.shape), mask), [area])


def test_energy_share_of_a_known_split_and_batches() -> None:
    mask = np.zeros((4, 4), bool)
    mask[0, :2] = True
    saliency = np.ones((4, 4))
    saliency[0, 0] = 7.0  # mass 7 + 1 inside, 14 outside
    maps = np.stack([saliency, saliency.T])
    masks = np.stack([mask, mask])
    # Transposed: (0,0)=7 and (0,1)=1 are still inside (the mask is row 0, cols 0-1).
    np.testing.assert_allclose(am.energy_share(maps, masks), [8 / 22, 8 / 22])
    # Negative values are not energy.
    signed = np.where(mask, 1.0, -5.0)
    np.testing.assert_allclose(am.energy_share(signed, mask), [1.0])


def test_pointing_game() -> None:
    mask = _disc_mask()
    saliency = np.zeros(mask.shape)
    saliency[5, 9] = 1.0
    assert am.pointing_game(saliency, mask)[0]
    saliency[0, 0] = 2.0
    assert not am.pointing_game(saliency, mask)[0]
    # A tie between a pixel inside and one outside counts as a hit.
    saliency[5, 9] = 2.0
    assert am.pointing_game(saliency, mask)[0]
    with pytest.raises(ValueError, match="must agree"):
        am.pointing_game(saliency, mask[:3])


def test_saliency_order_is_descending_and_stable() -> None:
    saliency = np.array([[0.1, 0.9], [0.5, 0.9]])
    np.testing.assert_array_equal(am.saliency_order(saliency), [1, 3, 2, 0])


def test_step_counts_and_series_endpoints() -> None:
    np.testing.assert_array_equal(am.step_counts(10, 4), [0, 2, 5, 8, 10])
    rng = np.random.default_rng(1)
    image = rng.uniform(size=(3, 4, 2))
    base = np.zeros_like(image)
    order = rng.permutation(12)
    deletion = am.perturbation_series(image, base, order, 3, am.DELETION)
    insertion = am.perturbation_series(image, base, order, 3, am.INSERTION)
    assert deletion.shape == (4, 3, 4, 2)
    np.testing.assert_array_equal(deletion[0], image)
    np.testing.assert_array_equal(deletion[-1], base)
    np.testing.assert_array_equal(insertion[0], base)
    np.testing.assert_array_equal(insertion[-1], image)
    # Step 1 of 3 deletes the first round(12/3) = 4 pixels of the order, all channels.
    flat = deletion[1].reshape(12, 2)
    np.testing.assert_array_equal(flat[order[:4]], 0.0)
    np.testing.assert_array_equal(flat[order[4:]], image.reshape(12, 2)[order[4:]])
    # Insertion at step t is deletion at step t with image and baseline swapped.
    swapped = am.perturbation_series(base, image, order, 3, am.DELETION)
    np.testing.assert_array_equal(insertion, swapped)


def test_deletion_on_a_linear_model_follows_its_closed_form() -> None:
    # f(x) = <w, x> with w > 0 and x = 1: the map of a linear model is w, deleting the
    # top-n pixels (zero baseline) leaves f = Σ of the remaining weights, so the curve
    # is the total minus the cumulative sum of the sorted weights at each step count.
    rng = np.random.default_rng(2)
    w = rng.uniform(0.0, 1.0, size=(6, 5))
    image = np.ones((6, 5, 1))
    steps = 10
    series = am.perturbation_series(
        image, np.zeros_like(image), am.saliency_order(w), steps, "deletion"
    )
    scores = (series[..., 0] * w).sum(axis=(1, 2))
    sorted_w = np.sort(w.ravel())[::-1]
    cumulative = np.r_[0.0, np.cumsum(sorted_w)]
    expected = w.sum() - cumulative[am.step_counts(30, steps)]
    np.testing.assert_allclose(scores, expected)
    # The map's own order deletes fastest: its area is below any other ordering's.
    area = am.curve_area(scores)
    for seed in range(5):
        other = am.random_order(30, np.random.default_rng(seed))
        s = (am.perturbation_series(image, 0 * image, other, steps, "deletion")[..., 0] * w).sum(
            axis=(1, 2)
        )
        assert area <= am.curve_area(s) + 1e-12
    # Insertion is the mirror image: Σ of the inserted weights.
    inserted = am.perturbation_series(image, 0 * image, am.saliency_order(w), steps, "insertion")
    np.testing.assert_allclose(
        (inserted[..., 0] * w).sum(axis=(1, 2)), cumulative[am.step_counts(30, steps)]
    )


def test_curve_area_trapezoid() -> None:
    # y = t on [0, 1] → 1/2; a constant c → c; y = t^2 sampled at 4 steps → trapezoid value.
    np.testing.assert_allclose(am.curve_area(np.linspace(0, 1, 11)), 0.5)
    np.testing.assert_allclose(am.curve_area(np.full((2, 5), 0.3)), [0.3, 0.3])
    t = np.linspace(0, 1, 5)
    np.testing.assert_allclose(am.curve_area(t**2), np.trapezoid(t**2, t))


def test_rankdata_and_spearman_on_known_rankings() -> None:
    np.testing.assert_array_equal(am.rankdata(np.array([10, 30, 20, 20])), [1, 4, 2.5, 2.5])
    a = np.arange(10.0)
    assert am.spearman(a, a**3) == pytest.approx(1.0)  # monotone: rank-identical
    assert am.spearman(a, -np.exp(a)) == pytest.approx(-1.0)
    # [1,2,3,4,5] vs [2,1,4,3,5]: Σd² = 4, ρ = 1 - 6·4 / (5·24) = 0.8.
    assert am.spearman(np.array([1, 2, 3, 4, 5.0]), np.array([2, 1, 4, 3, 5.0])) == pytest.approx(
        0.8
    )
    # With ties: the Pearson correlation of the average ranks.
    x, y = np.array([1, 2, 2, 3.0]), np.array([1, 3, 2, 4.0])
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 3, 2, 4.0])
    assert am.spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    # A constant map carries no ordering: 0, not NaN.
    assert am.spearman(np.zeros(6), a[:6]) == 0.0
    # Maps of any shape compare flattened.
    assert am.spearman(a.reshape(2, 5), (2 * a).reshape(2, 5)) == pytest.approx(1.0)


def test_blur_preserves_constants_and_mean() -> None:
    const = np.full((8, 8, 3), 0.4)
    np.testing.assert_allclose(am.blur(const, 2.0), const)
    rng = np.random.default_rng(3)
    noisy = rng.uniform(size=(32, 32, 1))
    blurred = am.blur(noisy, 3.0)
    assert blurred.std() < noisy.std() / 3  # detail gone
    assert abs(blurred.mean() - noisy.mean()) < 0.02  # content kept
    np.testing.assert_array_equal(am.blur(noisy, 0.0), noisy)


def test_summary() -> None:
    s = am.summary([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert s == {"n": 4, "mean": 2.5, "median": 2.5, "q1": 1.75, "q3": 3.25, "min": 1.0, "max": 4.0}
    assert am.summary([])["n"] == 0
