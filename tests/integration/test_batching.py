"""Dynamic batching through a real server: hundreds of concurrent, mixed requests
each get exactly their own result, cancelled and expired ones never reach the
device, a full queue refuses at once, and batches form (or, switched off, do not).

Where a test must know what waits in the queue, the server holds batches with a
long `max_queue_delay_ms` and the test releases them with the batchers' `flush()`,
so nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc import aio

from salience.v1 import salience_pb2 as pb
from salience.v1 import salience_pb2_grpc
from salience_client import Objective, SalienceClient, SalienceError, tensors
from salience_client.client import explanation_request, explanation_result
from tests.conftest import RunningServer, running_server
from tests.integration.models import LINEAR_SHAPE, SMOOTH_SHAPE, build_repository

HOLD_MS = 60_000.0  # the longest delay allowed: batches go when flushed (or full)
# Requests held in the queue at once, and how many of them are cancelled there.
# tests/integration/test_load_mixed.py is the suite's proof under sustained load that
# every request gets its own rows (split across device calls, cancelled and expired
# ones among them); here the held queue checks what that test cannot: that cancelled
# requests never reach the device, that hundreds of requests with every request
# option this module draws merge into few device calls, and each still gets its own
# answer.
HELD_REQUESTS = 200
HELD_CANCELLED = 24
MODIFIERS = ["absolute", "none", "negate", "relu", "invert", "small_values"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("batching-repo"))


@pytest.fixture(scope="module")
def runtimes(repo: Path) -> dict[str, Any]:
    """The models loaded once more, outside the server, to compute references."""
    from salience_server.runtime import ModelRuntime

    return {
        name: ModelRuntime.load(name, 1, repo / name / "1" / "model.keras")
        for name in ("linear", "softmax", "smooth")
    }


# Requests and their references ------------------------------------------------------


@dataclass
class Case:
    rpc: str  # "Predict" or "Explain"
    model: str
    request: Any
    rows: int


def random_case(rng: np.random.Generator, max_rows: int) -> Case:
    model = str(rng.choice(["linear", "softmax", "smooth"]))
    shape, dtype = (SMOOTH_SHAPE, "float64") if model == "smooth" else (LINEAR_SHAPE, "float32")
    rows = int(rng.integers(1, max_rows + 1))
    x = rng.uniform(-1, 1, (rows, *shape)).astype(dtype)
    if rng.random() < 0.3:
        request = pb.PredictRequest(model=pb.ModelSpec(name=model), inputs=[tensors.encode(x)])
        return Case("Predict", model, request, rows)
    units = {"linear": 4, "softmax": 4, "smooth": 3}[model]
    layer = {"linear": "logits", "softmax": "probs", "smooth": "out"}[model]
    if model == "smooth" and rng.random() < 0.3:
        layer, units = "hidden", 5  # another graph
    picked = sorted(rng.choice(units, size=int(rng.integers(1, 3)), replace=False).tolist())
    objectives = [Objective(layer, picked, float(rng.choice([1.0, -0.5, 2.0])))]
    if rng.random() < 0.3:
        objectives.append(Objective(layer, [int(rng.integers(units))], -1.0))
    normalize = bool(rng.random() < 0.7)
    dtypes = ["float32", "float16", "uint8"] if normalize else ["float32", "float16"]
    # Methods with per-sample params of their own (seeds, noise levels, baselines).
    method = str(
        rng.choice(
            ["vanilla", "smoothgrad", "integrated-gradients", "gradient-x-input"],
            p=[0.6, 0.15, 0.15, 0.1],
        )
    )
    extra: dict[str, Any] = {}
    if method == "smoothgrad":
        extra = {
            "samples": 3,
            "seed": int(rng.integers(2**32)),
            "noise": float(rng.uniform(0, 0.3)),
        }
    elif method == "integrated-gradients":
        extra = {"steps": int(rng.choice([2, 4]))}
    request = explanation_request(
        model,
        x,
        method=method,
        **extra,
        objectives=objectives,
        grad_modifiers=list(rng.choice(MODIFIERS, size=int(rng.integers(1, 3)), replace=False)),
        keepdims=bool(rng.random() < 0.3),
        normalize=normalize,
        keep_activation=bool(model == "softmax" and rng.random() < 0.5),
        output_dtype=str(rng.choice(dtypes)),
    )
    return Case("Explain", model, request, rows)


def assert_alone(case: Case, response: Any, runtimes: dict[str, Any]) -> None:
    """The served answer equals the request computed alone, in-process."""
    from salience_server import convert
    from salience_server.explain.options import Limits

    runtime = runtimes[case.model]
    inputs = runtime.check_inputs(convert.request_inputs(case.request.inputs), 64)
    if case.rpc == "Predict":
        want = runtime.predict(inputs)
        got = [tensors.decode(t) for t in response.outputs]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        return
    options = convert.explain_options(case.request.explanation)
    runtime.check_options(options, Limits())
    want_result = runtime.explain(inputs, options)
    got_result = explanation_result(response)
    for g, w in zip(got_result.outputs.values(), want_result.outputs, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert got_result.maps.keys() == want_result.maps.keys()
    for name, want_map in want_result.maps.items():
        got_map = got_result.maps[name]
        assert got_map.shape == want_map.shape
        assert got_map.dtype == want_map.dtype
        if want_map.dtype == np.uint8:  # a rounding step may differ by one level
            assert np.abs(got_map.astype(int) - want_map.astype(int)).max() <= 1
        else:
            tol = 2e-3 if want_map.dtype == np.float16 else 1e-4
            np.testing.assert_allclose(got_map, want_map, rtol=tol, atol=tol)


# Reaching the server's batchers --------------------------------------------------------


async def until_queued(running: RunningServer, rows: int) -> None:
    for _ in range(3000):
        if await asyncio.to_thread(running.queued) == rows:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{running.queued()} samples queued, expected {rows}")


def metric(running: RunningServer, name: str, **labels: str) -> float:
    value = running.server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def total(running: RunningServer, name: str, **labels: str) -> float:
    return sum(
        metric(running, name, model=model, **labels) for model in ("linear", "softmax", "smooth")
    )


@pytest.fixture
def held(repo: Path) -> Iterator[RunningServer]:
    """A server whose batches wait until flushed (or full at 1024 samples)."""
    with running_server(
        repo,
        max_queue_delay_ms=HOLD_MS,
        max_device_batch_size=1024,
        max_queue_size=4096,
        max_batch_size=3,
    ) as running:
        yield running


def stub(channel: aio.Channel) -> Any:
    return salience_pb2_grpc.SalienceStub(channel)


# Tests ---------------------------------------------------------------------------------


def test_held_mixed_requests_each_get_their_own_result_and_cancelled_ones_never_compute(
    held: RunningServer, runtimes: dict[str, Any]
) -> None:
    rng = np.random.default_rng(2024)
    cases = [random_case(rng, max_rows=3) for _ in range(HELD_REQUESTS)]
    cancel = set(rng.choice(len(cases), size=HELD_CANCELLED, replace=False).tolist())
    all_rows = sum(c.rows for c in cases)
    cancelled_rows = sum(cases[k].rows for k in cancel)

    async def scenario() -> list[Any]:
        async with aio.insecure_channel(held.target) as channel:
            s = stub(channel)
            calls = [getattr(s, c.rpc)(c.request, timeout=300) for c in cases]
            await until_queued(held, all_rows)  # every request waits: nothing computed yet
            assert sum(b.stats.samples for b in await asyncio.to_thread(held.batchers)) == 0
            for k in cancel:
                calls[k].cancel()
            await until_queued(held, all_rows - cancelled_rows)
            await asyncio.to_thread(held.flush)
            return await asyncio.gather(*calls, return_exceptions=True)

    answers = asyncio.run(scenario())
    assert len(answers) == len(cases)
    for k, (case, answer) in enumerate(zip(cases, answers, strict=True)):
        if k in cancel:
            assert isinstance(answer, asyncio.CancelledError), answer
        else:
            assert not isinstance(answer, BaseException), (k, answer)
            assert_alone(case, answer, runtimes)
    computed = sum(b.stats.samples for b in held.batchers())
    assert computed == all_rows - cancelled_rows
    assert total(held, "salience_requests_refused_total", reason="cancelled") == len(cancel)
    # Merged: under a quarter as many device calls as requests (a request cut between two calls
    # counts in both).
    pieces = sum(b.stats.pieces for b in held.batchers())
    assert total(held, "salience_batch_requests_sum") == pieces >= len(cases) - len(cancel)
    assert total(held, "salience_batch_requests_count") < (len(cases) - len(cancel)) / 4


def test_concurrent_requests_are_merged_and_split_across_device_calls(
    repo: Path, runtimes: dict[str, Any]
) -> None:
    rng = np.random.default_rng(7)
    cases = [random_case(rng, max_rows=10) for _ in range(60)]
    with running_server(
        repo, max_device_batch_size=4, max_batch_size=10, max_queue_size=4096
    ) as running:

        async def scenario() -> list[Any]:
            async with aio.insecure_channel(running.target) as channel:
                s = stub(channel)
                return await asyncio.gather(
                    *(getattr(s, c.rpc)(c.request, timeout=300) for c in cases)
                )

        answers = asyncio.run(scenario())
        for case, answer in zip(cases, answers, strict=True):
            assert_alone(case, answer, runtimes)
        stats = running.batchers()
        assert sum(b.stats.samples for b in stats) == sum(c.rows for c in cases)
        assert max(b.stats.max_requests_per_call for b in stats) > 1
        # Batches formed: more samples than device calls.
        assert total(running, "salience_batch_size_sum") > total(
            running, "salience_batch_size_count"
        )


def test_with_batching_off_every_device_call_has_one_request(
    repo: Path, runtimes: dict[str, Any]
) -> None:
    rng = np.random.default_rng(8)
    cases = [random_case(rng, max_rows=3) for _ in range(30)]
    with running_server(repo, batching=False, max_batch_size=3) as running:

        async def scenario() -> list[Any]:
            async with aio.insecure_channel(running.target) as channel:
                s = stub(channel)
                return await asyncio.gather(
                    *(getattr(s, c.rpc)(c.request, timeout=300) for c in cases)
                )

        answers = asyncio.run(scenario())
        for case, answer in zip(cases, answers, strict=True):
            assert_alone(case, answer, runtimes)
        assert max(b.stats.max_requests_per_call for b in running.batchers()) == 1
        assert total(running, "salience_batch_requests_count") == len(cases)
        assert total(running, "salience_batch_requests_sum") == len(cases)


def test_a_full_queue_refuses_at_once_with_resource_exhausted(
    repo: Path, runtimes: dict[str, Any]
) -> None:
    rng = np.random.default_rng(9)
    xs = [rng.uniform(-1, 1, (2, *LINEAR_SHAPE)).astype(np.float32) for _ in range(2)]
    with running_server(
        repo,
        max_queue_delay_ms=HOLD_MS,
        max_device_batch_size=8,
        max_queue_size=4,
        max_batch_size=2,
    ) as running:

        async def scenario() -> list[Any]:
            async with aio.insecure_channel(running.target) as channel:
                s = stub(channel)
                waiting = [
                    s.Predict(
                        pb.PredictRequest(
                            model=pb.ModelSpec(name="linear"), inputs=[tensors.encode(x)]
                        ),
                        timeout=300,
                    )
                    for x in xs
                ]
                await until_queued(running, 4)
                with (
                    # One attempt: the client would retry RESOURCE_EXHAUSTED.
                    SalienceClient(running.target, retry=None) as client,
                    pytest.raises(SalienceError) as caught,
                ):
                    await asyncio.to_thread(client.predict, "linear", xs[0][:1])
                assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert caught.value.details == (
                    "model 'linear' is at capacity: 4 samples are queued and this request's "
                    "1 would pass its max_queue_size=4; retry after a back-off"
                )
                # Refused without waiting for the queue: both are still queued.
                assert not any(w.done() for w in waiting)
                assert await asyncio.to_thread(running.queued) == 4
                await asyncio.to_thread(running.flush)
                return await asyncio.gather(*waiting)

        answers = asyncio.run(scenario())
        for x, answer in zip(xs, answers, strict=True):
            want = runtimes["linear"].predict([x])[0]
            np.testing.assert_allclose(tensors.decode(answer.outputs[0]), want, rtol=1e-5)
        assert (
            metric(running, "salience_requests_refused_total", model="linear", reason="queue_full")
            == 1
        )


def test_expired_requests_are_shed_before_the_device(repo: Path) -> None:
    x = np.ones((1, *LINEAR_SHAPE), np.float32)
    with running_server(repo, max_queue_delay_ms=HOLD_MS, max_batch_size=3) as running:

        async def scenario() -> list[Any]:
            async with aio.insecure_channel(running.target) as channel:
                s = stub(channel)
                requests = [explanation_request("linear", x, filter_indices=[k]) for k in range(3)]
                return await asyncio.gather(
                    *(s.Explain(r, timeout=0.5) for r in requests), return_exceptions=True
                )

        answers = asyncio.run(scenario())
        assert [a.code() for a in answers] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
        # The server dropped them from the queue at their deadline ...
        for _ in range(1000):
            if running.queued() == 0:
                break
            time.sleep(0.01)
        assert running.queued() == 0
        running.flush()
        shed = metric(
            running, "salience_requests_refused_total", model="linear", reason="deadline_exceeded"
        ) + metric(running, "salience_requests_refused_total", model="linear", reason="cancelled")
        assert shed == 3
        # ... and never computed them; the model still serves.
        assert sum(b.stats.samples for b in running.batchers()) == 0

        async def later() -> Any:
            async with aio.insecure_channel(running.target) as channel:
                call = stub(channel).Explain(
                    explanation_request("linear", x, filter_indices=[1]), timeout=300
                )
                await until_queued(running, 1)
                await asyncio.to_thread(running.flush)
                return await call

        assert len(explanation_result(asyncio.run(later())).maps["absolute"]) == 1
        assert sum(b.stats.samples for b in running.batchers()) == 1
