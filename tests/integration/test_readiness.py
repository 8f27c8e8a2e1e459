"""Start-up on a real server: the port answers before the models are loaded, health
turns SERVING model by model and then for the server, requests for a loading model
get UNAVAILABLE, a model that fails is reported while the others serve, warm-up runs
every batch bucket (free input axes included), and the first request after
readiness is no slower than the ones after it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from salience.v1 import salience_pb2 as pb
from salience_client import SalienceError
from salience_server.app import SERVICE_NAME, run
from salience_server.repository import RepositoryError
from salience_server.runtime import ModelRuntime
from salience_server.settings import Settings, SettingsError
from tests.conftest import running_server, save_model
from tests.integration.models import LINEAR_SHAPE, build_repository, reference_map

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CONV_SHAPE = (12, 12, 3)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Models load, and warm up, in name order: linear, smooth, softmax.
    return build_repository(tmp_path_factory.mktemp("readiness-repo"))


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def wait_for(condition: Callable[[], bool], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def gate_warm_up(monkeypatch: pytest.MonkeyPatch, name: str) -> threading.Event:
    """Holds the warm-up of model `name` until the returned event is set."""
    gate = threading.Event()
    original = ModelRuntime.warm_up

    def gated(self: ModelRuntime, *args: Any, **kwargs: Any) -> None:
        if self.name == name:
            assert gate.wait(60)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ModelRuntime, "warm_up", gated)
    return gate


def fail_warm_up(monkeypatch: pytest.MonkeyPatch, names: set[str]) -> None:
    original = ModelRuntime.warm_up

    def failing(self: ModelRuntime, *args: Any, **kwargs: Any) -> None:
        if self.name in names:
            raise RuntimeError(f"no kernel for {self.name}")
        original(self, *args, **kwargs)

    monkeypatch.setattr(ModelRuntime, "warm_up", failing)


def x_linear(n: int = 1) -> np.ndarray:
    return np.random.default_rng(n).uniform(-1, 1, (n, *LINEAR_SHAPE)).astype(np.float32)


def test_health_turns_serving_model_by_model_and_loading_models_are_unavailable(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = gate_warm_up(monkeypatch, "softmax")
    with running_server(repo, wait_ready=False) as running, running.client() as client:
        target = running.target
        # The port answers at once; the server is not ready while a model loads.
        assert health(target) == NOT_SERVING
        wait_for(lambda: health(target, "smooth") == SERVING)
        assert health(target, "linear") == SERVING
        assert health(target, "softmax") == NOT_SERVING
        assert health(target) == NOT_SERVING
        assert health(target, SERVICE_NAME) == NOT_SERVING

        # Ready models serve; the loading one answers UNAVAILABLE, which callers retry.
        x = x_linear()
        assert client.predict("linear", x).outputs["logits"].shape == (1, 4)
        with pytest.raises(SalienceError) as caught:
            client.predict("softmax", x)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details == "model 'softmax' is loading: retry in a moment"
        with pytest.raises(SalienceError) as caught:
            client.metadata("softmax")
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        listed = {m.name: m for m in client.list_models()}
        assert sorted(listed) == ["linear", "smooth", "softmax"]
        assert [list(listed[n].versions) for n in ("linear", "smooth")] == [[1], [1]]
        # The warming model is listed as loading, with no version served yet.
        assert list(listed["softmax"].versions) == []
        assert [(s.version, s.state) for s in listed["softmax"].version_status] == [
            (1, pb.VERSION_STATE_LOADING)
        ]

        gate.set()
        running.call(running.server.wait_ready())
        for service in ("", SERVICE_NAME, "linear", "smooth", "softmax"):
            assert health(target, service) == SERVING, service
        probs = client.predict("softmax", x).outputs["probs"]
        np.testing.assert_allclose(probs.sum(axis=-1), [1.0], rtol=1e-5)
        assert [m.name for m in client.list_models()] == ["linear", "smooth", "softmax"]


def test_a_model_that_fails_is_reported_and_the_others_serve(
    repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fail_warm_up(monkeypatch, {"softmax"})
    with (
        caplog.at_level(logging.ERROR, logger="salience_server.app"),
        running_server(repo) as running,
        running.client() as client,
    ):
        assert health(running.target) == SERVING
        assert health(running.target, "softmax") == NOT_SERVING
        assert health(running.target, "linear") == SERVING
        with pytest.raises(SalienceError) as caught:
            client.predict("softmax", x_linear())
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        assert caught.value.details == (
            "model.name='softmax' is not served (it failed to load: no kernel for softmax): "
            "choose one of 'linear', 'smooth'"
        )
        assert client.predict("linear", x_linear()).model_version == 1
    assert "model softmax failed to warm up: no kernel for softmax" in caplog.text


def test_when_no_model_loads_the_server_says_so_and_stays_not_serving(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_warm_up(monkeypatch, {"linear", "smooth", "softmax"})
    with running_server(repo, wait_ready=False) as running:
        with pytest.raises(RepositoryError, match="could be served: every one failed"):
            running.call(running.server.wait_ready())
        assert health(running.target) == NOT_SERVING
        assert health(running.target, "linear") == NOT_SERVING


def test_serve_exits_with_the_reason_when_nothing_loads(tmp_path: Path) -> None:
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.keras").write_bytes(b"not a zip file")
    settings = Settings(model_repository=tmp_path, host="127.0.0.1", port=0, metrics_port=-1)
    with pytest.raises(RepositoryError, match=r"no model under .* could be loaded"):
        asyncio.run(run(settings))


def test_a_gpu_that_is_absent_stops_start_up() -> None:
    import tensorflow as tf

    absent = f"gpu:{len(tf.config.list_physical_devices('GPU'))}"
    with pytest.raises(SettingsError) as caught, running_server(None, device=absent):
        pass
    message = str(caught.value)
    assert message.startswith(f"device='{absent}' is not available: this machine has ")
    assert message.endswith("; use cpu")


def test_metadata_reports_the_device_and_a_cpu_has_no_memory_gauge(repo: Path) -> None:
    with running_server(repo, metrics_port=0) as running, running.client() as client:
        device = client.metadata("linear").device
        runtime = running.server.core.repository.get("linear")
        weight = runtime.model.weights[0]
        assert device == runtime.device == weight.value.device
        assert device.endswith("/device:CPU:0")
        port = running.server.metrics_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    assert b"salience_device_memory_bytes" not in text


def build_convnet() -> Any:
    import keras

    keras.utils.set_random_seed(11)
    x = keras.Input(CONV_SHAPE, name="x")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(x, keras.layers.Dense(5, activation="softmax", name="probs")(h))


def test_warm_up_runs_every_bucket_of_the_models_batching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_model(tmp_path, "convnet", build_convnet())
    sizes: dict[str, list[int]] = {"predict": [], "compute": []}
    original_predict, original_compute = ModelRuntime.predict, ModelRuntime.compute

    def predict(self: ModelRuntime, inputs: Any) -> Any:
        sizes["predict"].append(len(inputs[0]))
        return original_predict(self, inputs)

    def compute(self: ModelRuntime, graph: Any, inputs: Any, params: Any) -> Any:
        sizes["compute"].append(len(inputs[0]))
        return original_compute(self, graph, inputs, params)

    monkeypatch.setattr(ModelRuntime, "predict", predict)
    monkeypatch.setattr(ModelRuntime, "compute", compute)
    with running_server(tmp_path, max_device_batch_size=6, batch_buckets=(1, 3)):
        pass
    # One probe of the sample, then every bucket (the largest is the device batch).
    assert sizes == {"predict": [1, 1, 3, 6], "compute": [1, 3, 6]}


def build_free_shape_model() -> Any:
    """Any height and width, and a valid 3x3 convolution: a 1x1 input cannot pass."""
    import keras

    keras.utils.set_random_seed(12)
    x = keras.Input((None, None, 3), name="x")
    h = keras.layers.Conv2D(4, 3, activation="tanh", name="conv")(x)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(x, keras.layers.Dense(3, name="logits")(h))


def test_a_model_with_free_spatial_axes_warms_up_and_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import tensorflow as tf

    model = build_free_shape_model()
    save_model(tmp_path, "free", model)
    x = np.random.default_rng(3).uniform(0, 1, (2, 5, 7, 3)).astype(np.float32)
    with (
        caplog.at_level(logging.INFO, logger="salience_server.runtime"),
        running_server(tmp_path) as running,
        running.client() as client,
    ):
        result = client.explain("free", x, filter_indices=[2])
        runtime = running.server.core.repository.get("free")
        assert runtime.traces == 1  # traced by warm-up, reused at 5x7
    assert "model free: warming up with free input axes of size 32" in caplog.text
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        logits = model(xt)
        score = tf.reduce_sum(logits[:, 2])
    np.testing.assert_allclose(result.outputs["logits"], logits.numpy(), rtol=1e-5, atol=1e-6)
    want = reference_map(tape.gradient(score, xt).numpy(), "absolute", False, True)
    np.testing.assert_allclose(result.maps["absolute"], want, rtol=1e-4, atol=1e-5)


def test_free_axes_take_the_first_size_that_fits_or_warm_up_is_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import keras

    x = keras.Input((None, None, 3), name="x")
    h = keras.layers.Conv2D(2, 33, name="wide")(x)  # needs at least 33x33
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    wide = ModelRuntime("wide", 1, keras.Model(x, keras.layers.Dense(2, name="out")(h)))
    # A length that is a multiple of 11 only: none of the sizes tried is.
    s = keras.Input((None, 3), name="s")
    r = keras.layers.Reshape((-1, 11), name="rows")(s)
    odd = ModelRuntime("odd", 1, keras.Model(s, keras.layers.Dense(2, name="out")(r)))
    with caplog.at_level(logging.INFO, logger="salience_server.runtime"):
        wide.warm_up((1, 2))
        odd.warm_up((1, 2))
    assert "model wide: warming up with free input axes of size 64" in caplog.text
    assert wide.traces == 1
    assert (
        "model odd: warm-up skipped: its free input axes take none of the sizes 32, 64, 128, "
        "224 (32: InvalidArgument; 64: InvalidArgument; 128: InvalidArgument; "
        "224: InvalidArgument); the first request of each shape traces its functions"
    ) in caplog.text
    assert odd.traces == 0
    # The model still serves the lengths it takes.
    out = odd.predict([np.ones((1, 11, 3), np.float32)])[0]
    assert out.shape == (1, 3, 2)


# The first request after readiness finds everything traced -----------------------


def live_traces() -> int:
    """How many times every tf.function alive in this process has been traced."""
    import gc

    from tensorflow.python.eager.polymorphic_function.polymorphic_function import Function

    return sum(
        obj.experimental_get_tracing_count()
        for obj in gc.get_objects()
        if isinstance(obj, Function)
    )


@pytest.mark.parametrize(
    ("settings", "batches"),
    [
        ({}, [1, 4, 16, 3]),
        # XLA compiles per shape: warm-up ran every bucket, so no request traces.
        ({"xla": True, "max_device_batch_size": 8}, [1, 3, 8]),
    ],
    ids=["default", "xla"],
)
def test_the_first_requests_after_readiness_trace_nothing(
    tmp_path: Path, settings: dict[str, Any], batches: list[int]
) -> None:
    # What warm-up did, not how long a request took (that is a benchmark's figure):
    # once ready, the first predict and default explanation at every batch size
    # (padded to a warmed bucket) trace no function anywhere in the process.
    save_model(tmp_path, "convnet", build_convnet())
    rng = np.random.default_rng(5)
    with running_server(tmp_path, **settings) as running, running.client() as client:
        runtime = running.server.core.repository.get("convnet")
        warmed, before = runtime.traces, live_traces()
        assert warmed >= 1  # the default explanation was traced by warm-up
        for batch in batches:
            x = rng.uniform(0, 1, (batch, *CONV_SHAPE)).astype(np.float32)
            explained = client.explain("convnet", x)
            predicted = client.predict("convnet", x)
            assert explained.maps["absolute"].shape == (batch, *CONV_SHAPE[:-1])
            np.testing.assert_allclose(
                explained.outputs["probs"], predicted.outputs["probs"], rtol=1e-5, atol=1e-6
            )
        assert runtime.traces == warmed
        assert live_traces() == before


def test_warm_up_leaves_out_what_cannot_run_and_stops_when_memory_runs_out(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keras

    from salience_server.errors import ResourceExhausted
    from salience_server.explain.options import ExplainOptions

    x = keras.Input(LINEAR_SHAPE, name="x")
    flat = keras.layers.Flatten(name="flatten")(x)
    runtime = ModelRuntime("flat", 1, keras.Model(x, keras.layers.Dense(2, name="out")(flat)))
    sizes: list[int] = []
    original = runtime.predict

    def predict(inputs: Any) -> Any:
        if len(inputs[0]) >= 4:
            raise ResourceExhausted("device out of memory")
        sizes.append(len(inputs[0]))
        return original(inputs)

    monkeypatch.setattr(runtime, "predict", predict)
    with caplog.at_level(logging.INFO, logger="salience_server.runtime"):
        runtime.warm_up((1, 2, 4, 8), [ExplainOptions(method="gradcam"), ExplainOptions()])
    assert sizes == [1, 1, 2]
    assert runtime.traces == 1  # vanilla; Grad-CAM was left out at the first bucket
    assert "model flat: warm-up leaves out explanation 'gradcam'" in caplog.text
    assert "model flat: vanilla computed on /job:localhost/replica:0/task:0/device:" in caplog.text
    assert (
        "model flat: the device ran out of memory warming up batch 4: larger buckets are not "
        "warmed; lower max_device_batch_size"
    ) in caplog.text
