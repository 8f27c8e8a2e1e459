"""Score-CAM, Faster-ScoreCAM, Layer-CAM and occlusion per request through the
service, next to the library call a user would otherwise wrap, on MobileNetV2 224².

    .venv/bin/pytest -q -m bench -s tests/bench/test_forward_methods_bench.py

Ours: one `Explain` RPC of one image to a real server (this process, port 0) with
the method's defaults (CAM layer `out_relu`, 7×7×1280; 64 rows per forward pass;
occlusion window 16, stride 8: 729 occluded copies). Theirs, in the same process on
the same weights: tf-keras-vis's `Scorecam` (`max_N=10` for Faster-ScoreCAM) and
`Layercam` with `ReplaceToLinear`, its default `batch_size` (32) for the masked
inputs; for occlusion, which tf-keras-vis lacks, the loop a user writes: the 729
occluded copies built in numpy and scored by `model.predict` (batch 32), averaged
per pixel exactly as ours. Runs are interleaved after a warm-up and medians
compared (one timed run each of the two heavy methods), so that load from other
processes hits both alike. Prints a table; asserts no timing, only that both
computed the same maps (correlation per method).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import running_server, save_model

pytestmark = [
    pytest.mark.bench,
    pytest.mark.filterwarnings("ignore:The structure of `inputs` doesn't match:UserWarning"),
    pytest.mark.filterwarnings("ignore:Please import `zoom`:DeprecationWarning"),
]

SIZE = 224
CLASS = 7
WINDOW, STRIDE = 16, 8
LAYER = "out_relu"


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int) -> list[float]:
    """(median seconds of ours, of theirs) over `repeats` alternating calls, after the
    warm-up calls the caller made."""
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for r in range(repeats):
        order = [("ours", ours), ("theirs", theirs)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name].append(timed(fn))
    return [statistics.median(times["ours"]), statistics.median(times["theirs"])]


def calibrated_mobilenet(images: np.ndarray) -> Any:
    """Random weights, batch norms set to their inputs' statistics (test_engine_bench):
    with the initial statistics the logits are rounding noise."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(SIZE, SIZE, 3))
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    model(images, training=True)
    for layer in norms:
        layer.momentum = 0.99
    return model


def occlusion_loop(model: Any, x: np.ndarray) -> np.ndarray:
    """Occlusion as a user writes it: every occluded copy in numpy, model.predict."""
    starts = [min(j * STRIDE, SIZE - WINDOW) for j in range(-(-(SIZE - WINDOW) // STRIDE) + 1)]
    windows = [(r, c) for r in starts for c in starts]
    copies = np.repeat(x, len(windows), axis=0)
    for k, (r, c) in enumerate(windows):
        copies[k, r : r + WINDOW, c : c + WINDOW] = 0.0
    base = model.predict(x, verbose=0)[0, CLASS]
    drops = base - model.predict(copies, batch_size=32, verbose=0)[:, CLASS]
    total = np.zeros((SIZE, SIZE))
    count = np.zeros((SIZE, SIZE))
    for d, (r, c) in zip(drops, windows, strict=True):
        total[r : r + WINDOW, c : c + WINDOW] += d
        count[r : r + WINDOW, c : c + WINDOW] += 1
    m = total / count
    return (m - m.min()) / (m.max() - m.min() + 1e-7)


@pytest.mark.timeout(3000)
def test_forward_methods_against_the_libraries(tmp_path: Path) -> None:
    from tf_keras_vis.layercam import Layercam
    from tf_keras_vis.scorecam import Scorecam
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import CategoricalScore

    images = np.random.default_rng(0).uniform(-1, 1, (8, SIZE, SIZE, 3)).astype("float32")
    model = calibrated_mobilenet(images)
    repo = save_model(tmp_path / "repo", "mobilenet", model)
    x = images[:1]
    score = CategoricalScore(CLASS)
    scorecam = Scorecam(model, model_modifier=ReplaceToLinear(), clone=True)
    layercam = Layercam(model, model_modifier=ReplaceToLinear(), clone=True)
    cam = {"penultimate_layer": LAYER, "seek_penultimate_conv_layer": False}

    rows = []
    with running_server(repo) as running, running.client(timeout=900) as client:

        def ours(method: str, **options: Any) -> Callable[[], np.ndarray]:
            def call() -> np.ndarray:
                result = client.explain("mobilenet", x, method=method, **options)
                return next(iter(result.maps.values()))

            return call

        cases: list[tuple[str, Callable[[], Any], Callable[[], Any], int, int]] = [
            (
                "scorecam (1280 channels)",
                ours("scorecam", filter_indices=[CLASS]),
                lambda: scorecam(score, x, **cam),
                1280 + 1,
                1,
            ),
            (
                "faster-scorecam (k=10)",
                ours("faster-scorecam", filter_indices=[CLASS]),
                lambda: scorecam(score, x, max_N=10, **cam),
                10 + 1,
                5,
            ),
            (
                "layercam",
                ours("layercam", filter_indices=[CLASS]),
                lambda: layercam(score, x, **cam),
                1,
                5,
            ),
            (
                f"occlusion ({WINDOW}/{STRIDE}: 729)",
                ours("occlusion", filter_indices=[CLASS], keep_activation=True),
                lambda: occlusion_loop(model, x),
                729 + 1,
                1,
            ),
        ]
        for name, mine, library, passes, repeats in cases:
            # The warm-up calls (traces, kernel caches) give the maps compared.
            got = np.asarray(mine()).reshape(-1)
            want = np.asarray(library()).reshape(-1)
            agreement = float(np.corrcoef(got, want)[0, 1])
            seconds = interleaved(mine, library, repeats)
            rows.append((name, passes, *seconds, agreement))

    print()
    print(f"MobileNetV2 {SIZE}x{SIZE}, random weights, one image per request; median s:")
    print(
        f"{'method':26s} {'fwd passes':>10s} {'service s':>10s} {'library s':>10s} "
        f"{'library/service':>16s} {'map corr':>9s}"
    )
    for name, passes, mine_s, theirs_s, agreement in rows:
        print(
            f"{name:26s} {passes:10d} {mine_s:10.2f} {theirs_s:10.2f} "
            f"{theirs_s / mine_s:15.2f}x {agreement:9.4f}"
        )
    # The same maps up to the upsampling (our bilinear resize, tf-keras-vis's scipy
    # zoom), which moves a few-channel Faster-ScoreCAM map most; the exact
    # comparisons are in test_tf_keras_vis_parity.
    for name, _, _, _, agreement in rows:
        assert agreement > 0.8, (name, agreement)
