"""The batcher on real tiny Keras models, without gRPC: merged device calls hand each
request exactly its own rows, pad rows never leak, large requests are split and
reassembled, graphs take turns, and full queues, deadlines, cancellations and
failing device calls each affect only the requests they concern.

Batches are held in the queue with a long `max_queue_delay` and released with
`flush()`, so what shares a device call never depends on timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from salience_server.batching import Batcher
from salience_server.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from salience_server.explain.options import ExplainOptions, ExplainResult, Objective
from salience_server.metrics import Metrics
from salience_server.runtime import ModelRuntime
from salience_server.settings import BatchingConfig, Settings, SettingsError

SHAPE = (4, 3)
HOLD = 600.0  # seconds: longer than any test, so only flush() or a full batch sends


@pytest.fixture(scope="module")
def runtime() -> ModelRuntime:
    import keras

    keras.utils.set_random_seed(3)
    x = keras.Input(SHAPE, name="x")
    flat = keras.layers.Flatten(name="flatten")(x)
    hidden = keras.layers.Dense(5, activation="tanh", name="hidden")(flat)
    logits = keras.layers.Dense(4, name="logits")(hidden)
    return ModelRuntime("tiny", 1, keras.Model(x, logits))


def batcher(runtime: ModelRuntime, **config: Any) -> Batcher:
    values: dict[str, Any] = {
        "max_device_batch_size": 8,
        "max_queue_delay": HOLD,
        "buckets": (1, 2, 4, 8),
        "max_queue_size": 64,
        **config,
    }
    return Batcher(runtime, BatchingConfig(**values), Metrics(CollectorRegistry()))


def samples(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, *SHAPE)).astype(np.float32)


def metric(b: Batcher, name: str, **labels: str) -> float:
    value = b._metrics.registry.get_sample_value(name, {"model": "tiny", **labels})
    return 0.0 if value is None else value


async def queued(b: Batcher, rows: int) -> None:
    """Lets submitted tasks run until `rows` samples wait in the queue."""
    for _ in range(1000):
        if b.queued == rows:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{b.queued} samples queued, expected {rows}")


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def assert_explained_alone(
    runtime: ModelRuntime, x: np.ndarray, options: ExplainOptions, got: ExplainResult
) -> None:
    want = runtime.explain([x], options)
    np.testing.assert_allclose(got.outputs[0], want.outputs[0], rtol=1e-5, atol=1e-6)
    assert got.maps.keys() == want.maps.keys()
    for name in want.maps:
        assert got.maps[name].dtype == want.maps[name].dtype
        np.testing.assert_allclose(
            got.maps[name].astype(np.float64),
            want.maps[name].astype(np.float64),
            rtol=1e-5,
            atol=1e-6,
        )
    assert got.resolved == want.resolved


def test_concurrent_predictions_share_calls_and_get_their_own_rows(
    runtime: ModelRuntime,
) -> None:
    sizes = [1, 2, 3, 1, 2, 1]
    xs = [samples(n, seed=k) for k, n in enumerate(sizes)]

    async def test() -> None:
        b = batcher(runtime)
        tasks = [asyncio.create_task(b.predict([x])) for x in xs]
        # The oldest 8 rows fill a device call, which goes at once: 1+2+3+1 and one
        # row of the fifth request. Its other row and the sixth request wait for
        # company until flushed, as the second call.
        await queued(b, 2)
        b.flush()
        results = await asyncio.gather(*tasks)
        for x, outputs in zip(xs, results, strict=True):
            np.testing.assert_allclose(outputs[0], runtime.predict([x])[0], rtol=1e-5, atol=1e-6)
        assert (b.stats.calls, b.stats.samples, b.stats.padding, b.stats.pieces) == (2, 10, 0, 7)
        assert b.stats.max_requests_per_call == 5
        assert metric(b, "salience_batch_size_sum") == 10
        assert metric(b, "salience_batch_size_count") == 2
        assert metric(b, "salience_queue_wait_seconds_count") == len(sizes)
        assert metric(b, "salience_queue_depth") == 0
        await b.aclose()

    run(test)


def test_pad_rows_never_reach_a_caller(runtime: ModelRuntime) -> None:
    xs = [samples(1, seed=10 + k) for k in range(3)]
    options = ExplainOptions(objectives=(Objective(filter_indices=(1,)),))

    async def test() -> None:
        b = batcher(runtime, buckets=(4, 8))
        plans = [runtime.plan(options, 1) for _ in xs]
        tasks = [asyncio.create_task(b.explain([x], p)) for x, p in zip(xs, plans, strict=True)]
        await queued(b, 3)
        b.flush()
        results = await asyncio.gather(*tasks)
        assert (b.stats.calls, b.stats.samples, b.stats.padding) == (1, 3, 1)
        for x, result in zip(xs, results, strict=True):
            assert result.maps["absolute"].shape == (1, 4)
            assert_explained_alone(runtime, x, options, result)
        await b.aclose()

    run(test)


def test_a_request_larger_than_a_device_call_is_split_and_reassembled(
    runtime: ModelRuntime,
) -> None:
    big, small = samples(7, seed=20), samples(2, seed=21)
    big_options = ExplainOptions(
        objectives=(Objective(filter_indices=(0, 3)),), grad_modifiers=("none", "relu")
    )
    small_options = ExplainOptions(
        objectives=(Objective(filter_indices=(2,), weight=-0.5),),
        normalize=False,
        output_dtype="float16",
    )

    async def test() -> None:
        b = batcher(runtime, max_device_batch_size=3, buckets=(1, 2, 3))
        first = asyncio.create_task(b.explain([big], runtime.plan(big_options, 7)))
        second = asyncio.create_task(b.explain([small], runtime.plan(small_options, 2)))
        # Equal graphs (the options differ in params and post-processing only), so
        # full calls of the oldest rows: big's 0-2, 3-5, then its row 6 with small's two.
        big_result, small_result = await asyncio.gather(first, second)
        assert (b.stats.calls, b.stats.samples, b.stats.padding) == (3, 9, 0)
        assert big_result.maps["none"].shape == (7, 4)
        assert_explained_alone(runtime, big, big_options, big_result)
        assert_explained_alone(runtime, small, small_options, small_result)
        await b.aclose()

    run(test)


def test_other_graphs_wait_their_turn_and_a_full_batch_does_not_wait(
    runtime: ModelRuntime,
) -> None:
    logits = ExplainOptions(objectives=(Objective(filter_indices=(1,)),))
    hidden = ExplainOptions(objectives=(Objective(layer="hidden", filter_indices=(0,)),))
    assert runtime.plan(logits, 1).graph != runtime.plan(hidden, 1).graph
    xs = [samples(1, seed=30 + k) for k in range(3)]

    async def test() -> None:
        b = batcher(runtime, max_device_batch_size=2, buckets=(1, 2))
        # The oldest request waits for company; the two of another graph fill a
        # device call, which goes at once.
        oldest = asyncio.create_task(b.explain([xs[0]], runtime.plan(hidden, 1)))
        full = [asyncio.create_task(b.explain([x], runtime.plan(logits, 1))) for x in xs[1:]]
        results = await asyncio.gather(*full)
        assert not oldest.done()
        assert b.queued == 1
        b.flush()
        assert_explained_alone(runtime, xs[0], hidden, await oldest)
        for x, result in zip(xs[1:], results, strict=True):
            assert_explained_alone(runtime, x, logits, result)
        assert b.stats.calls == 2
        await b.aclose()

    run(test)


def test_the_oldest_graph_goes_first(runtime: ModelRuntime) -> None:
    a = ExplainOptions(objectives=(Objective(filter_indices=(1,)),))
    other = ExplainOptions(objectives=(Objective(layer="hidden"),))

    async def test() -> None:
        b = batcher(runtime)
        done: list[str] = []
        plans = [("a1", a), ("other", other), ("a2", a)]
        tasks = []
        for name, options in plans:
            task = asyncio.create_task(b.explain([samples(1, seed=40)], runtime.plan(options, 1)))
            task.add_done_callback(lambda _, name=name: done.append(name))
            tasks.append(task)
        await queued(b, 3)
        b.flush()
        await asyncio.gather(*tasks)
        assert sorted(done[:2]) == ["a1", "a2"]
        assert done[2] == "other"
        assert b.stats.calls == 2
        await b.aclose()

    run(test)


def test_with_batching_off_every_device_call_has_one_request(runtime: ModelRuntime) -> None:
    sizes = [1, 3, 10, 2]
    xs = [samples(n, seed=50 + k) for k, n in enumerate(sizes)]

    async def test() -> None:
        b = batcher(runtime, enabled=False, max_device_batch_size=4, buckets=(1, 2, 4))
        results = await asyncio.gather(*(b.predict([x]) for x in xs))
        for x, outputs in zip(xs, results, strict=True):
            np.testing.assert_allclose(outputs[0], runtime.predict([x])[0], rtol=1e-5, atol=1e-6)
        # 1, 3, then 10 as 4+4+2, then 2: six calls of one request each.
        assert (b.stats.calls, b.stats.samples, b.stats.max_requests_per_call) == (6, 16, 1)
        assert b.stats.padding == 1  # the 3-row call padded to 4
        await b.aclose()

    run(test)


def test_a_full_queue_refuses_at_once(runtime: ModelRuntime) -> None:
    async def test() -> None:
        b = batcher(runtime, max_queue_size=4)
        held = [asyncio.create_task(b.predict([samples(2, seed=k)])) for k in range(2)]
        await queued(b, 4)
        with pytest.raises(ResourceExhausted) as caught:
            await b.predict([samples(1, seed=9)])
        assert caught.value.message == (
            "model 'tiny' is at capacity: 4 samples are queued and this request's 1 would "
            "pass its max_queue_size=4; retry after a back-off"
        )
        assert not any(t.done() for t in held)
        assert metric(b, "salience_requests_refused_total", reason="queue_full") == 1
        b.flush()
        assert [len(r[0]) for r in await asyncio.gather(*held)] == [2, 2]
        assert b.stats.samples == 4
        await b.aclose()

    run(test)


def test_expired_and_cancelled_requests_never_reach_the_device(runtime: ModelRuntime) -> None:
    import time

    async def test() -> None:
        b = batcher(runtime)
        with pytest.raises(DeadlineExceeded, match="deadline passed before model 'tiny'"):
            await b.predict([samples(1, seed=1)], deadline=time.monotonic() - 1)
        cancelled = asyncio.create_task(b.predict([samples(3, seed=3)]))
        kept_x = samples(1, seed=4)
        kept = asyncio.create_task(b.predict([kept_x]))
        await queued(b, 4)
        cancelled.cancel()
        expiring = asyncio.create_task(
            b.predict([samples(2, seed=2)], deadline=time.monotonic() + 0.05)
        )
        with pytest.raises(DeadlineExceeded, match="while the request waited for model 'tiny'"):
            await expiring
        await queued(b, 1)
        b.flush()
        np.testing.assert_allclose((await kept)[0], runtime.predict([kept_x])[0], rtol=1e-5)
        assert cancelled.cancelled()
        assert (b.stats.calls, b.stats.samples) == (1, 1)
        assert metric(b, "salience_requests_refused_total", reason="deadline_exceeded") == 2
        assert metric(b, "salience_requests_refused_total", reason="cancelled") == 1
        await b.aclose()

    run(test)


@pytest.fixture(scope="module")
def fragile() -> ModelRuntime:
    """Fails its device call for a sample with a value over 100 (a TF assertion),
    and runs out of memory for a sample whose first value is over 10.
    """
    import keras
    import tensorflow as tf

    class Fragile(keras.layers.Layer):
        def call(self, x: Any) -> Any:
            checked = tf.debugging.assert_less(
                tf.reduce_max(x), tf.constant(100.0), message="over 100"
            )
            with tf.control_dependencies([checked]):
                # 2**42 floats (16 TiB) when any first value is over 10.
                n = tf.cast(tf.reduce_max(x[:, 0]) > 10, tf.int64) * (2**42)
                hog = tf.zeros(tf.reshape(n, [1]))
                return x * 2.0 + tf.reduce_sum(hog[:1]) * 0.0

    x = keras.Input((3,), name="x")
    return ModelRuntime("fragile", 1, keras.Model(x, Fragile(name="fragile")(x)))


def test_a_failing_device_call_fails_only_the_request_at_fault(fragile: ModelRuntime) -> None:
    async def test() -> None:
        b = batcher(fragile)
        good = np.ones((1, 3), np.float32)
        bad = asyncio.create_task(b.predict([np.full((1, 3), 500.0, np.float32)]))
        neighbour = asyncio.create_task(b.predict([good]))
        await queued(b, 2)
        b.flush()
        # The merged call fails; computed again one request at a time, only the bad one does.
        with pytest.raises(InvalidArgument, match="over 100"):
            await bad
        np.testing.assert_array_equal((await neighbour)[0], 2 * good)
        assert b.stats.calls == 1  # one call dispatched, then its requests alone
        later = asyncio.create_task(b.predict([good]))
        await queued(b, 1)
        b.flush()
        np.testing.assert_array_equal((await later)[0], 2 * good)
        await b.aclose()

    run(test)


def test_out_of_device_memory_is_resource_exhausted(fragile: ModelRuntime) -> None:
    async def test() -> None:
        b = batcher(fragile, max_queue_delay=0.0)
        with pytest.raises(ResourceExhausted) as caught:
            await b.predict([np.full((2, 3), 50.0, np.float32)])
        assert caught.value.message == (
            "device out of memory while computing model 'fragile': retry later or with "
            "fewer samples"
        )
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        np.testing.assert_array_equal((await b.predict([x]))[0], 2 * x)
        await b.aclose()

    run(test)


def test_drain_sends_what_is_queued_and_refuses_new_requests(runtime: ModelRuntime) -> None:
    async def test() -> None:
        b = batcher(runtime)
        xs = [samples(1, seed=60 + k) for k in range(3)]
        tasks = [asyncio.create_task(b.predict([x])) for x in xs]
        await queued(b, 3)
        b.drain()
        with pytest.raises(Unavailable, match="model 'tiny' is shutting down"):
            await b.predict([xs[0]])
        for x, outputs in zip(xs, await asyncio.gather(*tasks), strict=True):
            np.testing.assert_allclose(outputs[0], runtime.predict([x])[0], rtol=1e-5, atol=1e-6)
        await b.aclose()
        assert b.stats.calls == 1

    run(test)


# Settings ----------------------------------------------------------------------


def test_batching_settings_default_to_powers_of_two_up_to_the_device_batch() -> None:
    config = Settings().batching_for("any")
    assert config == BatchingConfig(
        enabled=True,
        max_device_batch_size=32,
        max_queue_delay=0.0,
        buckets=(1, 2, 4, 8, 16, 32),
        max_queue_size=256,
    )
    assert [config.bucket(n) for n in (1, 3, 5, 17, 32)] == [1, 4, 8, 32, 32]
    custom = Settings(max_device_batch_size=24, batch_buckets=(6, 12)).batching_for("any")
    assert custom.buckets == (6, 12, 24)


def test_batching_settings_parse_from_flags_and_environment() -> None:
    settings = Settings.load(
        {"batching": "off", "batch_buckets": "1,8, 16", "max_device_batch_size": "16"},
        environ={"SALIENCE_MAX_QUEUE_DELAY_MS": "0.5"},
    )
    assert settings.batching is False
    assert settings.batch_buckets == (1, 8, 16)
    assert settings.max_queue_delay_ms == 0.5


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batching": "maybe"}, "--batching='maybe' is not a boolean: use true or false"),
        ({"batch_buckets": "1,x"}, "--batch-buckets='1,x' is not a comma-separated list"),
        ({"batch_buckets": "64"}, "batch_buckets has 64, outside 1..max_device_batch_size=32"),
        ({"max_queue_size": "10"}, "max_queue_size=10 is below max_batch_size=64"),
        ({"max_queue_delay_ms": "-1"}, "max_queue_delay_ms=-1.0 is out of range"),
        ({"max_device_batch_size": "0"}, "max_device_batch_size=0 must be at least 1"),
    ],
)
def test_bad_batching_settings_stop_start_up(values: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.load(values, environ={})
    assert message in str(caught.value)
