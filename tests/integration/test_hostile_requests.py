"""Requests an attacker would send, against a real server: ExplainStream frames with
zero rows, streams cancelled while the server writes to them, and numeric
parameters at and beyond the ranges of their wire types, in both APIs.

Each test reproduced its finding before the fix: empty frames were accepted without
bound (they counted as zero samples of the stream's window), a cancelled stream was
sometimes counted INTERNAL with an ERROR traceback in the log, and the OIP
parameter `filter_indices` of 2**63 was answered INTERNAL echoing a ValueError.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from inference.v2 import grpc_service_pb2 as oip
from inference.v2 import grpc_service_pb2_grpc
from salience.v1 import salience_pb2 as pb
from salience.v1 import salience_pb2_grpc
from salience_client import tensors
from tests.conftest import RunningServer, running_server
from tests.integration.models import LINEAR_SHAPE, SMOOTH_SHAPE, build_repository

EMPTY_FRAMES = 20_000
CANCEL_TRIES = 10
HOLD_MS = 60_000.0  # batches of the held server go only when flushed
WAIT_S = 30.0


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("hostile-repo"))


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    with running_server(repo) as running:
        yield running


@pytest.fixture(scope="module")
def held(repo: Path) -> Iterator[RunningServer]:
    """A server whose batches wait for a flush: a head frame stays unanswered."""
    with running_server(repo, max_queue_delay_ms=HOLD_MS) as running:
        yield running


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {WAIT_S:g} s")
        time.sleep(0.02)


def _tasks(running: RunningServer, name: str) -> int:
    async def count() -> int:
        return sum(1 for t in asyncio.all_tasks() if t.get_name() == name)

    result: int = running.call(count())
    return result


def stream_readers(running: RunningServer) -> int:
    """ExplainStream reader tasks alive on the server's loop."""
    return _tasks(running, "salience-stream-reader")


def stream_frames(running: RunningServer) -> int:
    """ExplainStream frame tasks alive on the server's loop."""
    return _tasks(running, "salience-stream-frame")


def sample(running: RunningServer, name: str, **labels: str) -> float:
    value = running.server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def frame(frame_id: str, x: np.ndarray, first: bool = False) -> pb.ExplainStreamRequest:
    request = pb.ExplainStreamRequest(frame_id=frame_id, inputs=[tensors.encode(x)])
    if first:
        request.model.name = "smooth"
        request.explanation.objectives.add(filter_indices=[1])
    return request


# Finding 2: zero-row frames ---------------------------------------------------------


def test_a_zero_row_frame_ends_the_stream_at_once_naming_it(held: RunningServer) -> None:
    """Behind a head frame that is not answered yet (its batch waits for a flush), the
    first empty frame stops the reading: the server takes no further message.
    """
    x = np.random.default_rng(0).normal(size=(1, *SMOOTH_SHAPE))
    empty = np.zeros((0, *SMOOTH_SHAPE))
    sent = [frame("head", x, first=True), *(frame(f"empty-{k}", empty) for k in range(3))]
    read_before = sample(held, "salience_request_bytes_sum", rpc="ExplainStream")

    def messages() -> Iterator[pb.ExplainStreamRequest]:
        yield from sent
        for k in range(3, EMPTY_FRAMES):
            yield frame(f"empty-{k}", empty)

    answered: list[str] = []
    errors: list[grpc.RpcError] = []

    def consume() -> None:
        with grpc.insecure_channel(held.target) as channel:
            stub = salience_pb2_grpc.SalienceStub(channel)
            try:
                for answer in stub.ExplainStream(messages(), timeout=120):
                    answered.append(answer.frame_id)
            except grpc.RpcError as err:
                errors.append(err)

    thread = threading.Thread(target=consume)
    thread.start()
    # The reader ends once it stops reading (before the fix: at the client's end).
    wait_for(lambda: stream_readers(held) == 0 and stream_frames(held) > 0, "the reader's end")
    held.flush()
    thread.join(60)
    # The frame before it is answered; the empty one ends the stream, named.
    assert answered == ["head"]
    assert [e.code() for e in errors] == [grpc.StatusCode.INVALID_ARGUMENT]
    assert errors[0].details() == (
        "frame_id='empty-0' (message 1 of the stream): inputs[0] has 0 rows: every frame "
        "carries at least one sample (a batch axis of size 1 or more)"
    )
    # The server read exactly the head and the first empty frame.
    read = sample(held, "salience_request_bytes_sum", rpc="ExplainStream") - read_before
    assert read == sent[0].ByteSize() + sent[1].ByteSize()
    assert sample(held, "salience_requests_in_flight", rpc="ExplainStream") == 0


