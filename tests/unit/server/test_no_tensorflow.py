"""The protocol layer — servicers, streams, the OIP layer, conversion, input
checks, the core and the batcher's queueing — talks to the device through the
seam (`salience_server.seam`) and never imports TensorFlow or Keras.
"""

from __future__ import annotations

import subprocess
import sys

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
