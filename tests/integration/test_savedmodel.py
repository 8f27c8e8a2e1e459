"""A SavedModel exported from a Keras model serves the same predictions and the same
input-gradient maps as the Keras model itself, through a real server; what needs
Keras layers gets FAILED_PRECONDITION saying why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from salience_client import Objective, SalienceClient, SalienceError

SHAPE = (6, 5, 3)
ATOL = 1e-5
GRADIENT_METHODS = [
    "vanilla",
    "smoothgrad",
    "integrated-gradients",
    "gradient-x-input",
    "blur-ig",
    "guided-ig",
    "xrai",
]
# What needs no layer: the gradient methods and occlusion (forward passes only), in
# the order metadata lists them.
SIGNATURE_METHODS = [*GRADIENT_METHODS[:4], "occlusion", *GRADIENT_METHODS[4:]]
PATH_METHODS = {"integrated-gradients", "blur-ig", "guided-ig", "xrai"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same two models as `model.keras` and as SavedModels (`model.export`)."""
    import keras

    from tests.conftest import save_model

    root = tmp_path_factory.mktemp("savedmodel-repo")
    keras.utils.set_random_seed(11)
    x = keras.Input(SHAPE, name="image")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="tanh", name="conv")(x)
    h = keras.layers.Conv2D(3, 3, strides=2, activation="relu", name="conv2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    logits = keras.layers.Dense(4, name="logits")(h)
    value = keras.layers.Dense(1, activation="tanh", name="value")(h)
    two_heads = keras.Model(x, [logits, value])
    probs = keras.layers.Activation("softmax", name="probs")(logits)
    softmax = keras.Model(x, probs)
    for name, model in (("heads", two_heads), ("softmax", softmax), ("pre", two_heads)):
        save_model(root, name, model)
        model.export(str(root / f"{name}_saved" / "1"), verbose=False)
    preprocess = PREPROCESS.replace("\n    ", "\n")
    for name in ("pre", "pre_saved"):
        (root / name / "config.toml").write_text(preprocess)
    return root


PREPROCESS = """
    [preprocess]
    resize = "bilinear"
    channel_order = "bgr"
    scale = [0.5, 2.0, -1.0]
    offset = 0.25
    """


@pytest.fixture(scope="module")
def client(repo: Path, server_factory: Any) -> SalienceClient:
    return server_factory(repo).client()


def images(n: int = 3, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, *SHAPE)).astype(np.float32)