def test_a_zero_row_first_frame_is_refused_too(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = salience_pb2_grpc.SalienceStub(channel)
        call = stub.ExplainStream(iter([frame("a", np.zeros((0, *SMOOTH_SHAPE)), True)]))
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(
        "frame_id='a' (message 0 of the stream): inputs[0] has 0 rows"
    )


# Finding 4: a stream cancelled while the server writes to it --------------------------


def test_a_stream_cancelled_while_written_is_cancelled_never_internal(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    x = np.random.default_rng(1).normal(size=(1, *SMOOTH_SHAPE))
    before = sample(
        server, "salience_requests_total", rpc="ExplainStream", model="smooth",
        method="vanilla", code="INTERNAL",
    )  # fmt: skip
    cancelled_before = sample(
        server, "salience_requests_total", rpc="ExplainStream", model="smooth",
        method="vanilla", code="CANCELLED",
    )  # fmt: skip
    caplog.set_level(logging.WARNING, logger="salience_server")
    with grpc.insecure_channel(server.target) as channel:
        stub = salience_pb2_grpc.SalienceStub(channel)
        for _ in range(CANCEL_TRIES):
            stop = threading.Event()

            def messages(stop: threading.Event = stop) -> Iterator[pb.ExplainStreamRequest]:
                yield frame("0", x, first=True)
                k = 1
                while not stop.is_set():
                    yield frame(str(k), x)
                    k += 1

            call = stub.ExplainStream(messages(), timeout=60)
            # Cancelled as soon as answers flow: the server is writing the next ones.
            for count, _ in enumerate(call, start=1):
                if count == 20:
                    call.cancel()
                    break
            stop.set()
            assert call.code() == grpc.StatusCode.CANCELLED
    server.call(_settled(server))
    internal = sample(
        server, "salience_requests_total", rpc="ExplainStream", model="smooth",
        method="vanilla", code="INTERNAL",
    )  # fmt: skip
    cancelled = sample(
        server, "salience_requests_total", rpc="ExplainStream", model="smooth",
        method="vanilla", code="CANCELLED",
    )  # fmt: skip
    assert internal == before
    assert cancelled == cancelled_before + CANCEL_TRIES
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert tracebacks == []


async def _settled(running: RunningServer) -> None:
    """Returns once no stream call of the server is still running."""
    for _ in range(3000):
        if sample(running, "salience_requests_in_flight", rpc="ExplainStream") == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the cancelled streams never ended on the server")


# Finding 5: numeric parameters beyond their ranges ----------------------------------


def oip_infer(server: RunningServer, parameters: dict[str, oip.InferParameter]) -> grpc.RpcError:
    x = np.random.default_rng(2).uniform(size=(1, *LINEAR_SHAPE)).astype(np.float32)
    request = oip.ModelInferRequest(
        model_name="linear",
        inputs=[
            oip.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=list(x.shape))
        ],
        raw_input_contents=[x.tobytes()],
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="saliency")],
    )
    for name, value in parameters.items():
        request.parameters[name].CopyFrom(value)
    with grpc.insecure_channel(server.target) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=30)
    return caught.value


TWO_63 = str(2**63)


