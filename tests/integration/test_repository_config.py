"""config.toml on a real server: preprocessing changes predictions and maps exactly as
computed by hand (chain rule, bilinear interpolation matrices), explanation defaults
and caps, labels, version policy, a bad configuration, and refused model names.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from salience_client import SalienceClient, SalienceError

SHAPE = (4, 3, 3)  # the linear models' input
SCALE = np.array([0.5, 2.0, -1.0])
OFFSET = np.array([1.0, 2.0, 3.0])
IMAGE = (4, 4, 2)  # the conv models' input
RESIZED = [(8, 6), (3, 5)]  # sender sizes of the resized models
LABELS = ("cat", "dog", "bird")


def config(root: Path, name: str, text: str) -> None:
    (root / name / "config.toml").write_text(textwrap.dedent(text))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import keras

    keras.utils.set_random_seed(21)
    x = keras.Input(SHAPE, name="x")
    linear = keras.Model(x, keras.layers.Dense(3, name="logits")(keras.layers.Flatten()(x)))
    x = keras.Input(IMAGE, name="image")
    h = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv")(x)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    conv = keras.Model(x, keras.layers.Dense(3, name="logits")(h))
    x = keras.Input(IMAGE, name="image")
    flat = keras.layers.Flatten()(x)
    sizing = keras.Model(x, keras.layers.Dense(1, name="score")(flat))
    return {"linear": linear, "conv": conv, "sizing": sizing}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Any]) -> Path:
    from tests.conftest import save_model

    root = tmp_path_factory.mktemp("config-repo")
    scale, offset = SCALE.tolist(), OFFSET.tolist()
    for name, model in [
        ("linear_plain", models["linear"]),
        ("linear_bgr", models["linear"]),
        ("conv_plain", models["conv"]),
        ("conv_bgr", models["conv"]),
        ("conv_resize", models["conv"]),
        ("sizing", models["sizing"]),
        ("defaults", models["linear"]),
        ("labelled", models["linear"]),
        ("bad", models["linear"]),
    ]:
        save_model(root, name, model)
    preprocess = f"""
        [preprocess]
        scale = {scale}
        offset = {offset}
        channel_order = "bgr"
        """
    config(root, "linear_bgr", preprocess)
    config(root, "conv_bgr", preprocess.replace(str(scale), "[0.5, 2.0]").replace(
        str(offset), "[1.0, -1.0]"
    ))  # fmt: skip
    config(root, "conv_resize", '[preprocess]\nresize = "bilinear"\n')
    config(root, "sizing", '[preprocess]\nresize = "bilinear"\n')
    config(
        root,
        "defaults",
        """
        [explain]
        method = "smoothgrad"
        grad_modifiers = ["negate", "none"]
        normalize = false
        samples = 4
        noise = 0.2
        steps = 10

        [limits]
        max_batch_size = 2
        max_samples = 6
        max_steps = 20
        """,
    )
    config(root, "labelled", "labels_file = 'classes.txt'\n")
    (root / "labelled" / "classes.txt").write_text("\n".join(LABELS) + "\n")
    config(root, "bad", "[preprocess]\nchannel_order = 'rbg'\n")
    for version in (1, 2, 3):
        save_model(root, "versions", models["linear"], version=version)
    config(root, "versions", "[version_policy]\ncount = 2\n")
    return root


@pytest.fixture(scope="module")
def client(repo: Path, server_factory: Any) -> SalienceClient:
    return server_factory(repo).client()


def uniform(shape: tuple[int, ...], n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, *shape)).astype(np.float32)


def by_hand(x: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """The preprocessing of the reference: reverse the channels, then x * scale + offset."""
    return (x[..., ::-1] * scale + offset).astype(np.float32)


def dense(model: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    kernel, bias = model.get_layer(name).get_weights()
    return kernel.astype(np.float64), bias.astype(np.float64)


def test_scale_offset_and_bgr_change_predictions_as_computed_by_hand(
    client: SalienceClient, models: dict[str, Any]
) -> None:
    x = uniform(SHAPE)
    kernel, bias = dense(models["linear"], "logits")
    flat = by_hand(x.astype(np.float64), SCALE, OFFSET).reshape(len(x), -1)
    got = client.predict("linear_bgr", x).outputs["logits"]
    np.testing.assert_allclose(got, flat @ kernel + bias, rtol=1e-5, atol=1e-5)
    # The same as the model without preprocessing fed the preprocessed input.
    plain = client.predict("linear_plain", by_hand(x, SCALE, OFFSET)).outputs["logits"]
    np.testing.assert_allclose(got, plain, rtol=0, atol=1e-5)


def test_vanilla_is_the_gradient_with_respect_to_the_sent_input(
    client: SalienceClient, models: dict[str, Any]
) -> None:
    # s = <w1, bgr(x) * a + o>, so ds/dx[..., c] = w1[..., 2 - c] * a[2 - c].
    kernel, _ = dense(models["linear"], "logits")
    want = (kernel[:, 1].reshape(SHAPE) * SCALE)[..., ::-1]
    x = uniform(SHAPE)
    result = client.explain(
        "linear_bgr", x, filter_indices=[1], grad_modifiers=["none"], keepdims=True, normalize=False
    )
    assert result.maps["none"].shape == (3, *SHAPE)
    for sample in result.maps["none"]:
        np.testing.assert_allclose(sample, want, rtol=1e-5, atol=1e-6)
    for method in ("smoothgrad", "integrated-gradients", "gradient-x-input"):
        # Linear score: every gradient method multiplies or averages the same gradient.
        got = client.explain(
            "linear_bgr", x, method=method, filter_indices=[1], grad_modifiers=["none"],
            keepdims=True, normalize=False, seed=3, steps=4, samples=3,
        )  # fmt: skip
        # Gradient x Input and IG (zero baseline) are x times the constant gradient.
        expected = np.broadcast_to(want if method == "smoothgrad" else x * want, x.shape)
        np.testing.assert_allclose(got.maps["none"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_cam_maps_are_those_of_the_preprocessed_input(client: SalienceClient, method: str) -> None:
    # A CAM depends on the model's activations only: equal to the plain model's on the
    # input preprocessed by hand.
    x = np.abs(uniform(IMAGE, seed=4))
    scale, offset = np.array([0.5, 2.0]), np.array([1.0, -1.0])
    got = client.explain("conv_bgr", x, method=method, filter_indices=[0], normalize=False)
    want = client.explain(
        "conv_plain", by_hand(x, scale, offset), method=method, filter_indices=[0], normalize=False
    )
    assert got.maps["none"].shape == (3, *IMAGE[:2])
    np.testing.assert_allclose(got.maps["none"], want.maps["none"], rtol=1e-4, atol=1e-6)
    assert np.abs(got.maps["none"]).max() > 0


def bilinear(size_in: int, size_out: int) -> np.ndarray:
    """The (size_out, size_in) matrix of 1-D bilinear resizing with half-pixel centres
    (tf.image.resize, no antialiasing).
    """
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        centre = (i + 0.5) * size_in / size_out - 0.5
        low = np.floor(centre)
        frac = centre - low
        matrix[i, int(min(max(low, 0), size_in - 1))] += 1 - frac
        matrix[i, int(min(max(low + 1, 0), size_in - 1))] += frac
    return matrix


@pytest.mark.parametrize("size", RESIZED)
def test_resize_predicts_on_the_interpolated_input_and_maps_come_back_at_the_senders_size(
    client: SalienceClient, models: dict[str, Any], size: tuple[int, int]
) -> None:
    rows, cols = bilinear(size[0], IMAGE[0]), bilinear(size[1], IMAGE[1])
    kernel, bias = dense(models["sizing"], "score")
    w = kernel[:, 0].reshape(IMAGE)
    x = uniform((*size, IMAGE[2]), seed=2).astype(np.float64)
    resized = np.einsum("ih,jw,nhwc->nijc", rows, cols, x)
    got = client.predict("sizing", x.astype(np.float32)).outputs["score"]
    np.testing.assert_allclose(got[:, 0], resized.reshape(len(x), -1) @ w.ravel() + bias[0],
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    # s = <w, R x>: ds/dx = R^T w, on the sender's grid.
    result = client.explain(
        "sizing", x.astype(np.float32), filter_indices=[0], grad_modifiers=["none"],
        keepdims=True, normalize=False,
    )  # fmt: skip
    want = np.einsum("ih,jw,ijc->hwc", rows, cols, w)
    assert result.maps["none"].shape == (3, *size, IMAGE[2])
    for sample in result.maps["none"]:
        np.testing.assert_allclose(sample, want, rtol=1e-5, atol=1e-6)


def test_resized_cam_is_the_models_cam_interpolated_to_the_senders_size(
    client: SalienceClient,
) -> None:
    size = RESIZED[0]
    rows, cols = bilinear(size[0], IMAGE[0]), bilinear(size[1], IMAGE[1])
    x = np.abs(uniform((*size, IMAGE[2]), seed=6))
    resized = np.einsum("ih,jw,nhwc->nijc", rows, cols, x.astype(np.float64)).astype(np.float32)
    got = client.explain("conv_resize", x, method="gradcam", filter_indices=[1], normalize=False)
    # The CAM layer ("same" padding) has the model's 4x4 grid, so the plain model's
    # CAM is not resized, and the sender's is that CAM resized to the sender's grid.
    plain = client.explain("conv_plain", resized, method="gradcam", filter_indices=[1],
                           normalize=False)  # fmt: skip
    want = np.einsum("hi,wj,nij->nhw", bilinear(IMAGE[0], size[0]), bilinear(IMAGE[1], size[1]),
                     plain.maps["none"].astype(np.float64))  # fmt: skip
    assert got.maps["none"].shape == (3, *size)
    np.testing.assert_allclose(got.maps["none"], want, rtol=1e-4, atol=1e-5)


def test_resized_input_metadata_takes_any_height_and_width(client: SalienceClient) -> None:
    meta = client.metadata("sizing")
    assert list(meta.inputs[0].shape) == [-1, -1, -1, IMAGE[2]]
    assert [layer.name for layer in meta.layers][-1] == "score"


def test_configured_defaults_fill_what_the_request_leaves_unset(client: SalienceClient) -> None:
    x = uniform(SHAPE, n=2)
    got = client.explain("defaults", x, filter_indices=[0], seed=9)
    r = got.resolved
    assert (r.method, r.samples, r.noise, list(r.grad_modifiers), r.normalize) == (
        "smoothgrad",
        4,
        pytest.approx(0.2),
        ["negate", "none"],
        False,
    )
    explicit = client.explain(
        "linear_plain", x, filter_indices=[0], seed=9, method="smoothgrad", samples=4,
        noise=0.2, grad_modifiers=["negate", "none"], normalize=False,
    )  # fmt: skip
    for name in ("negate", "none"):
        np.testing.assert_allclose(got.maps[name], explicit.maps[name], rtol=0, atol=1e-6)
    # What the request sets wins; the rest still comes from the configuration.
    ig = client.explain("defaults", x, method="integrated-gradients", grad_modifiers=["relu"])
    assert (ig.resolved.method, ig.resolved.steps, ig.resolved.normalize) == (
        "integrated-gradients",
        10,
        False,
    )
    assert list(ig.resolved.grad_modifiers) == ["relu"]
    normalized = client.explain("defaults", x, method="vanilla", normalize=True)
    assert normalized.resolved.normalize
    assert list(normalized.resolved.grad_modifiers) == ["negate", "none"]


def test_configured_caps_lower_the_servers(client: SalienceClient) -> None:
    def refused(**options: Any) -> str:
        with pytest.raises(SalienceError) as err:
            client.explain("defaults", options.pop("x", uniform(SHAPE, n=1)), **options)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        return err.value.details

    assert refused(samples=7) == (
        "explanation.samples=7 is over the model's max_samples=6: use 1..6 (0 for the default, 4)"
    )
    assert refused(method="integrated-gradients", steps=21) == (
        "explanation.steps=21 is over the model's max_steps=20: use 1..20 (0 for the default, 10)"
    )
    assert refused(x=uniform(SHAPE, n=3)) == (
        "inputs['x'] has a batch of 3, over the model's max_batch_size=2: split it into "
        "smaller requests"
    )
    with pytest.raises(SalienceError, match="over the model's max_batch_size=2"):
        client.predict("defaults", uniform(SHAPE, n=3))
    assert client.explain("defaults", uniform(SHAPE, n=2), samples=6).resolved.samples == 6
    meta = client.metadata("defaults")
    assert (meta.max_batch_size, meta.max_samples, meta.max_steps) == (2, 6, 20)
    plain = client.metadata("linear_plain")
    assert (plain.max_batch_size, plain.max_samples, plain.max_steps) == (64, 128, 512)


def test_labels_come_back_with_predictions_and_metadata(
    client: SalienceClient, models: dict[str, Any]
) -> None:
    x = uniform(SHAPE, n=6, seed=8)
    kernel, bias = dense(models["linear"], "logits")
    want = [LABELS[k] for k in np.argmax(x.reshape(6, -1).astype(np.float64) @ kernel + bias, 1)]
    assert len(set(want)) > 1  # the samples do not all pick one class
    assert client.predict("labelled", x).labels == want
    assert client.explain("labelled", x).labels == want
    assert client.predict("linear_plain", x).labels == []
    assert list(client.metadata("labelled").outputs[0].labels) == list(LABELS)
    assert list(client.metadata("linear_plain").outputs[0].labels) == []


def test_the_version_policy_serves_exactly_its_versions(client: SalienceClient) -> None:
    assert list(client.metadata("versions").versions) == [2, 3]
    assert client.predict("versions", uniform(SHAPE), version=2).model_version == 2
    with pytest.raises(SalienceError) as err:
        client.predict("versions", uniform(SHAPE), version=1)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert err.value.details == (
        "model.version=1 of model 'versions' is not served: choose one of 2, 3 (or 0 for the "
        "highest)"
    )


def test_a_bad_configuration_fails_only_its_model(client: SalienceClient) -> None:
    with pytest.raises(SalienceError) as err:
        client.predict("bad", uniform(SHAPE))
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert err.value.details.startswith(
        "model.name='bad' is not served (it failed to load: config.toml: "
        "preprocess.channel_order='rbg' is not allowed: use one of 'rgb', 'bgr'): choose one of"
    )
    # Listed, not served, with the reason.
    (bad,) = [m for m in client.list_models() if m.name == "bad"]
    assert list(bad.versions) == []
    (status,) = bad.version_status
    assert status.version == 0  # the model's configuration
    assert status.reason.startswith("config.toml: preprocess.channel_order='rbg'")


@pytest.mark.parametrize("name", ["../linear_plain", "linear_plain/1", "/etc", "..", "a\x00"])
def test_model_names_that_could_leave_the_repository_are_refused(
    client: SalienceClient, name: str
) -> None:
    with pytest.raises(SalienceError) as err:
        client.predict(name, uniform(SHAPE))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details == (
        f"model.name={name!r} is not a valid model name: use 1 to 128 letters, digits, '.', "
        "'_' or '-', starting with a letter or digit ([A-Za-z0-9][A-Za-z0-9._-]{0,127})"
    )
