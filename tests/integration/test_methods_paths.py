"""Blur IG, Guided IG and XRAI served over gRPC, checked against PAIR's saliency
library (`saliency.core`) on the same weights and inputs, and against their
definitions (completeness).

PAIR's methods take a `call_model_function`; here it is the same Keras model loaded
from the served file, its gradient taken with a `GradientTape` on the same logit the
service explains. Maps are compared raw (grad modifier "none", no normalisation).
"""

from __future__ import annotations

import itertools
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from salience_client import SalienceClient
from tests.conftest import save_model

SHAPE = (14, 12, 3)
UNIT = 1
RAW: dict[str, Any] = {"grad_modifiers": ["none"], "normalize": False, "keepdims": True}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    root = tmp_path_factory.mktemp("paths-repo")
    keras.utils.set_random_seed(21)
    x = keras.Input(SHAPE, name="image")
    h = keras.layers.Conv2D(6, 3, padding="same", activation="tanh", name="conv1")(x)
    h = keras.layers.Conv2D(4, 3, padding="same", activation="tanh", name="conv2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    save_model(root, "tanh", keras.Model(x, keras.layers.Dense(3, name="logits")(h)))

    x = keras.Input(SHAPE, name="image")
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv1")(x)
    h = keras.layers.MaxPooling2D(2, name="pool")(h)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    save_model(root, "relu", keras.Model(x, keras.layers.Dense(3, name="logits")(h)))

    x = keras.Input((6,), name="features")
    h = keras.layers.Dense(5, activation="tanh", name="hidden")(x)
    save_model(root, "dense", keras.Model(x, keras.layers.Dense(2, name="logits")(h)))
    return root


@pytest.fixture(scope="module")
def client(repo: Path, server_factory: Any) -> SalienceClient:
    return server_factory(repo).client()


def load(repo: Path, name: str) -> Any:
    import keras

    return keras.saving.load_model(repo / name / "1" / "model.keras", compile=False)


def call_model_function(model: Any, unit: int = UNIT) -> Any:
    """PAIR's model interface: the gradient of logit `unit` for a batch of inputs."""
    import saliency.core as pair
    import tensorflow as tf

    def call(batch: Any, call_model_args: Any = None, expected_keys: Any = None) -> Any:
        rows = tf.convert_to_tensor(np.asarray(batch, np.float32))
        with tf.GradientTape() as tape:
            tape.watch(rows)
            score = tf.reduce_sum(model(rows, training=False)[:, unit])
        return {pair.base.INPUT_OUTPUT_GRADIENTS: tape.gradient(score, rows).numpy()}

    return call


def guided_ig_module() -> Any:
    """PAIR's guided_ig module, its `np.quantile(..., interpolation=)` call (the
    keyword numpy 2 renamed `method`) translated; the algorithm is PAIR's own."""
    import saliency.core.guided_ig as guided_ig

    def quantile(a: Any, q: Any, interpolation: str = "linear", **kwargs: Any) -> Any:
        return np.quantile(a, q, method=interpolation, **kwargs)

    shim = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    shim.quantile = quantile
    guided_ig.np = shim
    return guided_ig


def images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.3, (n, *SHAPE))
    # Blocks of colour, so that segmentations have regions to find.
    for k in range(n):
        top, left = rng.integers(0, 6, 2)
        x[k, top : top + 7, left : left + 6] += rng.uniform(0.3, 0.8, 3)
    return x.astype(np.float32)


def logits(client: SalienceClient, model: str, x: np.ndarray) -> np.ndarray:
    return np.asarray(client.predict(model, x).predictions[:, UNIT], np.float64)


def assert_close_to(got: np.ndarray, want: np.ndarray, what: str, rtol: float = 1e-4) -> None:
    """Agreement relative to the reference map's largest magnitude."""
    scale = float(np.abs(want).max())
    assert scale > 0, f"{what}: the reference map is all zeros, nothing is compared"
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale, err_msg=what)


