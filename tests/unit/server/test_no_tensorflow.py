"""The protocol layer — servicers, streams, the OIP layer, conversion, input
checks, the core and the batcher's queueing — talks to the device through the
seam (`salience_server.seam`) and never imports TensorFlow or Keras.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROTOCOL_LAYER = (
    "salience_server.seam",
    "salience_server.checks",
    "salience_server.convert",
    "salience_server.servicer",
    "salience_server.stream",
    "salience_server.oip",
    "salience_server.oip.codec",
    "salience_server.oip.outputs",
    "salience_server.oip.parameters",
    "salience_server.oip.words",
    "salience_server.oip.servicer",
    "salience_server.core",
    "salience_server.batching",
    "salience_server.errors",
    "salience_server.metrics",
    "salience_server.settings",
    "salience_server.repository",
    "salience_server.explain.plan",
    "salience_server.explain.catalog",
    "salience_server.explain.options",
    # What a front-end process of `--frontends N` runs.
    "salience_server.frontdoor",
    "salience_server.security",
    "salience_server.connections",
    "salience_server.procs.wire",
    "salience_server.procs.state",
    "salience_server.procs.frontend",
)


def test_the_protocol_layer_imports_without_tensorflow() -> None:
    # A fresh interpreter in which importing TensorFlow or Keras fails loudly.
    code = f"""
import importlib, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {{"tensorflow", "keras", "tf_keras"}}:
            raise ImportError(f"{{name}} must not be imported by the protocol layer")
sys.meta_path.insert(0, Refuse())
for module in {PROTOCOL_LAYER!r}:
    importlib.import_module(module)
assert not {{"tensorflow", "keras"}} & set(sys.modules)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_refusal_would_catch_a_tensorflow_import() -> None:
    # The same guard around a module that does import TensorFlow fails: the test
    # above can fail.
    code = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"tensorflow", "keras"}:
            raise ImportError(f"{name} refused")
sys.meta_path.insert(0, Refuse())
import salience_server.runtime
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "refused" in result.stderr


def test_a_running_front_end_process_has_not_imported_tensorflow(tmp_path: Path) -> None:
    # A real `--frontends 2` server (the device owner is this test's own process,
    # which has TensorFlow): each front end, started for real, serves a Predict and
    # an Explain, then reports the modules it holds when asked (SIGUSR2 writes them).
    import keras
    import numpy as np

    from salience_client import SalienceClient
    from tests.conftest import running_server, save_model

    x = keras.Input((3,), name="x")
    model = keras.Model(x, keras.layers.Dense(2, activation="softmax", name="out")(x))
    save_model(tmp_path, "tiny", model)
    with running_server(tmp_path, frontends=2) as server:
        rows = np.arange(6, dtype=np.float32).reshape(2, 3)
        with SalienceClient(server.target) as client:
            for _ in range(8):  # connections spread over the front ends
                predicted = client.predict("tiny", rows).outputs["out"]
                np.testing.assert_allclose(predicted, model.predict(rows, verbose=0), rtol=1e-5)
        frontends = server.server._frontends
        pids = [p.pid for p in frontends._processes.values()]
        assert len(pids) == 2
        for pid in pids:
            modules = frontend_modules(frontends.directory, pid)
            assert "salience_server.frontdoor" in modules
            assert "grpc" in modules
            assert not {"tensorflow", "keras", "tf_keras"} & modules, sorted(modules)


def frontend_modules(directory: Path, pid: int) -> set[str]:
    """The top-level and package modules a front end has imported (it writes them to
    `modules-<pid>` in its run directory on SIGUSR2).
    """
    import os
    import signal
    import time

    path = directory / f"modules-{pid}"
    os.kill(pid, signal.SIGUSR2)
    end = time.monotonic() + 30
    while not path.exists() or not path.read_text().endswith("\n.\n"):
        assert time.monotonic() < end, "the front end did not list its modules"
        time.sleep(0.05)
    return set(path.read_text().splitlines()[:-1])
