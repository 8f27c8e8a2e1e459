"""Served maps equal tf-keras-vis's on the same Keras 3 model, for the options both share.

tf-keras-vis (keisen/tf-keras-vis, the maintained successor of keras-vis) runs eagerly on
a modified copy of the model: `ReplaceToLinear` swaps the softmax head for a linear one
(our default of scoring the logits), `GuidedBackpropagation` swaps every ReLU activation
for a guided one (our `backprop_modifier="guided"`). Its `CategoricalScore([c0, c1, ...])`
scores sample i on its own class c_i; we send one request per sample instead.

The conv net keeps the input's 8×8 resolution up to the Grad-CAM layer ('same' padding,
no pooling), so the CAM needs no resizing and is compared exactly (tf-keras-vis
`expand_cam=False`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from salience_client import Objective, SalienceClient
from tests.conftest import save_model

# tf-keras-vis feeds a one-input model a list, and imports zoom from a SciPy namespace
# deprecated for removal in SciPy 2.0: its warnings, not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The structure of `inputs` doesn't match:UserWarning"),
    pytest.mark.filterwarnings("ignore:Please import `zoom`:DeprecationWarning"),
]

EPS = 1e-7
SHAPE = (8, 8, 3)
# Each sample's own class: tf-keras-vis scores sample i on CLASSES[i].
CLASSES = [0, 2, 3, 1]
MODIFIERS = ["absolute", "none", "negate", "relu", "invert", "small_values"]
ATOL = 1e-4


def tkv_modifier(name: str) -> Callable[[Any], Any] | None:
    """Our grad modifier as a tf-keras-vis `gradient_modifier` (reference table)."""
    import tensorflow as tf

    return {
        "absolute": tf.abs,
        "none": None,
        "negate": tf.negative,
        "relu": tf.nn.relu,
        "invert": lambda g: 1.0 / (g + EPS),
        "small_values": lambda g: tf.abs(1.0 / (g + EPS)),
    }[name]


def build_convnet() -> Any:
    """ReLU conv net with a softmax head: a fused ReLU (conv1), a standalone
    Activation('relu') (relu2) and a ReLU Dense layer, all at the input's resolution."""
    import keras

    keras.utils.set_random_seed(11)
    x = keras.Input(SHAPE, name="x")
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv1")(x)
    h = keras.layers.Conv2D(5, 3, padding="same", name="conv2")(h)
    h = keras.layers.Activation("relu", name="relu2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(16, activation="relu", name="hidden")(h)
    out = keras.layers.Dense(4, activation="softmax", name="probs")(h)
    return keras.Model(x, out, name="convnet")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("parity-repo"), "convnet", build_convnet())


@pytest.fixture(scope="module")
def client(repo: Path, server_factory: Any) -> SalienceClient:
    return server_factory(repo).client()


@pytest.fixture(scope="module")
def model(repo: Path) -> Any:
    """The served model file, loaded again for tf-keras-vis (same weights)."""
    import keras

    return keras.saving.load_model(repo / "convnet" / "1" / "model.keras", compile=False)


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(5).uniform(-1, 1, (len(CLASSES), *SHAPE)).astype("float32")


def saliency(model: Any, guided: bool = False, linear: bool = True) -> Any:
    from tf_keras_vis.saliency import Saliency
    from tf_keras_vis.utils.model_modifiers import GuidedBackpropagation, ReplaceToLinear

    modifiers: list[Any] = [ReplaceToLinear()] if linear else []
    if guided:
        modifiers.insert(0, GuidedBackpropagation())
    return Saliency(model, model_modifier=modifiers, clone=True)


def categorical(indices: list[int] | int) -> Any:
    from tf_keras_vis.utils.scores import CategoricalScore

    return CategoricalScore(indices)


def per_sample_maps(
    client: SalienceClient, x: np.ndarray, classes: list[int], **options: Any
) -> dict[str, np.ndarray]:
    """One request per sample, each for its own class; maps stacked over samples."""
    results = [
        client.explain("convnet", x[i : i + 1], filter_indices=[c], **options).maps
        for i, c in enumerate(classes)
    ]
    return {name: np.concatenate([r[name] for r in results]) for name in results[0]}


def max_diff(got: np.ndarray, want: Any) -> float:
    want = np.asarray(want)
    assert got.shape == want.shape
    return float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))


