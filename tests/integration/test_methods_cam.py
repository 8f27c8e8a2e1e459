"""Grad-CAM, Grad-CAM++ and Guided Grad-CAM, served over gRPC, against their formulas
computed independently in numpy (closed-form gradients, numpy resizing), the
penultimate-layer rules, and the requests these methods must refuse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from salience_client import Objective, SalienceClient
from salience_client.client import SalienceError
from tests.conftest import save_model

EPS = 1e-7
SHAPE = (8, 8, 3)
CAM_METHODS = ["gradcam", "gradcam++", "guided-gradcam"]


def conv_stem(x: Any) -> Any:
    import keras

    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv_a")(x)
    return keras.layers.Conv2D(5, 3, strides=2, padding="same", activation="relu", name="conv_b")(h)


def build_models(root: Path) -> Path:
    """`cam_flat`: conv_a → conv_b (4×4×5) → Flatten → Dense logits (∂s/∂A is a kernel
    column); `cam_pool`: the same stem → MaxPool to 1×1 → softmax head, plus a side
    branch; `cam_1d`, `cam_3d`: Conv1D and Conv3D nets; `dense_only`: no layer with
    spatial extent."""
    import keras

    keras.utils.set_random_seed(21)
    x = keras.Input(SHAPE, name="x")
    h = keras.layers.Flatten(name="flat")(conv_stem(x))
    save_model(root, "cam_flat", keras.Model(x, keras.layers.Dense(3, name="logits")(h)))

    x = keras.Input(SHAPE, name="x")
    h = keras.layers.MaxPooling2D(4, name="pool")(conv_stem(x))
    h = keras.layers.Flatten(name="flat")(h)
    probs = keras.layers.Dense(3, activation="softmax", name="probs")(h)
    side = keras.layers.Conv2D(2, 3, padding="same", name="side")(x)
    save_model(root, "cam_pool", keras.Model(x, [probs, side]))

    x = keras.Input((16, 2), name="x")
    h = keras.layers.Conv1D(3, 3, padding="same", activation="relu", name="c1")(x)
    h = keras.layers.Conv1D(4, 3, strides=2, padding="same", activation="relu", name="c2")(h)
    h = keras.layers.Flatten(name="flat")(h)
    save_model(root, "cam_1d", keras.Model(x, keras.layers.Dense(2, name="logits")(h)))

    x = keras.Input((4, 6, 6, 1), name="x")
    h = keras.layers.Conv3D(2, 3, padding="same", activation="relu", name="c1")(x)
    h = keras.layers.Conv3D(3, 3, strides=2, padding="same", activation="relu", name="c2")(h)
    h = keras.layers.Flatten(name="flat")(h)
    save_model(root, "cam_3d", keras.Model(x, keras.layers.Dense(2, name="logits")(h)))

    x = keras.Input((4, 4, 3), name="x")
    h = keras.layers.Flatten(name="flat")(x)
    save_model(root, "dense_only", keras.Model(x, keras.layers.Dense(2, name="logits")(h)))
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models(tmp_path_factory.mktemp("cam-repo"))


@pytest.fixture(scope="module")
def client(repo: Path, server_factory: Any) -> SalienceClient:
    return server_factory(repo).client()


@pytest.fixture(scope="module")
def models(repo: Path) -> dict[str, Any]:
    import keras

    return {
        name: keras.saving.load_model(repo / name / "1" / "model.keras", compile=False)
        for name in ("cam_flat", "cam_pool", "cam_1d", "cam_3d")
    }


def images(n: int, seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, *shape)).astype(np.float32)


def activations(model: Any, layer: str, x: np.ndarray) -> np.ndarray:
    import keras

    return keras.Model(model.input, model.get_layer(layer).output)(x).numpy().astype(np.float64)


def flat_gradient(model: Any, layer_shape: tuple[int, ...], unit: int, n: int) -> np.ndarray:
    """∂logit/∂A for `Flatten → Dense`: the unit's kernel column, for every sample."""
    kernel, _ = model.get_layer("logits").get_weights()
    return np.broadcast_to(
        kernel[:, unit].astype(np.float64).reshape(layer_shape), (n, *layer_shape)
    )


