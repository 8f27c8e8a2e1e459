"""A model that fails inside TensorFlow fails only the requests at fault.

The `trip` model carries a `Tripwire` layer (tests/integration/faults.py). Each
kind of failure gets its status, and never a stack trace:

- an input holding 55 makes the layer's own code raise (UnknownError): INTERNAL
  "internal error while serving <rpc>; the server log has the details", and the
  log has the traceback;
- one holding 77 raises the ResourceExhaustedError of a device out of memory:
  RESOURCE_EXHAUSTED naming the model (retryable later, or with fewer samples);
- one holding 99 fails a TensorFlow assertion (InvalidArgumentError: the model
  refuses the input): INVALID_ARGUMENT with the op's own words, as runtime.py
  answers inputs a model's layers cannot compute.

A device call that fails after merging several requests is computed again once
per request, alone (batching.py), so innocent requests merged with the culprit get
their answers. Requests in other device calls are untouched, and the model keeps
serving: health stays SERVING and the next call succeeds.

Where a test needs requests merged into one device call, the server holds batches
with a long `max_queue_delay_ms` and the test releases them with `flush()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
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
from tests.conftest import RunningServer, running_server, save_model
from tests.integration.faults import Tripwire, trip_sample

SHAPE = (6,)
ASSERT_VALUE = 99.0
OOM_VALUE = 77.0
ERROR_VALUE = 55.0
HOLD_MS = 60_000.0  # batches go when flushed
INTERNAL_DETAILS = "internal error while serving {rpc}; the server log has the details"
OOM_DETAILS = "device out of memory while computing model 'trip': retry later or with fewer samples"
# The op's own words lead; runtime.py's advice on what to send follows them.
ASSERT_DETAILS = (
    "inputs do not fit model 'trip': its layers fail on them (assertion failed: "
    "[Tripwire: input holds] [99]); "
)
# What each trip value is answered with: (code, details; None for INTERNAL's own).
FAILURES = {
    ERROR_VALUE: (grpc.StatusCode.INTERNAL, None),
    OOM_VALUE: (grpc.StatusCode.RESOURCE_EXHAUSTED, OOM_DETAILS),
    ASSERT_VALUE: (grpc.StatusCode.INVALID_ARGUMENT, ASSERT_DETAILS),
}


def assert_details(value: float, rpc: str, details: str) -> None:
    """The message a failure of this trip value is answered with, and no trace."""
    want = FAILURES[value][1] or INTERNAL_DETAILS.format(rpc=rpc)
    if value == ASSERT_VALUE:
        assert details.startswith(want), details
    else:
        assert details == want
    assert_no_trace(details)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    keras.utils.set_random_seed(3)
    root = tmp_path_factory.mktemp("failure-repo")
    x = keras.Input(SHAPE, name="x")
    h = Tripwire(ASSERT_VALUE, OOM_VALUE, ERROR_VALUE, name="tripwire")(x)
    h = keras.layers.Dense(5, activation="tanh", name="hidden")(h)
    save_model(root, "trip", keras.Model(x, keras.layers.Dense(3, name="logits")(h)))
    x = keras.Input(SHAPE, name="x")
    save_model(root, "plain", keras.Model(x, keras.layers.Dense(2, name="logits")(x)))
    return root


@pytest.fixture(scope="module")
def runtimes(repo: Path) -> dict[str, Any]:
    """The models loaded once more, outside the server, to compute references."""
    from salience_server.runtime import ModelRuntime

    return {
        name: ModelRuntime.load(name, 1, repo / name / "1" / "model.keras")
        for name in ("trip", "plain")
    }


@pytest.fixture(scope="module")
def held(repo: Path) -> Iterator[RunningServer]:
    """A server whose batches wait until flushed (or full at 256 samples)."""
    with running_server(
        repo,
        max_queue_delay_ms=HOLD_MS,
        max_device_batch_size=256,
        max_queue_size=4096,
        max_batch_size=8,
    ) as running:
        yield running


def device_calls(running: RunningServer, model: str) -> int:
    async def count() -> int:
        return sum(
            b.stats.calls for (name, _), b in running.server.core.batchers.items() if name == model
        )

    result: int = running.call(count())
    return result


async def until_queued(running: RunningServer, rows: int) -> None:
    for _ in range(3000):
        if await asyncio.to_thread(running.queued) == rows:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{running.queued()} samples queued, expected {rows}")


def requests_total(running: RunningServer, rpc: str, model: str, code: str) -> float:
    total = 0.0
    for family in running.server.metrics.registry.collect():
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "salience_requests_total" and (
                labels["rpc"],
                labels["model"],
                labels["code"],
            ) == (rpc, model, code):
                total += sample.value
    return total


def serving(running: RunningServer) -> int:
    with grpc.insecure_channel(running.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status: int = stub.Check(health_pb2.HealthCheckRequest(service="trip"), timeout=60).status
        return status


def assert_no_trace(details: str) -> None:
    """A status message never carries a traceback, a source path or TensorFlow's trace."""
    for leak in ("Traceback", 'File "', ".py", "Graph execution", "Detected at", "[[", "node "):
        assert leak not in details, details