# Blur IG ------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tanh", "relu"])
@pytest.mark.parametrize(
    ("max_sigma", "grad_step", "steps"), [(4.0, 0.01, 12), (50.0, 0.05, 20), (0.3, 0.01, 5)]
)
def test_blur_ig_matches_pair(
    client: SalienceClient,
    repo: Path,
    model: str,
    max_sigma: float,
    grad_step: float,
    steps: int,
) -> None:
    import saliency.core as pair

    x = images(3, seed=1)
    result = client.explain(
        model,
        x,
        method="blur-ig",
        filter_indices=[UNIT],
        steps=steps,
        blur_max_sigma=max_sigma,
        blur_grad_step=grad_step,
        **RAW,
    )
    assert (result.resolved.steps, result.resolved.blur_max_sigma) == (steps, max_sigma)
    assert result.resolved.blur_grad_step == grad_step
    call = call_model_function(load(repo, model))
    for k in range(len(x)):
        want = pair.BlurIG().GetMask(
            x[k].astype(np.float64), call, max_sigma=max_sigma, steps=steps, grad_step=grad_step
        )
        assert_close_to(result.maps["none"][k], want, f"{model} sample {k}")


def test_blur_ig_completeness_residual_is_its_definition(
    client: SalienceClient, repo: Path
) -> None:
    from scipy import ndimage

    x = images(2, seed=2)
    blurred = np.stack([ndimage.gaussian_filter(s, [10, 10, 0], mode="constant") for s in x])
    want_difference = logits(client, "tanh", x) - logits(client, "tanh", blurred)
    ratios = []
    for steps in (4, 16, 64):
        result = client.explain(
            "tanh",
            x,
            method="blur-ig",
            filter_indices=[UNIT],
            steps=steps,
            blur_max_sigma=10.0,
            **RAW,
        )
        assert result.completeness_residual is not None
        assert result.score_difference is not None
        np.testing.assert_allclose(result.score_difference, want_difference, rtol=1e-4, atol=1e-6)
        total = result.maps["none"].reshape(len(x), -1).sum(axis=1)
        np.testing.assert_allclose(
            result.completeness_residual, total - want_difference, rtol=1e-3, atol=1e-6
        )
        ratio = np.abs(result.completeness_residual) / np.abs(want_difference)
        print(f"Blur IG completeness steps={steps}: residual/|score difference| = {ratio}")
        ratios.append(ratio.max())
    # The left Riemann sum converges: more steps, a smaller residual.
    assert ratios[2] < ratios[1] < ratios[0]
    assert ratios[2] < 0.05


def test_blur_ig_defaults_are_echoed(client: SalienceClient) -> None:
    result = client.explain("tanh", images(1, seed=3), method="blur-ig", steps=4)
    r = result.resolved
    assert (r.blur_max_sigma, r.blur_grad_step, r.steps) == (50.0, 0.01, 4)
    assert r.grad_modifiers == ("absolute",)
    assert (r.guided_fraction, r.xrai_scales) == (0.0, ())
    assert result.maps["absolute"].shape == (1, *SHAPE[:2])


# Guided IG ----------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tanh", "relu"])
@pytest.mark.parametrize(
    ("fraction", "max_dist", "steps"),
    [(0.25, 0.02, 16), (0.1, 0.2, 10), (1.0, 0.0, 8), (0.5, 1.0, 6)],
)
def test_guided_ig_matches_pair(
    client: SalienceClient,
    repo: Path,
    model: str,
    fraction: float,
    max_dist: float,
    steps: int,
) -> None:
    guided_ig = guided_ig_module()
    x = images(3, seed=4)
    result = client.explain(
        model,
        x,
        method="guided-ig",
        filter_indices=[UNIT],
        steps=steps,
        guided_fraction=fraction,
        guided_max_dist=max_dist,
        **RAW,
    )
    r = result.resolved
    assert (r.steps, r.guided_fraction, r.guided_max_dist) == (steps, fraction, max_dist)
    call = call_model_function(load(repo, model))
    for k in range(len(x)):
        want = guided_ig.GuidedIG().GetMask(
            x[k], call, x_steps=steps, fraction=fraction, max_dist=max_dist
        )
        assert_close_to(result.maps["none"][k], want, f"{model} sample {k}")