def resize_linear(a: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Separable linear interpolation of (B, *spatial) maps with half-pixel centres."""
    for axis, out in enumerate(size, start=1):
        n = a.shape[axis]
        src = np.clip((np.arange(out) + 0.5) * n / out - 0.5, 0, n - 1)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n - 1)
        frac = (src - low).reshape([-1 if k == axis else 1 for k in range(a.ndim)])
        a = np.take(a, low, axis=axis) * (1 - frac) + np.take(a, high, axis=axis) * frac
    return a


def normalise(s: np.ndarray) -> np.ndarray:
    axes = tuple(range(1, s.ndim))
    low, high = s.min(axis=axes, keepdims=True), s.max(axis=axes, keepdims=True)
    return (s - low) / (high - low + EPS)


MODIFY = {"none": lambda g: g, "absolute": np.abs, "relu": lambda g: np.maximum(g, 0)}


def gradcam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    alpha = g.mean(axis=tuple(range(1, g.ndim - 1)), keepdims=True)
    return np.maximum((a * alpha).sum(axis=-1), 0)


def gradcam_plus_plus(a: np.ndarray, g: np.ndarray, score: np.ndarray) -> np.ndarray:
    """tf-keras-vis's GradcamPlusPlus, literally, in float64."""
    spatial = tuple(range(1, g.ndim - 1))
    e = np.exp(score).reshape(-1, *([1] * (g.ndim - 1)))
    first, second, third = e * g, e * g**2, e * g**3
    global_sum = a.sum(axis=spatial, keepdims=True)
    denominator = second * 2.0 + third * global_sum
    denominator = denominator + (second == 0.0)
    alphas = second / denominator
    norm = alphas.sum(axis=spatial, keepdims=True)
    alphas = alphas / (norm + (norm == 0.0))
    weights = (np.maximum(first, 0) * alphas).sum(axis=spatial, keepdims=True)
    return np.maximum((weights * a).sum(axis=-1), 0)


def flat_scores(model: Any, a: np.ndarray, unit: int) -> np.ndarray:
    kernel, bias = model.get_layer("logits").get_weights()
    return a.reshape(len(a), -1) @ kernel[:, unit].astype(np.float64) + bias[unit]


# Formulas ------------------------------------------------------------------------


@pytest.mark.parametrize("modifier", ["none", "absolute", "relu"])
@pytest.mark.parametrize("normalize", [False, True])
def test_gradcam_matches_its_formula(
    client: SalienceClient, models: dict[str, Any], modifier: str, normalize: bool
) -> None:
    x = images(3, seed=1)
    result = client.explain(
        "cam_flat",
        x,
        method="gradcam",
        filter_indices=[1],
        grad_modifiers=[modifier],
        normalize=normalize,
    )
    a = activations(models["cam_flat"], "conv_b", x)
    g = flat_gradient(models["cam_flat"], (4, 4, 5), 1, len(x))
    want = resize_linear(gradcam(a, MODIFY[modifier](g)), (8, 8))
    if normalize:
        np.testing.assert_allclose(result.maps[modifier], normalise(want), atol=1e-5)
    else:
        np.testing.assert_allclose(result.maps[modifier], want, rtol=1e-4, atol=1e-7)
    assert result.maps[modifier].shape == (3, 8, 8)
    assert result.resolved.penultimate_layer == "conv_b"
    assert result.resolved.channels_reduced


@pytest.mark.parametrize("modifier", ["none", "absolute"])
def test_gradcam_plus_plus_matches_tf_keras_vis_formulas(
    client: SalienceClient, models: dict[str, Any], modifier: str
) -> None:
    x = images(3, seed=2)
    raw = client.explain(
        "cam_flat",
        x,
        method="gradcam++",
        filter_indices=[2],
        grad_modifiers=[modifier],
        normalize=False,
    )
    normalized = client.explain(
        "cam_flat", x, method="gradcam++", filter_indices=[2], grad_modifiers=[modifier]
    )
    a = activations(models["cam_flat"], "conv_b", x)
    g = MODIFY[modifier](flat_gradient(models["cam_flat"], (4, 4, 5), 2, len(x)))
    cam = gradcam_plus_plus(a, g, flat_scores(models["cam_flat"], a, 2))
    assert cam.max() > 0
    want = resize_linear(cam, (8, 8))
    np.testing.assert_allclose(raw.maps[modifier], want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(normalized.maps[modifier], normalise(want), atol=1e-5)


def test_gradcam_plus_plus_does_not_overflow_on_large_scores(
    client: SalienceClient, models: dict[str, Any]
) -> None:
    """exp(s) overflows float32 beyond s ≈ 88; the normalised map must not care."""
    x = images(2, seed=3)
    weight = 400.0
    result = client.explain(
        "cam_flat", x, method="gradcam++", objectives=[Objective("logits", [0], weight)]
    )
    a = activations(models["cam_flat"], "conv_b", x)
    score = weight * flat_scores(models["cam_flat"], a, 0)
    assert np.abs(score).max() > 89  # float32 exp(score) would be inf or 0
    g = weight * flat_gradient(models["cam_flat"], (4, 4, 5), 0, len(x))
    want = normalise(resize_linear(gradcam_plus_plus(a, g, score), (8, 8)))
    assert np.isfinite(result.maps["none"]).all()
    np.testing.assert_allclose(result.maps["none"], want, atol=1e-5)


def test_gradcam_through_max_pooling_and_logits(
    client: SalienceClient, models: dict[str, Any]
) -> None:
    """`cam_pool`: s = Σ_k W[k, c] · max_ij A[i, j, k] + b on the softmax's logits, so
    ∂s/∂A is W[k, c] at each channel's maximum and 0 elsewhere."""
    model = models["cam_pool"]
    x = images(2, seed=4)
    result = client.explain(
        "cam_pool", x, method="gradcam", layer="probs", filter_indices=[0], normalize=False
    )
    assert result.resolved.objectives[0].used_logits
    assert result.resolved.penultimate_layer == "conv_b"  # not the 1×1 pooling
    a = activations(model, "conv_b", x)
    kernel, _ = model.get_layer("probs").get_weights()
    flat = a.reshape(len(a), -1, a.shape[-1])
    g = np.zeros_like(flat)
    for b in range(len(a)):
        for k in range(a.shape[-1]):
            g[b, flat[b, :, k].argmax(), k] = kernel[k, 0]
    want = resize_linear(gradcam(a, g.reshape(a.shape)), (8, 8))
    np.testing.assert_allclose(result.maps["none"], want, rtol=1e-4, atol=1e-7)


def test_penultimate_of_input_size_needs_no_resizing(
    client: SalienceClient, models: dict[str, Any]
) -> None:
    import tensorflow as tf

    model = models["cam_flat"]
    x = images(2, seed=5)
    by_name = client.explain(
        "cam_flat",
        x,
        method="gradcam",
        filter_indices=[0],
        penultimate_layer="conv_a",
        normalize=False,
    )
    by_index = client.explain(
        "cam_flat", x, method="gradcam", filter_indices=[0], penultimate_layer=1, normalize=False
    )
    assert by_name.resolved.penultimate_layer == "conv_a"
    assert by_index.resolved.penultimate_layer == "conv_a"
    np.testing.assert_array_equal(by_name.maps["none"], by_index.maps["none"])
    # ∂s/∂A by differentiating the model's tail on A, independently of the server.
    a = tf.constant(activations(model, "conv_a", x).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(a)
        tail = model.get_layer("logits")(model.get_layer("flat")(model.get_layer("conv_b")(a)))
        score = tf.reduce_sum(tail[:, 0])
    g = tape.gradient(score, a).numpy().astype(np.float64)
    want = gradcam(a.numpy().astype(np.float64), g)  # 8×8 already: no resizing
    np.testing.assert_allclose(by_name.maps["none"], want, rtol=1e-4, atol=1e-7)


def test_one_dimensional_cam_is_resized_linearly(
    client: SalienceClient, models: dict[str, Any]
) -> None:
    x = images(2, seed=6, shape=(16, 2))
    result = client.explain("cam_1d", x, method="gradcam", filter_indices=[1], normalize=False)
    assert result.resolved.penultimate_layer == "c2"
    a = activations(models["cam_1d"], "c2", x)
    g = flat_gradient(models["cam_1d"], (8, 4), 1, len(x))
    want = resize_linear(gradcam(a, g), (16,))
    assert result.maps["none"].shape == (2, 16)
    np.testing.assert_allclose(result.maps["none"], want, rtol=1e-4, atol=1e-7)


def test_three_dimensional_cam_is_resized_linearly(
    client: SalienceClient, models: dict[str, Any]
) -> None:
    x = images(2, seed=11, shape=(4, 6, 6, 1))
    result = client.explain("cam_3d", x, method="gradcam", filter_indices=[0], normalize=False)
    assert result.resolved.penultimate_layer == "c2"
    a = activations(models["cam_3d"], "c2", x)
    g = flat_gradient(models["cam_3d"], (2, 3, 3, 3), 0, len(x))
    want = resize_linear(gradcam(a, g), (4, 6, 6))
    assert want.max() > 0
    np.testing.assert_allclose(result.maps["none"], want, rtol=1e-4, atol=1e-7)


def guided_input_gradient(model: Any, x: np.ndarray, unit: int) -> np.ndarray:
    """tf-keras-vis's guided backprop (an implementation independent of the server)."""
    from tf_keras_vis.saliency import Saliency
    from tf_keras_vis.utils.model_modifiers import GuidedBackpropagation
    from tf_keras_vis.utils.scores import CategoricalScore

    saliency = Saliency(model, model_modifier=GuidedBackpropagation(), clone=True)
    grads = saliency(
        CategoricalScore([unit] * len(x)),
        x,
        gradient_modifier=None,
        keepdims=True,
        normalize_map=False,
    )
    return np.asarray(grads, dtype=np.float64)


@pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")
def test_guided_gradcam_is_guided_gradient_times_upsampled_cam(
    client: SalienceClient, models: dict[str, Any]
) -> None:
    model = models["cam_flat"]
    x = images(2, seed=7)
    raw = client.explain(
        "cam_flat",
        x,
        method="guided-gradcam",
        filter_indices=[1],
        grad_modifiers=["none"],
        keepdims=True,
        normalize=False,
    )
    default = client.explain("cam_flat", x, method="guided-gradcam", filter_indices=[1])
    a = activations(model, "conv_b", x)
    cam = resize_linear(gradcam(a, flat_gradient(model, (4, 4, 5), 1, len(x))), (8, 8))
    guided = guided_input_gradient(model, x, 1)
    assert (guided != 0).any()
    product = guided * cam[..., None]
    np.testing.assert_allclose(raw.maps["none"], product, rtol=1e-4, atol=1e-7)
    # Then finished like a gradient map: |P|, channel max, per-sample min-max.
    assert list(default.maps) == ["absolute"]
    np.testing.assert_allclose(
        default.maps["absolute"], normalise(np.abs(product).max(axis=-1)), atol=1e-5
    )
    assert default.resolved.backprop_modifier == "guided"
    assert default.resolved.penultimate_layer == "conv_b"


def test_a_cam_is_the_same_alone_or_in_a_batch(client: SalienceClient) -> None:
    x = images(4, seed=8)
    for method in CAM_METHODS:
        batch = client.explain("cam_flat", x, method=method, filter_indices=[2])
        alone = client.explain("cam_flat", x[1:2], method=method, filter_indices=[2])
        for name, m in batch.maps.items():
            np.testing.assert_allclose(alone.maps[name][0], m[1], atol=1e-6)


def test_default_modifier_and_uint8(client: SalienceClient) -> None:
    x = images(1, seed=9)
    float_map = client.explain("cam_flat", x, method="gradcam", filter_indices=[0])
    quantised = client.explain(
        "cam_flat", x, method="gradcam", filter_indices=[0], output_dtype="uint8"
    )
    assert list(float_map.maps) == ["none"]
    assert quantised.maps["none"].dtype == np.uint8
    np.testing.assert_array_equal(
        quantised.maps["none"], np.round(float_map.maps["none"] * 255).astype(np.uint8)
    )


# Which models and layers a CAM can use -------------------------------------------


def test_metadata_lists_cam_methods_only_for_models_that_support_them(
    client: SalienceClient,
) -> None:
    for model in ("cam_flat", "cam_pool", "cam_1d", "cam_3d"):
        assert set(CAM_METHODS) <= set(client.metadata(model).methods), model
    methods = list(client.metadata("dense_only").methods)
    assert "vanilla" in methods
    assert not set(CAM_METHODS) & set(methods)


@pytest.mark.parametrize("method", CAM_METHODS)
def test_a_model_without_spatial_layers_cannot_use_cam(client: SalienceClient, method: str) -> None:
    with pytest.raises(SalienceError) as caught:
        client.explain("dense_only", images(1, 0, (4, 4, 3)), method=method)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"explanation.method={method!r} cannot explain model 'dense_only'" in (
        caught.value.details
    )
    assert "spatial extent larger than 1×1" in caught.value.details


@pytest.mark.parametrize(
    ("model", "options", "fragments"),
    [
        (
            "cam_pool",
            {"layer": "probs", "penultimate_layer": "pool"},
            [
                "explanation.penultimate_layer.name='pool'",
                "spatial extent is 1×1",
                "choose one of 'conv_a', 'conv_b'",
            ],
        ),
        (
            "cam_flat",
            {"penultimate_layer": "flat"},
            ["penultimate_layer.name='flat'", "no spatial extent", "'conv_a', 'conv_b'"],
        ),
        (
            "cam_flat",
            {"penultimate_layer": -1},
            ["penultimate_layer.index=-1", "layer 'logits'", "no spatial extent"],
        ),
        (
            "cam_pool",
            {"layer": "probs", "penultimate_layer": "side"},
            ["penultimate_layer.name='side'", "another branch", "'conv_a', 'conv_b'"],
        ),
        (
            "cam_flat",
            {"layer": "conv_a", "filter_indices": [0], "penultimate_layer": "conv_b"},
            ["penultimate_layer.name='conv_b'", "comes after it", "choose one of none"],
        ),
        (
            "cam_flat",
            {"layer": "conv_a", "filter_indices": [0]},
            ["no layer that the objectives' layer 'conv_a' is computed from", "1×1"],
        ),
        (
            "cam_flat",
            {"penultimate_layer": "nope"},
            ["penultimate_layer.name='nope' is not a layer", "'conv_b'"],
        ),
        (
            "cam_flat",
            {"method": "guided-gradcam", "backprop_modifier": "rectified"},
            ["backprop_modifier='rectified' does not apply", "always uses 'guided'"],
        ),
        (
            "cam_flat",
            {"method": "vanilla", "penultimate_layer": "conv_b"},
            ["explanation.penultimate_layer does not apply to method 'vanilla'"],
        ),
    ],
)
def test_bad_cam_layers_are_refused_with_the_candidates(
    client: SalienceClient, model: str, options: dict[str, Any], fragments: list[str]
) -> None:
    options = {"method": "gradcam", **options}
    with pytest.raises(SalienceError) as caught:
        client.explain(model, images(1, 0), **options)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details
    for fragment in fragments:
        assert fragment in caught.value.details


def test_guided_gradcam_accepts_its_own_modifier(client: SalienceClient) -> None:
    x = images(1, seed=10)
    named = client.explain(
        "cam_flat", x, method="guided-gradcam", filter_indices=[0], backprop_modifier="guided"
    )
    default = client.explain("cam_flat", x, method="guided-gradcam", filter_indices=[0])
    np.testing.assert_array_equal(named.maps["absolute"], default.maps["absolute"])
