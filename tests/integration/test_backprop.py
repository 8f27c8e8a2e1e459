"""Backprop modifiers and `wrt`, served over gRPC, against hand-computed gradients.

A tiny float32 network with a ReLU of every kind (a Dense `activation="relu"`, a
`ReLU(max_value=1)` layer, an `Activation("relu")` layer) is differentiated by hand
in numpy with each rule of the reference semantics; `wrt` is checked against the
same hand computation and against central finite differences on a float64 conv net.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from salience_client import Objective, SalienceClient
from salience_client.client import SalienceError
from tests.conftest import RunningServer, save_model
from tests.integration.models import SMOOTH_SHAPE, build_repository

IN = 6
CLIP = 1.0
Rule = Callable[[np.ndarray, np.ndarray], np.ndarray]

RULES: dict[str, Rule] = {
    "": lambda y, g: (y > 0) * g,
    "guided": lambda y, g: (y > 0) * (g > 0) * g,
    "rectified": lambda y, g: (g > 0) * g,
}
ODD_LAYERS = ["conv_gelu", "lrelu", "prelu", "elu", "leaky_relu_layer", "dense_swish", "soft"]


def relu_net() -> Any:
    """x → Dense(5, relu) → Dense(4) → ReLU(max 1) → Dense(4) → Activation(relu) → Dense(3)."""
    import keras

    rng = np.random.default_rng(11)
    x = keras.Input((IN,), name="x")
    h = keras.layers.Dense(5, activation="relu", name="d1")(x)
    h = keras.layers.Dense(4, name="d2")(h)
    h = keras.layers.ReLU(max_value=CLIP, name="clip")(h)
    h = keras.layers.Dense(4, name="d3")(h)
    h = keras.layers.Activation("relu", name="act")(h)
    out = keras.layers.Dense(3, name="logits")(h)
    model = keras.Model(x, out)
    for name, scale in (("d1", 1.0), ("d2", 1.5), ("d3", 1.0), ("logits", 1.0)):
        layer = model.get_layer(name)
        kernel, bias = layer.get_weights()
        layer.set_weights(
            [
                rng.normal(0, scale, kernel.shape).astype("float32"),
                rng.normal(0.2, 0.3, bias.shape).astype("float32"),
            ]
        )
    return model


def squashing_net() -> Any:
    """Only tanh, sigmoid, softmax and linear: a modifier changes nothing here."""
    import keras

    keras.utils.set_random_seed(3)
    x = keras.Input((IN,), name="x")
    h = keras.layers.Dense(5, activation="tanh", name="t")(x)
    h = keras.layers.Dense(4, activation="sigmoid", name="s")(h)
    h = keras.layers.Activation("tanh", name="a")(h)
    out = keras.layers.Dense(3, activation="softmax", name="probs")(h)
    return keras.Model(x, out)


def odd_net() -> Any:
    """Activations no modifier can handle, each in a layer of its own."""
    import keras

    x = keras.Input((5, 5, 2), name="x")
    h = keras.layers.Conv2D(3, 3, activation="gelu", name="conv_gelu")(x)
    h = keras.layers.LeakyReLU(name="lrelu")(h)
    h = keras.layers.PReLU(name="prelu")(h)
    h = keras.layers.ELU(name="elu")(h)
    h = keras.layers.ReLU(negative_slope=0.1, name="leaky_relu_layer")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(4, activation="swish", name="dense_swish")(h)
    h = keras.layers.Dense(4, activation="relu", name="fine")(h)
    h = keras.layers.Activation("softplus", name="soft")(h)
    return keras.Model(x, keras.layers.Dense(2, name="out")(h))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = build_repository(tmp_path_factory.mktemp("backprop-repo"))
    save_model(root, "relu_net", relu_net())
    save_model(root, "squashing", squashing_net())
    save_model(root, "odd", odd_net())
    return root


@pytest.fixture(scope="module")
def running(repo: Path, server_factory: Any) -> RunningServer:
    return server_factory(repo)


@pytest.fixture(scope="module")
def client(running: RunningServer) -> SalienceClient:
    return running.client()


@pytest.fixture(scope="module")
def weights(repo: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    import keras

    model = keras.saving.load_model(repo / "relu_net" / "1" / "model.keras", compile=False)
    return [
        tuple(w.astype(np.float64) for w in model.get_layer(name).get_weights())
        for name in ("d1", "d2", "d3", "logits")
    ]


def samples(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, IN)).astype(np.float32)


def hand_backprop(
    weights: list[tuple[np.ndarray, np.ndarray]],
    x: np.ndarray,
    unit: int,
    rule: Rule,
    wrt: str = "x",
) -> dict[str, np.ndarray]:
    """Forward and backward pass of `relu_net` in float64, every ReLU by `rule`.

    Returns the gradient of logit `unit` with respect to `wrt`, and the
    intermediate values the test checks the network exercises.
    """
    (w1, b1), (w2, b2), (w3, b3), (w4, _) = weights
    x = x.astype(np.float64)
    z1 = x @ w1 + b1
    y1 = np.maximum(z1, 0)
    z2 = y1 @ w2 + b2
    y2 = np.clip(z2, 0, CLIP)
    active2 = np.where(z2 < CLIP, y2, 0.0)  # a saturated unit passes nothing on
    z3 = y2 @ w3 + b3
    y3 = np.maximum(z3, 0)
    g = {"act": np.broadcast_to(w4[:, unit], y3.shape)}
    g["d3"] = rule(y3, g["act"])
    g["clip"] = g["d3"] @ w3.T
    g["d2"] = rule(active2, g["clip"])
    g["d1"] = g["d2"] @ w2.T
    g["x"] = rule(y1, g["d1"]) @ w1.T
    return {"grad": g[wrt], "z1": z1, "z2": z2, "z3": z3, "upstream": g["clip"]}


def explain_raw(client: SalienceClient, model: str, x: np.ndarray, **options: Any) -> Any:
    return client.explain(
        model, x, grad_modifiers=["none"], normalize=False, keepdims=True, **options
    )


def test_the_network_exercises_every_case(weights: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Inactive, active and saturated units and negative upstream gradients all occur,
    so the rules below are told apart."""
    r = hand_backprop(weights, samples(), 0, RULES["guided"])
    assert (r["z1"] <= 0).any()
    assert (r["z1"] > 0).any()
    assert (r["z2"] <= 0).any()
    assert ((r["z2"] > 0) & (r["z2"] < CLIP)).any()
    assert (r["z2"] >= CLIP).any()
    assert (r["z3"] <= 0).any()
    assert (r["z3"] > 0).any()
    assert (r["upstream"] < 0).any()
    assert (r["upstream"] > 0).any()
    grads = {
        name: hand_backprop(weights, samples(), 0, rule)["grad"] for name, rule in RULES.items()
    }
    assert not np.allclose(grads[""], grads["guided"])
    assert not np.allclose(grads["guided"], grads["rectified"])


