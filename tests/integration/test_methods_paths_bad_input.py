"""Bad Blur IG / Guided IG / XRAI options get INVALID_ARGUMENT with a message naming
the field and its range, and the server keeps serving."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest

from salience_client import SalienceClient, SalienceError
from tests.integration.models import LINEAR_SHAPE, build_repository

MAX_STEPS = 32
PATH_METHODS = ["blur-ig", "guided-ig", "xrai"]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, server_factory: Any) -> SalienceClient:
    import keras

    from tests.conftest import save_model

    repo = build_repository(tmp_path_factory.mktemp("paths-bad-input-repo"))
    # Free spatial axes: a baseline's fit is only known once the inputs are.
    image = keras.Input((None, None, 3), name="image")
    h = keras.layers.Conv2D(2, 3, padding="same", name="conv")(image)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    save_model(repo, "free", keras.Model(image, keras.layers.Dense(2, name="logits")(h)))
    return server_factory(repo, max_steps=MAX_STEPS).client()


def x(n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, (n, *LINEAR_SHAPE)).astype(np.float32)


def refused(client: SalienceClient, **options: Any) -> str:
    with pytest.raises(SalienceError) as err:
        client.explain(options.pop("model", "linear"), options.pop("x", x()), **options)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return err.value.details


SHAPE = list(LINEAR_SHAPE)
BLUR, GUIDED, XRAI = PATH_METHODS
CASES: list[tuple[str, dict[str, Any], str]] = [
    (
        "blur sigma zero",
        {"method": BLUR, "blur_max_sigma": 0.0},
        "explanation.blur_max_sigma=0 is out of range: use 0 < blur_max_sigma <= 1000 "
        "(unset means 50)",
    ),
    (
        "blur sigma too large",
        {"method": BLUR, "blur_max_sigma": 1000.5},
        "explanation.blur_max_sigma=1000.5 is out of range: use 0 < blur_max_sigma <= 1000",
    ),
    (
        "blur sigma NaN",
        {"method": BLUR, "blur_max_sigma": float("nan")},
        "explanation.blur_max_sigma=nan is out of range: use 0 < blur_max_sigma <= 1000",
    ),
    (
        "blur grad step negative",
        {"method": BLUR, "blur_grad_step": -0.5},
        "explanation.blur_grad_step=-0.5 is out of range: use 0 < blur_grad_step <= 1 "
        "(unset means 0.01)",
    ),
    (
        "blur baseline",
        {"method": BLUR, "baseline": np.zeros(LINEAR_SHAPE, np.float32)},
        "explanation.baseline does not apply to method 'blur-ig': its path ends at the input "
        "blurred at blur_max_sigma; leave it unset",
    ),
    (
        "guided fraction zero",
        {"method": GUIDED, "guided_fraction": 0.0},
        "explanation.guided_fraction=0 is out of range: use 0 < guided_fraction <= 1 "
        "(unset means 0.25)",
    ),
    (
        "guided fraction infinite",
        {"method": GUIDED, "guided_fraction": float("inf")},
        "explanation.guided_fraction=inf is out of range: use 0 < guided_fraction <= 1",
    ),
    (
        "guided max dist negative",
        {"method": GUIDED, "guided_max_dist": -0.1},
        "explanation.guided_max_dist=-0.1 is out of range: use 0 <= guided_max_dist <= 1 "
        "(unset means 0.02)",
    ),
    (
        "guided max dist over 1",
        {"method": GUIDED, "guided_max_dist": 1.5},
        "explanation.guided_max_dist=1.5 is out of range: use 0 <= guided_max_dist <= 1",
    ),
    (
        "guided baseline of another shape",
        {"method": GUIDED, "baseline": np.zeros((6, 5, 1), np.float32)},
        "explanation.baseline.shape=[6, 5, 1] does not fit input 'x': use shape "
        f"{SHAPE} (one sample) or {[2, *SHAPE]} (one per sample)",
    ),
    (
        "xrai negative scale",
        {"method": XRAI, "xrai_scales": [50.0, -3.0]},
        "explanation.xrai_scales[1]=-3 is out of range: use scales with 0 < scale <= 100000 "
        "(empty means 50, 100, 150, 250, 500, 1200)",
    ),
    (
        "xrai too many scales",
        {"method": XRAI, "xrai_scales": [10.0] * 17},
        "explanation.xrai_scales has 17 entries, over the most of 16",
    ),
    (
        "xrai sigma",
        {"method": XRAI, "xrai_sigma": 11.0},
        "explanation.xrai_sigma=11 is out of range: use 0 <= xrai_sigma <= 10 (unset means 0.8)",
    ),
    (
        "xrai min size zero",
        {"method": XRAI, "xrai_min_size": 0},
        "explanation.xrai_min_size=0 is out of range: use 1 <= xrai_min_size <= 50176 "
        "(unset means 150)",
    ),
    (
        "xrai regions over the bound",
        {"method": XRAI, "xrai_min_size": 10},
        "explanation.xrai_min_size=10 allows up to 30105 regions with 6 scales, over the "
        "most of 4096: use xrai_min_size >= 74, or fewer xrai_scales",
    ),
    (
        "xrai dilation radius",
        {"method": XRAI, "xrai_dilation_radius": 33},
        "explanation.xrai_dilation_radius=33 is out of range: use 0 <= xrai_dilation_radius "
        "<= 32 (unset means 5)",
    ),
    (
        "xrai area threshold",
        {"method": XRAI, "xrai_area_threshold": 0.0},
        "explanation.xrai_area_threshold=0 is out of range: use 0 < xrai_area_threshold <= 1 "
        "(unset means 1)",
    ),
    (
        "xrai baseline NaN",
        {"method": XRAI, "baseline": np.full(SHAPE, np.nan, np.float32)},
        "explanation.baseline holds NaN or infinite values: only finite values are accepted",
    ),
    (
        "blur option on integrated gradients",
        {"method": "integrated-gradients", "blur_max_sigma": 3.0},
        "explanation.blur_max_sigma does not apply to method 'integrated-gradients': it is a "
        "parameter of method 'blur-ig'; leave it unset",
    ),
    (
        "guided option on blur ig",
        {"method": BLUR, "guided_fraction": 0.5},
        "explanation.guided_fraction does not apply to method 'blur-ig': it is a parameter of "
        "method 'guided-ig'; leave it unset",
    ),
    (
        "xrai option on guided ig",
        {"method": GUIDED, "xrai_scales": [100.0]},
        "explanation.xrai_scales does not apply to method 'guided-ig': it is a parameter of "
        "method 'xrai'; leave it unset",
    ),
    (
        "guided max dist 0 on xrai",
        {"method": XRAI, "guided_max_dist": 0.0},
        "explanation.guided_max_dist does not apply to method 'xrai'",
    ),
]


@pytest.mark.parametrize(("options", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_options_are_refused(
    client: SalienceClient, options: dict[str, Any], message: str
) -> None:
    assert refused(client, **options).startswith(message)


@pytest.mark.parametrize("method", PATH_METHODS)
def test_steps_over_the_cap_are_refused(client: SalienceClient, method: str) -> None:
    assert refused(client, method=method, steps=MAX_STEPS + 1).startswith(
        f"explanation.steps=33 is over the server's max_steps={MAX_STEPS}: use 1..32 "
        "(0 for the default, 64)"
    )


@pytest.mark.parametrize("method", PATH_METHODS)
def test_wrt_is_refused_with_the_reason(client: SalienceClient, method: str) -> None:
    details = refused(client, method=method, wrt="flatten")
    assert details.startswith(f"explanation.wrt is not supported by method {method!r}: ")
    assert "leave wrt unset" in details


@pytest.mark.parametrize("method", ["guided-ig", "xrai"])
def test_baseline_must_match_inputs_with_free_axes(client: SalienceClient, method: str) -> None:
    images = np.random.default_rng(1).uniform(0, 1, (2, 9, 7, 3)).astype(np.float32)
    details = refused(
        client,
        model="free",
        x=images,
        method=method,
        steps=2,
        baseline=np.zeros((8, 8, 3), np.float32),
    )
    assert details == (
        "explanation.baseline has sample shape [8, 8, 3] but input 'image' has samples of "
        "shape [9, 7, 3]: send a baseline of the inputs' sample shape"
    )
    fitting = client.explain(
        "free", images, method=method, steps=2, baseline=np.zeros((9, 7, 3), np.float32)
    )
    assert fitting.maps[fitting.resolved.grad_modifiers[0]].shape == (2, 9, 7)


def test_server_still_answers_after_bad_options(client: SalienceClient) -> None:
    refused(client, method=BLUR, blur_max_sigma=-1.0)
    refused(client, method=GUIDED, guided_fraction=2.0)
    refused(client, method=XRAI, xrai_area_threshold=1.5)
    blur = client.explain("linear", x(), method=BLUR, steps=4, blur_max_sigma=2.0)
    assert (blur.resolved.steps, blur.resolved.blur_max_sigma) == (4, 2.0)
    guided = client.explain("linear", x(), method=GUIDED, steps=4, guided_fraction=0.5)
    assert guided.resolved.guided_fraction == 0.5
    xrai = client.explain("linear", x(), method=XRAI, steps=2, xrai_scales=[100.0])
    assert xrai.resolved.xrai_scales == (100.0,)