def test_predictions_are_the_keras_models(client: SalienceClient) -> None:
    x = images()
    keras_outputs = client.predict("heads", x).outputs
    saved_outputs = client.predict("heads_saved", x).outputs
    assert list(keras_outputs) == ["logits", "value"]
    assert list(saved_outputs) == ["output_0", "output_1"]
    for want, got in zip(keras_outputs.values(), saved_outputs.values(), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", SIGNATURE_METHODS)
@pytest.mark.parametrize("normalize", [True, False])
def test_maps_equal_the_keras_models(client: SalienceClient, method: str, normalize: bool) -> None:
    options: dict[str, Any] = {
        "method": method,
        "filter_indices": [1, 3],
        "grad_modifiers": ["none", "absolute"],
        "normalize": normalize,
        "seed": 1234,
        "samples": 6,
        "steps": 16,
    }
    if method != "smoothgrad":
        options.pop("seed")
        options.pop("samples")
    if method not in PATH_METHODS:
        options.pop("steps")
    x = images()
    want = client.explain("heads", x, **options)
    got = client.explain("heads_saved", x, **options)
    assert set(got.maps) == {"none", "absolute"}
    for name in got.maps:
        scale = 1.0 if normalize else max(1.0, float(np.abs(want.maps[name]).max()))
        np.testing.assert_allclose(got.maps[name], want.maps[name], rtol=0, atol=ATOL * scale)
    np.testing.assert_allclose(got.outputs["output_0"], want.outputs["logits"], atol=ATOL)
    if method == "integrated-gradients":
        assert got.completeness_residual is not None
        assert want.completeness_residual is not None
        np.testing.assert_allclose(
            got.completeness_residual, want.completeness_residual, rtol=0, atol=ATOL
        )
    if method == "smoothgrad":
        assert (got.resolved.seed, got.resolved.samples) == (1234, 6)
    [objective] = got.resolved.objectives
    assert (objective.layer_name, objective.layer_index) == ("output_0", 0)
    assert (list(objective.filter_indices), objective.reduction) == ([1, 3], "units")
    assert not objective.used_logits


def test_objectives_name_outputs_and_the_output_head_chooses_one(client: SalienceClient) -> None:
    x = images()
    want = client.explain(
        "heads",
        x,
        objectives=[Objective("value", [0], 2.0), Objective("logits", [2], -1.0)],
        grad_modifiers=["none"],
        normalize=False,
    )
    got = client.explain(
        "heads_saved",
        x,
        objectives=[Objective("output_1", [0], 2.0), Objective("output_0", [2], -1.0)],
        grad_modifiers=["none"],
        normalize=False,
    )
    np.testing.assert_allclose(got.maps["none"], want.maps["none"], rtol=0, atol=ATOL)
    head = client.explain("heads_saved", x, output="output_1", grad_modifiers=["none"])
    same = client.explain("heads_saved", x, layer="output_1", grad_modifiers=["none"])
    np.testing.assert_allclose(head.maps["none"], same.maps["none"], rtol=0, atol=0)
    assert head.resolved.output == "output_1"


def test_softmax_outputs_are_scored_as_activations(client: SalienceClient) -> None:
    # The signature has no logits to read: a SavedModel is explained like a Keras model
    # asked to keep the activation, and says so.
    x = images()
    want = client.explain("softmax", x, filter_indices=[2], keep_activation=True, normalize=False)
    got = client.explain("softmax_saved", x, filter_indices=[2], normalize=False)
    np.testing.assert_allclose(got.maps["absolute"], want.maps["absolute"], rtol=0, atol=ATOL)
    assert not got.resolved.objectives[0].used_logits
    logits = client.explain("softmax", x, filter_indices=[2], normalize=False)
    assert logits.resolved.objectives[0].used_logits
    assert np.abs(logits.maps["absolute"] - got.maps["absolute"]).max() > 1e-3


def test_metadata_lists_what_a_saved_model_supports(client: SalienceClient) -> None:
    meta = client.metadata("heads_saved")
    assert list(meta.methods) == SIGNATURE_METHODS
    assert list(meta.backprop_modifiers) == []
    assert list(meta.layers) == []
    assert [(s.name, list(s.shape)) for s in meta.inputs] == [("image", [-1, *SHAPE])]
    assert [(s.name, list(s.shape)) for s in meta.outputs] == [
        ("output_0", [-1, 4]),
        ("output_1", [-1, 1]),
    ]
    keras_meta = client.metadata("heads")
    assert "gradcam" in keras_meta.methods
    assert list(keras_meta.backprop_modifiers) == ["guided", "rectified"]


WHY = "it is a SavedModel, served through its serving signature, without Keras layers"
OUTPUTS = "choose one of 'output_0', 'output_1', or leave the layer unset for the output head"
REFUSALS = [
    (
        {"method": "gradcam"},
        f"explanation.method='gradcam' cannot be used on model 'heads_saved': {WHY}, and "
        "gradcam weights the activations of one of its layers: use one of 'vanilla', "
        "'smoothgrad', 'integrated-gradients', 'gradient-x-input'",
    ),
    ({"method": "gradcam++"}, "explanation.method='gradcam++' cannot be used on model"),
    ({"method": "guided-gradcam"}, "explanation.method='guided-gradcam' cannot be used on"),
    (
        {"backprop_modifier": "guided"},
        f"explanation.backprop_modifier='guided' cannot be used on model 'heads_saved': {WHY}, "
        "and a backprop modifier changes how gradients pass through the ReLUs of its layers: "
        "explain without a backprop modifier",
    ),
    (
        {"wrt": "conv"},
        f"explanation.wrt.name='conv' cannot be used on model 'heads_saved': {WHY}, so there is "
        "no layer output to take the gradient with respect to: leave wrt unset for the gradient "
        "with respect to the input",
    ),
    (
        {"method": "vanilla", "penultimate_layer": 2},
        f"explanation.penultimate_layer.index=2 cannot be used on model 'heads_saved': {WHY}: "
        "leave it unset",
    ),
    (
        {"layer": "conv2", "filter_indices": [0]},
        f"explanation.objectives[0].layer.name='conv2' cannot be used on model 'heads_saved': "
        f"{WHY}, so an objective can only name one of its outputs: {OUTPUTS}",
    ),
    (
        {"layer": -1},
        f"explanation.objectives[0].layer.index=-1 cannot be used on model 'heads_saved': "
        f"{WHY}, so an objective can only name one of its outputs: {OUTPUTS}",
    ),
]


@pytest.mark.parametrize(("options", "message"), REFUSALS)
def test_layer_options_get_failed_precondition_saying_why(
    client: SalienceClient, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(SalienceError) as refused:
        client.explain("heads_saved", images(1), **options)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details.startswith(message)


def test_bad_units_and_heads_are_invalid_arguments(client: SalienceClient) -> None:
    with pytest.raises(SalienceError) as units:
        client.explain("heads_saved", images(1), filter_indices=[4])
    assert units.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert units.value.details == (
        "objectives[0].filter_indices[0]=4 is out of range: output 'output_0' has 4 units "
        "(valid 0..3)"
    )
    with pytest.raises(SalienceError) as head:
        client.explain("heads_saved", images(1), output="value")
    assert head.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert head.value.details == (
        "explanation.output='value' is not an output of the model: choose one of 'output_0', "
        "'output_1'"
    )


def test_preprocessing_works_the_same_on_a_saved_model(client: SalienceClient) -> None:
    # Resized from the sender's 8x7, channels reversed, scaled: the SavedModel's
    # predictions and maps (in the sender's space) are the Keras model's.
    x = np.random.default_rng(9).uniform(0, 1, (2, 8, 7, 3)).astype(np.float32)
    want = client.predict("pre", x).outputs["logits"]
    got = client.predict("pre_saved", x).outputs["output_0"]
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    assert np.abs(want - client.predict("heads", x[:, :6, :5]).outputs["logits"]).max() > 1e-3
    for method in ("vanilla", "integrated-gradients"):
        options: dict[str, Any] = {
            "method": method,
            "filter_indices": [0],
            "grad_modifiers": ["none"],
            "normalize": False,
            "keepdims": True,
            "steps": 8,
        }
        keras_map = client.explain("pre", x, **options).maps["none"]
        saved_map = client.explain("pre_saved", x, **options).maps["none"]
        assert saved_map.shape == (2, 8, 7, 3)
        np.testing.assert_allclose(saved_map, keras_map, rtol=0, atol=ATOL)
    assert list(client.metadata("pre_saved").inputs[0].shape) == [-1, -1, -1, 3]