@pytest.mark.parametrize(
    ("modifier", "canonical"),
    [
        ("", ""),
        ("guided", "guided"),
        ("rectified", "rectified"),
        ("deconv", "rectified"),
        ("relu", "rectified"),
    ],
)
@pytest.mark.parametrize("unit", [0, 2])
def test_modifier_matches_hand_computed_gradient(
    client: SalienceClient,
    weights: list[tuple[np.ndarray, np.ndarray]],
    modifier: str,
    canonical: str,
    unit: int,
) -> None:
    x = samples()
    result = explain_raw(client, "relu_net", x, filter_indices=[unit], backprop_modifier=modifier)
    want = hand_backprop(weights, x, unit, RULES[canonical])["grad"]
    np.testing.assert_allclose(result.maps["none"], want, rtol=1e-5, atol=1e-6)
    assert result.resolved.backprop_modifier == canonical


def test_modifier_composes_with_grad_modifiers_and_normalisation(
    client: SalienceClient, weights: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    x = samples(3, seed=4)
    result = client.explain(
        "relu_net", x, filter_indices=[1], backprop_modifier="guided", grad_modifiers=["negate"]
    )
    s = -hand_backprop(weights, x, 1, RULES["guided"])["grad"]
    low, high = s.min(axis=1, keepdims=True), s.max(axis=1, keepdims=True)
    np.testing.assert_allclose(result.maps["negate"], (s - low) / (high - low + 1e-7), atol=1e-5)


def test_a_sample_gets_the_same_modified_map_alone_or_in_a_batch(client: SalienceClient) -> None:
    x = samples(4, seed=8)
    batch = explain_raw(client, "relu_net", x, filter_indices=[0], backprop_modifier="guided")
    alone = explain_raw(client, "relu_net", x[2:3], filter_indices=[0], backprop_modifier="guided")
    np.testing.assert_allclose(alone.maps["none"][0], batch.maps["none"][2], rtol=1e-6)


def test_served_model_is_unchanged_by_a_modified_copy(
    running: RunningServer, client: SalienceClient, weights: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    import keras
    import tensorflow as tf

    x = samples(4, seed=2)
    guided = explain_raw(client, "relu_net", x, filter_indices=[0], backprop_modifier="guided")
    rectified = explain_raw(
        client, "relu_net", x, filter_indices=[0], backprop_modifier="rectified"
    )
    vanilla = explain_raw(client, "relu_net", x, filter_indices=[0])
    ordinary = hand_backprop(weights, x, 0, RULES[""])["grad"]
    np.testing.assert_allclose(vanilla.maps["none"], ordinary, rtol=1e-5, atol=1e-6)
    # The predictions that came with every map are the served model's.
    for result in (guided, rectified):
        np.testing.assert_allclose(result.predictions, vanilla.predictions, rtol=1e-6)

    runtime = running.server.core.repository.get("relu_net")
    model = runtime.model
    assert model.get_layer("d1").activation is keras.activations.relu
    assert type(model.get_layer("clip")) is keras.layers.ReLU
    assert model.get_layer("act").activation is keras.activations.relu
    copies = [value for key, value in runtime.derived.items() if key[0] == "backprop-copy"]
    assert len(copies) == 2  # one per modifier, built once
    t = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(t)
        logits = model(t, training=False)
        score = tf.reduce_sum(logits[:, 0])
    np.testing.assert_allclose(tape.gradient(score, t).numpy(), ordinary, rtol=1e-5, atol=1e-6)
    for copy in copies:
        assert copy.model is not model
        assert not {id(w) for w in copy.model.weights} & {id(w) for w in model.weights}
        np.testing.assert_allclose(copy.model(t).numpy(), logits.numpy(), rtol=1e-6)


def test_sigmoid_tanh_and_softmax_pass_gradients_ordinarily(client: SalienceClient) -> None:
    x = samples(3, seed=5)
    vanilla = explain_raw(client, "squashing", x, filter_indices=[1], keep_activation=True)
    for modifier in ("guided", "rectified"):
        result = explain_raw(
            client,
            "squashing",
            x,
            filter_indices=[1],
            keep_activation=True,
            backprop_modifier=modifier,
        )
        np.testing.assert_allclose(result.maps["none"], vanilla.maps["none"], rtol=1e-6)


def test_metadata_lists_the_modifiers_each_model_supports(client: SalienceClient) -> None:
    assert list(client.metadata("relu_net").backprop_modifiers) == ["guided", "rectified"]
    assert list(client.metadata("squashing").backprop_modifiers) == ["guided", "rectified"]
    assert list(client.metadata("odd").backprop_modifiers) == []


@pytest.mark.parametrize("modifier", ["guided", "deconv"])
def test_unsupported_activations_are_refused_naming_every_layer(
    client: SalienceClient, modifier: str
) -> None:
    x = np.zeros((1, 5, 5, 2), np.float32)
    with pytest.raises(SalienceError) as caught:
        client.explain("odd", x, backprop_modifier=modifier)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    details = caught.value.details
    assert f"backprop_modifier={modifier!r} cannot be used on model 'odd'" in details
    for name in ODD_LAYERS:
        assert f"'{name}'" in details, name
    assert "'fine'" not in details
    for fragment in ("(LeakyReLU)", "(PReLU)", "(ELU)", "activation 'gelu'", "activation 'silu'"):
        assert fragment in details
    assert "negative_slope=0.1" in details
    # The model itself is still explained without a modifier.
    assert client.explain("odd", x).maps["absolute"].shape == (1, 5, 5)


def test_unknown_modifier_lists_the_allowed_names(client: SalienceClient) -> None:
    with pytest.raises(SalienceError) as caught:
        client.explain("relu_net", samples(1), backprop_modifier="smooth")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "backprop_modifier='smooth' is unknown" in caught.value.details
    assert "'guided', 'rectified', 'deconv', 'relu'" in caught.value.details


def test_a_method_without_backprop_modifiers_refuses_one(client: SalienceClient) -> None:
    with pytest.raises(SalienceError) as caught:
        client.explain(
            "smooth",
            np.zeros((1, *SMOOTH_SHAPE)),
            method="gradcam",
            backprop_modifier="guided",
        )
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "backprop_modifier='guided' does not apply to method 'gradcam'" in (caught.value.details)


# wrt -------------------------------------------------------------------------


@pytest.mark.parametrize("modifier", ["", "guided", "rectified"])
@pytest.mark.parametrize("layer", ["act", "clip", "d1"])
def test_wrt_a_layer_matches_hand_computed_gradient(
    client: SalienceClient,
    weights: list[tuple[np.ndarray, np.ndarray]],
    layer: str,
    modifier: str,
) -> None:
    x = samples(4, seed=3)
    result = explain_raw(
        client, "relu_net", x, filter_indices=[2], wrt=layer, backprop_modifier=modifier
    )
    want = hand_backprop(weights, x, 2, RULES[modifier], wrt=layer)["grad"]
    assert result.maps["none"].shape == want.shape
    np.testing.assert_allclose(result.maps["none"], want, rtol=1e-5, atol=1e-6)
    assert result.resolved.wrt == layer


def test_wrt_the_input_layer_is_the_input(client: SalienceClient) -> None:
    x = samples(2, seed=6)
    plain = explain_raw(client, "relu_net", x, filter_indices=[1])
    by_layer = explain_raw(client, "relu_net", x, filter_indices=[1], wrt="x")
    by_index = explain_raw(client, "relu_net", x, filter_indices=[1], wrt=0)
    np.testing.assert_array_equal(by_layer.maps["none"], plain.maps["none"])
    np.testing.assert_array_equal(by_index.maps["none"], plain.maps["none"])
    assert by_layer.resolved.wrt == "x"
    assert plain.resolved.wrt == ""


def smooth_tail(model: Any, h: np.ndarray, unit: int) -> float:
    """Logit `unit` of `smooth` computed from the output of its layer `conv`."""
    a = model.get_layer("conv2")(h).numpy()
    a = model.get_layer("hidden")(model.get_layer("flatten")(a)).numpy()
    kernel, bias = model.get_layer("out").get_weights()
    return float((a @ kernel + bias)[0, unit])


def test_wrt_matches_central_finite_differences(client: SalienceClient, repo: Path) -> None:
    import keras

    model = keras.saving.load_model(repo / "smooth" / "1" / "model.keras", compile=False)
    x = np.random.default_rng(9).uniform(-1, 1, (1, *SMOOTH_SHAPE))
    result = explain_raw(client, "smooth", x, filter_indices=[1], wrt="conv")
    got = result.maps["none"]
    assert got.shape == (1, 7, 6, 4)  # the layer's shape, not the input's
    assert result.resolved.objectives[0].used_logits
    h = keras.Model(model.input, model.get_layer("conv").output)(x).numpy()
    rng = np.random.default_rng(10)
    step = 1e-6
    fd = np.zeros(got.shape)
    for _ in range(10):
        where = (0, *(int(rng.integers(0, d)) for d in got.shape[1:]))
        up, down = h.copy(), h.copy()
        up[where] += step
        down[where] -= step
        fd[where] = (smooth_tail(model, up, 1) - smooth_tail(model, down, 1)) / (2 * step)
        assert got[where] == pytest.approx(fd[where], rel=1e-4, abs=1e-8), where
    # Finished on the layer's shape: the channel axis is reduced with the max.
    reduced = client.explain(
        "smooth", x, filter_indices=[1], wrt="conv", grad_modifiers=["none"], normalize=False
    )
    assert reduced.resolved.channels_reduced
    np.testing.assert_allclose(reduced.maps["none"], got.max(axis=-1), rtol=1e-6)


def test_wrt_a_dense_layer_keeps_its_units(
    client: SalienceClient, weights: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    x = samples(2, seed=7)
    result = client.explain("relu_net", x, filter_indices=[0], wrt="d1")
    assert not result.resolved.channels_reduced  # rank 2: no channel axis to reduce
    g = np.abs(hand_backprop(weights, x, 0, RULES[""], wrt="d1")["grad"])
    low, high = g.min(axis=1, keepdims=True), g.max(axis=1, keepdims=True)
    np.testing.assert_allclose(result.maps["absolute"], (g - low) / (high - low + 1e-7), atol=1e-5)


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (
            {"layer": "d2", "wrt": "d3"},
            ["explanation.wrt.name='d3'", "does not depend", "choose one of 'x', 'd1', 'd2'"],
        ),
        (
            {"objectives": [Objective("d1", [0]), Objective("d2", [1])], "wrt": "act"},
            ["explanation.wrt.name='act'", "'d1', 'd2'", "choose one of 'x', 'd1', 'd2'"],
        ),
        ({"wrt": "nope"}, ["explanation.wrt.name='nope' is not a layer", "'clip'"]),
        ({"wrt": 40}, ["explanation.wrt.index=40 is out of range"]),
    ],
)
def test_wrt_a_layer_the_score_does_not_depend_on_is_refused(
    client: SalienceClient, options: dict[str, Any], fragments: list[str]
) -> None:
    with pytest.raises(SalienceError) as caught:
        client.explain("relu_net", samples(1), **options)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    for fragment in fragments:
        assert fragment in caught.value.details


def test_wrt_on_another_branch_is_refused(tmp_path: Path, server_factory: Any) -> None:
    import keras

    x = keras.Input((4,), name="x")
    a = keras.layers.Dense(3, name="a")(x)
    b = keras.layers.Dense(3, name="b")(x)
    model = keras.Model(x, [keras.layers.Dense(2, name="head_a")(a), b])
    client = server_factory(save_model(tmp_path, "branches", model)).client()
    x_in = samples(1)[:, :4]
    with pytest.raises(SalienceError) as caught:
        client.explain("branches", x_in, layer="head_a", wrt="b")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "explanation.wrt.name='b'" in caught.value.details
    assert "another branch" in caught.value.details
    # ... while a layer on the target's own branch is fine: ∂s/∂a = W_head[:, 0].
    result = explain_raw(client, "branches", x_in, layer="head_a", filter_indices=[0], wrt="a")
    kernel = model.get_layer("head_a").get_weights()[0]
    np.testing.assert_allclose(result.maps["none"][0], kernel[:, 0], rtol=1e-6)


def test_wrt_with_a_method_that_does_not_take_it_is_refused(client: SalienceClient) -> None:
    with pytest.raises(SalienceError) as caught:
        client.explain("smooth", np.zeros((1, *SMOOTH_SHAPE)), method="gradcam", wrt="conv")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "explanation.wrt does not apply to method 'gradcam'" in caught.value.details
