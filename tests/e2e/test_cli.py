"""The `salience` command line end to end: `salience serve` in a subprocess on a tiny
linear model, and every client command run as a user would, checked by value.

The model is Flatten → Dense(4) "logits" → Softmax "probs" on 8×8×3 images, so the
gradient of logit c is its kernel column W[:, c] reshaped to the image: maps have a
closed form. One server serves the whole module; SIGTERM must stop it with status 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from salience_client import SalienceClient

SHAPE = (8, 8, 3)
UNITS = 4
EPS = 1e-7  # the server's normalisation epsilon
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 20
ENTRY_POINT = Path(sys.executable).with_name("salience")
CLI = [str(ENTRY_POINT)] if ENTRY_POINT.exists() else [sys.executable, "-m", "salience_client.cli"]


@dataclass
class Served:
    target: str
    kernel: np.ndarray  # (192, 4)
    bias: np.ndarray  # (4,)
    workdir: Path

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.workdir,
            env=env,
        )

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = self.run(*args)
        assert done.returncode == 0, f"{args}: {done.returncode}\n{done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr
        return done

    def gradient(self, unit: int) -> np.ndarray:
        return self.kernel[:, unit].reshape(SHAPE).astype(np.float64)


def build_repository(root: Path) -> tuple[np.ndarray, np.ndarray]:
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(11)
    kernel = rng.normal(size=(int(np.prod(SHAPE)), UNITS)).astype(np.float32)
    bias = rng.normal(size=UNITS).astype(np.float32)
    x = keras.Input(SHAPE, name="image")
    flat = keras.layers.Flatten(name="flatten")(x)
    dense = keras.layers.Dense(UNITS, name="logits")
    logits = dense(flat)
    probs = keras.layers.Softmax(name="probs")(logits)
    dense.set_weights([kernel, bias])
    target = root / "linear" / "1"
    target.mkdir(parents=True)
    keras.Model(x, [logits, probs]).save(target / "model.keras")
    return kernel, bias


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_serving(target: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Polls the standard gRPC health check until the Salience service is SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + START_TIMEOUT_S
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="salience.v1.Salience")
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"salience serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if stub.Check(request, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    pytest.fail(f"salience serve did not answer within {START_TIMEOUT_S}s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    pytest.importorskip("grpc_health.v1")
    root = tmp_path_factory.mktemp("cli-repo")
    kernel, bias = build_repository(root)
    port = free_port()
    log = root.parent / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*CLI, "serve", "--model-repository", str(root), "--host", "127.0.0.1",
             "--port", str(port), "--metrics-port", "-1"],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    target = f"127.0.0.1:{port}"
    try:
        wait_until_serving(target, process, log)
        yield Served(target, kernel, bias, tmp_path_factory.mktemp("cli-work"))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"salience serve ignored SIGTERM for {STOP_TIMEOUT_S}s:\n{log.read_text()}")
    assert status == 0, f"salience serve exited with {status} after SIGTERM:\n{log.read_text()}"


@pytest.fixture(scope="module")
def inputs(served: Served) -> dict[str, np.ndarray]:
    """An 8-bit PNG, a float64 .npy sample and a float32 .npy batch of two."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    Image.fromarray(pixels).save(served.workdir / "cat.png")
    sample = rng.uniform(-1, 1, SHAPE)
    np.save(served.workdir / "one.npy", sample)
    batch = rng.uniform(0, 1, (2, *SHAPE)).astype(np.float32)
    np.save(served.workdir / "pair.npy", batch)
    return {"cat.png": pixels / 255.0, "one.npy": sample, "pair.npy": batch}


