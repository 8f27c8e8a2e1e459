"""Overload is refused at once, with RESOURCE_EXHAUSTED, instead of queued without bound.

The server has a small `max_queue_size` (8 samples per model). Its models carry a
`Gate` layer (tests/integration/faults.py) in front of a Dense layer:

- `held`: the test holds its device thread inside a device call for as long as it
  likes. A flood sent meanwhile fills the queue and every other request is refused
  while that device call is still held — so a refusal never waits for the device,
  by construction rather than by a clock.
- `slow`: every device call sleeps 0.1 s. Closed-loop callers overload it for a few
  seconds; refusals come back faster than accepted calls (which wait for at least
  one device call), the queue depth never passes max_queue_size, and the first
  call after the load is answered.

Every answer is checked against numpy (the Gate is the identity: x @ W + b). The
figures (refusal vs accepted latency, in ms) are printed; run with `-s` to see them:

    .venv/bin/pytest -s tests/integration/test_overload.py
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc import aio

from salience.v1 import salience_pb2_grpc
from salience_client import tensors
from salience_client.client import explanation_request, explanation_result, predict_request
from tests.conftest import RunningServer, running_server, save_model
from tests.integration.faults import Gate, entered

SHAPE = (6,)
UNITS = 3
MAX_QUEUE = 8
SLOW_SECONDS = 0.1  # every device call of `slow`
FLOOD = 64
LOAD_SECONDS = 4.0
CAPACITY = (
    "model {model!r} is at capacity: {queued} samples are queued and this request's "
    "{rows} would pass its max_queue_size=8; retry after a back-off"
)


@dataclass
class Files:
    hold: Path  # exists: `held` waits in its device call
    log: Path  # one line per forward pass of `held`


@dataclass
class Outcome:
    rpc: str
    x: np.ndarray
    code: grpc.StatusCode
    seconds: float  # from sending to the status
    done_at: float  # time.perf_counter() when the status came
    response: Any = None
    details: str = ""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    work = tmp_path_factory.mktemp("overload-gate")
    return Files(work / "hold", work / "entered.log")


@pytest.fixture(scope="module")
def weights() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(4)
    return {
        name: (rng.normal(size=(SHAPE[0], UNITS)).astype(np.float32), rng.normal(size=UNITS))
        for name in ("held", "slow")
    }


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    files: Files,
    weights: dict[str, tuple[np.ndarray, np.ndarray]],
) -> Iterator[RunningServer]:
    import keras

    root = tmp_path_factory.mktemp("overload-repo")
    gates = {
        "held": Gate(hold=str(files.hold), log=str(files.log), name="gate"),
        "slow": Gate(delay=SLOW_SECONDS, name="gate"),
    }
    for name, gate in gates.items():
        x = keras.Input(SHAPE, name="x")
        dense = keras.layers.Dense(UNITS, name="logits")
        model = keras.Model(x, dense(gate(x)))
        kernel, bias = weights[name]
        dense.set_weights([kernel, bias.astype(np.float32)])
        save_model(root, name, model)
    with running_server(
        root,
        max_queue_size=MAX_QUEUE,
        max_batch_size=2,
        max_device_batch_size=4,
        max_queue_delay_ms=0.0,
    ) as running:
        yield running


# Probes of the server ----------------------------------------------------------------


def gauge(running: RunningServer, name: str, **labels: str) -> float:
    value = running.server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class DepthWatch:
    """Samples `salience_queue_depth` of a model every 2 ms on a thread: its maximum."""

    def __init__(self, running: RunningServer, model: str) -> None:
        self.running, self.model = running, model
        self.highest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            depth = gauge(self.running, "salience_queue_depth", model=self.model)
            self.highest = max(self.highest, depth)
            time.sleep(0.002)

    def __enter__(self) -> DepthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# Calls -------------------------------------------------------------------------------


def sample(rng: np.random.Generator, rows: int) -> np.ndarray:
    return rng.uniform(-1, 1, (rows, *SHAPE)).astype(np.float32)


async def send(stub: Any, rpc: str, model: str, x: np.ndarray) -> Outcome:
    """One call, timed from sending to its status."""
    start = time.perf_counter()
    try:
        if rpc == "Predict":
            response = await stub.Predict(predict_request(model, x), timeout=300)
        else:
            request = explanation_request(
                model, x, filter_indices=[1], grad_modifiers=["none"], normalize=False
            )
            response = await stub.Explain(request, timeout=300)
    except aio.AioRpcError as err:
        now = time.perf_counter()
        return Outcome(rpc, x, err.code(), now - start, now, details=err.details() or "")
    now = time.perf_counter()
    return Outcome(rpc, x, grpc.StatusCode.OK, now - start, now, response)


def check_answer(outcome: Outcome, kernel: np.ndarray, bias: np.ndarray) -> None:
    """Predictions x @ W + b; a vanilla map of unit 1 of a linear model is W[:, 1]."""
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    want = outcome.x.astype(np.float64) @ kernel + bias
    if outcome.rpc == "Predict":
        got = tensors.decode(outcome.response.outputs[0])
    else:
        result = explanation_result(outcome.response)
        got = result.predictions
        saliency = np.broadcast_to(kernel[:, 1], outcome.x.shape)
        np.testing.assert_allclose(result.maps["none"], saliency, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def report(title: str, refused: list[Outcome], accepted: list[Outcome]) -> None:
    r = [o.seconds * 1e3 for o in refused]
    a = [o.seconds * 1e3 for o in accepted]
    print(
        f"\n{title}: {len(refused)} refused, p50 {percentile(r, 50):.1f} ms, "
        f"p99 {percentile(r, 99):.1f} ms; {len(accepted)} accepted, p50 "
        f"{percentile(a, 50):.1f} ms, p99 {percentile(a, 99):.1f} ms; "
        f"p50 ratio accepted/refused {percentile(a, 50) / percentile(r, 50):.0f}x"
    )


# Tests -------------------------------------------------------------------------------


def test_a_flood_is_refused_while_the_device_call_in_flight_is_still_held(
    server: RunningServer, files: Files, weights: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    rng = np.random.default_rng(1)
    kernel, bias = weights["held"]
    blocker = sample(rng, 1)
    flood = [("Predict" if k % 3 else "Explain", sample(rng, 1 + k % 2)) for k in range(FLOOD)]
    refused_before = gauge(
        server, "salience_requests_refused_total", model="held", reason="queue_full"
    )
    files.hold.touch()
    passes = len(entered(files.log))

    async def scenario() -> tuple[Outcome, list[Outcome], float]:
        async with aio.insecure_channel(server.target) as channel:
            stub = salience_pb2_grpc.SalienceStub(channel)
            first = asyncio.ensure_future(send(stub, "Predict", "held", blocker))
            # The device thread holds the blocker's call: nothing computes from now on.
            while len(entered(files.log)) == passes:
                assert not first.done(), first.result()
                await asyncio.sleep(0.01)
            calls = [asyncio.ensure_future(send(stub, rpc, "held", x)) for rpc, x in flood]
            with DepthWatch(server, "held") as depth:
                # Every request is refused or queued while the device call is held: the
                # calls not answered are exactly those the queue holds.
                for _ in range(12_000):
                    waiting = sum(
                        len(x) for (_, x), c in zip(flood, calls, strict=True) if not c.done()
                    )
                    if waiting == await asyncio.to_thread(server.queued, "held"):
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("the flood was neither refused nor queued in 120 s")
                assert not first.done()  # the device call is still held ...
                assert len(entered(files.log)) == passes + 1  # ... and no other started
                assert waiting <= MAX_QUEUE
                assert gauge(server, "salience_queue_depth", model="held") == waiting
                answered = [c.result() for c in calls if c.done()]
                released = time.perf_counter()
                files.hold.unlink()
                outcomes = [await c for c in calls]
            assert depth.highest <= MAX_QUEUE
            assert all(o.done_at < released for o in answered)
            return await first, outcomes, released

    try:
        first, outcomes, released = asyncio.run(scenario())
    finally:
        files.hold.unlink(missing_ok=True)

    refused = [o for o in outcomes if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    accepted = [o for o in outcomes if o.code != grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(refused) >= FLOOD - MAX_QUEUE
    assert 1 <= sum(len(o.x) for o in accepted) <= MAX_QUEUE
    for o in refused:
        assert o.done_at < released
        queued_then = int(o.details.split(": ")[1].split()[0])
        assert o.details == CAPACITY.format(model="held", queued=queued_then, rows=len(o.x))
        assert queued_then + len(o.x) > MAX_QUEUE
    check_answer(first, kernel, bias)
    for o in accepted:
        check_answer(o, kernel, bias)
        assert o.done_at > released
    assert gauge(
        server, "salience_requests_refused_total", model="held", reason="queue_full"
    ) - refused_before == len(refused)
    report("held device, flood of 64", refused, accepted)

    # Load gone: the next call is answered at once.
    async def one() -> Outcome:
        async with aio.insecure_channel(server.target) as channel:
            return await send(salience_pb2_grpc.SalienceStub(channel), "Explain", "held", blocker)

    check_answer(asyncio.run(one()), kernel, bias)


def test_sustained_overload_refuses_fast_keeps_the_queue_bounded_and_recovers(
    server: RunningServer, weights: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    kernel, bias = weights["slow"]
    callers = 24

    async def caller(stub: Any, seed: int, until: float) -> list[Outcome]:
        rng = np.random.default_rng(seed)
        outcomes = []
        while time.perf_counter() < until:
            rpc = "Predict" if rng.random() < 0.6 else "Explain"
            outcome = await send(stub, rpc, "slow", sample(rng, int(rng.integers(1, 3))))
            outcomes.append(outcome)
            if outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                await asyncio.sleep(0.02)  # a client backs off a little before retrying
        return outcomes

    async def scenario() -> list[Outcome]:
        async with aio.insecure_channel(server.target) as channel:
            stub = salience_pb2_grpc.SalienceStub(channel)
            until = time.perf_counter() + LOAD_SECONDS
            per_caller = await asyncio.gather(*(caller(stub, k, until) for k in range(callers)))
        return [o for outcomes in per_caller for o in outcomes]

    with DepthWatch(server, "slow") as depth:
        outcomes = asyncio.run(scenario())
    refused = [o for o in outcomes if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    accepted = [o for o in outcomes if o.code == grpc.StatusCode.OK]
    assert len(refused) + len(accepted) == len(outcomes)  # nothing else happened
    assert refused
    assert accepted
    for o in accepted:
        check_answer(o, kernel, bias)
    for o in refused:
        assert o.details.startswith("model 'slow' is at capacity: ")
    # Accepted calls wait for at least one device call (SLOW_SECONDS); refusals for none.
    assert statistics.median(o.seconds for o in refused) < statistics.median(
        o.seconds for o in accepted
    )
    assert depth.highest <= MAX_QUEUE
    report(
        f"slow device ({SLOW_SECONDS * 1e3:.0f} ms a call), {callers} callers", refused, accepted
    )

    # The load dropped: one call, answered on its first try.
    async def one() -> Outcome:
        async with aio.insecure_channel(server.target) as channel:
            x = sample(np.random.default_rng(99), 2)
            return await send(salience_pb2_grpc.SalienceStub(channel), "Predict", "slow", x)

    check_answer(asyncio.run(one()), kernel, bias)
