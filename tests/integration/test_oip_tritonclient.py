"""Triton's official `tritonclient` (gRPC) against a real salience server: liveness,
readiness, server and model metadata, inference with raw and typed inputs, a
saliency map equal to what Explain returns for the same input and options, and
refusals with the status codes tritonclient reports.

tritonclient pins protobuf below 7 and this project's stubs need 7, so the client
runs in its own virtual environment, `.venv-oip`, which `make install-test`
creates (constraints-oip.txt pins it); tests/e2e/oip_client_script.py is what runs
there, and prints what it saw as JSON for the checks below.
"""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import RunningServer
from tests.integration.models import LINEAR_SHAPE, build_repository

ROOT = Path(__file__).resolve().parents[2]
OIP_PYTHON = ROOT / ".venv-oip" / "bin" / "python"
SCRIPT = ROOT / "tests" / "e2e" / "oip_client_script.py"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, server_factory: Any) -> RunningServer:
    running: RunningServer = server_factory(build_repository(tmp_path_factory.mktemp("oip-tc")))
    return running


@pytest.fixture(scope="module")
def seen(served: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What the tritonclient script saw, with its arrays loaded (key `arrays`)."""
    if not OIP_PYTHON.exists():
        pytest.fail(
            f"{OIP_PYTHON} is missing: run `make install-test`, which creates the "
            "tritonclient environment (.venv-oip) this test runs Triton's client in"
        )
    work = tmp_path_factory.mktemp("oip-tc-work")
    x = np.random.default_rng(5).uniform(-1, 1, (2, *LINEAR_SHAPE)).astype(np.float32)
    np.save(work / "x.npy", x)
    done = subprocess.run(
        [str(OIP_PYTHON), str(SCRIPT), served.target, str(work)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"the tritonclient script failed:\n{done.stderr}"
    report: dict[str, Any] = json.loads(done.stdout)
    report["x"] = x
    report["arrays"] = {p.stem: np.load(p) for p in work.glob("*.npy") if p.stem != "x"}
    return report


def test_health_and_metadata_as_tritonclient_reads_them(seen: dict[str, Any]) -> None:
    assert (seen["live"], seen["ready"]) == (True, True)
    assert (seen["model_ready"], seen["model_ready_version_1"]) == (True, True)
    assert seen["model_ready_unknown"] is False
    assert seen["server_metadata"] == {
        "name": "salience",
        "version": metadata.version("salience"),
        "extensions": ["saliency"],
    }
    assert seen["model_metadata"] == {
        "name": "linear",
        "versions": ["1"],
        "platform": "keras",
        "inputs": [["x", "FP32", [-1, *LINEAR_SHAPE]]],
        "outputs": [["logits", "FP32", [-1, 4]]],
    }


def test_raw_and_typed_inference_equal_predict(seen: dict[str, Any], served: RunningServer) -> None:
    with served.client() as client:
        expected = client.predict("linear", seen["x"]).outputs["logits"]
    assert seen["raw"] == {
        "model_name": "linear",
        "model_version": "1",
        "id": "raw-1",
        "outputs": [["logits", "FP32", [2, 4]]],
    }
    np.testing.assert_array_equal(seen["arrays"]["raw_logits"], expected)
    assert seen["typed"] == {
        "id": "typed-1",
        "raw_output_contents": 0,
        "outputs": [["logits", "FP32", [2, 4]]],
    }
    np.testing.assert_array_equal(seen["arrays"]["typed_logits"], expected)


def test_saliency_output_equals_explain(seen: dict[str, Any], served: RunningServer) -> None:
    with served.client() as client:
        explained = client.explain(
            "linear",
            seen["x"],
            method="smoothgrad",
            filter_indices=[1, 3],
            samples=4,
            noise=0.25,
            seed=11,
            grad_modifiers=["absolute", "negate"],
        )
    saliency = seen["saliency"]
    assert saliency["outputs"] == [
        ["saliency", "FP32", [2, *LINEAR_SHAPE[:2]]],
        ["saliency/negate", "FP32", [2, *LINEAR_SHAPE[:2]]],
    ]
    assert (saliency["method"], saliency["seed"]) == ("smoothgrad", 11)
    arrays = seen["arrays"]
    np.testing.assert_allclose(arrays["saliency"], explained.maps["absolute"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        arrays["saliency_negate"], explained.maps["negate"], rtol=1e-6, atol=1e-7
    )
    # Normalised per sample, as Explain's default says: each map spans [0, 1).
    np.testing.assert_allclose(arrays["saliency"].min(axis=(1, 2)), [0, 0], atol=1e-6)
    np.testing.assert_allclose(arrays["saliency"].max(axis=(1, 2)), [1, 1], atol=1e-5)


def test_refusals_carry_the_codes_tritonclient_reports(seen: dict[str, Any]) -> None:
    assert seen["unknown_model"] == {
        "status": "StatusCode.NOT_FOUND",
        "message": "model_name='nope' is not served: choose one of 'linear', 'smooth', 'softmax'",
    }
    assert seen["wrong_datatype"] == {
        "status": "StatusCode.INVALID_ARGUMENT",
        "message": "inputs[0].datatype='FP64' is not accepted: input 'x' of model 'linear' "
        "takes FP32",
    }
    assert seen["unknown_parameter"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert seen["unknown_parameter"]["message"].startswith(
        "parameters['temperature'] is not a parameter salience knows: use one of "
        "'backprop_modifier', 'blur_grad_step', 'blur_max_sigma', 'chunk_size', "
        "'filter_indices'"
    )
