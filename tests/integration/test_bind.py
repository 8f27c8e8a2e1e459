"""A port `salience serve` cannot have: the setting, the address and what to do are
named, and it exits cleanly (status 1, no traceback); a port another salience
server holds is refused, never shared (gRPC's default SO_REUSEPORT would split the
traffic between the two silently).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from salience_client import SalienceClient
from tests.conftest import save_model
from tests.processes import ROOT, salience_serve

NOISE = ("Traceback", "never awaited", "Event loop is closed", "Exception ignored")


@contextmanager
def listener() -> Iterator[int]:
    """A port held by a plain listening socket (not a salience server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def serve_once(repo: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`salience serve` to its exit (these all fail at start-up)."""
    command = [
        str(Path(sys.executable).with_name("salience")), "serve", "--host", "127.0.0.1",
        "--model-repository", str(repo), "--repository-poll-seconds", "0", *flags,
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    x = keras.Input((3,), name="x")
    model = keras.Model(x, keras.layers.Dense(2, name="out")(x))
    return save_model(tmp_path_factory.mktemp("bind-repo"), "tiny", model)


def assert_clean_refusal(result: subprocess.CompletedProcess[str], *named: str) -> None:
    assert result.returncode == 1, result.stderr
    for text in named:
        assert text in result.stderr, result.stderr
    for noise in NOISE:
        assert noise not in result.stderr, result.stderr


def test_a_taken_metrics_port_is_named_with_its_setting(repo: Path) -> None:
    with listener() as port:
        result = serve_once(repo, "--port", "0", "--metrics-port", str(port))
    assert_clean_refusal(
        result,
        f"cannot listen for metrics on 127.0.0.1:{port}",
        "--metrics-port / SALIENCE_METRICS_PORT",
        "another process holds it",
        "Choose a free port with --metrics-port or SALIENCE_METRICS_PORT",
    )


def test_a_taken_grpc_port_is_named_with_its_setting(repo: Path) -> None:
    with listener() as port:
        result = serve_once(repo, "--port", str(port), "--metrics-port", "0")
    assert_clean_refusal(
        result,
        f"cannot listen for gRPC on 127.0.0.1:{port}",
        "--port / SALIENCE_PORT",
        "another process holds it",
    )


def test_a_port_another_salience_server_holds_is_refused_not_shared(repo: Path) -> None:
    with salience_serve(repo) as first:
        port = first.target.rsplit(":", 1)[1]
        second = serve_once(repo, "--port", port, "--metrics-port", "0")
        assert_clean_refusal(second, f"cannot listen for gRPC on 127.0.0.1:{port}")
        # The first still serves every call on its port.
        with SalienceClient(first.target) as client:
            x = np.ones((1, 3), np.float32)
            for _ in range(8):
                assert client.predict("tiny", x).outputs["out"].shape == (1, 2)
