"""Finding 7 of the hostile-traffic issue, against a real server: admission by rows,
not by cost. One 64-row Integrated Gradients request of 512 steps held its model
for 27 s and Predicts on the same model hit their deadlines meanwhile; 50 streams
of light SmoothGrad frames all ended RESOURCE_EXHAUSTED instead of slowing down.

Now heavy requests queue in their own lane and go to the device in calls of at
most `max_call_cost`, and a light request is the next call (`batching`). Under a
flood of maximal Integrated Gradients requests (64 rows × 512 steps), 1-row
Predicts all succeed within the 5 s deadline the finding used, and the batcher's
record says no Predict waited behind more than one heavy call dispatched after it
queued. Streams wait for room in a full queue instead of failing. What is
asserted is what happened, never how long it took (tests/bench/test_lanes_bench.py
prints the latencies).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from salience_client import SalienceError
from salience_server.batching import HEAVY, LIGHT
from tests.conftest import RunningServer, running_server
from tests.integration.bad_requests import Linear
from tests.integration.models import LINEAR_SHAPE, build_repository

ELEMENTS = int(np.prod(LINEAR_SHAPE))  # 90
STEPS = 512  # the default max_steps
ROWS = 64  # the default max_batch_size
CALL_COST = (STEPS + 1) * ELEMENTS  # one row of a maximal IG request a device call
FLOOD_THREADS = 4  # 4 x 64 rows: the heavy lane's whole room
PREDICTS = 200
DEADLINE_S = 5.0  # the Predicts' deadline in the finding
STREAMS = 50
FRAMES = 8


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("lanes-repo"))


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    with running_server(repo, max_call_cost=CALL_COST, light_request_cost=CALL_COST) as running:
        yield running


def x(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, *LINEAR_SHAPE)).astype(np.float32)


class Flood:
    """Threads sending maximal Integrated Gradients requests until stopped."""

    def __init__(self, running: RunningServer, threads: int) -> None:
        self.running = running
        self.stop = threading.Event()
        self.answered = 0
        self.refused: list[grpc.StatusCode] = []  # RESOURCE_EXHAUSTED: heavy lane full
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k,)) for k in range(threads)]

    def _run(self, k: int) -> None:
        with self.running.client(retry=None) as client:
            while not self.stop.is_set():
                try:
                    client.explain(
                        "linear", x(ROWS, k), method="integrated-gradients", steps=STEPS,
                        timeout=600,
                    )  # fmt: skip
                    with self._lock:
                        self.answered += 1
                except SalienceError as err:
                    with self._lock:
                        self.refused.append(err.code)
                    self.stop.wait(0.05)

    def __enter__(self) -> Flood:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(600)


def heavy_calls(running: RunningServer) -> int:
    return sum(b.stats.lane_calls[HEAVY] for b in running.batchers("linear"))


def test_predicts_under_a_flood_of_maximal_integrated_gradients_go_first(
    server: RunningServer, repo: Path
) -> None:
    linear = Linear.load(repo)
    before = {id(b): b.stats.max_heavy_calls_before_light for b in server.batchers("linear")}
    assert all(v == 0 for v in before.values())
    ok = 0
    failed: list[grpc.StatusCode] = []
    with Flood(server, FLOOD_THREADS) as flood, server.client(retry=None) as client:
        client.predict("linear", x(1, 99))  # connected, traced
        while heavy_calls(server) < 2:
            threading.Event().wait(0.01)  # the flood reaches the device
        started = heavy_calls(server)
        for k in range(PREDICTS):
            sample = x(1, 1000 + k)
            try:
                result = client.predict("linear", sample, timeout=DEADLINE_S)
            except SalienceError as err:
                failed.append(err.code)
                continue
            (logits,) = result.outputs.values()
            np.testing.assert_allclose(logits, linear.logits(sample), rtol=1e-4, atol=1e-5)
            ok += 1
        during = heavy_calls(server) - started
    assert ok / PREDICTS >= 0.99, f"{ok} of {PREDICTS} Predicts succeeded"
    assert set(failed) <= {grpc.StatusCode.DEADLINE_EXCEEDED}, failed
    # The heavy requests were answered, or refused only for a full heavy lane.
    assert set(flood.refused) <= {grpc.StatusCode.RESOURCE_EXHAUSTED}, flood.refused
    (batcher,) = server.batchers("linear")
    stats = batcher.stats
    # The flood kept the device busy with heavy calls all along the Predicts...
    assert during >= 1
    assert flood.answered + len(flood.refused) >= 1
    assert stats.lane_calls[LIGHT] >= PREDICTS
    # ...and every Predict went before the heavy chunks queued when it arrived: at
    # most one heavy call (the heavy lane's owed turn when the previous light call
    # had put the light lane ahead of its share) went between its queueing and its
    # own call, never the rest of a 64-call request.
    assert stats.max_heavy_calls_before_light <= 1


def test_fifty_streams_of_light_smoothgrad_frames_slow_down_instead_of_failing(
    repo: Path,
) -> None:
    # A queue of 8 samples per lane: 50 streams (windows of 8) keep it full.
    with (
        running_server(repo, max_batch_size=8, max_queue_size=8) as running,
        running.client() as client,
    ):
        frames = x(FRAMES, 7)
        options = {"method": "smoothgrad", "samples": 4, "filter_indices": [1], "seed": 3}
        # The gradient of a linear logit is the same at every noisy copy: each frame's
        # map is this one.
        reference = client.explain("linear", frames[:1], **options).maps["absolute"][0]

        def stream(k: int) -> list[tuple[int, np.ndarray]]:
            pairs = ((j, frames[j]) for j in range(FRAMES))
            return [
                (j, result.maps["absolute"][0])
                for j, result in client.explain_stream("linear", pairs, **options)
            ]

        with ThreadPoolExecutor(STREAMS) as pool:
            answers = list(pool.map(stream, range(STREAMS)))
        (batcher,) = running.batchers("linear")
    for frames_answered in answers:
        assert [j for j, _ in frames_answered] == list(range(FRAMES))
        for _, the_map in frames_answered:
            np.testing.assert_allclose(the_map, reference, rtol=1e-5, atol=1e-6)
    # Every frame of every stream was answered, in order, with its map, although
    # the queue was full: the streams waited for room.
    assert batcher.stats.room_waits > 0
    assert batcher.stats.samples >= STREAMS * FRAMES
