"""ExplainStream through a real server: frames answered in order, each equal to the
unary Explain of that frame, batched on the device; the window holds the reading
back; a bad frame ends the stream naming it; cancelling frees the server at once.

The model is `smooth` (a float64 conv net with tanh/softplus), whose maps depend on
the input, so an answer matched to the wrong frame could not pass for the right one.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc import aio

from salience.v1 import salience_pb2 as pb
from salience.v1 import salience_pb2_grpc
from salience_client import SalienceError, tensors
from salience_client.aio import AsyncSalienceClient
from salience_client.stream import explain_stream_async
from tests.conftest import RunningServer, running_server
from tests.integration.models import LINEAR_SHAPE, SMOOTH_SHAPE, build_repository

FRAMES = 1000
MODIFIERS = ["none", "negate", "small_values"]
OPTIONS: dict[str, Any] = {"filter_indices": [1], "grad_modifiers": MODIFIERS}
HOLD_MS = 60_000.0  # batches of the held server go only when flushed (or full)
WAIT_S = 30.0  # the longest a condition polled below may take to come true


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("stream-repo"))


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    with running_server(repo) as running:
        yield running


@pytest.fixture(scope="module")
def held(repo: Path) -> Iterator[RunningServer]:
    """A server whose batches wait for a flush: what is in flight stays put."""
    with running_server(repo, max_queue_delay_ms=HOLD_MS) as running:
        yield running


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *SMOOTH_SHAPE))


def sample(running: RunningServer, name: str, **labels: str) -> float:
    value = running.server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def batcher(running: RunningServer, model: str) -> Any:
    """The model's batcher (made now if no request made it yet)."""
    core = running.server.core

    async def make() -> Any:
        return core.batcher(core.runtime(model))

    return running.call(make())


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {WAIT_S:g} s")
        time.sleep(0.02)


def stream_tasks(running: RunningServer) -> list[str]:
    """Names of the tasks of ExplainStream calls alive on the server's loop."""

    async def names() -> list[str]:
        return [t.get_name() for t in asyncio.all_tasks() if "stream" in t.get_name()]

    result: list[str] = running.call(names())
    return result


def in_flight(running: RunningServer) -> float:
    return sample(running, "salience_requests_in_flight", rpc="ExplainStream")


# In order, equal to unary, batched --------------------------------------------------


def test_frames_come_back_in_order_equal_to_unary_and_batched(server: RunningServer) -> None:
    x = frames(FRAMES)
    with server.client() as client:
        stats = batcher(server, "smooth").stats
        calls_before, samples_before = stats.calls, stats.samples
        size_count = sample(server, "salience_batch_size_count", model="smooth")
        size_ones = sample(server, "salience_batch_size_bucket", model="smooth", le="1.0")
        answers = list(
            client.explain_stream("smooth", ((k, x[k]) for k in range(FRAMES)), **OPTIONS)
        )
        # Every frame, in order, tagged with the very id it was sent with.
        assert [frame_id for frame_id, _ in answers] == list(range(FRAMES))
        # Each answer's prediction is its own frame's: the model run on all frames at once.
        streamed = np.concatenate([result.outputs["out"] for _, result in answers])
        stats_after_stream = (stats.calls, stats.samples)
        predicted = np.concatenate(
            [client.predict("smooth", x[k : k + 50]).outputs["out"] for k in range(0, FRAMES, 50)]
        )
        np.testing.assert_allclose(streamed, predicted, rtol=1e-10, atol=1e-12)
        # Every 50th frame: the whole answer equals the unary Explain of that frame.
        for k in range(0, FRAMES, 50):
            unary = client.explain("smooth", x[k : k + 1], **OPTIONS)
            result = answers[k][1]
            assert list(result.maps) == MODIFIERS
            for name in MODIFIERS:
                assert result.maps[name].shape == (1, *SMOOTH_SHAPE[:2])
                np.testing.assert_allclose(
                    result.maps[name], unary.maps[name], rtol=1e-5, atol=1e-6
                )
            np.testing.assert_allclose(result.outputs["out"], unary.outputs["out"], rtol=1e-12)
            assert result.model_version == unary.model_version == 1
            assert list(result.resolved.grad_modifiers) == MODIFIERS
            assert [list(o.filter_indices) for o in result.resolved.objectives] == [[1]]
    # The frames reached the device together: each computed once, in fewer calls than
    # frames, some calls holding several of them (how many depends on how fast the
    # device is against the frames' planning; the held server below shows it exactly).
    calls, samples = stats_after_stream
    assert samples - samples_before == FRAMES
    assert calls - calls_before < FRAMES
    assert stats.max_requests_per_call > 1
    calls_of_many = (sample(server, "salience_batch_size_count", model="smooth") - size_count) - (
        sample(server, "salience_batch_size_bucket", model="smooth", le="1.0") - size_ones
    )
    assert calls_of_many > 0
    # One stream is one call, answered OK, its request sizes summed over its messages.
    assert (
        sample(
            server,
            "salience_requests_total",
            rpc="ExplainStream",
            model="smooth",
            method="vanilla",
            code="OK",
        )
        >= 1
    )
    assert in_flight(server) == 0


