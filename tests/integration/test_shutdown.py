"""Graceful shutdown of a real `salience serve` process on SIGTERM, under load.

The server runs as a child process (real signals, its own exit status) on a model
behind a `Gate` layer (tests/integration/faults.py, loaded with `--plugins`): the
test holds the model's device thread, so 16 callers' requests are certainly in
flight — one device call held, the rest queued — when SIGTERM comes. Then:

- health goes NOT_SERVING (seen on a health Watch stream) while every one of those
  calls is still in flight;
- new calls are refused with UNAVAILABLE, on the open channel and on a new one
  (the port stays open while calls drain, so that no call reaches a stopping gRPC
  server, which would answer CANCELLED);
- a second SIGTERM, and a SIGINT, change nothing;
- once the device is released every in-flight call is answered, OK and right;
- the process exits 0 within its grace — the open Watch stream does not hold it
  for the whole grace.

And when calls outlast the grace, they are cut at the grace (UNAVAILABLE) though
the device still holds them; the process exits 0 once the device call in progress
ends.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from salience.v1 import salience_pb2_grpc
from salience_client import tensors
from salience_client.client import explanation_request, explanation_result, predict_request
from tests.conftest import save_model
from tests.integration.faults import Gate, entered
from tests.processes import ServerProcess, salience_serve

SHAPE = (6,)
UNITS = 3
CALLERS = 16
GRACE_S = 30.0
SHORT_GRACE_S = 2.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REFUSED = "model 'gated' is shutting down: retry on another server"


def in_flight(served: ServerProcess) -> float:
    """salience_requests_in_flight summed over the RPCs, from /metrics."""
    found = re.findall(
        r"^salience_requests_in_flight\{[^}]*\} (\S+)$", served.metrics(), re.MULTILINE
    )
    return sum(float(value) for value in found)


@dataclass
class Files:
    hold: Path
    log: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    work = tmp_path_factory.mktemp("shutdown-gate")
    return Files(work / "hold", work / "entered.log")


@pytest.fixture(scope="module")
def weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(8)
    return rng.normal(size=(SHAPE[0], UNITS)).astype(np.float32), rng.normal(size=UNITS)


@pytest.fixture(scope="module")
def repo(
    tmp_path_factory: pytest.TempPathFactory, files: Files, weights: tuple[np.ndarray, np.ndarray]
) -> Path:
    import keras

    root = tmp_path_factory.mktemp("shutdown-repo")
    x = keras.Input(SHAPE, name="x")
    dense = keras.layers.Dense(UNITS, name="logits")
    model = keras.Model(x, dense(Gate(hold=str(files.hold), log=str(files.log), name="gate")(x)))
    kernel, bias = weights
    dense.set_weights([kernel, bias.astype(np.float32)])
    return save_model(root, "gated", model)


@contextmanager
def serve(repo: Path, grace: float) -> Iterator[ServerProcess]:
    """`salience serve` as a child process on free ports; yields once it is SERVING.
    The tests send SIGTERM themselves; one still running at the end is killed.
    """
    flags = ["--shutdown-grace-seconds", str(grace), "--max-device-batch-size", "4"]
    with salience_serve(
        repo, [*flags, "--plugins", "tests.integration.faults"], stop="kill"
    ) as served:
        yield served


# Calls -------------------------------------------------------------------------------


@dataclass
class Outcome:
    rpc: str
    x: np.ndarray
    code: grpc.StatusCode
    response: Any = None
    details: str = ""


async def send(stub: Any, rpc: str, x: np.ndarray) -> Outcome:
    try:
        if rpc == "Predict":
            response = await stub.Predict(predict_request("gated", x), timeout=300)
        else:
            request = explanation_request(
                "gated", x, filter_indices=[2], grad_modifiers=["none"], normalize=False
            )
            response = await stub.Explain(request, timeout=300)
    except aio.AioRpcError as err:
        return Outcome(rpc, x, err.code(), details=err.details() or "")
    return Outcome(rpc, x, grpc.StatusCode.OK, response)


def check_answer(outcome: Outcome, weights: tuple[np.ndarray, np.ndarray]) -> None:
    """Predictions x @ W + b; a vanilla map of unit 2 of a linear model is W[:, 2]."""
    assert outcome.code == grpc.StatusCode.OK, (outcome.code, outcome.details)
    kernel, bias = weights
    want = outcome.x.astype(np.float64) @ kernel + bias
    if outcome.rpc == "Predict":
        got = tensors.decode(outcome.response.outputs[0])
    else:
        result = explanation_result(outcome.response)
        got = result.predictions
        saliency = np.broadcast_to(kernel[:, 2], outcome.x.shape)
        np.testing.assert_allclose(result.maps["none"], saliency, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


async def watch_health(stub: Any, seen: list[Any]) -> None:
    """Every status a Watch stream sends, then the code it ended with."""
    try:
        async for response in stub.Watch(health_pb2.HealthCheckRequest(service="")):
            seen.append(response.status)
    except aio.AioRpcError as err:
        seen.append(err.code())


async def until(condition: Any, what: str, seconds: float = 120.0) -> None:
    end = time.monotonic() + seconds
    while not await asyncio.to_thread(condition):
        if time.monotonic() > end:
            raise AssertionError(f"not reached in {seconds:.0f} s: {what}")
        await asyncio.sleep(0.02)


async def load_in_flight(
    served: ServerProcess, files: Files, stub: Any
) -> tuple[list[tuple[str, np.ndarray]], list[asyncio.Task[Outcome]]]:
    """Holds the device and sends one request per caller; returns once every one is
    in flight in the server (one device call held, the others queued)."""
    rng = np.random.default_rng(3)
    requests = [
        ("Predict" if k % 2 else "Explain", rng.uniform(-1, 1, (1 + k % 2, *SHAPE)).astype("f4"))
        for k in range(CALLERS)
    ]
    files.hold.touch()
    passes = len(entered(files.log))
    calls = [asyncio.create_task(send(stub, rpc, x)) for rpc, x in requests]
    await until(lambda: in_flight(served) == CALLERS, f"{CALLERS} calls in flight")
    await until(lambda: len(entered(files.log)) == passes + 1, "the held device call")
    assert not any(c.done() for c in calls)
    return requests, calls


# Tests -------------------------------------------------------------------------------


def test_sigterm_under_load_answers_every_in_flight_call_and_exits_0_within_the_grace(
    repo: Path, files: Files, weights: tuple[np.ndarray, np.ndarray]
) -> None:
    with serve(repo, GRACE_S) as served:

        async def scenario() -> tuple[list[Outcome], list[Any], float]:
            async with aio.insecure_channel(served.target) as channel:
                stub = salience_pb2_grpc.SalienceStub(channel)
                seen: list[Any] = []
                watching = asyncio.ensure_future(
                    watch_health(health_pb2_grpc.HealthStub(channel), seen)
                )
                await until(lambda: seen == [SERVING], "the Watch stream's first status")
                _, calls = await load_in_flight(served, files, stub)
                passes = len(entered(files.log))

                signalled = time.monotonic()
                served.process.send_signal(signal.SIGTERM)
                await until(lambda: len(seen) > 1, "a second health status", GRACE_S)
                # NOT_SERVING first: every call is still in flight, the device still held.
                assert seen == [SERVING, NOT_SERVING]
                assert not any(c.done() for c in calls)
                assert len(entered(files.log)) == passes

                # New calls are refused, on this channel and on a new one.
                x = np.zeros((1, *SHAPE), np.float32)
                refused = [await send(stub, "Predict", x)]
                async with aio.insecure_channel(served.target) as other:
                    refused.append(await send(salience_pb2_grpc.SalienceStub(other), "Explain", x))
                assert [(o.code, o.details) for o in refused] == [
                    (grpc.StatusCode.UNAVAILABLE, REFUSED)
                ] * 2

                # Further signals change nothing (given time to be handled, while held).
                served.process.send_signal(signal.SIGTERM)
                served.process.send_signal(signal.SIGINT)
                await asyncio.sleep(0.5)
                assert served.process.poll() is None
                assert not any(c.done() for c in calls)

                files.hold.unlink()
                outcomes = [await c for c in calls]
                await asyncio.wait_for(watching, GRACE_S)
                return outcomes, seen, signalled

        try:
            outcomes, seen, signalled = asyncio.run(scenario())
        finally:
            files.hold.unlink(missing_ok=True)
        status = served.process.wait(GRACE_S + 60)
        took = time.monotonic() - signalled
        assert status == 0, served.text()
        # Within the grace: the Watch stream, still open, did not hold the shutdown.
        assert took < GRACE_S, f"{took:.1f}s\n{served.text()}"
        for outcome in outcomes:
            check_answer(outcome, weights)
        # The Watch stream saw NOT_SERVING, then ended with the server.
        assert seen[:2] == [SERVING, NOT_SERVING]
        assert seen[2:] == [grpc.StatusCode.UNAVAILABLE]
        assert "shutting down: finishing in-flight calls for up to 30.0s" in served.text()
        assert served.text().rstrip().endswith("salience_server.app: stopped")
        print(f"\nSIGTERM to exit 0: {took:.2f}s with {CALLERS} calls in flight (grace {GRACE_S}s)")


def test_calls_that_outlast_the_grace_are_cut_and_the_process_still_exits_0(
    repo: Path, files: Files
) -> None:
    with serve(repo, SHORT_GRACE_S) as served:

        async def scenario() -> list[Outcome]:
            async with aio.insecure_channel(served.target) as channel:
                stub = salience_pb2_grpc.SalienceStub(channel)
                _, calls = await load_in_flight(served, files, stub)
                served.process.send_signal(signal.SIGTERM)
                # Cut at the end of the grace though the device still holds them ...
                outcomes = [await c for c in calls]
                # ... and the process waits for the device call in progress.
                assert served.process.poll() is None
                files.hold.unlink()
                return outcomes

        try:
            outcomes = asyncio.run(scenario())
        finally:
            files.hold.unlink(missing_ok=True)
        assert [o.code for o in outcomes] == [grpc.StatusCode.UNAVAILABLE] * CALLERS
        assert served.process.wait(120) == 0, served.text()
        assert served.text().rstrip().endswith("salience_server.app: stopped")
