"""The protocol layer against a numpy device (`fake_device.SumDevice`): the core's
admission, the batcher's merging, routing, failure isolation and cancellation,
and the servicer over a real gRPC server — all with no TensorFlow in the process
of the last test, which proves the seam is the only way to the device.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from salience_server.core import InferenceCore
from salience_server.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from salience_server.explain.options import ExplainOptions, Objective
from salience_server.metrics import Metrics
from salience_server.repository import ModelRepository
from salience_server.settings import Settings
from tests.unit.server.fake_device import POISON, SumDevice


def make_core(device: SumDevice, **settings: object) -> InferenceCore:
    core = InferenceCore(None, Settings.load(settings, environ={}), Metrics(CollectorRegistry()))
    core.expect([device.name])
    core.attach(ModelRepository({device.name: {device.version: device}}))  # type: ignore[dict-item]
    core.set_ready(device.name)
    return core


def rows(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def test_every_request_gets_its_own_rows_in_shared_device_calls() -> None:
    device = SumDevice()

    async def run() -> None:
        core = make_core(device, max_queue_delay_ms=20.0)
        sizes = [1 + k % 5 for k in range(64)]
        inputs = [rows(k, n) for k, n in enumerate(sizes)]
        answers = await asyncio.gather(*(core.predict("sum", 0, {"x": x}) for x in inputs))
        for x, (_, outputs) in zip(inputs, answers, strict=True):
            np.testing.assert_array_equal(outputs[0], x.sum(axis=1, keepdims=True))
        await core.aclose()
        # Merged: 192 rows in calls of at most 32 (the default device batch).
        assert sum(n for _, n in device.calls) >= sum(sizes)
        assert len(device.calls) < len(sizes)
        assert max(n for _, n in device.calls) <= 32
        # Every call ran on the model's one device thread, never on the loop's.
        assert len(device.threads) == 1
        assert next(iter(device.threads)).startswith("salience-device-sum-1")

    asyncio.run(run())


def test_explanations_carry_their_own_params_and_reuse_their_plans() -> None:
    device = SumDevice()

    async def run() -> None:
        core = make_core(device, max_queue_delay_ms=20.0)
        weights = [0.5, -2.0, 3.0, 0.5]

        async def explain(weight: float, n: int) -> np.ndarray:
            options = ExplainOptions(objectives=(Objective(weight=weight),))
            _, result = await core.explain("sum", 0, {"x": rows(n, n)}, options)
            return result.maps["absolute"]

        cases = [(w, n) for w in weights for n in (1, 3)]
        first = await asyncio.gather(*(explain(w, n) for w, n in cases))
        planned = device.planned
        second = await asyncio.gather(*(explain(w, n) for w, n in cases))
        await core.aclose()
        for (w, n), a, b in zip(cases, first, second, strict=True):
            np.testing.assert_array_equal(a, np.full((n, 4), abs(w), np.float32))
            np.testing.assert_array_equal(b, a)
        # Equal options and batch sizes share a plan; the second round planned nothing.
        assert planned == len({(w, n) for w, n in cases})
        assert device.planned == planned

    asyncio.run(run())


def test_a_sample_the_device_fails_on_fails_only_its_own_request() -> None:
    device = SumDevice()

    async def run() -> list[object]:
        core = make_core(device, max_queue_delay_ms=20.0)
        inputs = [rows(k, 2) for k in range(6)]
        inputs[3][1, 0] = POISON
        results = await asyncio.gather(
            *(core.predict("sum", 0, {"x": x}) for x in inputs), return_exceptions=True
        )
        await core.aclose()
        for k, (x, result) in enumerate(zip(inputs, results, strict=True)):
            if k == 3:
                assert isinstance(result, InvalidArgument)
                assert "poisoned sample" in result.message
            else:
                assert not isinstance(result, BaseException)
                np.testing.assert_array_equal(result[1][0], x.sum(axis=1, keepdims=True))
        return results

    asyncio.run(run())
    # One merged call (12 rows padded to the bucket of 16) failed; then each
    # request was computed alone.
    assert device.calls[0] == ("predict", 16)
    assert sorted(device.calls[1:]) == [("predict", 2)] * 6


def test_a_full_queue_refuses_at_once_and_serves_what_it_admitted() -> None:
    device = SumDevice()

    async def run() -> list[object]:
        core = make_core(device, max_queue_delay_ms=50.0, max_queue_size=8, max_batch_size=4)
        results = await asyncio.gather(
            *(core.predict("sum", 0, {"x": rows(k, 1)}) for k in range(20)),
            return_exceptions=True,
        )
        await core.aclose()
        return results

    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    served = [r for r in results if not isinstance(r, BaseException)]
    assert (len(served), len(refused)) == (8, 12)
    assert "max_queue_size=8" in refused[0].message
    assert device.calls == [("predict", 8)]


def test_a_request_cancelled_or_expired_in_the_queue_never_reaches_the_device() -> None:
    device = SumDevice()

    async def run() -> None:
        core = make_core(device, max_queue_delay_ms=100.0)
        marked = rows(0, 3)
        gone = asyncio.ensure_future(core.predict("sum", 0, {"x": marked}))
        late = asyncio.ensure_future(
            core.predict("sum", 0, {"x": rows(1, 5)}, deadline=time.monotonic() + 0.02)
        )
        await asyncio.sleep(0.005)
        gone.cancel()
        kept = await core.predict("sum", 0, {"x": rows(2, 2)})
        with pytest.raises(asyncio.CancelledError):
            await gone
        with pytest.raises(DeadlineExceeded):
            await late
        np.testing.assert_array_equal(kept[1][0], rows(2, 2).sum(axis=1, keepdims=True))
        await core.aclose()

    asyncio.run(run())
    assert device.calls == [("predict", 2)]


SERVER_WITHOUT_TENSORFLOW = """
import asyncio, importlib, json, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"tensorflow", "keras"}:
            raise ImportError(f"{name} must not be imported above the seam")