def check_close(got: np.ndarray, want: Any, normalize: bool) -> None:
    """Normalised maps lie in [0, 1): within ATOL. Raw maps carry the gradient's own
    scale (1e-2 for a CAM, 1e4 for 1/(G+eps)): within ATOL of their largest value."""
    want = np.asarray(want)
    scale = 1.0 if normalize else float(np.max(np.abs(want)))
    assert scale > 0  # a map of zeros would prove nothing
    assert max_diff(got, want) <= ATOL * scale, (max_diff(got, want), scale)


# Vanilla saliency ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("keepdims", "normalize"), list(itertools.product([False, True], [True, False]))
)
def test_vanilla_equals_saliency_for_every_modifier(
    client: SalienceClient, model: Any, x: np.ndarray, keepdims: bool, normalize: bool
) -> None:
    ours = per_sample_maps(
        client, x, CLASSES, grad_modifiers=MODIFIERS, keepdims=keepdims, normalize=normalize
    )
    theirs = saliency(model)
    for modifier in MODIFIERS:
        want = theirs(
            categorical(CLASSES),
            x,
            keepdims=keepdims,
            normalize_map=normalize,
            gradient_modifier=tkv_modifier(modifier),
        )
        check_close(ours[modifier], want, normalize)


def test_vanilla_batch_of_one_class_equals_saliency(
    client: SalienceClient, model: Any, x: np.ndarray
) -> None:
    ours = client.explain("convnet", x, filter_indices=[2]).maps["absolute"]
    want = saliency(model)(categorical(2), x)
    check_close(ours, want, normalize=True)


def test_kept_softmax_equals_saliency_without_replace_to_linear(
    client: SalienceClient, model: Any, x: np.ndarray
) -> None:
    ours = per_sample_maps(
        client, x, CLASSES, keep_activation=True, grad_modifiers=["none"], normalize=False
    )
    want = saliency(model, linear=False)(
        categorical(CLASSES), x, gradient_modifier=None, normalize_map=False
    )
    check_close(ours["none"], want, normalize=False)


def test_conv_channel_objective_equals_intermediate_layer_score(
    client: SalienceClient, model: Any, x: np.ndarray
) -> None:
    """A conv channel is scored by its spatial mean in both (CategoricalScore on a
    rank-4 output averages over everything but the batch)."""
    from tf_keras_vis.saliency import Saliency
    from tf_keras_vis.utils.model_modifiers import ExtractIntermediateLayer

    channels = [4, 0, 3, 1]
    theirs = Saliency(model, model_modifier=ExtractIntermediateLayer("conv2"), clone=True)
    for keepdims in (False, True):
        ours = np.concatenate(
            [
                client.explain(
                    "convnet", x[i : i + 1], layer="conv2", filter_indices=[c], keepdims=keepdims
                ).maps["absolute"]
                for i, c in enumerate(channels)
            ]
        )
        check_close(ours, theirs(categorical(channels), x, keepdims=keepdims), normalize=True)


def test_weighted_objectives_equal_a_weighted_score_function(
    client: SalienceClient, model: Any, x: np.ndarray
) -> None:
    objectives = [Objective("probs", [1], 2.0), Objective(-1, [3], -1.0)]
    ours = client.explain(
        "convnet", x, objectives=objectives, grad_modifiers=["none", "absolute"], normalize=False
    ).maps
    theirs = saliency(model)

    def contrast(output: Any) -> Any:
        return 2.0 * output[:, 1] - output[:, 3]

    for modifier in ("none", "absolute"):
        want = theirs(contrast, x, normalize_map=False, gradient_modifier=tkv_modifier(modifier))
        check_close(ours[modifier], want, normalize=False)


# Guided backpropagation -------------------------------------------------------------


@pytest.mark.parametrize(("keepdims", "normalize"), [(False, True), (True, False)])
def test_guided_vanilla_equals_saliency_with_guided_backpropagation(
    client: SalienceClient, model: Any, x: np.ndarray, keepdims: bool, normalize: bool
) -> None:
    modifiers = ["absolute", "none", "relu"]
    ours = per_sample_maps(
        client,
        x,
        CLASSES,
        backprop_modifier="guided",
        grad_modifiers=modifiers,
        keepdims=keepdims,
        normalize=normalize,
    )
    theirs = saliency(model, guided=True)
    plain = saliency(model)
    for modifier in modifiers:
        options = {
            "keepdims": keepdims,
            "normalize_map": normalize,
            "gradient_modifier": tkv_modifier(modifier),
        }
        want = theirs(categorical(CLASSES), x, **options)
        check_close(ours[modifier], want, normalize)
        # Guided really differs from plain backprop on this net.
        assert max_diff(ours[modifier], plain(categorical(CLASSES), x, **options)) > 0.01


