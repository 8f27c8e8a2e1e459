"""1-row Predicts under a flood of maximal Integrated Gradients requests, with and
without lanes, side by side in one run:

    .venv/bin/pytest -m bench -s tests/bench/test_lanes_bench.py

Three `salience serve` processes on the same repository (the tiny `linear` model
of the integration tests, 6×5×3 inputs): `lanes`, with `max_call_cost` and
`light_request_cost` at one row of a maximal IG request (each heavy row is its own
device call); `lanes x4`, heavy calls of 4 rows; and `one lane`, whose caps are so
high that every request shares one lane and a 64-row request goes in two device
calls of 32 rows (the batcher before lanes). For each, PREDICTS sequential 1-row
Predicts (5 s deadline, the finding's) are timed unloaded, then while
FLOOD_THREADS threads keep sending 64-row, 512-step IG requests. Printed: the
Predicts' success ratio and p50/p99, loaded against unloaded, and the IG rows/s
the flood got meanwhile; nothing is asserted about speed (the default test
command asserts the scheduling order, tests/integration/test_lanes.py).
"""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from salience_client import SalienceClient, SalienceError
from tests.integration.models import LINEAR_SHAPE, build_repository
from tests.processes import ServerProcess, salience_serve

ELEMENTS = int(np.prod(LINEAR_SHAPE))
STEPS = 512
ROWS = 64
CALL_COST = (STEPS + 1) * ELEMENTS
PREDICTS = 400
FLOOD_THREADS = 4
DEADLINE_S = 5.0
SETUPS = {
    "lanes": ["--max-call-cost", str(CALL_COST), "--light-request-cost", str(CALL_COST)],
    "lanes x4": ["--max-call-cost", str(4 * CALL_COST), "--light-request-cost", str(CALL_COST)],
    "one lane": ["--max-call-cost", str(2**40), "--light-request-cost", str(2**40)],
}


def x(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, *LINEAR_SHAPE)).astype(np.float32)


def explain_samples(server: ServerProcess) -> float:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30)
        .read()
        .decode()
    )
    for line in text.splitlines():
        if line.startswith("salience_samples_total{") and 'kind="explain"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def predicts(client: SalienceClient) -> tuple[float, list[float]]:
    """Success ratio and latencies (s) of the successful ones."""
    seconds: list[float] = []
    for k in range(PREDICTS):
        sample = x(1, 1000 + k)
        start = time.perf_counter()
        try:
            client.predict("linear", sample, timeout=DEADLINE_S)
        except SalienceError as err:
            if err.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            continue
        seconds.append(time.perf_counter() - start)
    return len(seconds) / PREDICTS, seconds


def flood(server: ServerProcess, stop: threading.Event, counts: list[int]) -> None:
    with SalienceClient(server.target, retry=None) as client:
        while not stop.is_set():
            try:
                client.explain(
                    "linear", x(ROWS, 1), method="integrated-gradients", steps=STEPS, timeout=600
                )
                counts[0] += 1
            except SalienceError as err:
                if err.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                counts[1] += 1
                stop.wait(0.05)


def ms(values: list[float], q: float) -> float:
    return 1000 * float(np.quantile(values, q)) if values else float("nan")


@pytest.mark.bench
def test_predicts_under_an_integrated_gradients_flood(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo")
    rows = []
    for name, flags in SETUPS.items():
        with salience_serve(repo, flags) as server, SalienceClient(server.target) as client:
            for _ in range(50):  # connection, traces
                client.predict("linear", x(1, 0))
            client.explain("linear", x(ROWS, 1), method="integrated-gradients", steps=STEPS)
            _, unloaded = predicts(client)
            stop = threading.Event()
            counts = [0, 0]
            threads = [
                threading.Thread(target=flood, args=(server, stop, counts))
                for _ in range(FLOOD_THREADS)
            ]
            for thread in threads:
                thread.start()
            start = explain_samples(server)
            while explain_samples(server) < start + ROWS:
                time.sleep(0.01)  # the flood is on the device
            began = time.perf_counter()
            ratio, loaded = predicts(client)
            heavy_rows = explain_samples(server) - start
            rate = heavy_rows / (time.perf_counter() - began)
            stop.set()
            for thread in threads:
                thread.join(600)
            rows.append((name, unloaded, ratio, loaded, rate))
    print(
        f"\n1-row Predicts ({PREDICTS} each, sequential) under {FLOOD_THREADS} threads of "
        f"IG {ROWS} rows x {STEPS} steps on `linear`:"
    )
    print(
        f"{'setup':>9} | {'unloaded p50':>12} {'p99':>8} | {'loaded ok':>9} "
        f"{'p50':>8} {'p99':>8} | {'p99 ratio':>9} | IG rows/s meanwhile"
    )
    for name, unloaded, ratio, loaded, rate in rows:
        print(
            f"{name:>9} | {ms(unloaded, 0.5):10.2f}ms {ms(unloaded, 0.99):6.2f}ms | "
            f"{100 * ratio:8.1f}% {ms(loaded, 0.5):6.2f}ms {ms(loaded, 0.99):6.2f}ms | "
            f"{ms(loaded, 0.99) / ms(unloaded, 0.99):8.1f}x | {rate:.0f}"
        )
