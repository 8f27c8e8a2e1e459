"""A backend that only calls the service never needs TensorFlow."""

from __future__ import annotations

import subprocess
import sys


def test_client_package_imports_without_tensorflow() -> None:
    # A fresh interpreter in which importing TensorFlow (or the server) would fail.
    code = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"tensorflow", "keras", "salience_server"}:
            raise ImportError(f"{name} must not be imported by the client")
sys.meta_path.insert(0, Refuse())
import salience_client, salience_client.client, salience_client.cli, salience_client.overlay
import salience_client.cli.entry
from salience_client import SalienceClient
assert "tensorflow" not in sys.modules and "keras" not in sys.modules
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