def all_samples(inputs: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([inputs["cat.png"][None], inputs["one.npy"][None], inputs["pair.npy"]])


def min_max(s: np.ndarray) -> np.ndarray:
    return (s - s.min()) / (s.max() - s.min() + EPS)


def test_models_json_lists_the_model(served: Served) -> None:
    env = {**os.environ, "SALIENCE_TARGET": served.target}  # the default --target
    done = served.run("models", "--json", env=env)
    assert done.returncode == 0, done.stderr
    (model,) = json.loads(done.stdout)
    assert model["name"] == "linear"
    assert model["versions"] == [1]
    assert model["version"] == 1
    assert model["inputs"] == [{"name": "image", "dtype": "float32", "shape": [None, *SHAPE]}]
    assert model["outputs"] == [
        {"name": "logits", "dtype": "float32", "shape": [None, UNITS]},
        {"name": "probs", "dtype": "float32", "shape": [None, UNITS]},
    ]
    human = served.ok("models", "--target", served.target).stdout
    assert "linear" in human
    assert "[N, 8, 8, 3]" in human


def test_a_reader_that_leaves_early_ends_the_command_without_a_traceback(served: Served) -> None:
    """`salience models --json | head`: the pipe's reader is gone before the answer is
    written; the command stops quietly with the shell's SIGPIPE status.
    """
    read, write = os.pipe()
    os.close(read)  # the reader left before anything was written
    try:
        done = subprocess.run(
            [*CLI, "models", "--json", "--target", served.target],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""


def test_predict_writes_every_output(served: Served, inputs: dict[str, np.ndarray]) -> None:
    done = served.ok(
        "predict", "--target", served.target, "--model", "linear", "--out", "p.npz",
        "cat.png", "one.npy", "pair.npy",
    )  # fmt: skip
    assert done.stdout.strip() == "p.npz"
    x = all_samples(inputs).reshape(4, -1)
    logits = x @ served.kernel.astype(np.float64) + served.bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    with np.load(served.workdir / "p.npz") as saved:
        assert set(saved.files) == {"predictions", "output_logits", "output_probs"}
        np.testing.assert_allclose(saved["predictions"], logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(saved["output_logits"], saved["predictions"])
        np.testing.assert_allclose(saved["output_probs"], probs, rtol=1e-4, atol=1e-5)

    printed = served.ok("predict", "--target", served.target, "--model", "linear", "cat.png")
    lines = printed.stdout.splitlines()
    assert lines[0] == "model linear version 1"
    (prob_line,) = [line for line in lines if line.startswith("cat.png  probs:")]
    assert prob_line.split("argmax ")[1].startswith(str(int(np.argmax(probs[0]))))


def test_explain_raw_maps_equal_the_kernel_column(
    served: Served, inputs: dict[str, np.ndarray]
) -> None:
    done = served.ok(
        "explain", "--target", served.target, "--model", "linear", "--layer", "logits",
        "--filter-indices", "2", "--grad-modifier", "none", "--grad-modifier", "absolute",
        "--no-normalize", "--out", "raw.npz", "cat.png", "one.npy", "pair.npy",
    )  # fmt: skip
    assert done.stdout.strip() == "raw.npz"
    w = served.gradient(2)
    with np.load(served.workdir / "raw.npz") as saved:
        assert "saliency" not in saved.files  # two modifiers: no single map
        assert saved["saliency_none"].shape == (4, 8, 8)
        for k in range(4):  # a linear score: the same map for every sample
            np.testing.assert_allclose(saved["saliency_none"][k], w.max(-1), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(
                saved["saliency_absolute"][k], np.abs(w).max(-1), rtol=1e-5, atol=1e-6
            )


def test_explain_normalised_absolute_and_weighted_objectives(served: Served) -> None:
    served.ok(
        "explain", "--target", served.target, "--model", "linear", "--filter-indices", "1",
        "--out", "norm.npz", "one.npy",
    )  # fmt: skip
    with np.load(served.workdir / "norm.npz") as saved:
        np.testing.assert_allclose(
            saved["saliency"][0], min_max(np.abs(served.gradient(1)).max(-1)), atol=1e-5
        )
        np.testing.assert_array_equal(saved["saliency"], saved["saliency_absolute"])

    # d/dx (-1 * logit_2 + 0.5 * logit_0) = -w2 + 0.5 w0. Layer -2 is "logits" by index
    # (the last layer is the softmax); a value starting with "-" needs the `=` form.
    served.ok(
        "explain", "--target", served.target, "--model", "linear",
        "--objective", "logits:2:-1", "--objective=-2:0:0.5", "--grad-modifier", "none",
        "--no-normalize", "--out", "mix.npz", "one.npy",
    )  # fmt: skip
    want = (-served.gradient(2) + 0.5 * served.gradient(0)).max(-1)
    with np.load(served.workdir / "mix.npz") as saved:
        np.testing.assert_allclose(saved["saliency"][0], want, rtol=1e-5, atol=1e-6)


def test_explain_method_options_reach_the_server(
    served: Served, inputs: dict[str, np.ndarray]
) -> None:
    # Integrated Gradients of a linear score from a zero baseline is exactly x ⊙ w,
    # and its completeness residual is zero.
    served.ok(
        "explain", "--target", served.target, "--model", "linear", "--layer", "logits",
        "--filter-indices", "3", "--method", "integrated-gradients", "--steps", "4",
        "--grad-modifier", "none", "--keepdims", "--no-normalize", "--out", "ig.npz",
        "one.npy",
    )  # fmt: skip
    x = inputs["one.npy"].astype(np.float32).astype(np.float64)
    w = served.gradient(3)
    with np.load(served.workdir / "ig.npz") as saved:
        np.testing.assert_allclose(saved["saliency"][0], x * w, rtol=1e-4, atol=1e-5)
        score = float((x * w).sum())
        np.testing.assert_allclose(saved["score_difference"], [score], rtol=1e-4, atol=1e-4)
        assert abs(float(saved["completeness_residual"][0])) < 1e-3 * max(1.0, abs(score))

    # SmoothGrad of a linear score is |w| whatever the noise: the options must parse
    # and a fixed seed must reproduce the map bit for bit.
    args = (
        "explain", "--target", served.target, "--model", "linear", "--layer", "logits",
        "--filter-indices", "0", "--method", "smoothgrad", "--samples", "3", "--noise",
        "0.5", "--seed", "42", "--no-normalize",
    )  # fmt: skip
    served.ok(*args, "--out", "sg1.npz", "pair.npy")
    served.ok(*args, "--out", "sg2.npz", "pair.npy")
    with np.load(served.workdir / "sg1.npz") as one, np.load(served.workdir / "sg2.npz") as two:
        np.testing.assert_array_equal(one["saliency"], two["saliency"])
        want = np.abs(served.gradient(0)).max(-1)
        np.testing.assert_allclose(one["saliency"][1], want, rtol=1e-4, atol=1e-6)

    # A CAM method on a model without spatial layers: status and message, exit 1.
    done = served.run(
        "explain", "--target", served.target, "--model", "linear", "--method", "gradcam",
        "--out", "cam.npz", "one.npy",
    )  # fmt: skip
    assert done.returncode == 1
    assert "FAILED_PRECONDITION" in done.stderr
    assert "gradcam" in done.stderr
    # A malformed option value is a usage error, caught before any call.
    done = served.run(
        "explain", "--target", served.target, "--model", "linear", "--samples", "-3",
        "--out", "x.npz", "one.npy",
    )  # fmt: skip
    assert done.returncode == 2
    assert "--samples" in done.stderr


def test_explain_path_method_options_reach_the_server(
    served: Served, inputs: dict[str, np.ndarray]
) -> None:
    from scipy import ndimage

    x = inputs["one.npy"].astype(np.float32).astype(np.float64)
    w = served.gradient(3)
    # Guided IG of a linear score from a zero baseline is exactly x ⊙ w, whatever
    # path its fraction and max_dist make it walk.
    served.ok(
        "explain", "--target", served.target, "--model", "linear", "--layer", "logits",
        "--filter-indices", "3", "--method", "guided-ig", "--steps", "5",
        "--guided-fraction", "0.5", "--guided-max-dist", "0.3",
        "--grad-modifier", "none", "--keepdims", "--no-normalize", "--out", "gig.npz",
        "one.npy",
    )  # fmt: skip
    with np.load(served.workdir / "gig.npz") as saved:
        np.testing.assert_allclose(saved["saliency"][0], x * w, rtol=1e-4, atol=1e-5)
    # Blur IG's score difference is measured against the input blurred at its sigma.
    served.ok(
        "explain", "--target", served.target, "--model", "linear", "--layer", "logits",
        "--filter-indices", "3", "--method", "blur-ig", "--steps", "4",
        "--blur-max-sigma", "3", "--blur-grad-step", "0.05", "--out", "blur.npz", "one.npy",
    )  # fmt: skip
    blurred = ndimage.gaussian_filter(x, [3, 3, 0], mode="constant")
    with np.load(served.workdir / "blur.npz") as saved:
        want = float(((x - blurred) * w).sum())
        np.testing.assert_allclose(saved["score_difference"], [want], rtol=1e-4, atol=1e-5)
    served.ok(
        "explain", "--target", served.target, "--model", "linear", "--layer", "logits",
        "--filter-indices", "3", "--method", "xrai", "--steps", "4", "--xrai-scales", "100,300",
        "--xrai-sigma", "0.5", "--xrai-min-size", "40", "--xrai-dilation-radius", "1",
        "--xrai-area-threshold", "0.5", "--out", "xrai.npz", "one.npy",
    )  # fmt: skip
    with SalienceClient(served.target) as client:
        want = client.explain(
            "linear",
            x[None].astype(np.float32),
            layer="logits",
            filter_indices=[3],
            method="xrai",
            steps=4,
            xrai_scales=[100.0, 300.0],
            xrai_sigma=0.5,
            xrai_min_size=40,
            xrai_dilation_radius=1,
            xrai_area_threshold=0.5,
        )
    assert want.resolved.xrai_scales == (100.0, 300.0)
    with np.load(served.workdir / "xrai.npz") as saved:
        assert saved["saliency"].shape == (1, *SHAPE[:2])
        np.testing.assert_array_equal(saved["saliency"], want.maps["none"])
    done = served.run(
        "explain", "--target", served.target, "--model", "linear", "--method", "xrai",
        "--xrai-scales", "100,x", "one.npy",
    )  # fmt: skip
    assert done.returncode != 0
    assert "'100,x' is not a comma-separated list of numbers" in done.stderr


def test_explain_to_a_directory_writes_overlays(
    served: Served, inputs: dict[str, np.ndarray]
) -> None:
    import matplotlib

    done = served.ok(
        "explain", "--target", served.target, "--model", "linear", "--filter-indices", "3",
        "--colormap", "viridis", "--alpha", "1", "--plain", "--out", "maps", "cat.png",
        "pair.npy",
    )  # fmt: skip
    names = ["cat_absolute.png", "pair_0_absolute.png", "pair_1_absolute.png"]
    assert done.stdout.split() == [str(Path("maps") / n) for n in names]
    expected = min_max(np.abs(served.gradient(3)).max(-1))
    cmap = matplotlib.colormaps["viridis"]
    hot = np.unravel_index(np.argmax(expected), expected.shape)
    cold = np.unravel_index(np.argmin(expected), expected.shape)
    for name in names:
        with Image.open(served.workdir / "maps" / name) as png:
            assert png.size == (8, 8)
            rgb = np.asarray(png.convert("RGB")).astype(int)
        # alpha=1: only the map's colours, hottest pixel at the top of the colormap.
        np.testing.assert_array_equal(rgb[hot], cmap(1.0, bytes=True)[:3])
        np.testing.assert_array_equal(rgb[cold], cmap(0.0, bytes=True)[:3])
        colours = np.asarray(cmap(expected, bytes=True))[..., :3].astype(int)
        assert np.abs(rgb - colours).max() <= 8  # at most a neighbouring colormap entry

    blended = served.ok(
        "explain", "--target", served.target, "--model", "linear", "--alpha", "0",
        "--plain", "--out", "plain", "cat.png",
    )  # fmt: skip
    assert blended.stdout.split() == [str(Path("plain") / "cat_absolute.png")]
    with Image.open(served.workdir / "plain" / "cat_absolute.png") as png:
        # alpha=0 gives back the input image exactly.
        np.testing.assert_array_equal(np.asarray(png), np.round(inputs["cat.png"] * 255))


def test_explain_overlays_are_titled_with_the_prediction_and_have_a_colour_bar(
    served: Served, inputs: dict[str, np.ndarray]
) -> None:
    from salience_client.report import annotated_overlay, overlay_layout

    served.ok(
        "explain", "--target", served.target, "--model", "linear", "--filter-indices", "3",
        "--colormap", "viridis", "--plain", "--out", "bare", "cat.png",
    )  # fmt: skip
    served.ok(
        "explain", "--target", served.target, "--model", "linear", "--filter-indices", "3",
        "--colormap", "viridis", "--out", "annotated", "cat.png",
    )  # fmt: skip
    # The logits in closed form: the title names unit 3's and the largest.
    logits = inputs["cat.png"].reshape(-1) @ served.kernel.astype(np.float64) + served.bias
    top = int(np.argmax(logits))
    title = f"logits[3] {logits[3]:.3f}"
    if top != 3:
        title += f" · argmax {top} {logits[top]:.3f}"
    with Image.open(served.workdir / "bare" / "cat_absolute.png") as png:
        bare = np.asarray(png.convert("RGB"))
    with Image.open(served.workdir / "annotated" / "cat_absolute.png") as png:
        drawn = np.asarray(png.convert("RGB"))
    layout = overlay_layout(SHAPE[:2], title)
    assert layout.scale == 24  # 8×8 drawn 192×192
    assert drawn.shape == (layout.size[1], layout.size[0], 3)
    np.testing.assert_array_equal(drawn, annotated_overlay(bare, title, "viridis"))


def test_server_errors_exit_1_with_status_and_message(served: Served) -> None:
    done = served.run("predict", "--target", served.target, "--model", "nope", "one.npy")
    assert done.returncode == 1
    assert done.stderr.startswith("error: NOT_FOUND: ")
    assert "'nope'" in done.stderr
    assert "Traceback" not in done.stderr

    done = served.run(
        "explain", "--target", served.target, "--model", "linear", "--filter-indices", "9",
        "--out", "x.npz", "one.npy",
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith("error: INVALID_ARGUMENT: ")
    assert "filter_indices[0]=9 is out of range" in done.stderr
    assert not (served.workdir / "x.npz").exists()


def test_usage_errors_exit_2(served: Served) -> None:
    Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(served.workdir / "short.png")
    done = served.run("predict", "--target", served.target, "--model", "linear", "short.png")
    assert done.returncode == 2
    assert "8×6" in done.stderr
    assert "8×8" in done.stderr
    assert "Traceback" not in done.stderr

    done = served.run(
        "explain", "--target", served.target, "--model", "linear", "--objective", "logits:2",
        "--layer", "logits", "--out", "x.npz", "one.npy",
    )  # fmt: skip
    assert done.returncode == 2
    assert "--objective" in done.stderr
