"""Soak: a steady mixed load on a `salience serve` process, watching its memory.

    make bench                                   # 600 s (SALIENCE_SOAK_SECONDS)
    SALIENCE_SOAK_SECONDS=3600 .venv/bin/pytest -m bench -s tests/bench/test_soak.py

The server runs as a child process, so the resident memory read from
/proc/<pid>/status is its own. Eight callers send predictions and vanilla,
Grad-CAM, SmoothGrad and Integrated Gradients explanations of two tiny models,
batches of 1 to 8, every input distinct, without pause. After a warm-up (a quarter
of the run, 5 to 60 s: traces, allocator pools and gRPC buffers settle) the RSS is
sampled every second until the end. Printed: RSS at warm-up and at the end, the
peak, the slope of a least-squares line through the samples (MB/min), requests,
throughput and errors.

Asserted: no request fails, every prediction of `mlp` equals numpy's, and the
server counted every request. The short run in the test command
(tests/integration/test_soak_short.py) also bounds the RSS growth after warm-up.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc import aio

from salience.v1 import salience_pb2_grpc
from salience_client import tensors
from salience_client.client import explanation_request, predict_request
from tests.conftest import save_model
from tests.processes import ServerProcess, salience_serve

SOAK_SECONDS_ENV = "SALIENCE_SOAK_SECONDS"
DEFAULT_SOAK_SECONDS = 600.0
CALLERS = 8
IMAGE = (8, 8, 3)
VECTOR = (10,)
MIB = 1024 * 1024


@dataclass
class Mlp:
    """The `mlp` model's weights: tanh(x @ W1 + b1) @ W2 + b2, checked with numpy."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    def predict(self, x: np.ndarray) -> np.ndarray:
        h = np.tanh(x.astype(np.float64) @ self.w1 + self.b1)
        result: np.ndarray = h @ self.w2 + self.b2
        return result


def build_repository(root: Path) -> Mlp:
    """`conv` (a small conv net, for Grad-CAM) and `mlp` (weights returned)."""
    import keras

    keras.utils.set_random_seed(17)
    x = keras.Input(IMAGE, name="image")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(x)
    h = keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    save_model(root, "conv", keras.Model(x, keras.layers.Dense(3, name="logits")(h)))
    rng = np.random.default_rng(17)
    mlp = Mlp(
        rng.normal(size=(VECTOR[0], 8)).astype(np.float32) * 0.5,
        rng.normal(size=8).astype(np.float32),
        rng.normal(size=(8, 4)).astype(np.float32),
        rng.normal(size=4).astype(np.float32),
    )
    x = keras.Input(VECTOR, name="x")
    hidden = keras.layers.Dense(8, activation="tanh", name="hidden")
    logits = keras.layers.Dense(4, name="logits")
    model = keras.Model(x, logits(hidden(x)))
    hidden.set_weights([mlp.w1, mlp.b1])
    logits.set_weights([mlp.w2, mlp.b2])
    save_model(root, "mlp", model)
    return mlp


# The server ---------------------------------------------------------------------------


def requests_total(server: ServerProcess) -> Counter[str]:
    """salience_requests_total by code, from /metrics."""
    counts: Counter[str] = Counter()
    for labels, value in re.findall(
        r"^salience_requests_total\{([^}]*)\} (\S+)$", server.metrics(), re.MULTILINE
    ):
        code = re.search(r'code="([A-Z_]+)"', labels)
        assert code is not None
        counts[code.group(1)] += int(float(value))
    return counts


@contextmanager
def serve(repo: Path) -> Iterator[ServerProcess]:
    """`salience serve` as a child process on free ports, until SIGTERM."""
    flags = ["--max-batch-size", "8", "--max-device-batch-size", "8"]
    with salience_serve(repo, flags) as server:
        yield server


# The load -----------------------------------------------------------------------------


