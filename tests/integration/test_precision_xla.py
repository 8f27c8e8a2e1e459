"""Mixed precision and XLA on a real server give the float32, uncompiled maps and
predictions within the tolerances the README documents:

- XLA: maps within 1e-4 (normalised maps lie in [0, 1]), predictions within 1e-5
  relative. SmoothGrad draws its noise through XLA's own Philox-to-normal
  transform, so a seed gives other (equally Gaussian) draws than without XLA: its
  maps are checked against the closed form of a linear model, where noise cannot
  matter, and for reproducibility.
- mixed precision on a smooth network: maps within 0.01 (float16) and 0.05
  (bfloat16), predictions within 1e-3 and 5e-3. (In a ReLU network a unit whose
  pre-activation is near zero can switch, so single pixels may differ more.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import RunningServer, save_model
from tests.integration.models import LINEAR_SHAPE

# On the device the suite computes on: scripts/gpu-check runs these on a GPU.
pytestmark = pytest.mark.gpu

SHAPE = (12, 12, 3)
CLASSES = 4
# Small buckets: XLA compiles every bucket of every warmed function at start-up.
SETTINGS = {"max_device_batch_size": 4}
XLA_MAP_ATOL = 1e-4
XLA_OUTPUT_RTOL = 1e-5
MIXED = {"float16": (0.01, 1e-3), "bfloat16": (0.05, 5e-3)}  # (maps, predictions) atol
OPTIONS: dict[str, dict[str, Any]] = {
    "vanilla": {},
    "gradient-x-input": {},
    "integrated-gradients": {"steps": 16},
    "gradcam": {},
    "gradcam++": {},
    "guided-gradcam": {},
    "smoothgrad": {"samples": 8, "seed": 7},
    # Layer-CAM compiles as Grad-CAM; Score-CAM and occlusion run uncompiled (their
    # copies per call follow tensor arguments), so XLA must leave them as they are.
    "layercam": {},
    "scorecam": {},
    "faster-scorecam": {"top_channels": 2},
    "occlusion": {"window": 3},
    "blur-ig": {"steps": 8, "blur_max_sigma": 4.0},
    "guided-ig": {"steps": 8},
    # XRAI's device function is plain Python around two tf.functions (the regions are
    # segmented on the host): the XLA placement leaves it as it is.
    "xrai": {"steps": 8, "xrai_scales": [100.0]},
}


def build_relu_convnet() -> Any:
    import keras

    keras.utils.set_random_seed(21)
    x = keras.Input(SHAPE, name="x")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(x, keras.layers.Dense(CLASSES, activation="softmax", name="probs")(h))


def build_smooth_convnet() -> Any:
    import keras

    keras.utils.set_random_seed(5)
    x = keras.Input(SHAPE, name="x")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="tanh", name="conv1")(x)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="softplus", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(x, keras.layers.Dense(CLASSES, activation="softmax", name="probs")(h))


def build_linear() -> Any:
    import keras

    keras.utils.set_random_seed(8)
    x = keras.Input(LINEAR_SHAPE, name="x")
    flat = keras.layers.Flatten(name="flatten")(x)
    return keras.Model(x, keras.layers.Dense(CLASSES, name="logits")(flat))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("precision-repo")
    save_model(root, "relu", build_relu_convnet())
    save_model(root, "smooth", build_smooth_convnet())
    save_model(root, "linear", build_linear())
    return root


@pytest.fixture(scope="module")
def baseline(repo: Path, server_factory: Any) -> RunningServer:
    return server_factory(repo, **SETTINGS)  # type: ignore[no-any-return]


def images(n: int = 3, seed: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, *SHAPE)).astype(np.float32)


def explain(running: RunningServer, model: str, method: str, x: np.ndarray) -> Any:
    with running.client() as client:
        return client.explain(model, x, method=method, filter_indices=[1], **OPTIONS[method])


def test_xla_gives_the_maps_and_predictions_of_the_uncompiled_functions(
    repo: Path, baseline: RunningServer, server_factory: Any
) -> None:
    compiled = server_factory(repo, xla=True, **SETTINGS)
    x = images()
    for method in sorted(set(OPTIONS) - {"smoothgrad"}):
        want = explain(baseline, "relu", method, x)
        got = explain(compiled, "relu", method, x)
        np.testing.assert_allclose(
            got.outputs["probs"], want.outputs["probs"], rtol=XLA_OUTPUT_RTOL, err_msg=method
        )
        for name, m in want.maps.items():
            np.testing.assert_allclose(got.maps[name], m, atol=XLA_MAP_ATOL, err_msg=method)
    with compiled.client() as client:
        predicted = client.predict("relu", x).outputs["probs"]
    np.testing.assert_allclose(predicted, want.outputs["probs"], rtol=XLA_OUTPUT_RTOL)

    # SmoothGrad of a linear score is |w| whatever the noise; a seed reproduces it.
    runtime = compiled.server.core.repository.get("linear")
    assert runtime.placement.xla
    w = runtime.model.get_layer("logits").kernel.numpy()[:, 2].reshape(LINEAR_SHAPE)
    xl = np.random.default_rng(1).uniform(-1, 1, (2, *LINEAR_SHAPE)).astype(np.float32)
    with compiled.client() as client:
        options = {"method": "smoothgrad", "samples": 6, "noise": 0.5, "seed": 3}
        one = client.explain("linear", xl, filter_indices=[2], normalize=False, **options)
        two = client.explain("linear", xl, filter_indices=[2], normalize=False, **options)
    np.testing.assert_allclose(one.maps["absolute"], [np.abs(w).max(-1)] * 2, rtol=1e-5)
    np.testing.assert_array_equal(one.maps["absolute"], two.maps["absolute"])


@pytest.mark.parametrize("dtype", sorted(MIXED))
def test_mixed_precision_maps_and_predictions_are_close_to_float32(
    repo: Path, baseline: RunningServer, server_factory: Any, dtype: str
) -> None:
    mixed = server_factory(repo, mixed_precision=dtype, **SETTINGS)
    runtime = mixed.server.core.repository.get("smooth")
    assert runtime.model.get_layer("conv1").compute_dtype == dtype
    assert runtime.model.get_layer("conv1").kernel.dtype == "float32"
    assert runtime.model.get_layer("probs").compute_dtype == "float32"
    map_atol, output_atol = MIXED[dtype]
    x = images()
    # Guided Grad-CAM needs ReLUs. Occlusion's map is made of differences of nearly
    # equal scores, which carry the reduced type's rounding whole (the README says so);
    # XRAI's map is a ranking of regions, a discrete choice that a reduced type may make
    # otherwise where two regions' gains are close.
    for method in sorted(set(OPTIONS) - {"guided-gradcam", "occlusion", "xrai"}):
        want = explain(baseline, "smooth", method, x)
        got = explain(mixed, "smooth", method, x)
        assert got.outputs["probs"].dtype == np.float32
        np.testing.assert_allclose(
            got.outputs["probs"], want.outputs["probs"], atol=output_atol, err_msg=method
        )
        for name, m in want.maps.items():
            np.testing.assert_allclose(got.maps[name], m, atol=map_atol, err_msg=method)
        # Not equal either: the reduced type really computed them.
        assert not np.array_equal(got.outputs["probs"], want.outputs["probs"])
