"""The cost model and the lanes against the numpy device (`fake_device.SumDevice`),
whose device calls a test can hold: what is refused before any work, what fills
which lane's room, and the order in which lanes reach the device.

`sum`'s input is (N, 4) and its one method is vanilla: every row costs 4
element-evaluations (1 evaluation × 4 elements).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from salience_server.batching import HEAVY, LIGHT, Batcher
from salience_server.core import InferenceCore
from salience_server.errors import InvalidArgument, QueueFull
from salience_server.explain.options import ExplainOptions, Objective
from salience_server.metrics import Metrics
from salience_server.model_config import ModelConfig, ModelLimits
from salience_server.repository import ModelRepository
from salience_server.settings import Settings
from tests.unit.server.fake_device import SumDevice

WAIT_S = 10.0  # a bound for what must happen, never a figure asserted


def make_core(device: SumDevice, **settings: object) -> InferenceCore:
    core = InferenceCore(None, Settings.load(settings, environ={}), Metrics(CollectorRegistry()))
    core.expect([device.name])
    core.attach(ModelRepository({device.name: {device.version: device}}))  # type: ignore[dict-item]
    core.set_ready(device.name)
    return core


def rows(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def options(weight: float = 1.0) -> ExplainOptions:
    return ExplainOptions(objectives=(Objective(weight=weight),))


def batcher_of(core: InferenceCore) -> Batcher:
    return next(iter(core.batchers.values()))


async def until(condition: Callable[[], bool], what: str) -> None:
    """Lets submitted tasks (and the device thread) run until `condition` holds."""
    for _ in range(int(WAIT_S / 0.001)):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{what} did not happen within {WAIT_S:g} s")


def sample(core: InferenceCore, name: str, **labels: str) -> float:
    value = core.metrics.registry.get_sample_value(name, {"model": "sum", **labels})
    return 0.0 if value is None else value


def test_a_request_over_its_cost_cap_is_refused_before_any_device_work() -> None:
    device = SumDevice()

    async def run() -> None:
        core = make_core(device, max_request_cost=16)
        with pytest.raises(InvalidArgument) as caught:
            await core.predict("sum", 0, {"x": rows(0, 5)})
        assert caught.value.message == (
            "the Predict request costs 20 element-evaluations (5 rows × 4 input elements "
            "per row), over the server's max_request_cost=16: send fewer rows or a smaller "
            "input"
        )
        with pytest.raises(InvalidArgument) as caught:
            await core.explain("sum", 0, {"x": rows(1, 5)}, options())
        assert caught.value.message.startswith(
            "the vanilla request costs 20 element-evaluations (5 rows × 4 input elements "
            "per row), over the server's max_request_cost=16"
        )
        assert sample(core, "salience_request_cost_refused_total", reason="over_cap") == 40
        # At the cap is admitted, and computed right.
        _, outputs = await core.predict("sum", 0, {"x": rows(2, 4)})
        np.testing.assert_allclose(outputs[0], rows(2, 4).sum(axis=1, keepdims=True))
        assert device.calls == [("predict", 4)]
        assert sample(core, "salience_request_cost_admitted_total", lane="light") == 16
        await core.aclose()

    asyncio.run(run())


def test_a_model_lowers_the_cost_caps_and_the_message_says_whose_they_are() -> None:
    device = SumDevice()
    device.config = ModelConfig(limits=ModelLimits(max_request_cost=8, max_map_bytes=8))

    async def run() -> None:
        core = make_core(device)
        with pytest.raises(InvalidArgument) as caught:
            await core.predict("sum", 0, {"x": rows(0, 3)})
        assert "over the model's max_request_cost=8" in caught.value.message
        with pytest.raises(InvalidArgument) as caught:
            await core.explain("sum", 0, {"x": rows(0, 1)}, options())
        # One row: cost 4 fits; its float32 map of 4 elements is 16 bytes.
        assert caught.value.message == (
            "the vanilla request's maps take 16 bytes, over the model's max_map_bytes=8: "
            "send fewer rows, fewer grad_modifiers, a smaller input or output_dtype float16 "
            "or uint8"
        )
        assert device.calls == []
        await core.aclose()

    asyncio.run(run())


def test_a_light_request_goes_before_the_queued_chunks_of_a_heavy_one() -> None:
    device = SumDevice()
    device.gate = threading.Event()

    async def run() -> None:
        # A row costs 4: a heavy explanation of 6 rows (24) goes in 3 calls of 2 rows.
        core = make_core(device, max_call_cost=8, light_request_cost=8)
        heavy = asyncio.create_task(core.explain("sum", 0, {"x": rows(1, 6)}, options(3.0)))
        await until(lambda: len(device.calls) == 1, "the first heavy chunk on the device")
        light = asyncio.create_task(core.predict("sum", 0, {"x": rows(2, 2)}))
        b = batcher_of(core)
        await until(lambda: b.queued == 4 + 2, "the predict queued behind 4 heavy rows")
        assert device.gate is not None
        device.gate.set()
        _, result = await heavy
        _, outputs = await light
        # The predict was the next call, before the heavy rows queued before it.
        assert device.calls == [("explain", 2), ("predict", 2), ("explain", 2), ("explain", 2)]
        np.testing.assert_array_equal(result.maps["absolute"], np.full((6, 4), 3.0, np.float32))
        np.testing.assert_allclose(outputs[0], rows(2, 2).sum(axis=1, keepdims=True))
        assert b.stats.lane_calls == [1, 3]
        assert b.stats.max_heavy_calls_before_light == 0
        await core.aclose()

    asyncio.run(run())


def test_under_a_flood_of_light_work_the_heavy_lane_gets_its_share() -> None:
    device = SumDevice()
    device.gate = threading.Event()

    async def run() -> None:
        # One call per request; every call costs 4, so with a heavy share of 1/4 the
        # light lane takes three calls for each heavy one while both wait.
        core = make_core(
            device, batching=False, max_call_cost=4, light_request_cost=4, heavy_lane_share=0.25
        )
        first = asyncio.create_task(core.predict("sum", 0, {"x": rows(0, 1)}))
        await until(lambda: len(device.calls) == 1, "a predict on the device")
        heavy = asyncio.create_task(core.explain("sum", 0, {"x": rows(1, 4)}, options()))
        await until(lambda: batcher_of(core).queued == 4, "the heavy request queued")
        light = [asyncio.create_task(core.predict("sum", 0, {"x": rows(k, 1)})) for k in range(12)]
        await until(lambda: batcher_of(core).queued == 16, "the light flood queued")
        assert device.gate is not None
        device.gate.set()
        await asyncio.gather(first, heavy, *light)
        kinds = "".join("H" if kind == "explain" else "L" for kind, _ in device.calls)
        # Light first (ties go to it), then one heavy call per three light ones: the
        # heavy request finishes while light work still waits, never starved by it.
        assert kinds == "LL" + "HLLL" * 3 + "HLL"
        await core.aclose()

    asyncio.run(run())


def test_a_heavy_flood_fills_only_the_heavy_lane_and_a_stream_can_wait_for_room() -> None:
    device = SumDevice()
    device.gate = threading.Event()

    async def run() -> None:
        core = make_core(
            device, max_batch_size=4, max_queue_size=4, max_call_cost=4, light_request_cost=4
        )
        heavy = asyncio.create_task(core.explain("sum", 0, {"x": rows(1, 4)}, options()))
        await until(lambda: len(device.calls) == 1, "the first heavy chunk on the device")
        b = batcher_of(core)
        assert b.queued == 3
        with pytest.raises(QueueFull) as caught:
            await core.explain("sum", 0, {"x": rows(2, 2)}, options())
        assert caught.value.message == (
            "model 'sum' is at capacity: 3 samples are queued in its heavy lane and this "
            "request's 2 would pass its max_queue_size=4; retry after a back-off"
        )
        assert sample(core, "salience_request_cost_refused_total", reason="queue_full") == 8
        # The light lane has its own room: a full batch of predicts still queues.
        light = asyncio.create_task(core.predict("sum", 0, {"x": rows(3, 4)}))
        await until(lambda: b.queued == 7, "the predicts queued")
        assert not b.has_room(1, 4, LIGHT)
        assert not b.has_room(2, 8, HEAVY)
        waiting = asyncio.create_task(b.wait_for_room(2, 8, HEAVY))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # nothing has left the queue
        assert device.gate is not None
        device.gate.set()
        await asyncio.wait_for(waiting, WAIT_S)
        _, result = await heavy
        _, outputs = await light
        np.testing.assert_array_equal(result.maps["absolute"], np.ones((4, 4), np.float32))
        np.testing.assert_allclose(outputs[0], rows(3, 4).sum(axis=1, keepdims=True))
        await core.aclose()

    asyncio.run(run())