sys.meta_path.insert(0, Refuse())

import grpc
import numpy as np
from grpc import aio
from prometheus_client import CollectorRegistry

from salience.v1 import salience_pb2 as pb, salience_pb2_grpc
from salience_client import tensors
from salience_server.core import InferenceCore
from salience_server.errors import ErrorInterceptor
from salience_server.metrics import Metrics
from salience_server.repository import ModelRepository
from salience_server.servicer import SalienceServicer
from salience_server.settings import Settings
from tests.unit.server.fake_device import SumDevice

async def main():
    device = SumDevice()
    core = InferenceCore(None, Settings.load({}, environ={}), Metrics(CollectorRegistry()))
    core.expect(["sum"]); core.attach(ModelRepository({"sum": {1: device}})); core.set_ready("sum")
    server = aio.server(interceptors=[ErrorInterceptor()])
    salience_pb2_grpc.add_SalienceServicer_to_server(SalienceServicer(core), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = salience_pb2_grpc.SalienceStub(channel)
        predicted = await stub.Predict(pb.PredictRequest(
            model=pb.ModelSpec(name="sum"), inputs=[tensors.encode(x, "x")]))
        explained = await stub.Explain(pb.ExplainRequest(
            model=pb.ModelSpec(name="sum"), inputs=[tensors.encode(x, "x")],
            explanation=pb.Explanation(objectives=[pb.Objective(weight=-3.0)])))
        try:
            await stub.Explain(pb.ExplainRequest(
                model=pb.ModelSpec(name="sum"), inputs=[tensors.encode(x, "x")],
                explanation=pb.Explanation(method="gradcam")))
            refused = None
        except aio.AioRpcError as err:
            refused = [err.code().name, err.details()]
    await server.stop(None)
    await core.aclose()
    print(json.dumps({
        "sum": tensors.decode(predicted.outputs[0]).tolist(),
        "map": tensors.decode(explained.maps[0].map).tolist(),
        "refused": refused,
        "tensorflow": "tensorflow" in sys.modules or "keras" in sys.modules,
    }))

asyncio.run(main())
"""


def test_the_servicer_serves_a_numpy_device_with_no_tensorflow_in_the_process() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SERVER_WITHOUT_TENSORFLOW],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["sum"] == [[6.0], [22.0]]
    assert answer["map"] == [[3.0] * 4, [3.0] * 4]
    assert answer["refused"][0] == "INVALID_ARGUMENT"
    assert "explanation.method='gradcam'" in answer["refused"][1]
    assert answer["tensorflow"] is False
