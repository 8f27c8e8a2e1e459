"""SmoothGrad, Integrated Gradients and Gradient × Input served over gRPC, checked
against closed forms and an independent numpy + TensorFlow computation.

- `linear`: `s = ⟨w, x⟩ + b`, so `G = w` everywhere: SmoothGrad is `m(w)` exactly,
  IG is `(x − x') ⊙ w`, Gradient × Input is `w ⊙ x`.
- `square`: `s = ⟨w, x ⊙ x⟩ + b`, so `G = 2 w ⊙ x` depends on `x`: SmoothGrad is
  checked copy for copy against the documented noise, and IG is `w ⊙ (x² − x'²)`
  exactly (the integrand is linear in α, which the trapezoid rule integrates exactly).
- `relu`: a small ReLU net; with a backprop modifier every method is the same
  composition of the modified gradient that vanilla saliency returns.
- the bundled demo models: IG's completeness residual is small and shrinks with steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from salience_client import Objective, SalienceClient
from salience_server.demo.data import generate_roads, generate_shapes
from tests.conftest import RunningServer, save_model
from tests.integration.models import LINEAR_SHAPE, build_repository, modify, reference_map

SQUARE_SHAPE = (4, 3, 2)
MODIFIERS = ["absolute", "none", "negate", "relu"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    root = build_repository(tmp_path_factory.mktemp("noise-ig-repo"))
    keras.utils.set_random_seed(11)
    x = keras.Input(SQUARE_SHAPE, name="x")
    squared = keras.layers.Multiply(name="square")([x, x])
    flat = keras.layers.Flatten(name="flatten")(squared)
    save_model(root, "square", keras.Model(x, keras.layers.Dense(3, name="logits")(flat)))

    x = keras.Input(SQUARE_SHAPE, name="x")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(x)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(8, activation="relu", name="hidden")(h)
    save_model(root, "relu", keras.Model(x, keras.layers.Dense(3, name="logits")(h)))
    return root


@pytest.fixture(scope="module")
def client(repo: Path, server_factory: Any) -> SalienceClient:
    return server_factory(repo).client()


@pytest.fixture(scope="module")
def demo_client(demo_server: RunningServer) -> SalienceClient:
    return demo_server.client()


def kernel(repo: Path, model: str, unit: int, shape: tuple[int, ...]) -> np.ndarray:
    import keras

    loaded = keras.saving.load_model(repo / model / "1" / "model.keras", compile=False)
    weights = loaded.get_layer("logits").get_weights()[0].astype(np.float64)
    return weights[:, unit].reshape(shape)


def images(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    # Different value ranges per sample, so that per-sample noise scales differ.
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 3.0, (n, *([1] * len(shape))))
    return (rng.uniform(-1, 1, (n, *shape)) * scale).astype(np.float32)


def reference_noise(seed: int, copies: int, shape: tuple[int, ...]) -> np.ndarray:
    """The noise the documentation promises: copy j of a sample is a Philox normal
    seeded with fold_in([seed mod 2^32, seed >> 32], j)."""
    import tensorflow as tf

    key = tf.constant(np.array([seed % 2**32, seed >> 32], np.uint32).view(np.int32))
    return np.stack(
        [
            tf.random.stateless_normal(
                shape,
                seed=tf.random.experimental.stateless_fold_in(key, j, alg="philox"),
                alg="philox",
            ).numpy()
            for j in range(copies)
        ]
    )


# SmoothGrad --------------------------------------------------------------------


def test_smoothgrad_same_seed_same_maps_other_seed_other_maps(client: SalienceClient) -> None:
    x = images(SQUARE_SHAPE, 3, seed=1)
    options: dict[str, Any] = {"method": "smoothgrad", "filter_indices": [0], "samples": 6}
    first = client.explain("square", x, seed=42, **options)
    again = client.explain("square", x, seed=42, **options)
    other = client.explain("square", x, seed=43, **options)
    np.testing.assert_array_equal(first.maps["absolute"], again.maps["absolute"])
    assert np.abs(first.maps["absolute"] - other.maps["absolute"]).max() > 1e-3
    assert first.resolved.seed == 42
    assert other.resolved.seed == 43
    assert (first.resolved.samples, first.resolved.noise) == (6, pytest.approx(0.15))


def test_smoothgrad_without_seed_draws_one_and_echoes_it(client: SalienceClient) -> None:
    x = images(SQUARE_SHAPE, 2, seed=2)
    options: dict[str, Any] = {"method": "smoothgrad", "filter_indices": [1], "samples": 4}
    drawn = client.explain("square", x, **options)
    redrawn = client.explain("square", x, **options)
    assert drawn.resolved.seed is not None
    assert drawn.resolved.seed != redrawn.resolved.seed
    replay = client.explain("square", x, seed=drawn.resolved.seed, **options)
    np.testing.assert_array_equal(replay.maps["absolute"], drawn.maps["absolute"])
    assert np.abs(drawn.maps["absolute"] - redrawn.maps["absolute"]).max() > 1e-3


@pytest.mark.parametrize("normalize", [False, True])
def test_smoothgrad_of_a_linear_model_is_the_modified_weights(
    client: SalienceClient, repo: Path, normalize: bool
) -> None:
    # G = w at every noisy copy, so the mean of m(G) is m(w) exactly, whatever the noise.
    w = kernel(repo, "linear", 2, LINEAR_SHAPE)
    x = images(LINEAR_SHAPE, 3, seed=3)
    result = client.explain(
        "linear",
        x,
        method="smoothgrad",
        filter_indices=[2],
        grad_modifiers=[*MODIFIERS, "small_values"],
        normalize=normalize,
        noise=0.5,
        seed=7,
    )
    assert result.resolved.samples == 16  # the default
    for modifier in [*MODIFIERS, "small_values"]:
        want = reference_map(np.broadcast_to(w, x.shape), modifier, False, normalize)
        np.testing.assert_allclose(result.maps[modifier], want, rtol=1e-4, atol=1e-5)


# 3 samples x 100 copies is 300 rows: the device runs them in several chunks.
@pytest.mark.parametrize("copies", [5, 100])
def test_smoothgrad_is_the_mean_of_modified_gradients_at_the_documented_noise(
    client: SalienceClient, repo: Path, copies: int
) -> None:
    w = kernel(repo, "square", 1, SQUARE_SHAPE)
    x = images(SQUARE_SHAPE, 3, seed=4)
    seed, sigma = 2**40 + 12345, 0.3
    result = client.explain(
        "square",
        x,
        method="smoothgrad",
        filter_indices=[1],
        grad_modifiers=MODIFIERS,
        keepdims=True,
        normalize=False,
        samples=copies,
        noise=sigma,
        seed=seed,
    )
    noise = reference_noise(seed, copies, SQUARE_SHAPE).astype(np.float64)
    spread = (x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3))).astype(np.float64)
    # noisy[b, j] = x_b + ε_j · σ · (max x_b − min x_b); G = 2 w ⊙ noisy.
    noisy = (
        x[:, None].astype(np.float64) + noise[None] * (sigma * spread)[:, None, None, None, None]
    )
    grads = 2 * w * noisy
    for modifier in MODIFIERS:
        # The modifier applies to every copy's gradient before the mean.
        want = modify(grads, modifier).mean(axis=1)
        np.testing.assert_allclose(result.maps[modifier], want, rtol=1e-4, atol=1e-5)
    # |mean G| would be a different map: the modifier really comes first.
    assert np.abs(result.maps["absolute"] - np.abs(grads.mean(axis=1))).max() > 1e-3


def test_smoothgrad_without_noise_is_vanilla_saliency(client: SalienceClient) -> None:
    x = images(SQUARE_SHAPE, 2, seed=5)
    smooth = client.explain(
        "square", x, method="smoothgrad", filter_indices=[2], noise=0.0, samples=3, seed=1
    )
    vanilla = client.explain("square", x, filter_indices=[2])
    np.testing.assert_allclose(smooth.maps["absolute"], vanilla.maps["absolute"], atol=1e-6)


# Integrated Gradients --------------------------------------------------------------


def test_integrated_gradients_of_a_linear_model_is_exact(
    client: SalienceClient, repo: Path
) -> None:
    w = kernel(repo, "linear", 3, LINEAR_SHAPE)
    x = images(LINEAR_SHAPE, 3, seed=6)
    one = np.random.default_rng(8).uniform(-1, 1, LINEAR_SHAPE).astype(np.float32)
    per_sample = np.random.default_rng(9).uniform(-1, 1, x.shape).astype(np.float32)
    for baseline in (None, one, per_sample):
        result = client.explain(
            "linear",
            x,
            method="integrated-gradients",
            filter_indices=[3],
            grad_modifiers=["none"],
            keepdims=True,
            normalize=False,
            baseline=baseline,
            steps=5,
        )
        base = np.zeros(LINEAR_SHAPE) if baseline is None else baseline.astype(np.float64)
        delta = x.astype(np.float64) - base
        np.testing.assert_allclose(result.maps["none"], delta * w, rtol=1e-5, atol=1e-6)
        difference = (delta * w).sum(axis=(1, 2, 3))
        assert result.score_difference is not None
        assert result.completeness_residual is not None
        np.testing.assert_allclose(result.score_difference, difference, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(result.completeness_residual, 0, atol=1e-5)
        assert result.resolved.steps == 5


def test_integrated_gradients_of_a_quadratic_score_is_exact(
    client: SalienceClient, repo: Path
) -> None:
    # ∫₀¹ 2w(x' + α(x − x')) dα ⊙ (x − x') = w ⊙ (x² − x'²): the integrand is linear in α,
    # which the trapezoid rule integrates exactly with any number of steps.
    w = kernel(repo, "square", 0, SQUARE_SHAPE)
    x = images(SQUARE_SHAPE, 2, seed=10)
    baseline = np.random.default_rng(11).uniform(-1, 1, SQUARE_SHAPE).astype(np.float32)
    result = client.explain(
        "square",
        x,
        method="integrated-gradients",
        filter_indices=[0],
        grad_modifiers=["none", "absolute"],
        keepdims=True,
        normalize=False,
        baseline=baseline,
        steps=3,
    )
    want = w * (x.astype(np.float64) ** 2 - baseline.astype(np.float64) ** 2)
    np.testing.assert_allclose(result.maps["none"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.maps["absolute"], np.abs(want), rtol=1e-5, atol=1e-6)
    assert result.score_difference is not None
    np.testing.assert_allclose(result.score_difference, want.sum(axis=(1, 2, 3)), rtol=1e-5)
    assert result.completeness_residual is not None
    np.testing.assert_allclose(result.completeness_residual, 0, atol=1e-5)


def test_integrated_gradients_default_steps_and_normalised_maps(
    client: SalienceClient, repo: Path
) -> None:
    w = kernel(repo, "linear", 0, LINEAR_SHAPE)
    x = images(LINEAR_SHAPE, 2, seed=12)
    result = client.explain("linear", x, method="integrated-gradients", filter_indices=[0])
    assert result.resolved.steps == 64
    want = reference_map(x.astype(np.float64) * w, "absolute", False, True)
    np.testing.assert_allclose(result.maps["absolute"], want, atol=1e-4)


def _ig_residuals(
    client: SalienceClient, model: str, groups: list[tuple[np.ndarray, int]], steps: int
) -> tuple[np.ndarray, np.ndarray]:
    residuals, differences = [], []
    for x, unit in groups:
        result = client.explain(
            model, x, method="integrated-gradients", filter_indices=[unit], steps=steps
        )
        assert result.completeness_residual is not None
        assert result.score_difference is not None
        residuals.append(result.completeness_residual)
        differences.append(result.score_difference)
    return np.concatenate(residuals), np.concatenate(differences)


def test_integrated_gradients_completeness_on_the_demo_models(
    demo_client: SalienceClient,
) -> None:
    shapes = generate_shapes(8, seed=2024)
    roads = generate_roads(8, seed=77)
    cases = {
        # Each image explained on its own class's logit.
        "shapes": [
            (shapes.images[shapes.labels == label], int(label))
            for label in np.unique(shapes.labels)
        ],
        "steering": [(roads.images, 0)],
    }
    for model, groups in cases.items():
        ratios = []
        for steps in (16, 64, 256):
            residual, difference = _ig_residuals(demo_client, model, groups, steps)
            # Σ|residual| / Σ|s(x) − s(x')| over the batch: robust to a sample whose
            # score barely changes along the path.
            ratio = float(np.abs(residual).sum() / np.abs(difference).sum())
            ratios.append(ratio)
            print(
                f"IG completeness {model} steps={steps}: residual/|score difference| = "
                f"{ratio:.5f} (per sample max {np.max(np.abs(residual / difference)):.5f})"
            )
        assert ratios[1] < 0.05, (model, ratios)
        assert ratios[0] > ratios[1] > ratios[2], (model, ratios)


# Gradient × Input ------------------------------------------------------------------


def test_gradient_x_input_closed_forms(client: SalienceClient, repo: Path) -> None:
    w_lin = kernel(repo, "linear", 1, LINEAR_SHAPE)
    x = images(LINEAR_SHAPE, 3, seed=13)
    linear = client.explain(
        "linear",
        x,
        method="gradient-x-input",
        filter_indices=[1],
        grad_modifiers=["none", "absolute"],
        keepdims=True,
        normalize=False,
    )
    np.testing.assert_allclose(linear.maps["none"], w_lin * x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(linear.maps["absolute"], np.abs(w_lin * x), rtol=1e-5, atol=1e-6)
    assert linear.completeness_residual is None

    w_sq = kernel(repo, "square", 2, SQUARE_SHAPE)
    xs = images(SQUARE_SHAPE, 2, seed=14)
    square = client.explain(
        "square",
        xs,
        method="gradient-x-input",
        objectives=[Objective("logits", [2], -1.0)],
        grad_modifiers=["relu"],
    )
    # G ⊙ x = −2 w x², then relu, channel max and per-sample normalisation.
    want = reference_map(-2 * w_sq * xs.astype(np.float64) ** 2, "relu", False, True)
    np.testing.assert_allclose(square.maps["relu"], want, atol=1e-4)


# Backprop modifiers ----------------------------------------------------------------


@pytest.mark.parametrize("backprop_modifier", ["guided", "rectified"])
def test_methods_compose_the_modified_gradient(
    client: SalienceClient, backprop_modifier: str
) -> None:
    x = images(SQUARE_SHAPE, 3, seed=15)
    common: dict[str, Any] = {
        "filter_indices": [1],
        "grad_modifiers": ["none"],
        "keepdims": True,
        "normalize": False,
        "backprop_modifier": backprop_modifier,
    }

    def modified_gradient(at: np.ndarray) -> np.ndarray:
        result = client.explain("relu", at, **common)
        assert result.resolved.backprop_modifier == backprop_modifier
        return result.maps["none"].astype(np.float64)

    g = modified_gradient(x)
    plain = client.explain("relu", x, **{**common, "backprop_modifier": ""}).maps["none"]
    assert np.abs(g - plain).max() > 1e-4  # the modifier changes this model's gradient

    smooth = client.explain("relu", x, method="smoothgrad", noise=0.0, samples=2, **common)
    np.testing.assert_allclose(smooth.maps["none"], g, rtol=1e-5, atol=1e-6)
    assert smooth.resolved.backprop_modifier == backprop_modifier

    product = client.explain("relu", x, method="gradient-x-input", **common)
    np.testing.assert_allclose(product.maps["none"], g * x, rtol=1e-5, atol=1e-6)

    # One trapezoid step: (x − x') ⊙ (G(x') + G(x)) / 2.
    baseline = np.full(SQUARE_SHAPE, 0.1, np.float32)
    ig = client.explain(
        "relu", x, method="integrated-gradients", steps=1, baseline=baseline, **common
    )
    g_base = modified_gradient(np.stack([baseline] * len(x)))
    want = (x - baseline) * (g + g_base) / 2
    np.testing.assert_allclose(ig.maps["none"], want, rtol=1e-5, atol=1e-6)
