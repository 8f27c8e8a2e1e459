"""Bad SmoothGrad / Integrated Gradients / Gradient × Input options get INVALID_ARGUMENT
with a message naming the field and what is allowed, and the server keeps serving."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest

from salience_client import SalienceClient, SalienceError
from tests.integration.models import LINEAR_SHAPE, build_repository

MAX_SAMPLES = 8
MAX_STEPS = 32
MAX_WINDOWS = 20


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, server_factory: Any) -> SalienceClient:
    import keras

    from tests.conftest import save_model

    repo = build_repository(tmp_path_factory.mktemp("methods-bad-input-repo"))
    # Free spatial axes: a baseline's fit is only known once the inputs are.
    image = keras.Input((None, None, 3), name="image")
    h = keras.layers.Conv2D(2, 3, padding="same", name="conv")(image)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    save_model(repo, "free", keras.Model(image, keras.layers.Dense(2, name="logits")(h)))
    return server_factory(
        repo, max_samples=MAX_SAMPLES, max_steps=MAX_STEPS, max_windows=MAX_WINDOWS
    ).client()


def x(n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, (n, *LINEAR_SHAPE)).astype(np.float32)


def refused(client: SalienceClient, **options: Any) -> str:
    with pytest.raises(SalienceError) as err:
        client.explain(options.pop("model", "linear"), options.pop("x", x()), **options)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return err.value.details


SHAPE = list(LINEAR_SHAPE)
CASES: list[tuple[str, dict[str, Any], str]] = [
    (
        "samples over cap",
        {"method": "smoothgrad", "samples": MAX_SAMPLES + 1},
        f"explanation.samples=9 is over the server's max_samples={MAX_SAMPLES}: use 1..8 "
        "(0 for the default, 16)",
    ),
    (
        "steps over cap",
        {"method": "integrated-gradients", "steps": MAX_STEPS + 1},
        f"explanation.steps=33 is over the server's max_steps={MAX_STEPS}: use 1..32 "
        "(0 for the default, 64)",
    ),
    (
        "negative noise",
        {"method": "smoothgrad", "noise": -0.1},
        "explanation.noise=-0.1 is not allowed: use a finite value >= 0",
    ),
    (
        "baseline of another dtype",
        {"method": "integrated-gradients", "baseline": np.zeros(LINEAR_SHAPE, np.float64)},
        "explanation.baseline.dtype=float64 is not accepted: input 'x' takes float32, so the "
        f"baseline must be float32 of shape {SHAPE} (one sample) or {[2, *SHAPE]} (one per "
        "sample)",
    ),
    (
        "baseline of another shape",
        {"method": "integrated-gradients", "baseline": np.zeros((6, 5, 1), np.float32)},
        "explanation.baseline.shape=[6, 5, 1] does not fit input 'x': use shape "
        f"{SHAPE} (one sample) or {[2, *SHAPE]} (one per sample)",
    ),
    (
        "baseline per sample of another batch",
        {"method": "integrated-gradients", "baseline": np.zeros((3, *SHAPE), np.float32)},
        "explanation.baseline.shape=[3, 6, 5, 3] does not fit input 'x': use shape "
        f"{SHAPE} (one sample) or {[2, *SHAPE]} (one per sample)",
    ),
    (
        "baseline of another rank",
        {"method": "integrated-gradients", "baseline": np.zeros((1, 1, *SHAPE), np.float32)},
        "explanation.baseline.shape=[1, 1, 6, 5, 3] does not fit input 'x'",
    ),
    (
        "baseline with NaN",
        {"method": "integrated-gradients", "baseline": np.full(SHAPE, np.nan, np.float32)},
        "explanation.baseline holds NaN or infinite values: only finite values are accepted",
    ),
    (
        "chunk size over bound",
        {"method": "occlusion", "chunk_size": 1025},
        "explanation.chunk_size=1025 is out of range: use 1..1024 rows per forward pass "
        "(0 for the default, 64)",
    ),
    (
        "chunk size for vanilla",
        {"method": "vanilla", "chunk_size": 8},
        "explanation.chunk_size does not apply to method 'vanilla': leave it unset",
    ),
    (
        "top channels over the layer's",
        {"model": "free", "x": x() * 0 + 0.5, "method": "faster-scorecam", "top_channels": 3},
        "explanation.top_channels=3 is out of range: CAM layer 'conv' has 2 channels "
        "(valid 1..2, 0 for the default, 10 or every channel when fewer)",
    ),
    (
        "top channels for scorecam",
        {"model": "free", "method": "scorecam", "top_channels": 1},
        "explanation.top_channels does not apply to method 'scorecam': leave it unset",
    ),
    (
        "window over the input",
        {"method": "occlusion", "window": 6},
        "explanation.window=6 is out of range: input 'x' has spatial extent [6, 5] "
        "(valid 1..5, 0 for the default, 16 or the smallest extent when smaller)",
    ),
    (
        "stride over the window",
        {"method": "occlusion", "window": 2, "stride": 3},
        "explanation.stride=3 is out of range: use 1..2 (at most the window, 2; 0 for the "
        "default, 1)",
    ),
    (
        "occlusion windows over cap",
        {"method": "occlusion", "window": 1},
        f"explanation.window=1 with stride=1 gives 30 occluded copies per sample, over the "
        f"server's max_windows={MAX_WINDOWS}: use a larger window or stride",
    ),
    (
        "infinite occlusion value",
        {"method": "occlusion", "occlusion_value": float("inf")},
        "explanation.occlusion_value=inf is not allowed: use a finite value of magnitude at "
        "most 3.402823e+38 (unset means 0.0)",
    ),
    (
        "window for gradcam",
        {"model": "free", "method": "gradcam", "window": 3},
        "explanation.window does not apply to method 'gradcam': leave it unset",
    ),
    (
        "occlusion value for scorecam",
        {"model": "free", "method": "scorecam", "occlusion_value": 0.5},
        "explanation.occlusion_value does not apply to method 'scorecam': leave it unset",
    ),
    (
        "occlusion window over free input",
        {
            "model": "free",
            "x": np.zeros((1, 9, 7, 3), np.float32),
            "method": "occlusion",
            "window": 8,
        },
        "explanation.window=8 is out of range: input 'image' has samples of spatial extent "
        "[9, 7] (valid 1..7)",
    ),
    (
        "unknown output head",
        {"method": "smoothgrad", "output": "probabilities"},
        "explanation.output='probabilities' is not an output of the model: choose one of 'logits'",
    ),
]


@pytest.mark.parametrize(("options", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_options_are_refused(
    client: SalienceClient, options: dict[str, Any], message: str
) -> None:
    assert refused(client, **options).startswith(message)


@pytest.mark.parametrize("method", ["smoothgrad", "integrated-gradients", "gradient-x-input"])
def test_wrt_is_refused_with_the_reason(client: SalienceClient, method: str) -> None:
    details = refused(client, method=method, wrt="flatten")
    assert details.startswith(f"explanation.wrt is not supported by method {method!r}: ")
    assert "leave wrt unset" in details


def test_server_still_answers_after_bad_options(client: SalienceClient) -> None:
    refused(client, method="integrated-gradients", steps=MAX_STEPS + 1)
    ok = client.explain(
        "linear", x(), method="integrated-gradients", steps=MAX_STEPS, filter_indices=[0]
    )
    assert ok.resolved.steps == MAX_STEPS
    ok = client.explain("linear", x(), method="smoothgrad", samples=MAX_SAMPLES, seed=0)
    assert (ok.resolved.samples, ok.resolved.seed) == (MAX_SAMPLES, 0)


def test_baseline_must_match_inputs_with_free_axes(client: SalienceClient) -> None:
    images = np.random.default_rng(1).uniform(0, 1, (2, 9, 7, 3)).astype(np.float32)
    details = refused(
        client,
        model="free",
        x=images,
        method="integrated-gradients",
        baseline=np.zeros((8, 8, 3), np.float32),
    )
    assert details == (
        "explanation.baseline has sample shape [8, 8, 3] but input 'image' has samples of "
        "shape [9, 7, 3]: send a baseline of the inputs' sample shape"
    )
    fitting = client.explain(
        "free",
        images,
        method="integrated-gradients",
        baseline=np.full((9, 7, 3), 0.5, np.float32),
        steps=4,
        filter_indices=[1],
    )
    assert fitting.maps["absolute"].shape == (2, 9, 7)
    assert fitting.completeness_residual is not None


def test_forward_pass_methods_serve_inputs_with_free_axes(client: SalienceClient) -> None:
    """After their refusals, Score-CAM and occlusion still explain a model whose
    spatial axes are free: the masks and windows follow the samples' own size."""
    images = np.random.default_rng(2).uniform(0, 1, (2, 9, 7, 3)).astype(np.float32)
    refused(client, model="free", x=images, method="occlusion", window=8)
    occluded = client.explain("free", images, method="occlusion", window=7, stride=3)
    assert occluded.maps["none"].shape == (2, 9, 7)
    assert (occluded.resolved.window, occluded.resolved.stride) == (7, 3)
    scored = client.explain("free", images, method="faster-scorecam", top_channels=1)
    assert scored.maps["none"].shape == (2, 9, 7)
    assert scored.resolved.penultimate_layer == "conv"
