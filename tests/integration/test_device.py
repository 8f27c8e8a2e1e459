"""The device the suite computes on, through a real server: where the weights are,
that the device computes the maps an independent reference computes, that a device
this machine lacks stops `salience serve` at start-up, and the device memory gauge
on a real scrape.

The device is SALIENCE_TEST_DEVICE's (`tests/conftest.py`): on a CPU machine these
run on the CPU in the test command; scripts/gpu-check runs them (marker `gpu`) with
`gpu`, where a GPU TensorFlow does not see fails instead of being skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import TEST_DEVICE, running_server, save_model

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (16, 16, 3)
CLASSES = 5
CLASS = 3
# A GPU computes float32 convolutions and matrix products in TF32 by default (Ampere
# and later): about 1e-3 relative, so a normalised map moves by up to about 1e-2
# against a CPU's float32; a smooth network has no ReLU kink to flip.
MAP_ATOL = {"cpu": 1e-5, "gpu": 2e-2}
OUTPUT_RTOL = {"cpu": 1e-5, "gpu": 1e-2}


def gpu_count() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


@pytest.fixture(scope="module")
def kind() -> str:
    """`gpu` or `cpu`: what this run computes on. Asked for a GPU, a machine that
    shows TensorFlow none fails here, never skips.
    """
    gpus = gpu_count()
    if TEST_DEVICE == "gpu" and not gpus:
        pytest.fail(
            "SALIENCE_TEST_DEVICE=gpu, but TensorFlow sees no GPU: is this the GPU build "
            "(salience[gpu]), with a driver?"
        )
    if TEST_DEVICE == "cpu":
        return "cpu"
    return "gpu" if gpus else "cpu"


def build_smooth_convnet() -> Any:
    import keras

    keras.utils.set_random_seed(3)
    x = keras.Input(SHAPE, name="image")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="tanh", name="conv1")(x)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="softplus", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(x, keras.layers.Dense(CLASSES, name="logits")(h))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("device-repo"), "smooth", build_smooth_convnet())


def images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(9).uniform(0, 1, (n, *SHAPE)).astype(np.float32)


def reference(repo: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, vanilla `absolute` map of CLASS) computed on the CPU in this process,
    with a plain gradient tape: what the served device must agree with.
    """
    import keras
    import tensorflow as tf

    with tf.device("/CPU:0"):
        model = keras.saving.load_model(repo / "smooth" / "1" / "model.keras", compile=False)
        inputs = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            logits = model(inputs, training=False)
            score = tf.reduce_sum(logits[:, CLASS])
        grads = tape.gradient(score, inputs).numpy()
    s = np.abs(grads).max(axis=-1)
    low = s.min(axis=(1, 2), keepdims=True)
    high = s.max(axis=(1, 2), keepdims=True)
    return logits.numpy(), (s - low) / (high - low + 1e-7)


def scrape(port: int) -> str:
    return str(
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    )


def gauge(text: str, device: str, stat: str) -> float | None:
    found = re.search(
        rf'^salience_device_memory_bytes\{{device="{re.escape(device)}",stat="{stat}"\}} (\S+)$',
        text,
        re.MULTILINE,
    )
    return float(found.group(1)) if found else None


def test_models_are_placed_on_the_device_and_compute_what_a_reference_computes(
    repo: Path, kind: str
) -> None:
    settings = ("gpu", "gpu:0") if kind == "gpu" else ("cpu",)
    want_logits, want_map = reference(repo, images())
    for setting in settings:
        with running_server(repo, device=setting) as running, running.client() as client:
            runtime = running.server.core.repository.get("smooth")
            device = client.metadata("smooth").device
            suffix = "/device:GPU:0" if kind == "gpu" else "/device:CPU:0"
            assert device.endswith(suffix), (setting, device)
            assert device == runtime.device == runtime.model.weights[0].value.device
            assert runtime.placement.device == ("/GPU:0" if kind == "gpu" else "/CPU:0")
            got = client.explain("smooth", images(), filter_indices=[CLASS])
        np.testing.assert_allclose(
            got.outputs["logits"], want_logits, rtol=OUTPUT_RTOL[kind], atol=1e-6, err_msg=setting
        )
        np.testing.assert_allclose(
            got.maps["absolute"], want_map, atol=MAP_ATOL[kind], err_msg=setting
        )
        assert float(got.maps["absolute"].std()) > 0.05  # a real map, not a constant


def test_a_device_this_machine_lacks_stops_serve_at_start_up(repo: Path) -> None:
    """`salience serve --device gpu:N` with N GPUs present (gpu:1 on a one-GPU machine)
    exits with status 1 naming what the machine has, before it serves anything.
    """
    gpus = gpu_count()
    absent = f"gpu:{gpus}"
    have = {
        0: "no GPU (TensorFlow sees none: is this the GPU build, with a driver?)",
        1: "1 GPU (gpu:0)",
    }.get(gpus, f"{gpus} GPUs (" + ", ".join(f"gpu:{k}" for k in range(gpus)) + ")")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "salience_client.cli", "serve", "--model-repository", str(repo),
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--device", absent],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    message = f"salience serve: error: device='{absent}' is not available: this machine has {have}"
    assert f"{message}; use cpu" in done.stderr
    assert "serving" not in done.stderr.lower().replace("not_serving", "")


def test_the_device_memory_gauge_reports_what_the_device_holds(repo: Path, kind: str) -> None:
    with (
        running_server(repo, metrics_port=0) as running,
        running.client() as client,
    ):
        client.explain("smooth", images(8), filter_indices=[CLASS])
        text = scrape(running.server.metrics_port)
        runtime = running.server.core.repository.get("smooth")
        device = runtime.placement.device
        weights = sum(np.asarray(w.value).nbytes for w in runtime.model.weights)
    assert 'salience_samples_total{kind="explain",model="smooth"} 8.0' in text, text
    if kind == "cpu":
        assert "salience_device_memory_bytes" not in text  # a CPU reports no such gauge
        return
    current, peak = gauge(text, device, "current"), gauge(text, device, "peak")
    assert current is not None, text
    assert peak is not None, text
    # At least the model's weights are resident on it.
    assert current >= weights, (current, weights)
    assert peak >= current