def test_guided_ig_with_a_baseline_matches_pair(client: SalienceClient, repo: Path) -> None:
    guided_ig = guided_ig_module()
    x = images(2, seed=5)
    baseline = np.full(SHAPE, 0.2, np.float32)
    # Features equal to the baseline have no path to walk: they stay put.
    x[0, 0, 0] = baseline[0, 0]
    result = client.explain(
        "tanh", x, method="guided-ig", filter_indices=[UNIT], steps=12, baseline=baseline, **RAW
    )
    call = call_model_function(load(repo, "tanh"))
    for k in range(len(x)):
        want = guided_ig.GuidedIG().GetMask(x[k], call, x_baseline=baseline, x_steps=12)
        assert_close_to(result.maps["none"][k], want, f"sample {k}")
    assert np.all(result.maps["none"][0, 0, 0] == 0)


@pytest.mark.parametrize("model", ["tanh", "relu"])
def test_guided_ig_completeness_residual_is_its_definition(
    client: SalienceClient, repo: Path, model: str
) -> None:
    # The residual is reported for every path; with max_dist = 0 the path is the
    # straight line and the sum PAIR's left Riemann sum, whose residual shrinks with
    # the steps. With max_dist > 0 a feature may jump up to 2·max_dist along the path
    # in one step on a gradient taken before the jump, whatever the steps: the
    # residual is what the method's quadrature leaves, printed for the record.
    x = images(2, seed=6)
    want_difference = logits(client, model, x) - logits(client, model, np.zeros_like(x))
    ratios: dict[float, list[float]] = {0.0: [], 0.02: []}
    for max_dist, steps in itertools.product(ratios, (4, 32, 128)):
        result = client.explain(
            model,
            x,
            method="guided-ig",
            filter_indices=[UNIT],
            steps=steps,
            guided_max_dist=max_dist,
            **RAW,
        )
        assert result.completeness_residual is not None
        assert result.score_difference is not None
        np.testing.assert_allclose(result.score_difference, want_difference, rtol=1e-4, atol=1e-6)
        total = result.maps["none"].reshape(len(x), -1).sum(axis=1)
        np.testing.assert_allclose(
            result.completeness_residual, total - want_difference, rtol=1e-3, atol=1e-6
        )
        ratio = np.abs(result.completeness_residual) / np.abs(want_difference)
        print(
            f"Guided IG completeness {model} max_dist={max_dist} steps={steps}: "
            f"residual/|score difference| = {ratio}"
        )
        ratios[max_dist].append(float(ratio.max()))
    straight = ratios[0.0]
    assert straight[2] < straight[1] < straight[0]
    assert straight[2] < 0.05


def test_guided_ig_of_an_input_equal_to_its_baseline_is_zero(client: SalienceClient) -> None:
    x = images(2, seed=7)
    x[1] = 0
    result = client.explain("tanh", x, method="guided-ig", steps=4, **RAW)
    assert np.all(result.maps["none"][1] == 0)
    assert np.abs(result.maps["none"][0]).max() > 0


def test_guided_ig_explains_models_without_images(client: SalienceClient, repo: Path) -> None:
    guided_ig = guided_ig_module()
    x = np.random.default_rng(8).normal(0, 1, (2, 6)).astype(np.float32)
    result = client.explain("dense", x, method="guided-ig", filter_indices=[UNIT], steps=10, **RAW)
    call = call_model_function(load(repo, "dense"))
    for k in range(len(x)):
        want = guided_ig.GuidedIG().GetMask(x[k], call, x_steps=10)
        assert_close_to(result.maps["none"][k], want, f"sample {k}")


# XRAI ---------------------------------------------------------------------------


XRAI_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("defaults", {}, {}),
    (
        "segmentation options",
        {
            "xrai_scales": [30.0, 300.0],
            "xrai_sigma": 0.5,
            "xrai_min_size": 60,
            "xrai_dilation_radius": 2,
        },
        {"scales": [30.0, 300.0], "sigma": 0.5, "min_size": 60, "radius": 2},
    ),
    ("area threshold", {"xrai_area_threshold": 0.3}, {"area": 0.3}),
]


