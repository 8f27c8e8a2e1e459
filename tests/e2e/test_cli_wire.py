"""The command line sends image files as uint8 to a model that accepts them (the
bundled demo models do), float32 with `--float32` or for `.npy` files, and both get
the same answers; the server's own byte count shows the quarter-size requests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from salience_server.demo import bundled_repository
from salience_server.demo.data import generate_roads, generate_shapes
from tests.conftest import RunningServer
from tests.e2e.test_cli import CLI

SHAPES = (64, 64, 3)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, server_factory: Any) -> RunningServer:
    root = tmp_path_factory.mktemp("demo-wire")
    for name in ("shapes", "steering"):
        shutil.copytree(bundled_repository() / name, root / name)
    running: RunningServer = server_factory(root)
    return running


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("pngs")
    paths = []
    for k, image in enumerate(generate_shapes(2, seed=5).images):
        path = root / f"shape{k}.png"
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def run(server: RunningServer, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*CLI, *args, "--target", server.target],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"{args}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def request_bytes(server: RunningServer, rpc: str) -> float:
    total = server.server.metrics.registry.get_sample_value(
        "salience_request_bytes_sum", {"rpc": rpc}
    )
    return float(total or 0.0)


def sent(server: RunningServer, rpc: str, *args: str) -> float:
    """The bytes of the one `rpc` request a CLI command sends, as the server counted."""
    before = request_bytes(server, rpc)
    run(server, *args)
    return request_bytes(server, rpc) - before


def test_predict_sends_uint8_by_default_and_float32_when_asked(
    server: RunningServer, pngs: list[Path], tmp_path: Path
) -> None:
    pixels = 2 * int(np.prod(SHAPES))
    common = ["predict", "--model", "shapes", *map(str, pngs)]
    uint8 = sent(server, "Predict", *common, "--out", str(tmp_path / "u.npz"))
    float32 = sent(server, "Predict", *common, "--float32", "--out", str(tmp_path / "f.npz"))
    assert pixels <= uint8 < pixels + 200
    assert 4 * pixels <= float32 < 4 * pixels + 200
    got, want = np.load(tmp_path / "u.npz"), np.load(tmp_path / "f.npz")
    np.testing.assert_allclose(got["predictions"], want["predictions"], rtol=1e-5, atol=1e-6)
    assert got["predictions"].shape == (2, 4)


def test_explain_maps_are_the_same_either_way(
    server: RunningServer, pngs: list[Path], tmp_path: Path
) -> None:
    common = ["explain", "--model", "shapes", "--filter-indices", "1", str(pngs[0])]
    run(server, *common, "--out", str(tmp_path / "u.npz"))
    run(server, *common, "--float32", "--out", str(tmp_path / "f.npz"))
    got, want = np.load(tmp_path / "u.npz"), np.load(tmp_path / "f.npz")
    np.testing.assert_allclose(got["saliency"], want["saliency"], rtol=1e-4, atol=1e-6)
    assert float(want["saliency"].max()) > 0


def test_npy_files_go_as_float32_and_join_images_in_one_batch(
    server: RunningServer, pngs: list[Path], tmp_path: Path
) -> None:
    sample = np.asarray(Image.open(pngs[1]), np.float32) / np.float32(255)
    np.save(tmp_path / "sample.npy", sample)
    pixels = int(np.prod(SHAPES))
    args = ["predict", "--model", "shapes", str(pngs[0]), str(tmp_path / "sample.npy")]
    mixed = sent(server, "Predict", *args, "--out", str(tmp_path / "m.npz"))
    # One float32 batch: the image's pixels as the floats they stand for.
    assert 8 * pixels <= mixed < 8 * pixels + 200
    run(server, "predict", "--model", "shapes", *map(str, pngs), "--out", str(tmp_path / "u.npz"))
    got, want = np.load(tmp_path / "m.npz"), np.load(tmp_path / "u.npz")
    np.testing.assert_allclose(got["predictions"], want["predictions"], rtol=1e-5, atol=1e-6)


def test_models_json_lists_the_accepted_dtypes(server: RunningServer) -> None:
    listed = {m["name"]: m for m in json.loads(run(server, "models", "--json").stdout)}
    for name in ("shapes", "steering"):
        (spec,) = listed[name]["inputs"]
        assert spec["accepted_dtypes"] == ["float32", "uint8"]
        assert spec["wire_range"] == "unit"


@pytest.mark.parametrize("model", ["shapes", "steering"])
def test_the_demo_models_answer_uint8_as_the_float_images(
    server: RunningServer, model: str
) -> None:
    images = (
        generate_shapes(3, seed=9).images if model == "shapes" else generate_roads(3, seed=9).images
    )
    pixels = np.round(images * 255).astype(np.uint8)
    floats = pixels.astype(np.float32) / np.float32(255)
    client = server.client()
    got = client.explain(model, pixels, filter_indices=[0])
    want = client.explain(model, floats, filter_indices=[0])
    np.testing.assert_allclose(got.predictions, want.predictions, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.maps["absolute"], want.maps["absolute"], rtol=1e-4, atol=1e-6)
