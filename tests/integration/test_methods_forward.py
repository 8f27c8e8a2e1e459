"""Score-CAM, Faster-ScoreCAM, Layer-CAM and occlusion, served over gRPC, against
their definitions computed by hand on small Keras models: Score-CAM's weights are
the probabilities of the masked inputs, Layer-CAM's the element-wise positive
gradients, and occlusion on a linear model has a closed form.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from salience_client import Objective, SalienceClient
from tests.conftest import save_model

# Keras warns when a one-input model is called on a bare tensor, as the checks do.
pytestmark = pytest.mark.filterwarnings("ignore:The structure of `inputs` doesn't match")

EPS = 1e-7
SHAPE = (6, 6, 2)
LINEAR = (6, 5, 2)
# Linear models over one and three spatial axes.
VOLUMES = {"linear_1d": (11, 2), "linear_3d": (4, 5, 3, 1)}


def build_models(root: Path) -> Path:
    """`convnet`: conv1 → conv2 (both 6×6, ReLU) → pool (3×3) → GAP → logits →
    softmax; `linear`: Flatten → Dense, no activation (occlusion's closed form)."""
    import keras

    keras.utils.set_random_seed(7)
    x = keras.Input(SHAPE, name="x")
    h = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv1")(x)
    h = keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D(2, name="pool")(h)
    h = keras.layers.Conv2D(4, 1, activation="relu", name="conv3")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    logits = keras.layers.Dense(3, name="logits")(h)
    probs = keras.layers.Softmax(name="probs")(logits)
    save_model(root, "convnet", keras.Model(x, probs))

    x = keras.Input(LINEAR, name="x")
    h = keras.layers.Flatten(name="flat")(x)
    save_model(root, "linear", keras.Model(x, keras.layers.Dense(2, name="out")(h)))
    for name, shape in VOLUMES.items():
        x = keras.Input(shape, name="x")
        h = keras.layers.Flatten(name="flat")(x)
        save_model(root, name, keras.Model(x, keras.layers.Dense(2, name="out")(h)))
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models(tmp_path_factory.mktemp("forward-repo"))


@pytest.fixture(scope="module")
def client(repo: Path, server_factory: Any) -> SalienceClient:
    return server_factory(repo).client()


@pytest.fixture(scope="module")
def models(repo: Path) -> dict[str, Any]:
    import keras

    return {
        name: keras.saving.load_model(repo / name / "1" / "model.keras", compile=False)
        for name in ("convnet", "linear")
    }


def images(n: int, shape: tuple[int, ...] = SHAPE, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, *shape)).astype(np.float32)


def normalised(m: np.ndarray) -> np.ndarray:
    axes = tuple(range(1, m.ndim))
    low = m.min(axis=axes, keepdims=True)
    high = m.max(axis=axes, keepdims=True)
    return (m - low) / (high - low + EPS)