@pytest.mark.parametrize(
    ("name", "param", "expected"),
    [
        (
            "filter_indices",
            oip.InferParameter(string_param=TWO_63),
            f"parameters['filter_indices'] has {TWO_63}, which is out of range: use indices "
            f"from {-(2**63)} to {2**63 - 1}",
        ),
        (
            "filter_indices",
            oip.InferParameter(string_param=f"1,-{TWO_63}1"),
            f"parameters['filter_indices'] has -{TWO_63}1, which is out of range: use indices "
            f"from {-(2**63)} to {2**63 - 1}",
        ),
        (
            "layer",
            oip.InferParameter(string_param=TWO_63),
            f"parameters['layer']={TWO_63} is not a layer index",
        ),
        (
            "noise",
            oip.InferParameter(string_param="1e999"),
            "parameters['noise']=inf is not allowed",
        ),
        (
            "noise",
            oip.InferParameter(string_param="nan"),
            "parameters['noise']=nan is not allowed",
        ),
        (
            "samples",
            oip.InferParameter(uint64_param=2**64 - 1),
            f"parameters['samples']={2**64 - 1} is not allowed: use a whole number from 0 to",
        ),
        (
            "steps",
            oip.InferParameter(int64_param=-1),
            "parameters['steps']=-1 is not allowed: use a whole number from 0 to",
        ),
        (
            "seed",
            oip.InferParameter(int64_param=-(2**63)),
            f"parameters['seed']={-(2**63)} is not allowed: use a whole number from 0 to",
        ),
        (
            "randomize_layers",
            oip.InferParameter(int64_param=2**40),
            f"parameters['randomize_layers']={2**40} is not allowed",
        ),
    ],
)
def test_oip_numeric_parameters_out_of_range_are_invalid_argument_naming_them(
    server: RunningServer, name: str, param: oip.InferParameter, expected: str
) -> None:
    error = oip_infer(server, {name: param})
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert expected in error.details(), error.details()


def explain_error(server: RunningServer, explanation: pb.Explanation) -> grpc.RpcError:
    x = np.random.default_rng(3).uniform(size=(1, *LINEAR_SHAPE)).astype(np.float32)
    request = pb.ExplainRequest(
        model=pb.ModelSpec(name="linear"), inputs=[tensors.encode(x)], explanation=explanation
    )
    with grpc.insecure_channel(server.target) as channel:
        stub = salience_pb2_grpc.SalienceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Explain(request, timeout=30)
    return caught.value


@pytest.mark.parametrize(
    ("explanation", "expected"),
    [
        (
            pb.Explanation(objectives=[pb.Objective(filter_indices=[2**63 - 1])]),
            f"filter_indices[0]={2**63 - 1} is out of range",
        ),
        (
            pb.Explanation(objectives=[pb.Objective(filter_indices=[-(2**63)])]),
            f"filter_indices[0]={-(2**63)} is out of range",
        ),
        (
            pb.Explanation(objectives=[pb.Objective(filter_indices=[1], weight=float("nan"))]),
            "weight=nan",
        ),
        (
            pb.Explanation(objectives=[pb.Objective(filter_indices=[1], weight=float("inf"))]),
            "weight=inf",
        ),
        (
            pb.Explanation(objectives=[pb.Objective(layer=pb.LayerRef(index=2**31 - 1))]),
            f"layer.index={2**31 - 1}",
        ),
        (pb.Explanation(method="smoothgrad", samples=2**32 - 1), f"samples={2**32 - 1}"),
        (pb.Explanation(method="smoothgrad", noise=float("inf")), "noise=inf"),
        (
            pb.Explanation(method="integrated-gradients", steps=2**32 - 1),
            f"steps={2**32 - 1}",
        ),
        (
            pb.Explanation(randomization=pb.Randomization(layers=2**32 - 1)),
            f"randomization.layers={2**32 - 1}",
        ),
    ],
)
def test_native_numeric_fields_at_their_wire_limits_are_invalid_argument_naming_them(
    server: RunningServer, explanation: pb.Explanation, expected: str
) -> None:
    error = explain_error(server, explanation)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert expected in error.details(), error.details()