# SmoothGrad ---------------------------------------------------------------------------


def unit_noise(seed: int, copies: int) -> np.ndarray:
    """Copy j's unit Gaussian noise as documented for SmoothGrad: Philox key
    [seed mod 2³², seed >> 32], folded with j, then a stateless normal draw."""
    import tensorflow as tf

    key = tf.constant(np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint32).view(np.int32))
    return np.stack(
        [
            tf.random.stateless_normal(
                SHAPE,
                seed=tf.random.experimental.stateless_fold_in(key, j, alg="philox"),
                alg="philox",
                dtype=tf.float32,
            ).numpy()
            for j in range(copies)
        ]
    )


@pytest.mark.parametrize(
    ("noise", "keepdims", "normalize"), [(0.2, False, True), (0.5, True, False), (0.0, False, True)]
)
def test_smoothgrad_equals_saliency_smooth_samples_on_the_same_noise(
    client: SalienceClient,
    model: Any,
    x: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
    noise: float,
    keepdims: bool,
    normalize: bool,
) -> None:
    """tf-keras-vis draws its noise from the global numpy generator, `σ·(max x − min x)`
    per sample; replaying our documented draws there makes the two comparable exactly."""
    samples, seed = 6, 2**40 + 123
    modifiers = ["absolute", "none", "relu"]
    ours = per_sample_maps(
        client,
        x,
        CLASSES,
        method="smoothgrad",
        samples=samples,
        noise=noise,
        seed=seed,
        grad_modifiers=modifiers,
        keepdims=keepdims,
        normalize=normalize,
    )
    unit = unit_noise(seed, samples)

    draws = []

    def replayed(loc: float, scale: Any, size: tuple[int, ...]) -> np.ndarray:
        # size is (copies, batch, *sample): every sample of a request shares copy j's draw.
        assert loc == 0.0
        assert tuple(size) == (samples, len(x), *SHAPE)
        draws.append(size)
        return unit[:, None] * np.asarray(scale, np.float32)

    monkeypatch.setattr(np.random, "normal", replayed)
    theirs = saliency(model)
    for modifier in modifiers:
        want = theirs(
            categorical(CLASSES),
            x,
            smooth_samples=samples,
            smooth_noise=noise,
            keepdims=keepdims,
            normalize_map=normalize,
            gradient_modifier=tkv_modifier(modifier),
        )
        check_close(ours[modifier], want, normalize)
    assert len(draws) == len(modifiers)  # tf-keras-vis ran on the replayed noise


# Grad-CAM and Grad-CAM++ --------------------------------------------------------------


def gradcam(model: Any, plus_plus: bool) -> Any:
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear

    kind = GradcamPlusPlus if plus_plus else Gradcam
    return kind(model, model_modifier=ReplaceToLinear(), clone=True)


