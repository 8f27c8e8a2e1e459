"""A sample's map is the same alone or inside any batch, for every registered method
and every backprop modifier the model offers.

A server merges requests into one device call, so a map must never depend on the
other samples (per-sample scores, normalisation and noise) nor on the sample's
position in the batch. Methods are taken from the registry, so a new method is
covered as soon as it is registered.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest

from salience_client import SalienceClient, SalienceError
from salience_server.explain.methods import METHODS
from tests.conftest import save_model

# On the device the suite computes on: scripts/gpu-check runs these on a GPU.
pytestmark = pytest.mark.gpu

SHAPE = (10, 10, 3)
BATCH = 8
TOLERANCE = 1e-5

# Options a method needs to be deterministic or quick; everything else is default.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "smoothgrad": {"samples": 6, "seed": 2024, "noise": 0.2},
    "integrated-gradients": {"steps": 12},
    "faster-scorecam": {"top_channels": 3},
    # Chunks of 8 rows: one copy of each of 8 samples, 8 copies of a lone one.
    "scorecam": {"chunk_size": 8},
    "occlusion": {"window": 3, "stride": 2, "occlusion_value": 0.5, "chunk_size": 8},
    "blur-ig": {"steps": 8, "blur_max_sigma": 6.0},
    "guided-ig": {"steps": 8},
    # Two segmentations: each sample is segmented on the host at 224x224, per scale.
    "xrai": {"steps": 6, "xrai_scales": [100.0, 500.0]},
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, server_factory: Any) -> SalienceClient:
    import keras

    keras.utils.set_random_seed(5)
    x = keras.Input(SHAPE, name="image")
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv1")(x)
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D(2, name="pool")(h)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv3")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dense(8, activation="relu", name="hidden")(h)
    out = keras.layers.Dense(3, activation="softmax", name="probs")(h)
    repo = save_model(
        tmp_path_factory.mktemp("batch-independence-repo"), "convnet", keras.Model(x, out)
    )
    return server_factory(repo).client()


def images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Samples with different value ranges and offsets: per-sample noise levels and
    # normalisation differ inside one batch.
    scale = rng.uniform(0.3, 2.0, (n, 1, 1, 1))
    return (rng.uniform(-1, 1, (n, *SHAPE)) * scale + rng.normal(0, 0.5, (n, 1, 1, 1))).astype(
        np.float32
    )


def assert_same(alone: Any, batched: Any, row: int, what: str) -> None:
    assert set(alone.maps) == set(batched.maps)
    for name, saliency in alone.maps.items():
        np.testing.assert_allclose(
            batched.maps[name][row],
            saliency[0],
            rtol=TOLERANCE,
            atol=TOLERANCE,
            err_msg=f"{what}: map {name!r} of row {row}",
        )
    for extra in ("completeness_residual", "score_difference"):
        a, b = getattr(alone, extra), getattr(batched, extra)
        assert (a is None) == (b is None), extra
        if a is not None:
            np.testing.assert_allclose(b[row], a[0], rtol=TOLERANCE, atol=TOLERANCE)
    for name, output in alone.outputs.items():
        np.testing.assert_allclose(batched.outputs[name][row], output[0], rtol=1e-5, atol=1e-6)


def explain_if_applicable(
    client: SalienceClient, x: np.ndarray, options: dict[str, Any]
) -> Any | None:
    """The explanation, or None when the method says an option does not apply to it
    (e.g. a backprop modifier for a CAM method): nothing to compare then.
    """
    try:
        return client.explain("convnet", x, **options)
    except SalienceError as err:
        if err.code == grpc.StatusCode.INVALID_ARGUMENT and "does not apply" in err.details:
            return None
        raise


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_sample_gets_the_same_map_alone_or_in_a_batch(
    client: SalienceClient, method: str
) -> None:
    sample = images(1, seed=1)
    first = images(BATCH, seed=2)
    first[3] = sample[0]
    second = images(BATCH, seed=3)
    second[BATCH - 1] = sample[0]
    modifiers = ["", *client.metadata("convnet").backprop_modifiers]
    checked = []
    for backprop_modifier in modifiers:
        for normalize in (True, False):
            options: dict[str, Any] = {
                "method": method,
                "filter_indices": [1],
                "grad_modifiers": ["absolute", "none"],
                "normalize": normalize,
                "backprop_modifier": backprop_modifier,
                **METHOD_OPTIONS.get(method, {}),
            }
            alone = explain_if_applicable(client, sample, options)
            if alone is None:
                assert backprop_modifier  # only a backprop modifier may not apply
                continue
            what = f"{method} backprop_modifier={backprop_modifier!r} normalize={normalize}"
            assert_same(alone, client.explain("convnet", first, **options), 3, what)
            assert_same(alone, client.explain("convnet", second, **options), BATCH - 1, what)
            checked.append(backprop_modifier)
    assert "" in checked
