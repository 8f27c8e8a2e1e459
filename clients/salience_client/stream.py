"""ExplainStream from Python: frames in, (frame id, Explanation) out, in order.

    for frame_id, result in explain_stream(stub, "steering", frames, filter_indices=[0]):
        print(frame_id, result.predictions[0])

A frame is one sample *without* the batch axis (a video frame H×W×C), or a dict of
such samples keyed by input name; its Explanation is that of a batch of one, equal
to `SalienceClient.explain(model, frame[np.newaxis], **options)`. Frame ids may be
any object: they travel as `str(frame_id)` and come back as the very objects given.

The options (those of `explanation_request`) go with the first message and hold
for the whole stream. `window` caps the samples the server keeps in flight for
this stream (0: the server's largest). `timeout` bounds the whole stream; None
(the default) gives it no deadline, since a stream lasts as long as its frames.

The frames are consumed lazily, as gRPC's flow control lets them go, so an
endless iterator of frames works. Stop iterating the answers (break, close, or an
exception) and the stream is cancelled, which frees the server at once.

`explain_stream` takes a blocking stub (`grpc.Channel`), `explain_stream_async` an
asyncio one (`grpc.aio.Channel`); neither imports anything beyond grpcio and numpy.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from typing import Any

import grpc
import numpy as np

from salience.v1 import salience_pb2 as pb
from salience_client import tensors
from salience_client.messages import explanation_request, explanation_result
from salience_client.results import Explanation, SalienceError

Frame = np.ndarray | Mapping[str, np.ndarray]
"""One sample (no batch axis) for a single-input model, or samples keyed by input name."""


def frame_tensors(frame: Frame) -> list[pb.Tensor]:
    """A frame as request tensors: each sample gets a batch axis of one."""
    if isinstance(frame, Mapping):
        return [tensors.encode(np.asarray(a)[np.newaxis], name) for name, a in frame.items()]
    return [tensors.encode(np.asarray(frame)[np.newaxis])]


def stream_request(
    frame_id: Any,
    frame: Frame,
    *,
    first: bool,
    model: str = "",
    version: int = 0,
    window: int = 0,
    options: Mapping[str, Any] | None = None,
) -> pb.ExplainStreamRequest:
    """The message of one frame; the first also carries the model, options and window."""
    if not first:
        return pb.ExplainStreamRequest(frame_id=str(frame_id), inputs=frame_tensors(frame))
    if window < 0:
        raise ValueError(f"window={window} is negative: use 0 (the server's largest) or more")
    # The unary request builder checks and encodes the options exactly as `explain` does.
    request = explanation_request(model, {}, version=version, **dict(options or {}))
    return pb.ExplainStreamRequest(
        frame_id=str(frame_id),
        inputs=frame_tensors(frame),
        model=request.model,
        explanation=request.explanation,
        window=window,
    )


class _Answers:
    """Pairs each answer with the id its frame was sent with (answers come in order)."""

    def __init__(self) -> None:
        self._sent: deque[Any] = deque()

    def sent(self, frame_id: Any) -> None:
        self._sent.append(frame_id)

    def match(self, response: pb.ExplainStreamResponse) -> tuple[Any, Explanation]:
        if not self._sent:
            raise SalienceError(
                grpc.StatusCode.INTERNAL,
                f"the server answered frame_id={response.frame_id!r}, which was never sent",
            )
        frame_id = self._sent.popleft()
        if response.frame_id != str(frame_id):
            raise SalienceError(
                grpc.StatusCode.INTERNAL,
                f"the server answered frame_id={response.frame_id!r} where frame "
                f"{str(frame_id)!r} was due: answers must come in frame order",
            )
        return frame_id, explanation_result(response.result)


def explain_stream(
    stub: Any,
    model: str,
    frames: Iterable[tuple[Any, Frame]],
    *,
    version: int = 0,
    window: int = 0,
    timeout: float | None = None,
    metadata: Any = None,
    **options: Any,
) -> Generator[tuple[Any, Explanation], None, None]:
    """Explains `frames` ((frame_id, frame) pairs) over one stream of a blocking
    `SalienceStub`; yields (frame_id, Explanation) in frame order (see the module doc).

    Raises SalienceError with the server's status (whose message names the frame
    that failed), or whatever iterating `frames` raised.
    """
    answers = _Answers()
    # gRPC consumes the requests on a thread of its own: an error of the caller's
    # iterator is kept here, the call cancelled, and the error re-raised to the caller.
    failures: list[BaseException] = []
    started = threading.Event()
    holder: list[Any] = []

    def requests() -> Iterator[pb.ExplainStreamRequest]:
        try:
            for k, (frame_id, frame) in enumerate(frames):
                request = stream_request(
                    frame_id,
                    frame,
                    first=k == 0,
                    model=model,
                    version=version,
                    window=window,
                    options=options,
                )
                answers.sent(frame_id)
                yield request
        except Exception as err:
            failures.append(err)
            started.wait()
            holder[0].cancel()

    call = stub.ExplainStream(requests(), timeout=timeout, metadata=metadata)
    holder.append(call)
    started.set()
    try:
        for response in call:
            yield answers.match(response)
    except grpc.RpcError as err:
        if failures:
            raise failures[0] from None
        raise SalienceError.from_rpc_error(err, timeout) from None
    finally:
        # A no-op once the stream ended; when the caller stopped early, this is what
        # tells the server to drop the frames it still holds.
        call.cancel()
    if failures:
        raise failures[0]


async def explain_stream_async(
    stub: Any,
    model: str,
    frames: Iterable[tuple[Any, Frame]] | AsyncIterable[tuple[Any, Frame]],
    *,
    version: int = 0,
    window: int = 0,
    # The call's gRPC deadline, as in the blocking variant (not a local wait).
    timeout: float | None = None,  # noqa: ASYNC109
    metadata: Any = None,
    **options: Any,
) -> AsyncGenerator[tuple[Any, Explanation], None]:
    """`explain_stream` over an asyncio `SalienceStub` (`grpc.aio`); `frames` may be
    an ordinary or an async iterable.
    """
    answers = _Answers()
    failures: list[BaseException] = []
    holder: list[Any] = []

    async def pairs() -> AsyncIterator[tuple[Any, Frame]]:
        if isinstance(frames, AsyncIterable):
            async for pair in frames:
                yield pair
        else:
            for pair in frames:
                yield pair

    async def requests() -> AsyncIterator[pb.ExplainStreamRequest]:
        k = 0
        try:
            async for frame_id, frame in pairs():
                request = stream_request(
                    frame_id,
                    frame,
                    first=k == 0,
                    model=model,
                    version=version,
                    window=window,
                    options=options,
                )
                answers.sent(frame_id)
                k += 1
                yield request
        except Exception as err:
            # Consumed by a task of grpc's, which would only log it: kept for the caller.
            failures.append(err)
            holder[0].cancel()

    call = stub.ExplainStream(requests(), timeout=timeout, metadata=metadata)
    holder.append(call)
    try:
        async for response in call:
            yield answers.match(response)
    except grpc.RpcError as err:
        if failures:
            raise failures[0] from None
        raise SalienceError.from_rpc_error(err, timeout) from None
    except asyncio.CancelledError:
        # What reading a call cancelled by `requests` raises (and a cancelled caller).
        if failures:
            raise failures[0] from None
        raise
    finally:
        call.cancel()
    if failures:
        raise failures[0]
