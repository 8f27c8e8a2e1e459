"""`salience models --wait` against a real `salience serve`: it blocks until every
model is ready or failed, and its exit status says whether all are ready.

The repository holds a tiny Dense model and, in the first test, a version whose
model file is not a model, which fails to load.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import salience_serve

ENTRY_POINT = Path(sys.executable).with_name("salience")
CLI = [str(ENTRY_POINT)] if ENTRY_POINT.exists() else [sys.executable, "-m", "salience_client.cli"]
EXIT_NOT_READY = 3


def build_repository(root: Path, broken: bool) -> Path:
    keras = pytest.importorskip("keras")
    x = keras.Input((4,), name="features")
    y = keras.layers.Dense(2, name="scores")(x)
    (root / "dense" / "1").mkdir(parents=True)
    keras.Model(x, y).save(root / "dense" / "1" / "model.keras")
    if broken:
        (root / "broken" / "1").mkdir(parents=True)
        (root / "broken" / "1" / "model.keras").write_text("not a model")
    return root


def models(target: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "SALIENCE_TARGET": target}
    return subprocess.Popen(
        [*CLI, "models", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def test_wait_blocks_until_loaded_and_a_failed_model_makes_it_not_ready(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo", broken=True)
    with salience_serve(repo) as server:
        # Asked the moment the port opens, while the models still load.
        done = models(server.target, "--wait", "120")
        out, err = done.communicate(timeout=180)
    assert done.returncode == EXIT_NOT_READY, out + err
    assert "Traceback" not in err
    lines = out.splitlines()
    assert "dense  version 1 (served: 1)" in lines
    assert "broken  not served" in lines
    assert any(line.startswith("  version 1: failed: ") for line in lines), out
    assert "loading" not in out
    assert "salience models: not ready: broken version 1 (failed)" in err


def test_wait_outlasts_a_server_not_started_yet_and_exits_0_when_all_are_ready(
    tmp_path: Path,
) -> None:
    repo = build_repository(tmp_path / "repo", broken=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = f"127.0.0.1:{port}"
    # Started before the server: UNAVAILABLE is asked again within the wait.
    waiting = models(target, "--wait", "200", "--json")
    with salience_serve(repo, ["--port", str(port)]) as server:
        assert server.target == target
        out, err = waiting.communicate(timeout=240)
    assert waiting.returncode == 0, out + err
    import json

    listed = json.loads(out)
    assert [(m["name"], m["versions"]) for m in listed] == [("dense", [1])]
    assert listed[0]["version_status"] == [{"version": 1, "state": "ready", "reason": ""}]
