"""Bytes on the wire: float32 against uint8 images on MobileNetV2 at 224×224 (random
weights), side by side in one run of one server.

    .venv/bin/pytest -m bench -s tests/bench/test_wire_bench.py

The model's config.toml accepts uint8 (`[inputs.<name>] wire_dtypes = ["uint8"]`,
`wire_range = "unit"`), so the same images go once as the floats p / 255 and once as
their uint8 pixels p. For Predict and Explain, windows of the two alternate for
ROUNDS rounds at CONCURRENCY callers; each figure is the median of its rounds. Bytes
per request are the server's own count (`salience_request_bytes`), throughput the
requests answered per second. Printed, not asserted: timing is not a test; what is
asserted is that every request was answered OK and that both dtypes got the same
predictions.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest

from tests.processes import salience_serve

pytestmark = pytest.mark.bench

ROUNDS = int(os.environ.get("SALIENCE_BENCH_ROUNDS", "3"))
CONCURRENCY = int(os.environ.get("SALIENCE_BENCH_CONCURRENCY", "8"))
SCALE = float(os.environ.get("SALIENCE_BENCH_SCALE", "1"))
WINDOW_SECONDS = {"predict": 4.0 * SCALE, "explain": 6.0 * SCALE}
MODEL = "mobilenet"
DISTINCT = 16


@pytest.fixture(scope="module")
def wire_repo(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bench repository's MobileNetV2, accepting uint8 images."""
    import keras

    root = tmp_path_factory.mktemp("wire-bench")
    shutil.copytree(repo / MODEL, root / MODEL)
    model = keras.saving.load_model(root / MODEL / "1" / "model.keras", compile=False)
    name = model.inputs[0].name
    (root / MODEL / "config.toml").write_text(
        f'[inputs."{name}"]\nwire_dtypes = ["uint8"]\nwire_range = "unit"\n'
    )
    return root


def request_bytes(metrics: str, rpc: str) -> tuple[float, float]:
    """(sum, count) of salience_request_bytes for one RPC, from /metrics text."""
    found = {}
    for kind in ("sum", "count"):
        line = re.search(
            rf'^salience_request_bytes_{kind}{{rpc="{rpc}"}} (\S+)$', metrics, re.MULTILINE
        )
        found[kind] = float(line.group(1)) if line else 0.0
    return found["sum"], found["count"]


def test_float32_against_uint8_images(wire_repo: Path) -> None:
    from salience_client import SalienceClient, bench

    pixels = bench.random_samples(np.dtype("uint8"), (224, 224, 3), DISTINCT, seed=0)
    images = {"float32": pixels.astype(np.float32) / np.float32(255), "uint8": pixels}
    rows = []
    with salience_serve(wire_repo) as server:
        with SalienceClient(server.target) as client:
            spec = client.metadata(MODEL).inputs[0]
            assert len(spec.accepted_dtypes) == 2, spec
            # Same images, same answers.
            got = client.predict(MODEL, images["uint8"][:2]).predictions
            want = client.predict(MODEL, images["float32"][:2]).predictions
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        for rpc in ("predict", "explain"):
            grpc_name = "Predict" if rpc == "predict" else "Explain"
            payloads = {
                dtype: bench.payloads(rpc, MODEL, samples, 1, distinct=DISTINCT)
                for dtype, samples in images.items()
            }
            throughput: dict[str, list[float]] = {d: [] for d in images}
            sizes: dict[str, list[float]] = {d: [] for d in images}
            for _ in range(ROUNDS):
                for dtype in images:
                    before = request_bytes(server.metrics(), grpc_name)
                    result = bench.run(
                        bench.Load(
                            target=server.target,
                            rpc=rpc,
                            payloads=payloads[dtype],
                            concurrency=CONCURRENCY,
                            duration=WINDOW_SECONDS[rpc],
                            warmup=CONCURRENCY,
                        ),
                        progress=False,
                    )
                    after = request_bytes(server.metrics(), grpc_name)
                    assert result.ok == result.requests, result.summary()["errors"]
                    throughput[dtype].append(result.ok / result.elapsed)
                    sizes[dtype].append((after[0] - before[0]) / (after[1] - before[1]))
            for dtype in images:
                rows.append(
                    (
                        rpc,
                        dtype,
                        statistics.median(sizes[dtype]),
                        statistics.median(throughput[dtype]),
                    )
                )
    print(f"\nMobileNetV2 224×224, concurrency {CONCURRENCY}, median of {ROUNDS} rounds")
    print(f"{'rpc':8} {'dtype':8} {'bytes/request':>14} {'requests/s':>11} {'MB/s in':>8}")
    for rpc, dtype, size, rate in rows:
        print(f"{rpc:8} {dtype:8} {size:14,.0f} {rate:11.1f} {size * rate / 1e6:8.2f}")
    for rpc in ("predict", "explain"):
        (f32,) = [r for r in rows if r[0] == rpc and r[1] == "float32"]
        (u8,) = [r for r in rows if r[0] == rpc and r[1] == "uint8"]
        print(
            f"{rpc}: uint8 requests are {f32[2] / u8[2]:.2f}× smaller; throughput "
            f"uint8/float32 = {u8[3] / f32[3]:.2f}"
        )
