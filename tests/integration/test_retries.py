"""The client's call policy against real servers: retries (only UNAVAILABLE and
RESOURCE_EXHAUSTED, within the policy's attempts, across a server restart),
deadlines (the default, an explicit one, none at all), and round robin across
servers. Attempts are counted where they land: in each server's
`salience_requests_total`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from salience_client import DEFAULT, RetryPolicy, SalienceClient, SalienceError
from salience_server.errors import InvalidArgument, ResourceExhausted, Unavailable
from tests.conftest import RunningServer, running_server, save_model

FEATURES = 6
UNITS = 3
# Fast, so a test that exhausts the attempts takes a fraction of a second.
QUICK = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
# Patient enough for a server restart: attempts about 1, 4, 13 and 28 s after the first.
PATIENT = RetryPolicy(max_attempts=5, initial_backoff=1.0, backoff_multiplier=3.0, max_backoff=15.0)
# Reconnect at least every second while no server listens (gRPC's own default backs
# off up to two minutes), so that the attempts find the new server once it does.
RECONNECT = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]


def linear_repository(root: Path) -> Path:
    """`linear`: logits = x @ W + b on 6 features, 3 units."""
    import keras

    keras.utils.set_random_seed(11)
    x = keras.Input((FEATURES,), name="x")
    logits = keras.layers.Dense(UNITS, name="logits", bias_initializer="glorot_uniform")(x)
    return save_model(root, "linear", keras.Model(x, logits))


def weights(repo: Path) -> tuple[np.ndarray, np.ndarray]:
    import keras

    model = keras.saving.load_model(repo / "linear" / "1" / "model.keras")
    kernel, bias = model.get_layer("logits").get_weights()
    return kernel, bias


def requests_total(running: RunningServer, rpc: str, code: str) -> float:
    """`salience_requests_total{rpc, code}` summed over models and methods."""
    text = generate_latest(running.server.metrics.registry).decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "salience_requests_total"
        and sample.labels["rpc"] == rpc
        and sample.labels["code"] == code
    )


def x_batch(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, FEATURES)).astype(np.float32)


class Faults:
    """Wraps a server's `core.predict`: the next `failures` calls raise `error`
    (a ServiceError), and every call's deadline argument (the server's
    `context.time_remaining()` as a monotonic instant, None without one) is kept.
    """

    def __init__(self, running: RunningServer) -> None:
        self.core = running.server.core
        self.original = self.core.predict
        self.failures = 0
        self.error: Callable[[], Exception] = lambda: Unavailable("not now")
        self.delay = 0.0
        self.remaining: list[float | None] = []
        self.core.predict = self.predict

    async def predict(self, *args: Any, **kwargs: Any) -> Any:
        deadline = args[3] if len(args) > 3 else kwargs.get("deadline")
        self.remaining.append(None if deadline is None else deadline - time.monotonic())
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failures > 0:
            self.failures -= 1
            raise self.error()
        return await self.original(*args, **kwargs)

    def restore(self) -> None:
        self.core.predict = self.original


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return linear_repository(tmp_path_factory.mktemp("retries-repo"))


# Rows of a request larger than gRPC's own 256 KiB retry buffer (6 float32 each).
BIG_ROWS = 16_384


@pytest.fixture(scope="module")
def served(repo: Path) -> Iterator[RunningServer]:
    big = {"max_batch_size": BIG_ROWS, "max_queue_size": BIG_ROWS}
    with running_server(repo, max_device_batch_size=BIG_ROWS, **big) as running:
        yield running


@pytest.fixture
def faults(served: RunningServer) -> Iterator[Faults]:
    faults = Faults(served)
    yield faults
    faults.restore()


def expected(repo: Path, x: np.ndarray) -> np.ndarray:
    kernel, bias = weights(repo)
    return x.astype(np.float64) @ kernel + bias


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (lambda: Unavailable("model 'linear' is loading: retry in a moment"), "UNAVAILABLE"),
        (lambda: ResourceExhausted("model 'linear' is at capacity"), "RESOURCE_EXHAUSTED"),
    ],
)
def test_transient_failures_are_retried_until_the_call_succeeds(
    repo: Path, served: RunningServer, faults: Faults, error: Any, code: str
) -> None:
    before = requests_total(served, "Predict", code), requests_total(served, "Predict", "OK")
    faults.failures, faults.error = 2, error
    x = x_batch(seed=1)
    with served.client() as client:  # the default policy: 5 attempts
        prediction = client.predict("linear", x)
    np.testing.assert_allclose(prediction.outputs["logits"], expected(repo, x), rtol=1e-5)
    # Two failed attempts and the third answered, all on the server.
    assert requests_total(served, "Predict", code) - before[0] == 2
    assert requests_total(served, "Predict", "OK") - before[1] == 1
    assert len(faults.remaining) == 3


def test_requests_larger_than_grpcs_own_retry_buffer_are_retried_too(
    repo: Path, served: RunningServer, faults: Faults
) -> None:
    # 384 KiB: gRPC would send it once with its default per-call buffer of 256 KiB.
    x = x_batch(BIG_ROWS, seed=2)
    assert x.nbytes > 256 * 1024
    faults.failures = 2
    with served.client() as client:
        prediction = client.predict("linear", x)
    assert len(faults.remaining) == 3
    np.testing.assert_allclose(
        prediction.outputs["logits"], expected(repo, x), rtol=1e-5, atol=1e-6
    )


def test_retries_stop_after_the_policys_attempts_with_the_last_status(
    served: RunningServer, faults: Faults
) -> None:
    before = requests_total(served, "Predict", "UNAVAILABLE")
    faults.failures = 100
    with served.client(retry=QUICK) as client, pytest.raises(SalienceError) as caught:
        client.predict("linear", x_batch())
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details == "not now"
    assert requests_total(served, "Predict", "UNAVAILABLE") - before == QUICK.max_attempts


def test_without_a_retry_policy_a_call_is_sent_once(served: RunningServer, faults: Faults) -> None:
    before = requests_total(served, "Predict", "UNAVAILABLE")
    faults.failures = 1
    with served.client(retry=None) as client, pytest.raises(SalienceError) as caught:
        client.predict("linear", x_batch())
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert requests_total(served, "Predict", "UNAVAILABLE") - before == 1


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (lambda: InvalidArgument("inputs[0] is wrong"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: RuntimeError("boom"), grpc.StatusCode.INTERNAL),
    ],
)
def test_other_failures_are_never_retried(
    served: RunningServer, faults: Faults, error: Any, code: grpc.StatusCode
) -> None:
    before = requests_total(served, "Predict", code.name)
    faults.failures, faults.error = 100, error
    with served.client() as client, pytest.raises(SalienceError) as caught:
        client.predict("linear", x_batch())
    assert caught.value.code == code
    assert requests_total(served, "Predict", code.name) - before == 1
    assert len(faults.remaining) == 1


def test_a_real_invalid_argument_is_answered_once(served: RunningServer) -> None:
    before = requests_total(served, "Predict", "INVALID_ARGUMENT")
    wrong = np.zeros((1, FEATURES + 1), np.float32)
    with served.client() as client, pytest.raises(SalienceError) as caught:
        client.predict("linear", wrong)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "shape" in caught.value.details
    assert requests_total(served, "Predict", "INVALID_ARGUMENT") - before == 1


def test_deadlines_default_explicit_and_none_reach_the_server(
    served: RunningServer, faults: Faults
) -> None:
    x = x_batch()
    with served.client(timeout=30.0) as client:
        client.predict("linear", x)  # the client's default
        client.predict("linear", x, timeout=DEFAULT)
        client.predict("linear", x, timeout=5.0)
        client.predict("linear", x, timeout=None)  # no deadline at all
    default, same, explicit, none = faults.remaining
    # gRPC sends a timeout rounded up to its wire units (grpc-timeout: "30S"), so
    # the server may see a little more than was given, never a lot.
    assert default is not None
    assert 25.0 < default <= 31.0
    assert same is not None
    assert 25.0 < same <= 31.0
    assert explicit is not None
    assert 0.0 < explicit <= 5.1
    assert none is None
    faults.remaining.clear()
    with served.client(timeout=None) as client:
        client.predict("linear", x)
        client.predict("linear", x, timeout=2.0)
    unset, given = faults.remaining
    assert unset is None
    assert given is not None
    assert 0.0 < given <= 2.1


def test_a_tiny_deadline_is_exceeded_and_says_so(served: RunningServer) -> None:
    with served.client() as client, pytest.raises(SalienceError) as caught:
        client.predict("linear", x_batch(), timeout=1e-4)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.timeout == 1e-4
    assert caught.value.details.startswith("no answer within the call's deadline of 0.0001 s")


def test_a_slow_answer_past_the_deadline_is_deadline_exceeded_and_not_retried(
    served: RunningServer, faults: Faults
) -> None:
    faults.delay = 3.0
    with served.client() as client, pytest.raises(SalienceError) as caught:
        client.predict("linear", x_batch(), timeout=0.3)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline of 0.3 s" in caught.value.details
    assert len(faults.remaining) == 1  # one attempt: DEADLINE_EXCEEDED is final


def test_a_call_rides_out_a_server_restart_on_the_same_port(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = x_batch(seed=5)
    with ExitStack() as stack:
        first = running_server(repo)
        running = first.__enter__()
        port = running.port
        client = stack.enter_context(
            SalienceClient(running.target, retry=PATIENT, timeout=60, options=RECONNECT)
        )
        client.predict("linear", x)  # connected to the first server
        first.__exit__(None, None, None)

        # The channel noticed: nothing listens on the port any more.
        failed = threading.Event()

        def watch(state: grpc.ChannelConnectivity) -> None:
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                failed.set()

        client._channel.subscribe(watch, try_to_connect=True)
        assert failed.wait(30), "the channel never noticed the server was gone"
        pool = stack.enter_context(ThreadPoolExecutor(1))
        # The first attempt fails at once (UNAVAILABLE: the channel cannot connect);
        # the retries find the second server once it listens and has loaded.
        answer: Future[Any] = pool.submit(client.predict, "linear", x)
        previous = record_previous_attempts(monkeypatch)
        second = stack.enter_context(running_server(repo, port=port))
        prediction = answer.result(timeout=90)
        client._channel.unsubscribe(watch)
    np.testing.assert_allclose(prediction.outputs["logits"], expected(repo, x), rtol=1e-5)
    assert requests_total(second, "Predict", "OK") == 1
    # The attempt that succeeded was a retry, within the policy's five attempts.
    assert len(previous) == requests_total(second, "Predict", "OK") + requests_total(
        second, "Predict", "UNAVAILABLE"
    )
    assert 1 <= previous[-1] <= PATIENT.max_attempts - 1


def record_previous_attempts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records, per call the servicer handles, how many attempts of it came before
    (the `grpc-previous-rpc-attempts` metadata gRPC adds to a retry).
    """
    from salience_server import servicer

    seen: list[int] = []
    original = servicer.deadline

    def deadline(context: Any) -> float | None:
        metadata = dict(context.invocation_metadata())
        seen.append(int(metadata.get("grpc-previous-rpc-attempts", 0)))
        return original(context)

    monkeypatch.setattr(servicer, "deadline", deadline)
    return seen


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_call_started_before_any_server_listens_succeeds_once_one_does(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    x = x_batch(seed=6)
    with (
        SalienceClient(f"127.0.0.1:{port}", retry=PATIENT, timeout=60, options=RECONNECT) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        failed = threading.Event()
        client._channel.subscribe(
            lambda s: failed.set() if s == grpc.ChannelConnectivity.TRANSIENT_FAILURE else None,
            try_to_connect=True,
        )
        assert failed.wait(30)  # nothing listens: the first attempt fails UNAVAILABLE
        answer: Future[Any] = pool.submit(client.predict, "linear", x)
        previous = record_previous_attempts(monkeypatch)
        with running_server(repo, port=port) as running:
            prediction = answer.result(timeout=90)
            assert requests_total(running, "Predict", "OK") == 1
    np.testing.assert_allclose(prediction.outputs["logits"], expected(repo, x), rtol=1e-5)
    assert 1 <= previous[-1] <= PATIENT.max_attempts - 1


def test_round_robin_spreads_calls_over_every_address_and_pick_first_does_not(
    repo: Path,
) -> None:
    x = x_batch(seed=7)
    with running_server(repo) as one, running_server(repo) as two:
        target = f"ipv4:127.0.0.1:{one.port},127.0.0.1:{two.port}"
        calls = 20
        with SalienceClient(target) as client:  # round_robin is the default
            for _ in range(calls):
                np.testing.assert_allclose(
                    client.predict("linear", x).outputs["logits"], expected(repo, x), rtol=1e-5
                )
        spread = requests_total(one, "Predict", "OK"), requests_total(two, "Predict", "OK")
        assert sum(spread) == calls
        # Round robin alternates between the servers once both are connected.
        assert min(spread) >= 1, spread

        with SalienceClient(target, load_balancing="pick_first") as client:
            for _ in range(calls):
                client.predict("linear", x)
        after = requests_total(one, "Predict", "OK"), requests_total(two, "Predict", "OK")
        added = sorted(a - b for a, b in zip(after, spread, strict=True))
        assert added == [0, calls]


def test_max_connection_age_makes_clients_reconnect_without_failing_a_call(repo: Path) -> None:
    # The server closes each connection after about 0.5 s (GOAWAY, then a grace for
    # calls in flight); the client opens a new one — resolving its target again —
    # and no call fails on the way.
    x = x_batch(seed=8)
    with running_server(repo, max_connection_age_seconds=0.5) as running:
        with SalienceClient(running.target, retry=None) as client:
            states: list[grpc.ChannelConnectivity] = []
            client._channel.subscribe(states.append, try_to_connect=True)
            answers = []
            for _ in range(8):
                answers.append(client.predict("linear", x).outputs["logits"])
                time.sleep(0.25)
            client._channel.unsubscribe(states.append)
        assert requests_total(running, "Predict", "OK") == len(answers)
    for logits in answers:
        np.testing.assert_allclose(logits, expected(repo, x), rtol=1e-5)
    ready = [s for s in states if s == grpc.ChannelConnectivity.READY]
    assert len(ready) >= 2, states
