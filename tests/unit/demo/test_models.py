"""Tests of the bundled demo models: they load safely, keep the structure that the
saliency methods rely on, and still perform on data that neither training nor the
recorded evaluation has seen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from salience_server.demo import MODELS_DIR, bundled_repository
from salience_server.demo.data import ROAD_SHAPE, SHAPE_CLASSES, generate_roads, generate_shapes

# Seeds used only here, so this is a third, independent draw of each data set.
SHAPES_TEST_SEED = 90_001
STEERING_TEST_SEED = 90_011
SHAPES_TEST_SAMPLES = 1_000
STEERING_TEST_SAMPLES = 600

MIN_SHAPES_ACCURACY = 0.95
# Measured held-out MAE is about 0.03 against a mean-predictor MAE of about 0.55; the
# threshold leaves ample room for numerical differences between machines.
MAX_STEERING_MAE = 0.06
MAX_MODEL_BYTES = 1_500_000


def _model_path(name: str) -> Path:
    return MODELS_DIR / name / "1" / "model.keras"


@pytest.fixture(scope="module")
def metrics() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((MODELS_DIR / "metrics.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def shapes_model() -> keras.Model:
    return keras.saving.load_model(_model_path("shapes"), compile=False, safe_mode=True)


@pytest.fixture(scope="module")
def steering_model() -> keras.Model:
    return keras.saving.load_model(_model_path("steering"), compile=False, safe_mode=True)


def _hidden_activations(model: keras.Model) -> dict[str, str]:
    """Activation names of every layer that has one, except the output layer."""
    found = {}
    for layer in model.layers:
        if layer.name == model.output_names[0] or not hasattr(layer, "activation"):
            continue
        found[layer.name] = layer.activation.__name__
    return found


def _conv_layers(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def test_bundled_repository_layout() -> None:
    assert bundled_repository() == MODELS_DIR
    for name in ("shapes", "steering"):
        path = _model_path(name)
        assert path.is_file(), f"missing {path}"
        # Small enough to ship in the repository and load fast in the server.
        assert path.stat().st_size < MAX_MODEL_BYTES


def test_test_seeds_are_fresh(metrics: dict[str, Any]) -> None:
    assert SHAPES_TEST_SEED not in (metrics["shapes"]["train_seed"], metrics["shapes"]["eval_seed"])
    assert STEERING_TEST_SEED not in (
        metrics["steering"]["train_seed"],
        metrics["steering"]["eval_seed"],
    )


def test_recorded_metrics_meet_the_bar(metrics: dict[str, Any]) -> None:
    assert metrics["shapes"]["eval_accuracy"] >= MIN_SHAPES_ACCURACY
    assert metrics["shapes"]["eval_samples"] >= 1000
    assert metrics["shapes"]["classes"] == list(SHAPE_CLASSES)
    steering = metrics["steering"]
    assert steering["eval_mae"] <= MAX_STEERING_MAE
    assert steering["eval_rmse"] >= steering["eval_mae"]
    assert steering["eval_baseline_mae"] / 2 > MAX_STEERING_MAE


def test_shapes_model_structure(shapes_model: keras.Model) -> None:
    assert shapes_model.name == "shapes"
    (inp,) = shapes_model.inputs
    assert inp.name == "image"
    assert tuple(inp.shape) == (None, 64, 64, 3)
    assert inp.dtype == "float32"
    assert tuple(shapes_model.output.shape) == (None, len(SHAPE_CLASSES))

    convs = _conv_layers(shapes_model)
    assert [c.name for c in convs] == ["conv1", "conv2", "conv3", "conv4"]
    last = convs[-1].output.shape
    assert min(last[1], last[2]) >= 4, f"Grad-CAM needs a spatial map, got {last}"
    assert isinstance(shapes_model.get_layer("gap"), keras.layers.GlobalAveragePooling2D)

    out = shapes_model.get_layer("predictions")
    assert out is shapes_model.layers[-1]
    assert out.activation.__name__ == "softmax"
    assert set(_hidden_activations(shapes_model).values()) == {"relu"}


def test_steering_model_structure(steering_model: keras.Model) -> None:
    assert steering_model.name == "steering"
    (inp,) = steering_model.inputs
    assert inp.name == "image"
    assert tuple(inp.shape) == (None, *ROAD_SHAPE)
    assert inp.dtype == "float32"
    assert tuple(steering_model.output.shape) == (None, 1)

    convs = _conv_layers(steering_model)
    assert [c.name for c in convs] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert all(c.strides == (2, 2) for c in convs[:3])
    out = steering_model.get_layer("steering")
    assert out is steering_model.layers[-1]
    assert out.activation.__name__ == "tanh"
    assert set(_hidden_activations(steering_model).values()) == {"relu"}


def test_no_layers_that_would_hide_relus(
    shapes_model: keras.Model, steering_model: keras.Model
) -> None:
    # Guided backprop rewrites ReLU gradients; other non-linearities would escape it.
    banned = (
        keras.layers.Activation,
        keras.layers.LeakyReLU,
        keras.layers.ELU,
        keras.layers.PReLU,
        keras.layers.Lambda,
    )
    for model in (shapes_model, steering_model):
        assert not [layer.name for layer in model.layers if isinstance(layer, banned)]


def test_shapes_accuracy_on_fresh_data(shapes_model: keras.Model) -> None:
    data = generate_shapes(SHAPES_TEST_SAMPLES, SHAPES_TEST_SEED)
    probs = shapes_model.predict(data.images, batch_size=250, verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    predicted = probs.argmax(axis=1)
    accuracy = float((predicted == data.labels).mean())
    assert accuracy >= MIN_SHAPES_ACCURACY, f"accuracy {accuracy:.4f}"
    for k, name in enumerate(SHAPE_CLASSES):
        recall = float((predicted[data.labels == k] == k).mean())
        assert recall >= 0.9, f"{name} recall {recall:.3f}"


def test_steering_mae_on_fresh_data(steering_model: keras.Model) -> None:
    data = generate_roads(STEERING_TEST_SAMPLES, STEERING_TEST_SEED)
    predicted = steering_model.predict(data.images, batch_size=200, verbose=0)[:, 0]
    assert np.all(np.abs(predicted) <= 1.0)
    mae = float(np.abs(predicted - data.angles).mean())
    baseline = float(np.abs(data.angles - data.angles.mean()).mean())
    assert mae <= MAX_STEERING_MAE, f"MAE {mae:.4f}"
    assert mae < baseline / 4, f"MAE {mae:.4f} vs mean-predictor {baseline:.4f}"
    # Turning the wrong way on a clear bend is the failure that matters most.
    clear = np.abs(data.angles) > 0.2
    assert np.all(np.sign(predicted[clear]) == np.sign(data.angles[clear]))


def test_steering_is_mirror_consistent(steering_model: keras.Model) -> None:
    # The scene generator is left/right symmetric with an odd target, so a mirrored
    # road should get roughly the opposite angle.
    data = generate_roads(64, STEERING_TEST_SEED + 1)
    straight = steering_model.predict(data.images, verbose=0)[:, 0]
    mirrored = steering_model.predict(data.images[:, :, ::-1].copy(), verbose=0)[:, 0]
    assert float(np.abs(straight + mirrored).mean()) < 2 * MAX_STEERING_MAE
