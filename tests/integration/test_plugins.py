"""Operator plugins end to end: a real `salience serve --plugins ...` process serves
the example plugin's grad and backprop modifiers, lists them in the metadata, and a
bad plugin stops start-up with the reason.

The servers run as child processes so that what a plugin registers (process-wide)
never leaks into the other tests' servers.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from salience_client import SalienceClient
from salience_client.client import SalienceError
from tests.conftest import save_model
from tests.integration.test_backprop import hand_backprop, relu_net, samples

EXAMPLE = "salience_server.demo.example_plugin"
LISTENING = re.compile(r"serving .* on 127\.0\.0\.1:(\d+)")


def serve_command(repo: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "salience_client.cli",
        "serve",
        "--model-repository",
        str(repo),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "-1",
        *flags,
    ]


def environment(extra_path: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("plugin-repo"), "relu_net", relu_net())


@pytest.fixture(scope="module")
def weights(repo: Path) -> list[tuple[np.ndarray, ...]]:
    import keras

    model = keras.saving.load_model(repo / "relu_net" / "1" / "model.keras", compile=False)
    return [
        tuple(w.astype(np.float64) for w in model.get_layer(name).get_weights())
        for name in ("d1", "d2", "d3", "logits")
    ]


@pytest.fixture(scope="module")
def client(repo: Path) -> Iterator[SalienceClient]:
    process = subprocess.Popen(
        serve_command(repo, "--plugins", EXAMPLE),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=environment(),
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    log: list[str] = []
    port = None
    try:
        while port is None:
            line = lines.get(timeout=240)
            log.append(line)
            found = LISTENING.search(line)
            if found:
                port = int(found.group(1))
    except queue.Empty:
        process.kill()
        pytest.fail("the plugin server did not start:\n" + "".join(log))
    try:
        with SalienceClient(f"127.0.0.1:{port}") as client:
            yield client
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    assert any("loaded plugin module " + EXAMPLE in line for line in log)


def test_metadata_lists_the_plugin_modifiers(client: SalienceClient) -> None:
    metadata = client.metadata("relu_net")
    assert "square" in metadata.grad_modifiers
    assert "absolute" in metadata.grad_modifiers
    assert list(metadata.backprop_modifiers) == ["guided", "rectified", "identity"]


def test_plugin_modifiers_compute_their_rules(
    client: SalienceClient, weights: list[tuple[np.ndarray, ...]]
) -> None:
    x = samples(4, seed=12)
    result = client.explain(
        "relu_net",
        x,
        filter_indices=[1],
        grad_modifiers=["square", "none"],
        backprop_modifier="identity",
        normalize=False,
    )
    # `identity`: every ReLU passes g down unchanged; `square`: G².
    g = hand_backprop(weights, x, 1, lambda y, g: g)["grad"]
    np.testing.assert_allclose(result.maps["none"], g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.maps["square"], g**2, rtol=1e-5, atol=1e-8)
    assert result.resolved.backprop_modifier == "identity"
    ordinary = hand_backprop(weights, x, 1, lambda y, g: (y > 0) * g)["grad"]
    assert not np.allclose(g, ordinary)  # the rule really changed something
    # A built-in modifier next to the plugin's, on a built-in backprop: unchanged.
    plain = client.explain(
        "relu_net", x, filter_indices=[1], grad_modifiers=["square"], normalize=False
    )
    np.testing.assert_allclose(plain.maps["square"], ordinary**2, rtol=1e-5, atol=1e-8)


def test_unknown_names_still_list_the_plugin_ones(client: SalienceClient) -> None:
    with pytest.raises(SalienceError) as caught:
        client.explain("relu_net", samples(1), backprop_modifier="identical")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'identity'" in caught.value.details
    with pytest.raises(SalienceError) as caught:
        client.explain("relu_net", samples(1), grad_modifiers=["cube"])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'square'" in caught.value.details


CLASHING = """
from salience_server.plugins import register_grad_modifier

register_grad_modifier("absolute", lambda g: g)
"""

NOT_ELEMENTWISE = """
import tensorflow as tf
from salience_server.plugins import register_grad_modifier

register_grad_modifier("total", lambda g: tf.reduce_sum(g))
"""


@pytest.mark.parametrize(
    ("module", "source", "fragments"),
    [
        ("no_such_plugin_module", None, ["module 'no_such_plugin_module' cannot be loaded"]),
        (
            "clashing_plugin",
            CLASHING,
            ["'clashing_plugin' was refused", "clashes with the built-in"],
        ),
        ("total_plugin", NOT_ELEMENTWISE, ["grad modifier 'total' must return", "shaped like"]),
    ],
)
def test_a_bad_plugin_stops_start_up_with_the_reason(
    repo: Path, tmp_path: Path, module: str, source: str | None, fragments: list[str]
) -> None:
    if source is not None:
        (tmp_path / f"{module}.py").write_text(source)
    done = subprocess.run(
        serve_command(repo, "--plugins", module),
        capture_output=True,
        text=True,
        timeout=240,
        env=environment(tmp_path),
    )
    assert done.returncode == 1, done.stderr
    assert "salience serve: error: plugins:" in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr


# Registration rules, in process (nothing here is ever registered) -----------------


@pytest.mark.parametrize(
    ("register", "name", "fn", "message"),
    [
        ("grad", "absolute", lambda g: g, "clashes with the built-in grad modifier"),
        ("backprop", "guided", lambda y, g: g, "clashes with the built-in backprop modifier"),
        ("backprop", "deconv", lambda y, g: g, "clashes with the built-in"),
        ("grad", "Bad Name", lambda g: g, "is not allowed"),
        ("grad", "broken", lambda g: 1 / 0, "fails on a test tensor"),
        ("backprop", "shape", lambda y, g: g[0], "shaped like its input"),
        ("grad", "not_a_function", 3, "is not a function"),
    ],
)
def test_registration_refuses_bad_modifiers(
    register: str, name: str, fn: Any, message: str
) -> None:
    from salience_server.explain import backprop, modifiers
    from salience_server.plugins import (
        PluginError,
        register_backprop_modifier,
        register_grad_modifier,
    )

    before = (dict(modifiers.GRAD_MODIFIERS), dict(backprop.BACKPROP_MODIFIERS))
    function = register_grad_modifier if register == "grad" else register_backprop_modifier
    with pytest.raises(PluginError, match=message):
        function(name, fn)
    assert before == (modifiers.GRAD_MODIFIERS, backprop.BACKPROP_MODIFIERS)


def test_plugins_setting_takes_a_comma_separated_list() -> None:
    from salience_server.settings import Settings, SettingsError

    assert Settings.load({"plugins": "a.b, c"}).plugins == ("a.b", "c")
    assert Settings.load({}, {"SALIENCE_PLUGINS": "x"}).plugins == ("x",)
    with pytest.raises(SettingsError, match="'a-b', which is not a Python module name"):
        Settings.load({"plugins": "a-b"})