def batch(rng: np.random.Generator, rows: int) -> np.ndarray:
    return rng.uniform(-1, 1, (rows, *SHAPE)).astype(np.float32)


def with_culprit(rng: np.random.Generator, rows: int, value: float) -> np.ndarray:
    """A batch whose last sample holds `value`: the request fails as a whole."""
    x = batch(rng, rows)
    x[-1:] = trip_sample(SHAPE, value, rng)
    return x


def check_predict(runtime: Any, x: np.ndarray, response: Any) -> None:
    want = runtime.predict([x])[0]
    np.testing.assert_allclose(tensors.decode(response.outputs[0]), want, rtol=1e-5, atol=1e-6)


def check_explain(runtime: Any, x: np.ndarray, request: Any, response: Any) -> None:
    from salience_server import convert
    from salience_server.explain.options import Limits

    options = convert.explain_options(request.explanation)
    runtime.check_options(options, Limits())
    want = runtime.explain([x], options)
    got = explanation_result(response)
    np.testing.assert_allclose(got.predictions, want.outputs[0], rtol=1e-5, atol=1e-6)
    assert got.maps.keys() == want.maps.keys()
    for name, saliency in want.maps.items():
        np.testing.assert_allclose(got.maps[name], saliency, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "value",
    [ERROR_VALUE, OOM_VALUE, ASSERT_VALUE],
    ids=["error-in-a-layer", "device-out-of-memory", "tensorflow-assertion"],
)
def test_a_failing_input_fails_only_its_own_request_in_a_merged_device_call(
    held: RunningServer,
    runtimes: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    value: float,
) -> None:
    code = FAILURES[value][0]
    rng = np.random.default_rng(int(value))
    # Predictions: 6 innocent requests and one culprit, all merged into one device
    # call (16 samples: a bucket, so none waits for the next call).
    predicts = [batch(rng, rows) for rows in (1, 2, 3, 2, 3, 3)]
    predicts.insert(3, with_culprit(rng, 2, value))
    # Explanations of one graph: another device call (8 samples), with its culprit.
    explains = [batch(rng, rows) for rows in (1, 2, 2, 1)]
    explains.insert(1, with_culprit(rng, 2, value))
    explain_requests = [
        explanation_request("trip", x, filter_indices=[1], grad_modifiers=["none"], normalize=False)
        for x in explains
    ]
    # Another model, merged in a device call of its own: untouched.
    others = [batch(rng, 2) for _ in range(3)]
    rows = sum(len(x) for x in [*predicts, *explains, *others])
    calls_before = device_calls(held, "trip")
    failed_before = requests_total(held, "Predict", "trip", code.name)

    async def scenario() -> tuple[list[Any], list[Any], list[Any]]:
        async with aio.insecure_channel(held.target) as channel:
            stub = salience_pb2_grpc.SalienceStub(channel)
            p = [stub.Predict(predict_request("trip", x), timeout=300) for x in predicts]
            e = [stub.Explain(r, timeout=300) for r in explain_requests]
            o = [stub.Predict(predict_request("plain", x), timeout=300) for x in others]
            await until_queued(held, rows)  # every request waits for the flush
            await asyncio.to_thread(held.flush)
            return (
                await asyncio.gather(*p, return_exceptions=True),
                await asyncio.gather(*e, return_exceptions=True),
                await asyncio.gather(*o, return_exceptions=True),
            )

    with caplog.at_level(logging.WARNING):
        p_answers, e_answers, o_answers = asyncio.run(scenario())

    for k, (x, answer) in enumerate(zip(predicts, p_answers, strict=True)):
        if k == 3:
            assert isinstance(answer, aio.AioRpcError), answer
            assert answer.code() == code
            assert_details(value, "Predict", answer.details())
        else:
            assert not isinstance(answer, BaseException), (k, answer)
            check_predict(runtimes["trip"], x, answer)
    for k, (x, request, answer) in enumerate(
        zip(explains, explain_requests, e_answers, strict=True)
    ):
        if k == 1:
            assert isinstance(answer, aio.AioRpcError), answer
            assert answer.code() == code
            assert_details(value, "Explain", answer.details())
        else:
            assert not isinstance(answer, BaseException), (k, answer)
            check_explain(runtimes["trip"], x, request, answer)
    for x, answer in zip(others, o_answers, strict=True):
        assert not isinstance(answer, BaseException), answer
        check_predict(runtimes["plain"], x, answer)

    # One merged call per kind was sent; each failed and was computed again per request.
    assert device_calls(held, "trip") - calls_before == 2
    assert requests_total(held, "Predict", "trip", code.name) - failed_before == 1
    retries = [r for r in caplog.records if "computing each alone" in r.getMessage()]
    assert len(retries) == 2, [r.getMessage() for r in retries]
    # The server log, not the caller, has the details of a failure inside the model.
    if code == grpc.StatusCode.INTERNAL:
        logged = [r for r in caplog.records if r.getMessage().startswith("unexpected failure")]
        assert len(logged) == 2
        assert all(r.exc_info and "Tripwire" in str(r.exc_info[1]) for r in logged)

    # The model serves on.
    assert serving(held) == health_pb2.HealthCheckResponse.SERVING

    async def next_call(x: np.ndarray) -> Any:
        async with aio.insecure_channel(held.target) as channel:
            call = salience_pb2_grpc.SalienceStub(channel).Predict(
                predict_request("trip", x), timeout=300
            )
            await until_queued(held, len(x))
            await asyncio.to_thread(held.flush)
            return await call

    x = batch(rng, 2)
    check_predict(runtimes["trip"], x, asyncio.run(next_call(x)))


