"""Maps served over gRPC equal the reference semantics, number for number.

Closed forms on linear models (G = w exactly), finite differences on a float64
conv net, weighted objectives, logits vs activations, and batch independence.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from salience_client import Objective, SalienceClient
from tests.integration.models import (
    LINEAR_SHAPE,
    SMOOTH_SHAPE,
    build_repository,
    reference_map,
)

MODIFIERS = ["absolute", "none", "negate", "relu", "invert", "small_values"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("numerics-repo"))


@pytest.fixture(scope="module")
def client(repo: Path, server_factory: Any) -> SalienceClient:
    return server_factory(repo).client()


@pytest.fixture(scope="module")
def keras_models(repo: Path) -> dict[str, Any]:
    import keras

    return {
        name: keras.saving.load_model(repo / name / "1" / "model.keras", compile=False)
        for name in ("linear", "softmax", "smooth")
    }


def dense_weights(model: Any, layer: str) -> tuple[np.ndarray, np.ndarray]:
    kernel, bias = model.get_layer(layer).get_weights()
    return kernel.astype(np.float64), bias.astype(np.float64)


def images(shape: tuple[int, ...], n: int, seed: int, dtype: str = "float32") -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, *shape)).astype(dtype)


def assert_maps_match(got: np.ndarray, want: np.ndarray, normalize: bool) -> None:
    assert got.shape == want.shape
    if normalize:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("keepdims", "normalize"), list(itertools.product([False, True], [True, False]))
)
def test_linear_model_every_modifier_matches_closed_form(
    client: SalienceClient, keras_models: dict[str, Any], keepdims: bool, normalize: bool
) -> None:
    kernel, _ = dense_weights(keras_models["linear"], "logits")
    x = images(LINEAR_SHAPE, 3, seed=1)
    result = client.explain(
        "linear",
        x,
        filter_indices=[1, 3],
        grad_modifiers=MODIFIERS,
        keepdims=keepdims,
        normalize=normalize,
    )
    # s = <w1 + w3, x> + b: the gradient is the same for every sample.
    g = np.broadcast_to((kernel[:, 1] + kernel[:, 3]).reshape(LINEAR_SHAPE), x.shape)
    assert list(result.maps) == MODIFIERS
    for modifier in MODIFIERS:
        want = reference_map(g, modifier, keepdims, normalize)
        assert_maps_match(result.maps[modifier], want, normalize)
    assert result.resolved.channels_reduced is (not keepdims)
    assert result.resolved.normalize is normalize


def test_weighted_objectives_sum_into_one_contrastive_score(
    client: SalienceClient, keras_models: dict[str, Any]
) -> None:
    kernel, _ = dense_weights(keras_models["linear"], "logits")
    x = images(LINEAR_SHAPE, 2, seed=2)
    objectives = [Objective("logits", [0], 2.0), Objective(-1, [2], -1.0), Objective(2, [0, 0])]
    result = client.explain(
        "linear", x, objectives=objectives, grad_modifiers=["none"], normalize=False, keepdims=True
    )
    g = (2 * kernel[:, 0] - kernel[:, 2] + 2 * kernel[:, 0]).reshape(LINEAR_SHAPE)
    np.testing.assert_allclose(result.maps["none"], np.broadcast_to(g, x.shape), rtol=1e-5)
    names = [(o.layer_name, o.layer_index, o.weight) for o in result.resolved.objectives]
    assert names == [("logits", 2, 2.0), ("logits", 2, -1.0), ("logits", 2, 1.0)]


def test_no_filter_index_explains_the_mean_of_the_layer(
    client: SalienceClient, keras_models: dict[str, Any]
) -> None:
    kernel, _ = dense_weights(keras_models["linear"], "logits")
    result = client.explain(
        "linear",
        images(LINEAR_SHAPE, 1, 3),
        grad_modifiers=["none"],
        normalize=False,
        keepdims=True,
    )
    np.testing.assert_allclose(
        result.maps["none"][0], kernel.mean(axis=1).reshape(LINEAR_SHAPE), rtol=1e-5
    )
    assert result.resolved.objectives[0].reduction == "layer_mean"


def test_softmax_head_is_explained_on_its_logits_by_default(
    client: SalienceClient, keras_models: dict[str, Any]
) -> None:
    kernel, bias = dense_weights(keras_models["softmax"], "probs")
    x = images(LINEAR_SHAPE, 2, seed=4)
    logits_map = client.explain(
        "softmax", x, filter_indices=[2], grad_modifiers=["none"], normalize=False, keepdims=True
    )
    assert logits_map.resolved.objectives[0].used_logits is True
    np.testing.assert_allclose(
        logits_map.maps["none"],
        np.broadcast_to(kernel[:, 2].reshape(LINEAR_SHAPE), x.shape),
        rtol=1e-5,
    )
    # With the activation kept: d p_2 / dx = p_2 (w_2 - sum_k p_k w_k).
    kept = client.explain(
        "softmax",
        x,
        filter_indices=[2],
        grad_modifiers=["none"],
        normalize=False,
        keepdims=True,
        keep_activation=True,
    )
    assert kept.resolved.objectives[0].used_logits is False
    flat = x.reshape(len(x), -1).astype(np.float64)
    z = flat @ kernel + bias
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = p[:, 2:3] * (kernel[:, 2][None, :] - p @ kernel.T)
    np.testing.assert_allclose(kept.maps["none"], g.reshape(x.shape), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(kept.predictions, p, rtol=1e-5)


def smooth_score(model: Any, x: np.ndarray, layer: str, units: list[int], logits: bool) -> float:
    """The per-sample score computed directly with Keras, in float64."""
    import keras

    if logits:
        hidden = keras.Model(model.inputs, model.get_layer("hidden").output)(x).numpy()
        kernel, bias = model.get_layer(layer).get_weights()
        a = hidden @ kernel + bias
    else:
        a = keras.Model(model.inputs, model.get_layer(layer).output)(x).numpy()
    pooled = a.mean(axis=tuple(range(1, a.ndim - 1))) if a.ndim > 2 else a
    return float(pooled[0, units].sum())


@pytest.mark.parametrize(
    ("layer", "units", "logits"),
    [("conv", [1], False), ("conv2", [0, 2], False), ("hidden", [3, 4], False), (-1, [1], True)],
)
def test_gradient_matches_central_finite_differences(
    client: SalienceClient, keras_models: dict[str, Any], layer: Any, units: list[int], logits: bool
) -> None:
    model = keras_models["smooth"]
    x = images(SMOOTH_SHAPE, 1, seed=5, dtype="float64")
    result = client.explain(
        "smooth",
        x,
        layer=layer,
        filter_indices=units,
        grad_modifiers=["none"],
        normalize=False,
        keepdims=True,
    )
    assert result.resolved.objectives[0].used_logits is logits
    name = layer if isinstance(layer, str) else "out"
    rng = np.random.default_rng(6)
    h = 1e-5
    for _ in range(8):
        pixel = tuple(int(rng.integers(0, d)) for d in SMOOTH_SHAPE)
        up, down = x.copy(), x.copy()
        up[(0, *pixel)] += h
        down[(0, *pixel)] -= h
        fd = (
            smooth_score(model, up, name, units, logits)
            - smooth_score(model, down, name, units, logits)
        ) / (2 * h)
        got = float(result.maps["none"][(0, *pixel)])
        assert got == pytest.approx(fd, rel=1e-4, abs=1e-8), (layer, pixel)


@pytest.mark.parametrize("model", ["smooth", "softmax"])
def test_a_sample_gets_the_same_map_alone_or_in_a_batch_of_8(
    client: SalienceClient, model: str
) -> None:
    shape = SMOOTH_SHAPE if model == "smooth" else LINEAR_SHAPE
    dtype = "float64" if model == "smooth" else "float32"
    batch = images(shape, 8, seed=8, dtype=dtype)
    options: dict[str, Any] = {"filter_indices": [1], "grad_modifiers": ["absolute", "negate"]}
    together = client.explain(model, batch, keep_activation=True, **options)
    for i in (0, 5):
        alone = client.explain(model, batch[i : i + 1], keep_activation=True, **options)
        for modifier in options["grad_modifiers"]:
            np.testing.assert_allclose(
                alone.maps[modifier][0], together.maps[modifier][i], rtol=0, atol=1e-6
            )
        np.testing.assert_allclose(alone.predictions[0], together.predictions[i], atol=1e-6)


@pytest.mark.parametrize(("dtype", "atol"), [("float16", 1e-3), ("uint8", 1)])
def test_reduced_precision_maps_match_the_float32_map(
    client: SalienceClient, dtype: str, atol: float
) -> None:
    x = images(SMOOTH_SHAPE, 2, seed=9, dtype="float64")
    full = client.explain("smooth", x, layer="conv", filter_indices=[0]).maps["absolute"]
    small = client.explain("smooth", x, layer="conv", filter_indices=[0], output_dtype=dtype)
    got = small.maps["absolute"]
    assert got.dtype == np.dtype(dtype)
    want = np.round(full * 255) if dtype == "uint8" else full
    np.testing.assert_allclose(got.astype(np.float64), want, atol=atol)
    if dtype == "uint8":
        assert got.max() == 255
        assert got.min() == 0


def test_predictions_come_with_the_maps(
    client: SalienceClient, keras_models: dict[str, Any]
) -> None:
    x = images(LINEAR_SHAPE, 4, seed=10)
    expected = keras_models["softmax"](x).numpy()
    explained = client.explain("softmax", x, filter_indices=[0])
    predicted = client.predict("softmax", x)
    np.testing.assert_allclose(explained.outputs["probs"], expected, atol=1e-6)
    np.testing.assert_allclose(predicted.outputs["probs"], expected, atol=1e-6)
    assert explained.model_version == predicted.model_version == 1


def test_steady_state_requests_do_not_retrace(server_factory: Any, repo: Path) -> None:
    running = server_factory(repo)
    runtime = running.server.core.repository.get("linear")
    with running.client() as client:
        client.explain("linear", images(LINEAR_SHAPE, 1, 0), filter_indices=[0])
        traces = runtime.traces
        for n, units in [(1, [1]), (3, [2, 3]), (5, [0]), (2, [])]:
            client.explain("linear", images(LINEAR_SHAPE, n, n), filter_indices=units)
            client.explain(
                "linear", images(LINEAR_SHAPE, n, n), objectives=[Objective(-1, units, -2.0)]
            )
        assert runtime.traces == traces
        # A different set of target layers does change the graph, once.
        client.explain("linear", images(LINEAR_SHAPE, 1, 0), layer="flatten", filter_indices=[0])
        client.explain("linear", images(LINEAR_SHAPE, 2, 0), layer="flatten", filter_indices=[9])
        assert runtime.traces == traces + 1
