"""The device settings: how `device` and `mixed_precision` resolve, what is refused
and with which message, which layers mixed precision switches, and the device
memory gauge.
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from salience_server import devices
from salience_server.devices import Placement
from salience_server.metrics import Metrics
from salience_server.settings import Settings, SettingsError

# scripts/gpu-check runs these on a GPU too (configure, placing, the real device).
pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    ("setting", "gpus", "device"),
    [
        ("auto", 0, "/CPU:0"),
        ("auto", 2, "/GPU:0"),
        ("cpu", 2, "/CPU:0"),
        ("CPU", 0, "/CPU:0"),
        ("gpu", 1, "/GPU:0"),
        ("gpu:1", 2, "/GPU:1"),
    ],
)
def test_the_device_setting_resolves_to_a_tensorflow_device(
    setting: str, gpus: int, device: str
) -> None:
    assert devices.resolve_device(setting, gpus) == device


@pytest.mark.parametrize(
    ("setting", "gpus", "message"),
    [
        (
            "gpu",
            0,
            "device='gpu' is not available: this machine has no GPU (TensorFlow sees none: is "
            "this the GPU build, with a driver?); use cpu",
        ),
        (
            "gpu:1",
            1,
            "device='gpu:1' is not available: this machine has 1 GPU (gpu:0); use cpu",
        ),
        (
            "gpu:2",
            2,
            "device='gpu:2' is not available: this machine has 2 GPUs (gpu:0, gpu:1); use cpu",
        ),
        ("tpu", 0, "device='tpu' is not allowed: use auto, cpu, gpu or gpu:N"),
    ],
)
def test_an_absent_or_unknown_device_is_refused_naming_what_exists(
    setting: str, gpus: int, message: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        devices.resolve_device(setting, gpus)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("setting", "device", "dtype"),
    [
        ("off", "/GPU:0", "float32"),
        ("on", "/GPU:0", "float16"),
        ("on", "/CPU:0", "bfloat16"),
        ("float16", "/CPU:0", "float16"),
        ("bfloat16", "/GPU:0", "bfloat16"),
    ],
)
def test_mixed_precision_on_means_float16_on_a_gpu_and_bfloat16_on_a_cpu(
    setting: str, device: str, dtype: str
) -> None:
    assert devices.resolve_compute_dtype(setting, device) == dtype


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"device": "gpu1"}, "device='gpu1' is not allowed: use auto, cpu, gpu or gpu:N"),
        (
            {"mixed_precision": "half"},
            "mixed_precision='half' is not allowed: use off, on, float16, bfloat16",
        ),
    ],
)
def test_settings_refuse_malformed_device_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings(**values)
    assert str(caught.value) == message


def test_settings_read_the_new_flags_and_variables() -> None:
    settings = Settings.load(
        {"device": "cpu", "xla": "true"}, environ={"SALIENCE_MIXED_PRECISION": "on"}
    )
    assert (settings.device, settings.mixed_precision, settings.xla) == ("cpu", "on", True)
    defaults = Settings()
    assert (defaults.device, defaults.mixed_precision, defaults.xla) == ("auto", "off", False)


def test_configure_resolves_the_settings_on_this_machine() -> None:
    import tensorflow as tf

    # "auto" never hides a device from the rest of this test process, as "cpu" would.
    gpu = bool(tf.config.list_physical_devices("GPU"))
    placement = devices.configure(Settings(device="auto", mixed_precision="on", xla=True))
    device, dtype = ("/GPU:0", "float16") if gpu else ("/CPU:0", "bfloat16")
    assert placement == Placement(device, dtype, True)
    assert placement.policy == f"mixed_{dtype}"
    assert placement.jit_compile is True
    assert placement.describe() == f"{device} (mixed precision {dtype}, XLA)"
    assert Placement().describe() == "/CPU:0"
    assert Placement().jit_compile is None
    # Outside `placing`, models go where the default setting puts them.
    assert devices.current() == Placement(device)
    with devices.placing(placement):
        assert devices.current() == placement
        assert tf.constant(1.0).device.endswith(f"/device:{device[1:]}")
    assert devices.current() == Placement(device)


def test_mixed_precision_switches_float32_layers_but_not_outputs_or_float64() -> None:
    import keras

    inner_in = keras.Input((4,), name="inner_in")
    inner = keras.Model(inner_in, keras.layers.Dense(4, name="inner_out")(inner_in), name="inner")
    x = keras.Input((4,), name="x")
    h = keras.layers.Dense(4, activation="relu", name="hidden")(x)
    h = inner(h)
    wide = keras.layers.Dense(4, dtype="float64", name="wide")(h)
    out = keras.layers.Dense(2, activation="softmax", name="probs")(wide)
    model = keras.Model(x, out)
    switched = devices.apply_mixed_precision(model, "mixed_float16")
    policies = {layer.name: layer.dtype_policy.name for layer in model.layers}
    assert policies == {
        "x": "float32",
        "hidden": "mixed_float16",
        "inner": "float32",  # the nested model itself; its layers below
        "wide": "float64",
        "probs": "float32",  # produces the model's output
    }
    # The nested model's own output layer stays float32 too.
    assert inner.get_layer("inner_out").dtype_policy.name == "float32"
    assert switched == 1
    assert model.get_layer("hidden").kernel.dtype == "float32"  # variables stay float32


def test_device_memory_gauge_reads_the_device_at_every_scrape() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    reading = {"current": 1024, "peak": 4096}
    metrics.track_device_memory("/GPU:0", lambda: reading)
    text = generate_latest(registry).decode()
    assert 'salience_device_memory_bytes{device="/GPU:0",stat="current"} 1024.0' in text
    assert 'salience_device_memory_bytes{device="/GPU:0",stat="peak"} 4096.0' in text
    reading["current"] = 2048
    text = generate_latest(registry).decode()
    assert 'salience_device_memory_bytes{device="/GPU:0",stat="current"} 2048.0' in text

    def broken() -> dict[str, int]:
        raise RuntimeError("device lost")

    other = Metrics(CollectorRegistry())
    other.track_device_memory("/GPU:1", broken)
    text = generate_latest(other.registry).decode()
    assert 'salience_device_memory_bytes{device="/GPU:1",stat="current"} NaN' in text