def test_request_and_response_bytes_are_summed_over_the_stream(server: RunningServer) -> None:
    x = np.random.default_rng(1).normal(size=(3, *LINEAR_SHAPE)).astype(np.float32)
    requests = [
        pb.ExplainStreamRequest(
            frame_id=f"f{k}",
            inputs=[tensors.encode(x[k : k + 1])],
            model=pb.ModelSpec(name="linear") if k == 0 else None,
        )
        for k in range(3)
    ]
    count = sample(server, "salience_request_bytes_count", rpc="ExplainStream")
    total = sample(server, "salience_request_bytes_sum", rpc="ExplainStream")
    sent = sum(r.ByteSize() for r in requests)
    with grpc.insecure_channel(server.target) as channel:
        stub = salience_pb2_grpc.SalienceStub(channel)
        responses = list(stub.ExplainStream(iter(requests), timeout=30))
    assert [r.frame_id for r in responses] == ["f0", "f1", "f2"]
    received = sum(r.ByteSize() for r in responses)
    assert sample(server, "salience_request_bytes_count", rpc="ExplainStream") == count + 1
    assert sample(server, "salience_request_bytes_sum", rpc="ExplainStream") == total + sent
    assert sample(server, "salience_response_bytes_sum", rpc="ExplainStream") >= received


def test_async_stream_takes_async_frames(server: RunningServer) -> None:
    x = frames(40, seed=3)

    async def run() -> list[tuple[Any, Any]]:
        async def source() -> Any:
            for k in range(len(x)):
                yield f"cam-{k}", {"x": x[k]}

        async with AsyncSalienceClient(server.target) as client:
            return [a async for a in client.explain_stream("smooth", source(), **OPTIONS)]

    answers = asyncio.run(run())
    assert [frame_id for frame_id, _ in answers] == [f"cam-{k}" for k in range(len(x))]
    with server.client() as client:
        unary = client.explain("smooth", x, **OPTIONS)
    for k, (_, result) in enumerate(answers):
        for name in MODIFIERS:
            np.testing.assert_allclose(
                result.maps[name][0], unary.maps[name][k], rtol=1e-5, atol=1e-6
            )


# Errors --------------------------------------------------------------------------


def test_a_bad_frame_ends_the_stream_after_every_frame_before_it(server: RunningServer) -> None:
    x = frames(12, seed=4)
    pairs: list[tuple[Any, Any]] = [(f"t{k}", x[k]) for k in range(12)]
    pairs[9] = ("t9", x[9][:, :3])  # a frame of the wrong width
    got: list[Any] = []

    def consume(client: Any) -> None:
        for frame_id, _ in client.explain_stream("smooth", pairs, **OPTIONS):
            got.append(frame_id)

    with server.client() as client, pytest.raises(SalienceError) as caught:
        consume(client)
    assert got == [f"t{k}" for k in range(9)]
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details.startswith("frame_id='t9' (message 9 of the stream): ")
    assert "shape" in caught.value.details
    assert in_flight(server) == 0


def test_first_message_errors_name_the_frame(server: RunningServer) -> None:
    x = frames(2, seed=5)
    with server.client() as client:
        with pytest.raises(SalienceError) as caught:
            list(client.explain_stream("nope", [("a", x[0])]))
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        assert caught.value.details.startswith("frame_id='a' (message 0 of the stream): ")
        assert "model.name='nope' is not served" in caught.value.details
        with pytest.raises(SalienceError) as caught:
            list(client.explain_stream("smooth", [("a", x[0])], method="nope"))
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "explanation.method='nope' is unknown" in caught.value.details


