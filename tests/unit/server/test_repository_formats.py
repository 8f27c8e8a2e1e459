"""Each model format of a version directory loads into a runtime that predicts exactly
what the Keras model does; model files that would run code are refused (safe mode).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from salience_server.model_config import ModelConfig
from salience_server.repository import ModelLoadError, ModelRepository, load_version
from salience_server.savedmodel import SavedModelRuntime

SHAPE = (5, 4, 3)


@pytest.fixture(scope="module")
def model() -> Any:
    import keras

    keras.utils.set_random_seed(3)
    x = keras.Input(SHAPE, name="image")
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    h = keras.layers.Flatten(name="flatten")(h)
    return keras.Model(x, keras.layers.Dense(3, activation="softmax", name="probs")(h))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, model: Any) -> Path:
    import tensorflow as tf

    root = tmp_path_factory.mktemp("formats")
    for name in ("keras", "h5", "export", "tfsave"):
        (root / name / "1").mkdir(parents=True)
    model.save(root / "keras" / "1" / "model.keras")
    model.save(root / "h5" / "1" / "model.h5")
    model.export(str(root / "export" / "1"), verbose=False)
    tf.saved_model.save(model, str(root / "tfsave" / "1"))
    return root


def samples(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, (n, *SHAPE)).astype(np.float32)


@pytest.mark.parametrize("name", ["keras", "h5", "export", "tfsave"])
def test_every_format_predicts_what_the_keras_model_does(repo: Path, model: Any, name: str) -> None:
    runtime = load_version(name, 1, repo / name / "1", ModelConfig())
    x = samples()
    want = np.asarray(model(x, training=False))
    np.testing.assert_allclose(runtime.predict([x])[0], want, rtol=0, atol=1e-6)
    assert [(i.dtype, i.shape) for i in runtime.inputs] == [("float32", (None, *SHAPE))]
    assert [(o.dtype, o.shape) for o in runtime.outputs] == [("float32", (None, 3))]


@pytest.mark.parametrize("name", ["export", "tfsave"])
def test_a_saved_model_is_its_signature_without_layers(repo: Path, name: str) -> None:
    runtime = load_version(name, 1, repo / name / "1", ModelConfig())
    assert isinstance(runtime, SavedModelRuntime)
    # model.export keeps the Keras input name; tf.saved_model.save names it "inputs".
    assert runtime.inputs[0].name == ("image" if name == "export" else "inputs")
    assert runtime.outputs[0].name == "output_0"
    assert runtime.layers == ()
    assert runtime.supported_methods() == (
        "vanilla",
        "smoothgrad",
        "integrated-gradients",
        "gradient-x-input",
        "occlusion",  # forward passes only: no layer needed
        "blur-ig",
        "guided-ig",
        "xrai",
    )
    assert runtime.backprop_modifiers() == ()


def test_a_saved_model_without_serving_signature_is_refused(tmp_path: Path) -> None:
    import tensorflow as tf

    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, str(tmp_path / "1"))
    with pytest.raises(ModelLoadError) as refused:
        load_version("m", 1, tmp_path / "1", ModelConfig())
    assert str(refused.value) == (
        f"{tmp_path / '1'}: the SavedModel has no 'serving_default' signature (it has none): "
        "export it with model.export() or tf.saved_model.save(..., signatures=...)"
    )


@pytest.mark.parametrize("filename", ["model.h5", "model.keras"])
def test_a_lambda_layer_is_refused_in_safe_mode(
    tmp_path: Path, model: Any, filename: str, caplog: pytest.LogCaptureFixture
) -> None:
    import keras

    x = keras.Input((3,), name="x")
    doubled = keras.layers.Lambda(lambda t: t * 2.0, name="code")(x)
    unsafe = keras.Model(x, keras.layers.Dense(2, name="out")(doubled))
    (tmp_path / "unsafe" / "1").mkdir(parents=True)
    unsafe.save(tmp_path / "unsafe" / "1" / filename)
    with pytest.raises(ValueError, match="Lambda") as refused:
        load_version("unsafe", 1, tmp_path / "unsafe" / "1", ModelConfig())
    assert "safe_mode" in str(refused.value)
    # In a repository the unsafe model is a failure; the safe one is served.
    (tmp_path / "safe" / "1").mkdir(parents=True)
    model.save(tmp_path / "safe" / "1" / "model.keras")
    with caplog.at_level(logging.ERROR, logger="salience_server.repository"):
        repository = ModelRepository.load(tmp_path, warm_up=False)
    assert repository.names() == ["safe"]
    [failure] = repository.failures
    assert (failure.model, failure.version) == ("unsafe", 1)
    assert failure.reason.startswith("ValueError: Requested the deserialization of a `Lambda`")
    assert "model unsafe version 1 failed to load: ValueError" in caplog.text
