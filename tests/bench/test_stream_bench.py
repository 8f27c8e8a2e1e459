"""ExplainStream against unary calls, side by side, on the bundled `steering` model:
what a review tool gains by streaming its frames.

    .venv/bin/pytest -m bench -s tests/bench/test_stream_bench.py

`salience serve` runs in a child process (so the client's work does not share its
interpreter); this process sends FRAMES frames of the steering model's shape, asking
for the three maps of a review (`none`, `negate`, `small_values`), in three ways:
one ExplainStream; one unary Explain per frame, one after the other; and one unary
Explain per frame from 8 threads. The ways alternate for ROUNDS rounds and each
figure is the median, so a noisy neighbour moves them alike. Printed: frames/s of
each and the stream's ratio to each; nothing is asserted about speed.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from salience_client import SalienceClient
from tests.processes import salience_serve

FRAMES = 400
ROUNDS = 3
THREADS = 8
MODIFIERS = ["none", "negate", "small_values"]


@pytest.mark.bench
def test_stream_against_unary_calls() -> None:
    from salience_server.demo import bundled_repository

    with salience_serve(bundled_repository()) as server, SalienceClient(server.target) as client:
        spec = client.metadata("steering").inputs[0]
        shape = [int(d) for d in spec.shape[1:]]
        frames = np.random.default_rng(0).random((FRAMES, *shape), dtype=np.float32)

        def stream() -> int:
            pairs = ((k, frames[k]) for k in range(FRAMES))
            answers = list(client.explain_stream("steering", pairs, grad_modifiers=MODIFIERS))
            assert [k for k, _ in answers] == list(range(FRAMES))
            return len(answers)

        def one(k: int) -> int:
            client.explain("steering", frames[k : k + 1], grad_modifiers=MODIFIERS)
            return 1

        def unary() -> int:
            return sum(one(k) for k in range(FRAMES))

        def threads() -> int:
            with ThreadPoolExecutor(THREADS) as pool:
                return sum(pool.map(one, range(FRAMES)))

        ways = {"stream": stream, "unary": unary, f"unary x{THREADS} threads": threads}
        for way in ways.values():  # warm-up: every trace and connection made
            way()
        rates: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(ROUNDS):
            for name, way in ways.items():
                start = time.perf_counter()
                assert way() == FRAMES
                rates[name].append(FRAMES / (time.perf_counter() - start))
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\nsteering, {FRAMES} frames, maps {','.join(MODIFIERS)}, median of {ROUNDS} rounds:")
    for name, rate in median.items():
        ratio = median["stream"] / rate
        print(f"  {name:<18} {rate:8.1f} frames/s   stream is {ratio:.2f}x")