@pytest.mark.parametrize("layer", ["relu2", "conv1"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_cam_equals_tf_keras_vis_before_resizing(
    client: SalienceClient, model: Any, x: np.ndarray, method: str, normalize: bool, layer: str
) -> None:
    """The CAM layers keep the input's 8×8 grid, so our resize to the input is the
    identity and tf-keras-vis's `expand_cam=False` map is comparable pixel for pixel."""
    modifiers = ["none", "absolute", "relu", "negate"]
    ours = per_sample_maps(
        client,
        x,
        CLASSES,
        method=method,
        penultimate_layer=layer,
        grad_modifiers=modifiers,
        normalize=normalize,
    )
    theirs = gradcam(model, plus_plus=method == "gradcam++")
    for modifier in modifiers:
        want = theirs(
            categorical(CLASSES),
            x,
            penultimate_layer=layer,
            seek_penultimate_conv_layer=False,
            gradient_modifier=tkv_modifier(modifier),
            expand_cam=False,
            normalize_cam=normalize,
        )
        check_close(ours[modifier], want, normalize)


def test_guided_gradcam_equals_guided_saliency_times_cam(
    client: SalienceClient, model: Any, x: np.ndarray
) -> None:
    """tf-keras-vis has no Guided Grad-CAM; it is made from its parts as defined: the
    guided input gradient times the raw Grad-CAM (same resolution here), then the
    grad modifier, channel max and per-sample normalisation."""
    modifiers = ["absolute", "none", "negate"]
    ours = per_sample_maps(
        client,
        x,
        CLASSES,
        method="guided-gradcam",
        penultimate_layer="relu2",
        grad_modifiers=modifiers,
    )
    raw = saliency(model, guided=True)(
        categorical(CLASSES), x, gradient_modifier=None, keepdims=True, normalize_map=False
    )
    cam = gradcam(model, plus_plus=False)(
        categorical(CLASSES),
        x,
        penultimate_layer="relu2",
        seek_penultimate_conv_layer=False,
        expand_cam=False,
        normalize_cam=False,
    )
    product = np.asarray(raw, np.float64) * np.asarray(cam, np.float64)[..., None]
    for modifier in modifiers:
        fn = tkv_modifier(modifier)
        s = np.asarray(fn(product) if fn is not None else product).max(axis=-1)
        low = s.min(axis=(1, 2), keepdims=True)
        high = s.max(axis=(1, 2), keepdims=True)
        check_close(ours[modifier], (s - low) / (high - low + EPS), normalize=True)


# Score-CAM, Faster-ScoreCAM and Layer-CAM ----------------------------------------------


def tkv_cam(model: Any, kind: str) -> Any:
    from tf_keras_vis.layercam import Layercam
    from tf_keras_vis.scorecam import Scorecam
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear

    return {"scorecam": Scorecam, "layercam": Layercam}[kind](
        model, model_modifier=ReplaceToLinear(), clone=True
    )


@pytest.mark.parametrize("layer", ["relu2", "conv1"])
@pytest.mark.parametrize("normalize", [True, False])
def test_scorecam_equals_tf_keras_vis_scorecam(
    client: SalienceClient, model: Any, x: np.ndarray, normalize: bool, layer: str
) -> None:
    """tf-keras-vis scores the masked inputs by the softmax of the linearised model's
    logits, which are our default (the activated output's) probabilities. The CAM
    layers keep the 8×8 grid: its zoom and our resize are both the identity."""
    ours = per_sample_maps(
        client, x, CLASSES, method="scorecam", penultimate_layer=layer, normalize=normalize
    )
    want = tkv_cam(model, "scorecam")(
        categorical(CLASSES),
        x,
        penultimate_layer=layer,
        seek_penultimate_conv_layer=False,
        expand_cam=False,
        normalize_cam=normalize,
    )
    check_close(ours["none"], want, normalize)


@pytest.mark.parametrize("top", [1, 3])
def test_faster_scorecam_equals_tf_keras_vis_scorecam_max_n(
    client: SalienceClient, model: Any, x: np.ndarray, top: int
) -> None:
    """tf-keras-vis keeps the union of every sample's top-k channels over its batch, so
    it is called one sample at a time (our maps never depend on the batch)."""
    ours = per_sample_maps(
        client,
        x,
        CLASSES,
        method="faster-scorecam",
        penultimate_layer="conv1",
        top_channels=top,
        normalize=False,
    )
    theirs = tkv_cam(model, "scorecam")
    want = np.concatenate(
        [
            theirs(
                categorical(c),
                x[i : i + 1],
                penultimate_layer="conv1",
                seek_penultimate_conv_layer=False,
                expand_cam=False,
                normalize_cam=False,
                max_N=top,
            )
            for i, c in enumerate(CLASSES)
        ]
    )
    check_close(ours["none"], want, normalize=False)
    every = theirs(
        categorical(CLASSES),
        x,
        penultimate_layer="conv1",
        seek_penultimate_conv_layer=False,
        expand_cam=False,
        normalize_cam=False,
    )
    assert max_diff(ours["none"], every) > 1e-3 * float(np.max(np.abs(every)))


@pytest.mark.parametrize("layer", ["relu2", "conv1"])
@pytest.mark.parametrize("normalize", [True, False])
def test_layercam_equals_tf_keras_vis_layercam(
    client: SalienceClient, model: Any, x: np.ndarray, normalize: bool, layer: str
) -> None:
    modifiers = ["relu", "none", "absolute"]
    ours = per_sample_maps(
        client,
        x,
        CLASSES,
        method="layercam",
        penultimate_layer=layer,
        grad_modifiers=modifiers,
        normalize=normalize,
    )
    theirs = tkv_cam(model, "layercam")
    for modifier in modifiers:
        want = theirs(
            categorical(CLASSES),
            x,
            penultimate_layer=layer,
            seek_penultimate_conv_layer=False,
            gradient_modifier=tkv_modifier(modifier),
            expand_cam=False,
            normalize_cam=normalize,
        )
        check_close(ours[modifier], want, normalize)