def test_options_after_the_first_message_are_refused(server: RunningServer) -> None:
    x = frames(3, seed=6)
    requests = [
        pb.ExplainStreamRequest(
            frame_id=str(k),
            inputs=[tensors.encode(x[k : k + 1])],
            model=pb.ModelSpec(name="smooth"),
        )
        for k in range(3)
    ]
    with grpc.insecure_channel(server.target) as channel:
        stub = salience_pb2_grpc.SalienceStub(channel)
        call = stub.ExplainStream(iter(requests), timeout=30)
        first = next(call)
        assert first.frame_id == "0"
        with pytest.raises(grpc.RpcError) as caught:
            next(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "frame_id='1' (message 1 of the stream): model is set on message 1 of the stream: "
        "only the first message names the model and the explanation options; leave them "
        "unset after it"
    )


def test_bytes_that_are_no_message_end_the_stream_with_invalid_argument(
    server: RunningServer,
) -> None:
    x = frames(2, seed=8)
    first = pb.ExplainStreamRequest(
        frame_id="0", inputs=[tensors.encode(x[:1])], model=pb.ModelSpec(name="smooth")
    ).SerializeToString()
    # A field header announcing 100 bytes of a length-delimited field, then 2 bytes.
    garbage = b"\x0a\x64ab"
    with grpc.insecure_channel(server.target) as channel:
        # No serialisers: the messages go as the bytes given.
        call = channel.stream_stream("/salience.v1.Salience/ExplainStream")(
            iter([first, garbage]), timeout=30
        )
        answer = pb.ExplainStreamResponse.FromString(next(call))
        assert answer.frame_id == "0"
        with pytest.raises(grpc.RpcError) as caught:
            next(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in (caught.value.details() or "")
    # The server goes on answering streams.
    with server.client() as client:
        answers = list(client.explain_stream("smooth", [("a", x[1])]))
    assert [frame_id for frame_id, _ in answers] == ["a"]
    np.testing.assert_allclose(
        answers[0][1].maps["absolute"][0], client_map(server, x[1:2]), rtol=1e-5, atol=1e-6
    )


def client_map(server: RunningServer, x: np.ndarray) -> np.ndarray:
    with server.client() as client:
        return np.asarray(client.explain("smooth", x).maps["absolute"][0])


def test_an_unexpected_failure_is_internal_and_leaks_nothing(server: RunningServer) -> None:
    runtime = server.server.core.repository.get("softmax")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret path /opt/models/weights.bin")

    runtime.compute = broken
    x = np.ones((2, *LINEAR_SHAPE), np.float32)
    with server.client() as client, pytest.raises(SalienceError) as caught:
        list(client.explain_stream("softmax", [(0, x[0]), (1, x[1])]))
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert "secret" not in caught.value.details
    assert "ExplainStream" in caught.value.details
    assert in_flight(server) == 0


def test_an_error_of_the_callers_frames_is_raised_to_the_caller(server: RunningServer) -> None:
    def source() -> Iterator[tuple[int, np.ndarray]]:
        yield 0, frames(1, seed=7)[0]
        raise OSError("camera unplugged")

    with server.client() as client, pytest.raises(OSError, match="camera unplugged"):
        list(client.explain_stream("smooth", source(), **OPTIONS))
    wait_until(lambda: in_flight(server) == 0, "the stream's end")


def test_an_error_of_async_frames_is_raised_to_the_caller(server: RunningServer) -> None:
    x = frames(1, seed=10)

    async def run() -> list[Any]:
        async def source() -> Any:
            yield "a", x[0]
            raise OSError("camera unplugged")

        got = []
        # The module's function over a raw asyncio stub (what the client's method wraps).
        async with aio.insecure_channel(server.target) as channel:
            stub = salience_pb2_grpc.SalienceStub(channel)
            async for frame_id, _ in explain_stream_async(stub, "smooth", source(), **OPTIONS):
                got.append(frame_id)
        return got

    with pytest.raises(OSError, match="camera unplugged"):
        asyncio.run(run())
    wait_until(lambda: in_flight(server) == 0, "the stream's end")


# Window and cancellation ------------------------------------------------------------


def test_the_window_holds_reading_back_until_answers_leave(held: RunningServer) -> None:
    """Nothing is computed until flushed, so exactly the window is read and queued."""
    window = 4  # a batch bucket: the flushed window goes in one device call, unpadded
    x = np.random.default_rng(8).normal(size=(1, *LINEAR_SHAPE)).astype(np.float32)
    endless = ((k, x[0]) for k in itertools.count())
    refused = sample(held, "salience_requests_refused_total", model="linear", reason="cancelled")
    queue = batcher(held, "linear")
    with held.client() as client:
        calls, samples = queue.stats.calls, queue.stats.samples
        answers = client.explain_stream("linear", endless, window=window)
        got: list[int] = []

        def take() -> None:
            got.append(next(answers)[0])

        # The stream starts with the first `next`, whose answer waits for a flush.
        first = threading.Thread(target=take)
        first.start()
        # The server reads no further than the window, however many frames are offered.
        wait_until(lambda: queue.queued == window, "a full window")
        time.sleep(0.3)  # room for a wrongly read extra frame to show up
        assert queue.queued == window
        held.loop.call_soon_threadsafe(queue.flush)
        first.join(WAIT_S)
        # The window's frames were computed in one device call, then the next window read.
        wait_until(lambda: queue.queued == window, "the next window")
        assert queue.stats.calls == calls + 1
        assert queue.stats.samples == samples + window
        for _ in range(window - 1):
            take()
        assert got == list(range(window))
        answers.close()  # cancels the stream: the queued window never reaches the device
        wait_until(lambda: in_flight(held) == 0, "the cancelled stream's end")
    wait_until(lambda: queue.queued == 0, "the queue to empty")
    assert queue.stats.calls == calls + 1
    assert (
        sample(held, "salience_requests_refused_total", model="linear", reason="cancelled")
        == refused + window
    )
    assert stream_tasks(held) == []


def test_cancelling_mid_stream_frees_the_server(server: RunningServer) -> None:
    x = frames(1, seed=9)
    sent: list[int] = []

    def endless() -> Iterator[tuple[int, np.ndarray]]:
        for k in itertools.count():
            sent.append(k)
            yield k, x[0]

    cancelled = sample(
        server,
        "salience_requests_total",
        rpc="ExplainStream",
        model="smooth",
        method="vanilla",
        code="CANCELLED",
    )
    queue = batcher(server, "smooth")
    samples = queue.stats.samples
    with server.client() as client:
        answers = client.explain_stream("smooth", endless(), **OPTIONS)
        got = [frame_id for frame_id, _ in itertools.islice(answers, 20)]
        assert got == list(range(20))
        answers.close()
        wait_until(lambda: in_flight(server) == 0, "the cancelled stream's end")
    assert stream_tasks(server) == []
    wait_until(lambda: queue.queued == 0, "the queue to empty")
    computed = queue.stats.samples
    # Only frames that were read reached the device (how many depends on how far the
    # server ran ahead of the client's reading, which the window bounds)...
    assert 20 <= computed - samples <= len(sent)
    # ...and none does after the stream ended.
    time.sleep(0.3)  # room for a device call of the stream's that should not happen
    assert queue.stats.samples == computed
    assert (
        sample(
            server,
            "salience_requests_total",
            rpc="ExplainStream",
            model="smooth",
            method="vanilla",
            code="CANCELLED",
        )
        == cancelled + 1
    )


def test_one_connection_holds_at_most_max_concurrent_streams(repo: Path) -> None:
    x = frames(1, seed=9)
    first = pb.ExplainStreamRequest(
        frame_id="0", inputs=[tensors.encode(x)], model=pb.ModelSpec(name="smooth")
    )
    release = threading.Event()

    def open_frames() -> Iterator[pb.ExplainStreamRequest]:
        yield first
        release.wait(60)  # the stream stays open until released

    predict = pb.PredictRequest(model=pb.ModelSpec(name="smooth"), inputs=[tensors.encode(x)])
    with (
        running_server(repo, max_concurrent_streams=2) as limited,
        grpc.insecure_channel(limited.target) as channel,
    ):
        stub = salience_pb2_grpc.SalienceStub(channel)
        streams = [stub.ExplainStream(open_frames(), timeout=60) for _ in range(2)]
        try:
            # Both streams are open: each has answered its first frame.
            assert [next(call).frame_id for call in streams] == ["0", "0"]
            # A third call on the same connection gets no stream until one ends.
            with pytest.raises(grpc.RpcError) as caught:
                stub.Predict(predict, timeout=2)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # Another connection is not held back by this one's limit.
            with limited.client() as other:
                expected = other.predict("smooth", x).predictions
        finally:
            release.set()
        for call in streams:
            assert list(call) == []  # the rest of each stream: nothing more, then OK
            assert call.code() == grpc.StatusCode.OK
        # With the streams ended, the connection takes calls again.
        answer = stub.Predict(predict, timeout=30)
        np.testing.assert_allclose(tensors.decode(answer.outputs[0]), expected, rtol=1e-6)
