"""Warm-up, XLA and mixed precision: what each gains on this machine.

    make bench        # = pytest -m bench -s tests/bench

(a) First request vs the ones after it, through a real server (in this process),
    for the bundled `shapes` demo model and a random-weight MobileNetV2 at 224×224:
    the default explanation (vanilla) at batch 1, ten requests right after
    readiness; once as served (warm-up at every batch bucket before SERVING) and
    once with warm-up switched off, which is what the first caller would pay
    without it. Also the time from start to SERVING.
(b) Per-image cost of the default explanation and of predict, in-process
    (`ModelRuntime`, no gRPC), for float32, XLA and mixed precision (bfloat16 on a
    CPU, float16 on a GPU), after a warm-up call; and the first call of each
    (tracing, XLA compilation) on its own line.

Targets (printed, not asserted; timing is not a test): (a) first ≤ 2× the median
of requests 2–10 when warmed. XLA and mixed precision are for GPUs: on a CPU
without AVX512-BF16 (as on the 2-core machine this was written on) bfloat16 is
emulated, and XLA's CPU code for MobileNetV2's gradients was 25–50× slower than
TensorFlow's own kernels; the figures say what this machine does.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import running_server

pytestmark = pytest.mark.bench

REQUESTS = 10
REPEATS = 3
BATCH = {"shapes": 8, "mobilenet": 2}  # in-process batch per call, (b)


def shape_of(model: str) -> tuple[int, int, int]:
    return (224, 224, 3) if model == "mobilenet" else (64, 64, 3)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def first_and_later(repo: Path, model: str, warm: bool, monkeypatch: Any) -> tuple[float, ...]:
    """(seconds to SERVING, first, tenth, median of 2–10) for one served model."""
    from salience_server.core import InferenceCore

    single = repo.parent / f"{repo.name}-{model}"
    if not single.exists():
        single.mkdir()
        shutil.copytree(repo / model, single / model)
    with monkeypatch.context() as patch:
        if not warm:
            patch.setattr(InferenceCore, "warm_up", lambda self, runtime: None)
        start = time.perf_counter()
        with running_server(single) as running, running.client(timeout=600) as client:
            ready = time.perf_counter() - start
            client.list_models()  # connects the channel: not the model's time
            rng = np.random.default_rng(0)
            seconds = [
                timed(
                    lambda: client.explain(
                        model, rng.uniform(0, 1, (1, *shape_of(model))).astype(np.float32)
                    )
                )
                for _ in range(REQUESTS)
            ]
    return ready, seconds[0], seconds[-1], statistics.median(seconds[1:])


def test_first_request_after_readiness(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = []
    for model in ("shapes", "mobilenet"):
        for warm in (True, False):
            ready, first, tenth, later = first_and_later(repo, model, warm, monkeypatch)
            lines.append(
                f"{model:10s} {'warm-up' if warm else 'no warm-up':11s} {ready:9.1f} "
                f"{1000 * first:9.1f} {1000 * tenth:9.1f} {1000 * later:11.1f} "
                f"{first / later:7.1f}x"
            )
    print()
    print("First request after readiness (vanilla, batch 1, through gRPC):")
    print(
        f"{'model':10s} {'start-up':11s} {'ready s':>9s} {'first ms':>9s} {'10th ms':>9s} "
        f"{'median 2-10':>11s} {'first/med':>8s}"
    )
    for line in lines:
        print(line)


def per_image(fn: Callable[[], Any], images: int) -> tuple[float, float]:
    """(first call seconds, median ms per image of REPEATS later calls)."""
    first = timed(fn)
    later = statistics.median(timed(fn) for _ in range(REPEATS))
    return first, 1000 * later / images


def test_xla_and_mixed_precision(repo: Path) -> None:
    import keras
    import tensorflow as tf

    from salience_server.devices import BFLOAT16, FLOAT16, Placement, current
    from salience_server.explain.options import ExplainOptions
    from salience_server.runtime import ModelRuntime

    device = current().device
    reduced = FLOAT16 if current().is_gpu else BFLOAT16
    variants = {
        "float32": Placement(device),
        "XLA": Placement(device, xla=True),
        f"mixed {reduced}": Placement(device, compute_dtype=reduced),
    }
    lines = []
    for model in ("shapes", "mobilenet"):
        path = repo / model / "1" / "model.keras"
        batch = BATCH[model]
        x = np.random.default_rng(1).uniform(0, 1, (batch, *shape_of(model))).astype(np.float32)
        base: dict[str, float] = {}
        for label, placement in variants.items():
            with tf.device(placement.device):
                loaded = keras.saving.load_model(path, compile=False, safe_mode=True)
            runtime = ModelRuntime(model, 1, loaded, placement=placement)
            for kind, fn in (
                ("explain", lambda r=runtime, x=x: r.explain([x], ExplainOptions())),
                ("predict", lambda r=runtime, x=x: r.predict([x])),
            ):
                first, ms = per_image(fn, batch)
                base.setdefault(kind, ms)
                lines.append(
                    f"{model:10s} {kind:8s} {label:16s} {first:8.2f} {ms:10.2f} "
                    f"{base[kind] / ms:8.2f}x"
                )
    print()
    print(f"XLA and mixed precision on {device} (in-process, batch {BATCH}):")
    print(
        f"{'model':10s} {'call':8s} {'variant':16s} {'first s':>8s} {'ms/image':>10s} "
        f"{'speed-up':>9s}"
    )
    for line in lines:
        print(line)
