"""`Explanation.randomization`: maps of a copy of the model with its top weighted
layers re-initialised (Adebayo et al.'s sanity check), computed by the server.

The copy's weights are re-derived here with `randomize.randomized_copy` and the
gradient of the two-layer model is computed in numpy, so the server's map is checked
against a closed form, not only for being different.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from salience_client import SalienceClient
from salience_client.client import SalienceError
from tests.conftest import save_model

SEED = 5


def _model() -> Any:
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input(shape=(4,), name="x")
    hidden = keras.layers.Dense(6, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(2, name="out")(hidden)
    return keras.Model(inputs, outputs, name="mlp")


@pytest.fixture(scope="module")
def model() -> Any:
    return _model()


@pytest.fixture(scope="module")
def client(model: Any, tmp_path_factory: pytest.TempPathFactory, server_factory: Any) -> Any:
    root: Path = save_model(tmp_path_factory.mktemp("randomization"), "mlp", model)
    with server_factory(root).client(retry=None) as opened:
        yield opened


def _gradient(weights: list[np.ndarray], x: np.ndarray, unit: int) -> np.ndarray:
    """∂ out[unit] / ∂x of Dense(relu) → Dense(linear), per sample."""
    w1, b1, w2, _ = (w.astype(np.float64) for w in weights)
    active = (x @ w1 + b1) > 0
    return np.asarray((active * w2[:, unit]) @ w1.T)


def _raw(client: SalienceClient, x: np.ndarray, **options: Any) -> Any:
    return client.explain(
        "mlp", x, filter_indices=[1], grad_modifiers=["none"], normalize=False, **options
    )


def test_randomized_maps_follow_the_reinitialised_weights(
    client: SalienceClient, model: Any
) -> None:
    from salience_server.explain.randomize import randomized_copy

    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    trained = _raw(client, x)
    np.testing.assert_allclose(
        trained.maps["none"], _gradient(model.get_weights(), x, 1), atol=1e-5
    )
    for layers, names in ((1, ("out",)), (2, ("out", "hidden"))):
        result = _raw(client, x, randomize_layers=layers, randomize_seed=SEED)
        assert result.resolved.randomized_layers == names
        assert result.resolved.randomization_seed == SEED
        copy = randomized_copy(model, layers, SEED).get_weights()
        expected = _gradient(copy, x, 1)
        np.testing.assert_allclose(result.maps["none"], expected, atol=1e-5)
        assert np.abs(expected - trained.maps["none"]).max() > 0.05
        # Only the top `layers` changed: the others keep the trained weights.
        kept = model.get_weights()[: 2 * (2 - layers)]
        for a, b in zip(copy[: len(kept)], kept, strict=True):
            np.testing.assert_array_equal(a, b)
    # The served model is untouched, and the same seed gives the same copy again.
    np.testing.assert_allclose(_raw(client, x).maps["none"], trained.maps["none"], atol=1e-6)
    again = _raw(client, x, randomize_layers=2, randomize_seed=SEED).maps["none"]
    other = _raw(client, x, randomize_layers=2, randomize_seed=SEED + 1).maps["none"]
    np.testing.assert_allclose(
        again, _gradient(randomized_copy(model, 2, SEED).get_weights(), x, 1), atol=1e-5
    )
    assert np.abs(other - again).max() > 0.05


def test_more_layers_than_the_model_has_is_refused(client: SalienceClient) -> None:
    with pytest.raises(SalienceError) as caught:
        _raw(client, np.zeros((1, 4), np.float32), randomize_layers=3)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details == (
        "explanation.randomization.layers=3 is over the 2 weighted layers of model 'mlp' "
        "(out, hidden, from the output down): use 1..2, or 0 for the trained model"
    )