@pytest.mark.parametrize("model", ["tanh", "relu"])
@pytest.mark.parametrize(
    ("options", "reference"), [c[1:] for c in XRAI_CASES], ids=[c[0] for c in XRAI_CASES]
)
def test_xrai_matches_pair(
    client: SalienceClient,
    repo: Path,
    model: str,
    options: dict[str, Any],
    reference: dict[str, Any],
) -> None:
    import saliency.core as pair
    from saliency.core import xrai

    x = images(2, seed=9)
    steps = 10
    result = client.explain(
        model,
        x,
        method="xrai",
        filter_indices=[UNIT],
        steps=steps,
        grad_modifiers=["none"],
        normalize=False,
        **options,
    )
    assert result.resolved.steps == steps
    assert result.resolved.channels_reduced
    call = call_model_function(load(repo, model))
    parameters = pair.XRAIParameters(steps=steps, area_threshold=reference.get("area", 1.0))
    for k in range(len(x)):
        segments = None
        if "scales" in reference:
            # PAIR's segmentation with these parameters (its module constants).
            saved = (xrai._FELZENSZWALB_SCALE_VALUES, xrai._FELZENSZWALB_SIGMA_VALUES)
            saved_size = xrai._FELZENSZWALB_MIN_SEGMENT_SIZE
            try:
                xrai._FELZENSZWALB_SCALE_VALUES = reference["scales"]
                xrai._FELZENSZWALB_SIGMA_VALUES = [reference["sigma"]]
                xrai._FELZENSZWALB_MIN_SEGMENT_SIZE = reference["min_size"]
                segments = xrai._get_segments_felzenszwalb(x[k], dilation_rad=reference["radius"])
            finally:
                xrai._FELZENSZWALB_SCALE_VALUES, xrai._FELZENSZWALB_SIGMA_VALUES = saved
                xrai._FELZENSZWALB_MIN_SEGMENT_SIZE = saved_size
        want = pair.XRAI().GetMask(
            x[k], call, segments=segments, batch_size=steps, extra_parameters=parameters
        )
        got = result.maps["none"][k]
        assert got.shape == SHAPE[:2]
        assert_close_to(got, want, f"{model} sample {k}", rtol=1e-4)
        # A region-ranked map: a few distinct values (one per region), not per pixel.
        assert len(np.unique(want)) < got.size / 4


def test_xrai_with_a_baseline_matches_pair(client: SalienceClient, repo: Path) -> None:
    import saliency.core as pair

    x = images(2, seed=10)
    baseline = np.full(SHAPE, 0.1, np.float32)
    result = client.explain(
        "tanh",
        x,
        method="xrai",
        filter_indices=[UNIT],
        steps=8,
        baseline=baseline,
        grad_modifiers=["none"],
        normalize=False,
        keepdims=True,
    )
    call = call_model_function(load(repo, "tanh"))
    parameters = pair.XRAIParameters(steps=8)
    for k in range(len(x)):
        want = pair.XRAI().GetMask(
            x[k], call, baselines=[baseline], batch_size=8, extra_parameters=parameters
        )
        got = result.maps["none"][k]
        assert got.shape == (*SHAPE[:2], 1)
        assert_close_to(got[..., 0], want, f"sample {k}")


def test_xrai_echoes_its_defaults_and_normalises(client: SalienceClient) -> None:
    result = client.explain("tanh", images(1, seed=11), method="xrai", steps=4)
    r = result.resolved
    assert r.grad_modifiers == ("none",)
    assert r.xrai_scales == (50.0, 100.0, 150.0, 250.0, 500.0, 1200.0)
    assert (r.xrai_sigma, r.xrai_min_size, r.xrai_dilation_radius) == (0.8, 150, 5)
    assert r.xrai_area_threshold == 1.0
    saliency = result.maps["none"]
    assert saliency.shape == (1, *SHAPE[:2])
    assert saliency.min() == 0
    assert 0.99 < saliency.max() < 1


# Metadata -----------------------------------------------------------------------


def test_metadata_lists_the_path_methods_a_model_supports(client: SalienceClient) -> None:
    import grpc

    from salience_client import SalienceError

    for model in ("tanh", "relu"):
        assert {"blur-ig", "guided-ig", "xrai"} <= set(client.metadata(model).methods)
    dense = list(client.metadata("dense").methods)
    assert "guided-ig" in dense
    assert not {"blur-ig", "xrai"} & set(dense)
    for method in ("blur-ig", "xrai"):
        with pytest.raises(SalienceError) as caught:
            client.explain("dense", np.zeros((1, 6), np.float32), method=method)
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"explanation.method={method!r}" in caught.value.details