def test_failures_under_concurrent_load_touch_no_other_request(
    repo: Path, runtimes: dict[str, Any]
) -> None:
    """Unheld batching, small device calls (requests of up to 8 rows are split across
    them): culprits fail while 60 concurrent innocent requests all get their answers.
    """
    rng = np.random.default_rng(11)
    cases: list[tuple[str, np.ndarray, grpc.StatusCode]] = []
    for k in range(72):
        model = "plain" if k % 4 == 0 else "trip"
        x = batch(rng, int(rng.integers(1, 9)))
        expected = grpc.StatusCode.OK
        if k % 6 == 5:  # odd: always a request to `trip`
            value = list(FAILURES)[k // 6 % 3]
            # The culprit sample anywhere in the request, also in a later device call.
            x[int(rng.integers(len(x)))] = trip_sample(SHAPE, value, rng)[0]
            expected = FAILURES[value][0]
        cases.append((model, x, expected))

    with running_server(
        repo, max_device_batch_size=4, max_queue_delay_ms=2.0, max_batch_size=8
    ) as running:

        async def scenario() -> list[Any]:
            async with aio.insecure_channel(running.target) as channel:
                stub = salience_pb2_grpc.SalienceStub(channel)
                return await asyncio.gather(
                    *(stub.Predict(predict_request(m, x), timeout=300) for m, x, _ in cases),
                    return_exceptions=True,
                )

        answers = asyncio.run(scenario())
        for (model, x, expected), answer in zip(cases, answers, strict=True):
            if expected == grpc.StatusCode.OK:
                assert not isinstance(answer, BaseException), (model, answer)
                check_predict(runtimes[model], x, answer)
            else:
                assert isinstance(answer, aio.AioRpcError), answer
                assert answer.code() == expected, answer
                assert_no_trace(answer.details())
        failed = sum(e != grpc.StatusCode.OK for _, _, e in cases)
        assert failed >= 6
        assert (
            requests_total(running, "Predict", "trip", "OK")
            + requests_total(running, "Predict", "plain", "OK")
            == len(cases) - failed
        )
        assert serving(running) == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(running.target) as channel:
            x = batch(rng, 3)
            response = salience_pb2_grpc.SalienceStub(channel).Predict(
                predict_request("trip", x), timeout=300
            )
            check_predict(runtimes["trip"], x, response)
