"""Models with several inputs, several outputs, and sub-models used as layers.

`multi` has inputs `a` (6,) and `b` (4, 3) and two linear heads:
`first = W1ᵀ [a; flat(b)] + c1` and `second = W2ᵀ flat(b) + c2`. Every gradient
has a closed form: `∂first_i/∂a = W1[:6, i]`, `∂first_i/∂b = W1[6:, i]`,
`∂second_i/∂b = W2[:, i]`, `∂second_i/∂a = 0`. The request picks the input the map
is for (`input_name`) and the head that objectives without a layer score (`output`).

`nested` calls a Functional `backbone` as a layer; layers inside it resolve by path
(`backbone/hidden`) or by a unique bare name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from salience_client import Objective, SalienceClient, SalienceError
from tests.conftest import save_model

A_SHAPE = (6,)
B_SHAPE = (4, 3)
GRADIENT_METHODS = ["vanilla", "smoothgrad", "integrated-gradients", "gradient-x-input"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    root = tmp_path_factory.mktemp("multi-io-repo")
    keras.utils.set_random_seed(21)
    a = keras.Input(A_SHAPE, name="a")
    b = keras.Input(B_SHAPE, name="b")
    flat_b = keras.layers.Flatten(name="flat_b")(b)
    joined = keras.layers.Concatenate(name="joined")([a, flat_b])
    first = keras.layers.Dense(3, name="first")(joined)
    second = keras.layers.Dense(2, name="second")(flat_b)
    save_model(root, "multi", keras.Model([a, b], [first, second]))

    # Two sub-models, each with a layer called "hidden" (ambiguous) and their own
    # uniquely named layers; the backbone's head ends in softmax.
    x = keras.Input((5,), name="inner_x")
    hidden = keras.layers.Dense(4, name="hidden")(x)
    probs = keras.layers.Dense(3, activation="softmax", name="inner_probs")(hidden)
    backbone = keras.Model(x, probs, name="backbone")
    y = keras.Input((3,), name="side_x")
    side = keras.Model(y, keras.layers.Dense(2, name="hidden")(y), name="side")
    inp = keras.Input((5,), name="x")
    out = keras.layers.Dense(2, name="head")(side(backbone(inp)))
    save_model(root, "nested", keras.Model(inp, out))
    return root


@pytest.fixture(scope="module")
def client(repo: Path, server_factory: Any) -> SalienceClient:
    return server_factory(repo).client()


@pytest.fixture(scope="module")
def weights(repo: Path) -> dict[str, np.ndarray]:
    import keras

    multi = keras.saving.load_model(repo / "multi" / "1" / "model.keras", compile=False)
    nested = keras.saving.load_model(repo / "nested" / "1" / "model.keras", compile=False)
    backbone = nested.get_layer("backbone")
    return {
        "first": multi.get_layer("first").get_weights()[0].astype(np.float64),
        "second": multi.get_layer("second").get_weights()[0].astype(np.float64),
        "hidden": backbone.get_layer("hidden").get_weights()[0].astype(np.float64),
        "inner_probs": backbone.get_layer("inner_probs").get_weights()[0].astype(np.float64),
        "side_hidden": nested.get_layer("side").get_layer("hidden").get_weights()[0],
    }


def inputs(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a": rng.uniform(-1, 1, (n, *A_SHAPE)).astype(np.float32),
        "b": rng.uniform(-1, 1, (n, *B_SHAPE)).astype(np.float32),
    }


def gradient(weights: dict[str, np.ndarray], head: str, unit: int, input_name: str) -> np.ndarray:
    """∂head_unit/∂input in closed form."""
    column = weights[head][:, unit]
    if head == "second":
        return np.zeros(A_SHAPE) if input_name == "a" else column.reshape(B_SHAPE)
    return column[:6] if input_name == "a" else column[6:].reshape(B_SHAPE)


def raw(client: SalienceClient, x: Any, model: str = "multi", **options: Any) -> Any:
    return client.explain(
        model, x, grad_modifiers=["none"], keepdims=True, normalize=False, **options
    )


@pytest.mark.parametrize("input_name", ["a", "b"])
@pytest.mark.parametrize(("head", "unit"), [("first", 2), ("second", 1)])
def test_vanilla_maps_for_each_input_and_head(
    client: SalienceClient,
    weights: dict[str, np.ndarray],
    input_name: str,
    head: str,
    unit: int,
) -> None:
    x = inputs(3, seed=1)
    result = raw(client, x, input_name=input_name, output=head, filter_indices=[unit])
    want = np.broadcast_to(gradient(weights, head, unit, input_name), x[input_name].shape)
    np.testing.assert_allclose(result.maps["none"], want, rtol=1e-5, atol=1e-7)
    assert result.resolved.output == head
    assert result.resolved.input == input_name
    assert result.resolved.objectives[0].layer_name == head
    assert set(result.outputs) == {"first", "second"}


def test_default_head_is_the_first_output_and_a_layer_overrides_the_head(
    client: SalienceClient, weights: dict[str, np.ndarray]
) -> None:
    x = inputs(2, seed=2)
    default = raw(client, x, input_name="b", filter_indices=[0])
    assert default.resolved.output == "first"
    np.testing.assert_allclose(
        default.maps["none"][0], gradient(weights, "first", 0, "b"), rtol=1e-5
    )
    # An objective naming its layer ignores `output`; one without a layer uses it.
    mixed = raw(
        client,
        x,
        input_name="b",
        output="second",
        objectives=[Objective("first", [1], 2.0), Objective(None, [0], -1.0)],
    )
    want = 2 * gradient(weights, "first", 1, "b") - gradient(weights, "second", 0, "b")
    np.testing.assert_allclose(mixed.maps["none"][0], want, rtol=1e-5, atol=1e-7)
    assert [o.layer_name for o in mixed.resolved.objectives] == ["first", "second"]


def test_predictions_of_both_heads_match_the_closed_form(
    client: SalienceClient, repo: Path
) -> None:
    import keras

    model = keras.saving.load_model(repo / "multi" / "1" / "model.keras", compile=False)
    x = inputs(2, seed=3)
    result = raw(client, x, input_name="a", output="second", filter_indices=[0])
    want = model.predict([x["a"], x["b"]], verbose=0)
    np.testing.assert_allclose(result.outputs["first"], want[0], rtol=1e-5)
    np.testing.assert_allclose(result.outputs["second"], want[1], rtol=1e-5)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_every_gradient_method_explains_either_input_of_either_head(
    client: SalienceClient, weights: dict[str, np.ndarray], method: str
) -> None:
    x = inputs(2, seed=4)
    cases = [("a", "first", 0), ("b", "second", 1), ("b", "first", 2), ("a", "second", 0)]
    for input_name, head, unit in cases:  # the last: the head does not depend on `a`
        result = raw(
            client,
            x,
            method=method,
            input_name=input_name,
            output=head,
            filter_indices=[unit],
            seed=5,
            samples=3,
            steps=4,
        )
        g = np.broadcast_to(gradient(weights, head, unit, input_name), x[input_name].shape)
        # Linear heads: SmoothGrad is G, IG (zero baseline) and Gradient × Input are G ⊙ x.
        want = g if method in ("vanilla", "smoothgrad") else g * x[input_name]
        np.testing.assert_allclose(result.maps["none"], want, rtol=1e-5, atol=1e-6)
        if method == "integrated-gradients":
            assert result.completeness_residual is not None
            np.testing.assert_allclose(result.completeness_residual, 0, atol=1e-5)


def test_unknown_output_head_is_refused_with_the_heads(client: SalienceClient) -> None:
    with pytest.raises(SalienceError) as err:
        client.explain("multi", inputs(1, 6), input_name="a", output="third")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details == (
        "explanation.output='third' is not an output of the model: choose one of 'first', 'second'"
    )


def test_multi_input_model_needs_the_input_named(client: SalienceClient) -> None:
    with pytest.raises(SalienceError) as err:
        client.explain("multi", inputs(1, 7), method="integrated-gradients")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "explanation.input is required" in err.value.details
    assert "'a', 'b'" in err.value.details


def test_integrated_gradients_baseline_of_the_explained_input(
    client: SalienceClient, weights: dict[str, np.ndarray]
) -> None:
    x = inputs(2, seed=8)
    baseline = np.full(B_SHAPE, 0.25, np.float32)
    result = raw(
        client,
        x,
        method="integrated-gradients",
        input_name="b",
        output="second",
        filter_indices=[0],
        baseline=baseline,
        steps=2,
    )
    g = gradient(weights, "second", 0, "b")
    np.testing.assert_allclose(result.maps["none"], g * (x["b"] - baseline), rtol=1e-5)
    assert result.score_difference is not None
    np.testing.assert_allclose(
        result.score_difference, (g * (x["b"] - baseline)).sum(axis=(1, 2)), rtol=1e-5
    )


# Sub-models ------------------------------------------------------------------------


def test_layers_inside_a_sub_model_resolve_by_path_or_unique_name(
    client: SalienceClient, weights: dict[str, np.ndarray]
) -> None:
    x = np.random.default_rng(9).uniform(-1, 1, (2, 5)).astype(np.float32)
    by_path = raw(client, x, model="nested", layer="backbone/hidden", filter_indices=[3])
    np.testing.assert_allclose(by_path.maps["none"][1], weights["hidden"][:, 3], rtol=1e-5)
    assert by_path.resolved.objectives[0].layer_name == "backbone/hidden"
    assert by_path.resolved.objectives[0].layer_index == 1  # the sub-model's index

    # A unique inner name; its softmax is scored on the logits, as at the top level.
    by_name = raw(client, x, model="nested", layer="inner_probs", filter_indices=[2])
    want = weights["hidden"] @ weights["inner_probs"][:, 2]
    np.testing.assert_allclose(by_name.maps["none"][0], want, rtol=1e-5)
    assert by_name.resolved.objectives[0].layer_name == "backbone/inner_probs"
    assert by_name.resolved.objectives[0].used_logits is True


def test_ambiguous_inner_name_lists_the_paths(client: SalienceClient) -> None:
    x = np.zeros((1, 5), np.float32)
    with pytest.raises(SalienceError) as err:
        client.explain("nested", x, layer="hidden", filter_indices=[0])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details == (
        "objectives[0].layer.name='hidden' names several layers inside sub-models: "
        "choose one of 'backbone/hidden', 'side/hidden'"
    )
    with pytest.raises(SalienceError) as err:
        client.explain("nested", x, layer="backbone/missing", filter_indices=[0])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'backbone/missing' is not a layer of the model" in err.value.details