def resized(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import tensorflow as tf

    return tf.image.resize(m[..., None], size, method="bilinear").numpy()[..., 0]


# Score-CAM -------------------------------------------------------------------------


def scorecam_by_hand(
    model: Any, layer: str, x: np.ndarray, weights: np.ndarray, top: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(weights α (B, k), raw map ReLU(Σ α_k A_k) at the input size) computed one
    masked input at a time: α_k = Σ_c weights_c · softmax(logits(x ∘ H_k))_c."""
    import keras

    a = keras.Model(model.inputs, model.get_layer(layer).output)(x).numpy().astype(np.float64)
    batch, channels = a.shape[0], a.shape[-1]
    alphas, maps = [], []
    for b in range(batch):
        kept = list(range(channels))
        if top:
            std = a[b].reshape(-1, channels).std(axis=0)
            kept = list(np.argsort(-std, kind="stable")[:top])
        alpha = []
        for k in kept:
            u = resized(a[b : b + 1, ..., k].astype(np.float32), x.shape[1:3])[0]
            h = (u - u.min()) / (u.max() - u.min() + EPS)
            probs = model(x[b : b + 1] * h[None, ..., None]).numpy()[0]
            alpha.append(float(np.dot(probs, weights)))
        alpha_k = np.array(alpha)
        cam = np.maximum((a[b][..., kept] * alpha_k).sum(axis=-1), 0)
        alphas.append(alpha_k)
        maps.append(resized(cam[None].astype(np.float32), x.shape[1:3])[0])
    return np.array(alphas), np.array(maps)


@pytest.mark.parametrize(("layer", "chunk"), [("conv2", 0), ("conv2", 3), ("conv3", 1)])
def test_scorecam_weights_are_the_masked_inputs_probabilities(
    client: SalienceClient, models: dict[str, Any], layer: str, chunk: int
) -> None:
    """conv2 keeps the input's 6×6 (no resizing); conv3 is 3×3, resized to 6×6 for its
    masks and its map. Any chunk size gives the same map."""
    x = images(3)
    weights = np.array([0.0, 1.0, 0.0])
    _, want = scorecam_by_hand(models["convnet"], layer, x, weights)
    got = client.explain(
        "convnet",
        x,
        method="scorecam",
        filter_indices=[1],
        penultimate_layer=layer,
        normalize=False,
        chunk_size=chunk,
    )
    assert got.resolved.penultimate_layer == layer
    assert got.resolved.chunk_size == (chunk or 64)
    assert not got.resolved.objectives[0].used_logits  # probabilities, not logits
    assert want.max() > 0  # a map of zeros would prove nothing
    np.testing.assert_allclose(got.maps["none"], want, rtol=1e-4, atol=1e-6)
    normal = client.explain(
        "convnet", x, method="scorecam", filter_indices=[1], penultimate_layer=layer
    )
    np.testing.assert_allclose(normal.maps["none"], normalised(want), atol=1e-4)


def test_scorecam_weights_sum_weighted_objectives(
    client: SalienceClient, models: dict[str, Any]
) -> None:
    x = images(2, seed=9)
    objectives = [Objective("probs", [0], 2.0), Objective(-1, [2], -1.0)]
    _, want = scorecam_by_hand(models["convnet"], "conv2", x, np.array([2.0, 0.0, -1.0]))
    assert want.max() > 0
    got = client.explain(
        "convnet",
        x,
        method="scorecam",
        objectives=objectives,
        normalize=False,
        penultimate_layer="conv2",
    )
    np.testing.assert_allclose(got.maps["none"], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("top", [1, 2, 4])
def test_faster_scorecam_keeps_each_samples_top_variance_channels(
    client: SalienceClient, models: dict[str, Any], top: int
) -> None:
    x = images(3, seed=4)
    weights = np.array([1.0, 0.0, 0.0])
    _, want = scorecam_by_hand(models["convnet"], "conv2", x, weights, top=top)
    _, every = scorecam_by_hand(models["convnet"], "conv2", x, weights)
    got = client.explain(
        "convnet",
        x,
        method="faster-scorecam",
        filter_indices=[0],
        penultimate_layer="conv2",
        top_channels=top,
        normalize=False,
    )
    assert got.resolved.top_channels == top
    np.testing.assert_allclose(got.maps["none"], want, rtol=1e-4, atol=1e-6)
    assert np.abs(want - every).max() > 1e-3  # fewer channels really is another map


def test_faster_scorecam_defaults_to_every_channel_of_a_narrow_layer(
    client: SalienceClient,
) -> None:
    x = images(2)
    got = client.explain("convnet", x, method="faster-scorecam", penultimate_layer="conv2")
    full = client.explain("convnet", x, method="scorecam", penultimate_layer="conv2")
    assert got.resolved.top_channels == 5  # 10 by default, but conv2 has 5
    np.testing.assert_allclose(got.maps["none"], full.maps["none"], atol=1e-5)


# Layer-CAM ---------------------------------------------------------------------------


def layer_and_logits(model: Any, layer: str, x: np.ndarray, unit: int) -> tuple[Any, Any]:
    import keras
    import tensorflow as tf

    cut = keras.Model(
        model.inputs, [model.get_layer(layer).output, model.get_layer("logits").output]
    )
    with tf.GradientTape() as tape:
        a, logits = cut(x)
        score = tf.reduce_sum(logits[:, unit])
    return a.numpy().astype(np.float64), tape.gradient(score, a).numpy().astype(np.float64)


@pytest.mark.parametrize("layer", ["conv2", "conv3"])
def test_layercam_weights_each_element_by_its_positive_gradient(
    client: SalienceClient, models: dict[str, Any], layer: str
) -> None:
    x = images(4, seed=5)
    a, g = layer_and_logits(models["convnet"], layer, x, 2)
    # relu(G) differs from G:
    assert (g < 0).any()
    assert (g > 0).any()
    modifiers = ["relu", "none", "absolute"]
    got = client.explain(
        "convnet",
        x,
        method="layercam",
        filter_indices=[2],
        penultimate_layer=layer,
        grad_modifiers=modifiers,
        normalize=False,
    )
    assert got.resolved.grad_modifiers == ("relu", "none", "absolute")
    fns = {"relu": lambda v: np.maximum(v, 0), "none": lambda v: v, "absolute": np.abs}
    for name in modifiers:
        cam = np.maximum((a * fns[name](g)).sum(axis=-1), 0)
        want = resized(cam.astype(np.float32), SHAPE[:2])
        np.testing.assert_allclose(got.maps[name], want, rtol=1e-4, atol=1e-6, err_msg=name)
    default = client.explain(
        "convnet", x, method="layercam", filter_indices=[2], penultimate_layer=layer
    )
    assert default.resolved.grad_modifiers == ("relu",)
    np.testing.assert_allclose(default.maps["relu"], normalised(got.maps["relu"]), atol=1e-5)


# Occlusion ---------------------------------------------------------------------------


def starts(n: int, window: int, stride: int) -> list[int]:
    """Window starts on an axis of extent n: j·stride, the last flush with the edge."""
    count = -(-(n - window) // stride) + 1
    return [min(j * stride, n - window) for j in range(count)]


def occlusion_by_hand(
    w: np.ndarray, x: np.ndarray, window: int, stride: int, value: float
) -> np.ndarray:
    """s(x) − s(x_p) = Σ_{i ∈ window p} w_i (x_i − v) for a linear score; each pixel
    averages the drops of the windows covering it (any number of spatial axes)."""
    spatial = x.shape[1:-1]
    total = np.zeros((len(x), *spatial))
    count = np.zeros(spatial)
    for corner in itertools.product(*(starts(n, window, stride) for n in spatial)):
        covered = np.zeros(spatial)
        covered[tuple(slice(c, c + window) for c in corner)] = 1
        drop = (w * (x - value) * covered[..., None]).reshape(len(x), -1).sum(axis=1)
        total += drop.reshape(-1, *[1] * len(spatial)) * covered
        count += covered
    assert count.min() >= 1  # the flush last window covers every pixel
    return total / count


@pytest.mark.parametrize(
    ("window", "stride", "value", "chunk"),
    [(3, 2, 0.5, 0), (2, 1, 0.0, 5), (1, 1, -1.0, 7), (5, 3, 0.25, 1)],
)
def test_occlusion_on_a_linear_model_equals_its_closed_form(
    client: SalienceClient,
    models: dict[str, Any],
    window: int,
    stride: int,
    value: float,
    chunk: int,
) -> None:
    kernel, _ = models["linear"].get_layer("out").get_weights()
    unit = 1
    w = kernel[:, unit].reshape(LINEAR).astype(np.float64)
    x = images(3, LINEAR, seed=8)
    want = occlusion_by_hand(w, x.astype(np.float64), window, stride, value)
    got = client.explain(
        "linear",
        x,
        method="occlusion",
        filter_indices=[unit],
        window=window,
        stride=stride,
        occlusion_value=value,
        chunk_size=chunk,
        grad_modifiers=["none", "absolute"],
        normalize=False,
    )
    r = got.resolved
    assert (r.window, r.stride, r.occlusion_value) == (window, stride, value)
    np.testing.assert_allclose(got.maps["none"], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.maps["absolute"], np.abs(want), rtol=1e-4, atol=1e-5)
    normal = client.explain(
        "linear",
        x,
        method="occlusion",
        filter_indices=[unit],
        window=window,
        stride=stride,
        occlusion_value=value,
    )
    np.testing.assert_allclose(normal.maps["none"], normalised(want), atol=1e-4)


def test_occlusion_defaults_clamp_the_window_to_the_input(
    client: SalienceClient, models: dict[str, Any]
) -> None:
    kernel, _ = models["linear"].get_layer("out").get_weights()
    x = images(2, LINEAR, seed=2)
    got = client.explain("linear", x, method="occlusion", filter_indices=[0], normalize=False)
    r = got.resolved
    # 16 by default, but the input is 6×5; stride half the window; value 0.
    assert (r.window, r.stride, r.occlusion_value) == (5, 2, 0.0)
    want = occlusion_by_hand(kernel[:, 0].reshape(LINEAR), x.astype(np.float64), 5, 2, 0.0)
    np.testing.assert_allclose(got.maps["none"], want, rtol=1e-4, atol=1e-5)


def test_occlusion_scores_logits_or_the_kept_activation(
    client: SalienceClient, models: dict[str, Any]
) -> None:
    """On the softmax net: the drop of the logit by default, of the probability with
    keep_activation, each checked by occluding by hand (window 6: one position)."""
    x = images(2, seed=6)
    model = models["convnet"]
    import keras

    logits = keras.Model(model.inputs, model.get_layer("logits").output)
    for keep, fn in ((False, logits), (True, model)):
        got = client.explain(
            "convnet",
            x,
            method="occlusion",
            filter_indices=[1],
            window=6,
            normalize=False,
            keep_activation=keep,
        )
        drop = fn(x).numpy()[:, 1] - fn(np.zeros_like(x)).numpy()[:, 1]
        want = np.broadcast_to(drop[:, None, None], (2, *SHAPE[:2]))
        np.testing.assert_allclose(got.maps["none"], want, rtol=1e-4, atol=1e-6)


def test_metadata_lists_the_methods_each_model_supports(client: SalienceClient) -> None:
    """The CAM methods need a layer with spatial extent (the linear model has none);
    occlusion only needs an input with spatial axes."""
    forward = ["scorecam", "faster-scorecam", "layercam", "occlusion"]
    conv = list(client.metadata("convnet").methods)
    assert [m for m in conv if m in forward] == forward
    linear = list(client.metadata("linear").methods)
    assert [m for m in linear if m in forward] == ["occlusion"]


@pytest.mark.parametrize("name", sorted(VOLUMES))
def test_occlusion_slides_over_one_or_three_spatial_axes(
    client: SalienceClient, repo: Path, name: str
) -> None:
    import keras

    model = keras.saving.load_model(repo / name / "1" / "model.keras", compile=False)
    kernel, _ = model.get_layer("out").get_weights()
    shape = VOLUMES[name]
    x = images(2, shape, seed=12)
    got = client.explain(
        name,
        x,
        method="occlusion",
        filter_indices=[0],
        window=2,
        stride=2,
        normalize=False,
        occlusion_value=0.3,
    )
    want = occlusion_by_hand(kernel[:, 0].reshape(shape), x.astype(np.float64), 2, 2, 0.3)
    assert got.maps["none"].shape == (2, *shape[:-1])
    np.testing.assert_allclose(got.maps["none"], want, rtol=1e-4, atol=1e-5)


# The cost model ------------------------------------------------------------------------


def test_the_cost_model_counts_score_cam_channels_and_occlusion_windows(
    repo: Path, server_factory: Any
) -> None:
    """Score-CAM makes one forward pass per scored channel and occlusion one per window
    position, each plus the unmasked pass: the cost model admits by those counts.
    """
    import grpc

    from salience_client import SalienceError

    client = server_factory(repo, max_request_cost=300).client()
    x = images(1)  # 6×6×2 = 72 input elements
    # conv3 has 4 channels: 5 passes, 360 element-evaluations.
    with pytest.raises(SalienceError) as refused:
        client.explain("convnet", x, method="scorecam", penultimate_layer="conv3")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details == (
        "the scorecam request costs 360 element-evaluations (1 rows × 5 evaluations × 72 "
        "input elements per row), over the server's max_request_cost=300: send "
        "faster-scorecam with fewer top_channels, fewer rows or a smaller input"
    )
    # Two kept channels: 3 passes, 216.
    kept = client.explain(
        "convnet", x, method="faster-scorecam", penultimate_layer="conv3", top_channels=2
    )
    assert kept.resolved.top_channels == 2
    # Windows of 2 with stride 1 over 6×5: 5 × 4 positions + 1 = 21 passes × 60 elements.
    y = images(1, LINEAR)
    with pytest.raises(SalienceError) as windows:
        client.explain("linear", y, method="occlusion", window=2, stride=1)
    assert windows.value.details.startswith(
        "the occlusion request costs 1260 element-evaluations (1 rows × 21 evaluations × 60 "
    )
    assert windows.value.details.endswith(
        "send a larger window or stride, fewer rows or a smaller input"
    )
    # Windows of 5 with stride 5: 2 positions + 1 = 3 passes, 180.
    wide = client.explain("linear", y, method="occlusion", window=5, stride=5)
    assert (wide.resolved.window, wide.resolved.stride) == (5, 5)