@dataclass
class Figures:
    seconds: float = 0.0
    warm_up_seconds: float = 0.0
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    wrong: int = 0  # predictions of `mlp` that differ from numpy's
    rss: list[tuple[float, int]] = field(default_factory=list)  # (s since start, bytes)
    served: Counter[str] = field(default_factory=Counter)

    @property
    def rss_warm_mb(self) -> float:
        return self.rss[0][1] / MIB

    @property
    def rss_end_mb(self) -> float:
        return self.rss[-1][1] / MIB

    @property
    def rss_peak_mb(self) -> float:
        return max(b for _, b in self.rss) / MIB

    @property
    def growth_mb(self) -> float:
        return self.rss_end_mb - self.rss_warm_mb

    @property
    def slope_mb_per_min(self) -> float:
        """The least-squares slope of RSS over the samples after warm-up."""
        t = np.array([s for s, _ in self.rss]) / 60.0
        mb = np.array([b for _, b in self.rss]) / MIB
        return float(np.polyfit(t, mb, 1)[0]) if len(t) > 1 else 0.0

    def report(self) -> str:
        return (
            f"soak {self.seconds:.0f} s ({self.warm_up_seconds:.0f} s warm-up), {CALLERS} "
            f"callers: {self.requests} requests ({self.requests / self.seconds:.0f}/s), "
            f"{sum(self.errors.values())} errors {dict(self.errors)}; server RSS "
            f"{self.rss_warm_mb:.1f} MB after warm-up, {self.rss_end_mb:.1f} MB at the end "
            f"(peak {self.rss_peak_mb:.1f} MB, growth {self.growth_mb:+.1f} MB, slope "
            f"{self.slope_mb_per_min:+.2f} MB/min over {len(self.rss)} samples)"
        )


def request(rng: np.random.Generator, seed: int) -> tuple[str, str, Any, np.ndarray]:
    """(rpc, model, request, input): a mixed request with a distinct input."""
    model = "conv" if rng.random() < 0.5 else "mlp"
    x = rng.uniform(-1, 1, (int(rng.integers(1, 9)), *(IMAGE if model == "conv" else VECTOR)))
    x = x.astype(np.float32)
    methods = ["predict", "vanilla", "smoothgrad", "integrated-gradients"]
    method = str(rng.choice([*methods, "gradcam"] if model == "conv" else methods))
    if method == "predict":
        return "Predict", model, predict_request(model, x), x
    extra: dict[str, Any] = {}
    if method == "smoothgrad":
        extra = {"samples": 4, "noise": 0.2, "seed": seed}
    elif method == "integrated-gradients":
        extra = {"steps": 8}
    explain = explanation_request(
        model,
        x,
        method=method,
        filter_indices=[int(rng.integers(3))],
        grad_modifiers=["absolute", "none"][: int(rng.integers(1, 3))],
        normalize=bool(rng.random() < 0.5),
        **extra,
    )
    return "Explain", model, explain, x


def soak(repo: Path, mlp: Mlp, seconds: float) -> Figures:
    """Runs the load on a fresh server for `seconds`; returns the figures."""
    figures = Figures(seconds=seconds, warm_up_seconds=min(60.0, max(5.0, seconds / 4)))
    with serve(repo) as server:

        async def caller(stub: Any, k: int, start: float) -> None:
            rng = np.random.default_rng(1000 + k)
            seeds = iter(range(k * 10**9, (k + 1) * 10**9))
            while time.monotonic() - start < seconds:
                rpc, model, message, x = request(rng, next(seeds))
                try:
                    response = await getattr(stub, rpc)(message, timeout=300)
                except aio.AioRpcError as err:
                    figures.errors[err.code().name] += 1
                else:
                    if rpc == "Predict" and model == "mlp":
                        got = tensors.decode(response.outputs[0])
                        if not np.allclose(got, mlp.predict(x), rtol=1e-5, atol=1e-5):
                            figures.wrong += 1
                figures.requests += 1

        async def sample_rss(start: float) -> None:
            await asyncio.sleep(figures.warm_up_seconds)
            while True:
                figures.rss.append((time.monotonic() - start, server.rss_bytes()))
                if time.monotonic() - start >= seconds:
                    return
                await asyncio.sleep(1.0)

        async def run() -> None:
            async with aio.insecure_channel(server.target) as channel:
                stub = salience_pb2_grpc.SalienceStub(channel)
                start = time.monotonic()
                await asyncio.gather(
                    sample_rss(start), *(caller(stub, k, start) for k in range(CALLERS))
                )
            # The last sample once every caller is done: the end of the run.
            figures.rss.append((time.monotonic() - start, server.rss_bytes()))

        asyncio.run(run())
        figures.served = requests_total(server)
    return figures


def check(figures: Figures) -> None:
    print("\n" + figures.report())
    assert figures.requests > 0
    assert not figures.errors, figures.report()
    assert figures.wrong == 0
    # Every request counted once by the server, as answered.
    assert dict(figures.served) == {grpc.StatusCode.OK.name: figures.requests}


@pytest.mark.bench
@pytest.mark.timeout(0)  # the run's length is the operator's choice
def test_soak(tmp_path: Path) -> None:
    seconds = float(os.environ.get(SOAK_SECONDS_ENV, DEFAULT_SOAK_SECONDS))
    mlp = build_repository(tmp_path / "repo")
    check(soak(tmp_path / "repo", mlp, seconds))
