"""Nothing lost, nothing mixed up: sustained mixed load on one server.

Three tiny models (`conv`, `mlp`, and `held`, a conv net behind a `Gate` layer from
tests/integration/faults.py) serve, concurrently:

- a sustained load from 12 callers: predictions and vanilla, Grad-CAM, SmoothGrad
  and Integrated Gradients explanations with random options, batches of 1 to 8
  samples (the server's device calls take 4, so larger requests are split), every
  input distinct, and a few requests the server must refuse (a wrong shape, an
  unknown model);
- rounds on `held` in which the test holds its device thread inside a device call
  and then, with other requests queued behind it, cancels requests (one whose
  first rows are in the held call, others still queued) and lets others pass tight
  deadlines (they expire in the queue); then releases the device, and the requests
  queued with the victims get their answers.

Cancellations and expiries happen while the request certainly sits in the server
(the held device answers nothing), so no answer races the client and the server's
count is exact. Every request gets exactly one status, counted client-side; the
server's `salience_requests_total`, by RPC and code, equals those counts; and every
answer equals the one computed for that request alone, in-process, before the load.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
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

IMAGE = (8, 8, 3)
VECTOR = (10,)
SHAPES = {"conv": IMAGE, "held": IMAGE, "mlp": VECTOR}
UNITS = {"conv": 3, "held": 3, "mlp": 4}
DEVICE_BATCH = 4
LOAD_REQUESTS = 320
CALLERS = 12
ROUNDS = 3
DEADLINE_S = 3.0  # of the victims that expire while `held` is held
MODIFIERS = ["absolute", "none", "relu", "negate"]
OK = grpc.StatusCode.OK


@dataclass
class Case:
    """One request, what it should get, and (once sent) what it got."""

    rpc: str
    model: str
    request: Any
    expect: grpc.StatusCode = OK
    want: Any = None  # the answer computed alone, for OK cases
    code: grpc.StatusCode | None = None
    response: Any = None


@dataclass
class Files:
    hold: Path
    log: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    work = tmp_path_factory.mktemp("load-gate")
    return Files(work / "hold", work / "entered.log")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, files: Files) -> Path:
    import keras

    keras.utils.set_random_seed(21)
    root = tmp_path_factory.mktemp("load-repo")
    for name in ("conv", "held"):
        x = keras.Input(IMAGE, name="image")
        h = Gate(hold=str(files.hold), log=str(files.log), name="gate")(x) if name == "held" else x
        h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(h)
        h = keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="conv2")(h)
        h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
        save_model(root, name, keras.Model(x, keras.layers.Dense(3, name="logits")(h)))
    x = keras.Input(VECTOR, name="x")
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(x)
    save_model(root, "mlp", keras.Model(x, keras.layers.Dense(4, name="logits")(h)))
    return root


@pytest.fixture(scope="module")
def runtimes(repo: Path) -> dict[str, Any]:
    """The models loaded once more, outside the server, to compute references."""
    from salience_server.runtime import ModelRuntime

    return {name: ModelRuntime.load(name, 1, repo / name / "1" / "model.keras") for name in SHAPES}


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    with running_server(
        repo,
        max_batch_size=8,
        max_device_batch_size=DEVICE_BATCH,
        max_queue_delay_ms=2.0,
        max_queue_size=4096,
    ) as running:
        yield running


# Requests and their references ------------------------------------------------------


def random_case(rng: np.random.Generator, model: str, seed: int) -> Case:
    """A request with a distinct input (and SmoothGrad seed) to `model`."""
    rows = int(rng.integers(1, 9))
    x = rng.uniform(-1, 1, (rows, *SHAPES[model])).astype(np.float32)
    methods = ["predict", "vanilla", "smoothgrad", "integrated-gradients"]
    if model != "mlp":
        methods.append("gradcam")
    method = str(rng.choice(methods))
    if method == "predict":
        return Case("Predict", model, predict_request(model, x))
    extra: dict[str, Any] = {}
    if method == "smoothgrad":
        extra = {"samples": 3, "noise": 0.2, "seed": seed}
    elif method == "integrated-gradients":
        extra = {"steps": 4}
    picked = rng.choice(UNITS[model], size=int(rng.integers(1, 3)), replace=False)
    request = explanation_request(
        model,
        x,
        method=method,
        filter_indices=sorted(int(k) for k in picked),
        grad_modifiers=list(rng.choice(MODIFIERS, size=int(rng.integers(1, 3)), replace=False)),
        normalize=bool(rng.random() < 0.5),
        **extra,
    )
    return Case("Explain", model, request)


def refused_case(rng: np.random.Generator, k: int) -> Case:
    """A request the server refuses before any work: a wrong shape or an unknown model."""
    if k % 2:
        x = rng.uniform(-1, 1, (2, 7)).astype(np.float32)
        return Case("Predict", "mlp", predict_request("mlp", x), grpc.StatusCode.INVALID_ARGUMENT)
    x = rng.uniform(-1, 1, (1, *VECTOR)).astype(np.float32)
    request = explanation_request("absent", x, filter_indices=[0])
    return Case("Explain", "absent", request, grpc.StatusCode.NOT_FOUND)


def samples(case: Case) -> int:
    return len(tensors.decode(case.request.inputs[0]))


def reference(case: Case, runtimes: dict[str, Any]) -> Any:
    """The request computed alone, in-process: outputs, and maps for explanations."""
    from salience_server import convert
    from salience_server.explain.options import Limits

    runtime = runtimes[case.model]
    inputs = runtime.check_inputs(convert.request_inputs(case.request.inputs), 64)
    if case.rpc == "Predict":
        return runtime.predict(inputs), {}
    options = convert.explain_options(case.request.explanation)
    runtime.check_options(options, Limits())
    result = runtime.explain(inputs, options)
    return result.outputs, result.maps


def check(case: Case) -> None:
    assert case.code == case.expect, (case.rpc, case.model, case.code)
    if case.expect != OK:
        return
    outputs, maps = case.want
    if case.rpc == "Predict":
        got = [tensors.decode(t) for t in case.response.outputs]
        got_maps: dict[str, np.ndarray] = {}
    else:
        result = explanation_result(case.response)
        got, got_maps = list(result.outputs.values()), result.maps
    for g, w in zip(got, outputs, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert got_maps.keys() == maps.keys()
    for name, saliency in maps.items():
        assert got_maps[name].shape == saliency.shape
        np.testing.assert_allclose(got_maps[name], saliency, rtol=1e-4, atol=1e-5)


# The server's side -------------------------------------------------------------------


def server_codes(running: RunningServer) -> Counter[tuple[str, str]]:
    """salience_requests_total by (rpc, code), summed over models and methods."""
    counts: Counter[tuple[str, str]] = Counter()
    for family in running.server.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "salience_requests_total" and sample.value:
                counts[sample.labels["rpc"], sample.labels["code"]] += int(sample.value)
    return counts


async def until(condition: Any, what: str | Any, seconds: float = 120.0) -> None:
    """Polls a blocking condition (run on a thread) until true; `what` describes it
    (or is called for the description, when it fails).
    """
    end = time.monotonic() + seconds
    while not await asyncio.to_thread(condition):
        if time.monotonic() > end:
            described = what if isinstance(what, str) else what()
            raise AssertionError(f"not reached in {seconds:.0f} s: {described}")
        await asyncio.sleep(0.01)


# Driving it --------------------------------------------------------------------------


async def run(stub: Any, case: Case, deadline_s: float = 300.0) -> Case:
    """Sends a case and records its one terminal status."""
    assert case.code is None  # each case is sent once
    call = getattr(stub, case.rpc)(case.request, timeout=deadline_s)
    try:
        case.response = await call
        case.code = OK
    except aio.AioRpcError as err:
        case.code = err.code()
    except asyncio.CancelledError:
        case.code = grpc.StatusCode.CANCELLED
    return case


async def load(stub: Any, cases: list[Case]) -> None:
    """CALLERS closed-loop callers work through the cases."""
    pending = iter(cases)

    async def caller() -> None:
        for case in pending:
            await run(stub, case)

    await asyncio.gather(*(caller() for _ in range(CALLERS)))


async def victim_round(
    running: RunningServer,
    stub: Any,
    files: Files,
    split: Case,
    survivors: list[Case],
    cancelled: list[Case],
    expiring: list[Case],
    tally: Counter[str],
) -> None:
    """Holds `held`, cancels and lets expire requests that sit in it, releases it."""
    rows = {id(c): samples(c) for c in [split, *survivors, *cancelled, *expiring]}
    files.hold.touch()
    passes = len(entered(files.log))
    tasks = {id(split): asyncio.ensure_future(run(stub, split))}
    # `split` is 8 samples: its first 4 go into a device call, which the gate holds.
    await until(lambda: len(entered(files.log)) > passes, "the held device call started")
    await until(lambda: running.queued("held") == rows[id(split)] - DEVICE_BATCH, "split queued")
    for case in [*survivors, *cancelled]:
        tasks[id(case)] = asyncio.ensure_future(run(stub, case))
    for case in expiring:
        tasks[id(case)] = asyncio.ensure_future(run(stub, case, deadline_s=DEADLINE_S))
    behind = sum(rows[id(c)] for c in [*survivors, *cancelled, *expiring])
    await until(
        lambda: (
            running.queued("held") + sum(rows[id(c)] for c in expiring if tasks[id(c)].done())
            == rows[id(split)] - DEVICE_BATCH + behind
        ),
        "every request of the round queued behind the held call",
    )
    assert len(entered(files.log)) == passes + 1  # still the one held call
    for case in [split, *cancelled]:
        tasks[id(case)].cancel()
    tally["CANCELLED"] += 1 + len(cancelled)
    for case in expiring:
        await tasks[id(case)]
    tally["DEADLINE_EXCEEDED"] += len(expiring)

    def counted() -> bool:
        codes = server_codes(running)
        return all(
            sum(n for (_, code), n in codes.items() if code == name) >= want
            for name, want in tally.items()
        )

    # The server saw every victim go (its counts are checked exactly at the end).
    await until(
        counted,
        lambda: f"the server counted the victims {dict(tally)}: {dict(server_codes(running))}",
    )
    await until(
        lambda: running.queued("held") == sum(rows[id(c)] for c in survivors),
        "only the survivors left in the queue",
    )
    files.hold.unlink()
    for case in [split, *survivors, *cancelled]:
        await tasks[id(case)]
    assert [c.code for c in [split, *cancelled]] == [grpc.StatusCode.CANCELLED] * (
        1 + len(cancelled)
    )


def test_sustained_mixed_load_loses_nothing_and_mixes_nothing_up(
    server: RunningServer, runtimes: dict[str, Any], files: Files
) -> None:
    rng = np.random.default_rng(2025)
    seeds = itertools.count(1)
    load_cases = [
        random_case(rng, str(rng.choice(["conv", "mlp"])), next(seeds))
        for _ in range(LOAD_REQUESTS)
    ]
    for k in range(0, LOAD_REQUESTS, 25):
        load_cases[k] = refused_case(rng, k)
    rounds = []
    for _ in range(ROUNDS):
        split = random_case(rng, "held", next(seeds))
        while samples(split) != 8:
            split = random_case(rng, "held", next(seeds))
        rounds.append(
            (
                split,
                [random_case(rng, "held", next(seeds)) for _ in range(4)],
                [random_case(rng, "held", next(seeds)) for _ in range(2)],
                [random_case(rng, "held", next(seeds)) for _ in range(2)],
            )
        )
    for split, _, cancelled, expiring in rounds:
        split.expect = grpc.StatusCode.CANCELLED
        for case in cancelled:
            case.expect = grpc.StatusCode.CANCELLED
        for case in expiring:
            case.expect = grpc.StatusCode.DEADLINE_EXCEEDED
    everything = load_cases + [c for r in rounds for c in [r[0], *r[1], *r[2], *r[3]]]
    for case in everything:
        if case.expect == OK:
            case.want = reference(case, runtimes)
    before = server_codes(server)

    async def scenario() -> None:
        async with aio.insecure_channel(server.target) as channel:
            stub = salience_pb2_grpc.SalienceStub(channel)
            tally: Counter[str] = Counter()

            async def victims() -> None:
                for split, survivors, cancelled, expiring in rounds:
                    await victim_round(
                        server, stub, files, split, survivors, cancelled, expiring, tally
                    )

            try:
                await asyncio.gather(load(stub, load_cases), victims())
            finally:
                files.hold.unlink(missing_ok=True)

    asyncio.run(scenario())

    # Exactly one terminal status per request, each the one expected.
    assert all(case.code is not None for case in everything)
    sent = Counter((case.rpc, case.code.name) for case in everything if case.code is not None)
    assert sum(sent.values()) == len(everything)
    for case in everything:
        check(case)

    # The server counted each request once, with the status its caller got.
    def settled() -> bool:
        now = server_codes(server)
        return {k: now[k] - before[k] for k in now if now[k] - before[k]} == dict(sent)

    end = time.monotonic() + 60
    while not settled() and time.monotonic() < end:
        time.sleep(0.05)
    now = server_codes(server)
    assert {k: now[k] - before[k] for k in now if now[k] - before[k]} == dict(sent)
    assert sent[("Predict", "OK")] + sent[("Explain", "OK")] > LOAD_REQUESTS * 0.8
    print("\nrequests by (rpc, status), client and server alike:", dict(sorted(sent.items())))
    assert server.queued("conv") == server.queued("mlp") == server.queued("held") == 0
