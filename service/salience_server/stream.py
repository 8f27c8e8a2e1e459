"""ExplainStream: a stream of frames explained in order, several at a time.

A reader task pulls frames off the stream and starts one task per frame, each an
ordinary `InferenceCore.explain` call, so frames are checked, planned and batched
on the device exactly as unary requests are (with each other and with everyone
else's). The stream's own loop answers the frames strictly in order: it waits for
the oldest frame, sends its answer, then the next.

Back-pressure: the reader takes the next message only while fewer than the
stream's window of samples are in flight (read and not yet answered). It never
buffers beyond that, so a client that sends faster than the device computes is
held back by gRPC flow control, and a slow reader of the answers slows the
stream down the same way (an answer that cannot be sent keeps its frame in
flight).

When the model is busy the stream slows down instead of failing: the reader
takes no message while the model's queue is full (`InferenceCore.wait_for_room`),
and a frame refused for a full queue (RESOURCE_EXHAUSTED, the queue filled by
other callers meanwhile) waits for room and is queued again, until the stream's
deadline. Other failures end the stream as below.

Every frame counts: one with an empty batch is refused at once (INVALID_ARGUMENT
naming it), since it would take no room in the window and a stream of them would
be read without bound.

Errors: the first frame that fails ends the stream with its status, the message
prefixed with the frame's id. Frames before it are all answered first (they are
awaited in order); frames after it are cancelled and never answered. When the
stream ends for any reason (answered, failed, cancelled by the client, shut down),
every task it started is cancelled and awaited: frames still queued leave the
batcher's queue and never reach the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any

from salience.v1 import salience_pb2 as pb
from salience_server import convert
from salience_server.core import InferenceCore
from salience_server.errors import (
    DeadlineExceeded,
    InvalidArgument,
    QueueFull,
    ServiceError,
    label_explain,
)
from salience_server.explain.options import ExplainOptions
from salience_server.seam import ModelDevice

# The window's default and cap, in device calls: one computing while the next fills.
WINDOW_DEVICE_CALLS = 2


def window_for(core: InferenceCore, runtime: ModelDevice, asked: int) -> int:
    """The samples a stream may have in flight: what it asked for (0: the most),
    at most two device calls' worth, and never more than the model's queue holds,
    so a stream is never refused for a full queue by its own frames alone.
    """
    config = core.batching_config(runtime)
    cap = max(1, min(WINDOW_DEVICE_CALLS * config.max_device_batch_size, config.max_queue_size))
    return cap if asked <= 0 else min(asked, cap)


def _rows(arrays: dict[str, Any]) -> int:
    """Samples a frame carries (its batch axis), for the window's count.

    Raises InvalidArgument for a frame with an empty batch: it would count as no
    sample of the window, so a stream of them would be read without bound.
    """
    for k, array in enumerate(arrays.values()):
        if array.ndim and array.shape[0] == 0:
            raise InvalidArgument(
                f"inputs[{k}] has 0 rows: every frame carries at least one sample (a batch "
                "axis of size 1 or more)"
            )
    return max((a.shape[0] if a.ndim else 1 for a in arrays.values()), default=1)


class _Frame:
    """One message of the stream: its id, its samples, and the task computing it."""

    __slots__ = ("frame_id", "index", "rows", "task")

    def __init__(
        self, frame_id: str, index: int, rows: int, task: asyncio.Task[pb.ExplainResponse]
    ) -> None:
        self.frame_id = frame_id
        self.index = index
        self.rows = rows
        self.task = task


def _frame_error(frame_id: str, index: int, err: ServiceError) -> ServiceError:
    """The frame's error, naming the frame, with the same class and status code."""
    prefixed = f"frame_id={frame_id!r} (message {index} of the stream): {err.message}"
    return type(err)(prefixed, err.code)


def _check_later(request: pb.ExplainStreamRequest, index: int) -> None:
    """Only the first message may set the stream's model and options."""
    for name in ("model", "explanation"):
        if request.HasField(name):
            raise InvalidArgument(
                f"{name} is set on message {index} of the stream: only the first message "
                "names the model and the explanation options; leave them unset after it"
            )
    if request.window:
        raise InvalidArgument(
            f"window={request.window} is set on message {index} of the stream: only the "
            "first message sets the window; leave it 0 after it"
        )


class _Stream:
    """The state of one ExplainStream call."""

    def __init__(self, core: InferenceCore, deadline: float | None) -> None:
        self.core = core
        self.deadline = deadline
        self.frames: deque[_Frame] = deque()
        self.in_flight = 0  # samples read and not yet answered
        self.window = 1
        self.changed = asyncio.Event()  # a frame was read, answered, or the reader ended
        self.reader_done = False
        self.reader: asyncio.Task[None] | None = None
        # Fixed by the first message.
        self.name = ""
        self.version = 0
        self.options = ExplainOptions()

    async def first(
        self, requests: AsyncIterator[pb.ExplainStreamRequest]
    ) -> pb.ExplainStreamRequest | None:
        """Reads the first message and fixes the stream's model, version and options."""
        request = await anext(requests, None)
        if request is None:
            return None
        name = request.model.name
        label_explain(name, request.explanation.method)
        try:
            # The version is resolved once: a stream is answered by one version, even if
            # a newer one is loaded while it runs.
            convert.check_model(request.model)
            runtime = self.core.runtime(name, request.model.version)
            self.options = convert.explain_options(request.explanation, self.core.settings.limits)
            runtime.check_options(self.options, self.core.settings.limits)
        except ServiceError as err:
            raise _frame_error(request.frame_id, 0, err) from None
        self.name, self.version = name, runtime.version
        self.window = window_for(self.core, runtime, request.window)
        return request

    def start(self, request: pb.ExplainStreamRequest, index: int) -> bool:
        """Queues a frame: decoded here, explained by a task of its own. False when the
        message is bad: its failure is queued in its place, and nothing after it matters.
        """
        try:
            if index:
                _check_later(request, index)
            arrays = convert.request_inputs(request.inputs)
            rows = _rows(arrays)
        except ServiceError as err:
            task = asyncio.create_task(_raise(err), name="salience-stream-frame")
            self.frames.append(_Frame(request.frame_id, index, 0, task))
            return False
        task = asyncio.create_task(self._explain(arrays), name="salience-stream-frame")
        self.frames.append(_Frame(request.frame_id, index, rows, task))
        self.in_flight += rows
        return True

    async def _explain(self, arrays: dict[str, Any]) -> pb.ExplainResponse:
        while True:
            try:
                runtime, result = await self.core.explain(
                    self.name, self.version, arrays, self.options, self.deadline
                )
            except QueueFull:
                # Busy, not wrong: try again once samples have left the queue (the
                # deadline still bounds the stream).
                await self._within_deadline(self.core.queue_changed(self.name, self.version))
                continue
            return convert.explain_response(runtime, result)

    async def _within_deadline(self, wait: Awaitable[None]) -> None:
        """Waits for room in the model's queue, within the stream's deadline."""
        if self.deadline is None:
            await wait
            return
        try:
            async with asyncio.timeout(self.deadline - time.monotonic()):
                await wait
        except TimeoutError:
            raise DeadlineExceeded(
                f"the deadline passed while the stream waited for room in model "
                f"{self.name!r}'s queue"
            ) from None

    async def read(self, requests: AsyncIterator[pb.ExplainStreamRequest], index: int) -> None:
        """The reader task: the next message only while the window has room."""
        try:
            while True:
                while self.in_flight >= self.window:
                    self.changed.clear()
                    await self.changed.wait()
                # Nothing more is read while the model has no room for it.
                with contextlib.suppress(ServiceError):
                    # Gone, shutting down or past the deadline: the frame read next
                    # fails with it, naming itself.
                    await self._within_deadline(self.core.wait_for_room(self.name, self.version))
                request = await anext(requests, None)
                if request is None:
                    return
                ok = self.start(request, index)
                index += 1
                self.changed.set()
                if not ok:
                    return
        finally:
            self.reader_done = True
            self.changed.set()

    async def answers(self) -> AsyncGenerator[pb.ExplainStreamResponse, None]:
        """The frames' answers, oldest first; raises the first failure, naming its frame."""
        while True:
            if not self.frames:
                if self.reader_done:
                    assert self.reader is not None  # started with the stream
                    # Re-raises what ended the reading, if it was not the stream's end.
                    await self.reader
                    return
                self.changed.clear()
                await self.changed.wait()
                continue
            frame = self.frames[0]
            try:
                response = await frame.task
            except ServiceError as err:
                raise _frame_error(frame.frame_id, frame.index, err) from None
            # Answered only once sent: an answer the client does not take holds its place.
            yield pb.ExplainStreamResponse(frame_id=frame.frame_id, result=response)
            self.frames.popleft()
            self.in_flight -= frame.rows
            self.changed.set()

    async def close(self) -> None:
        """Cancels and awaits every task of the stream (its reader, its frames)."""
        tasks: list[asyncio.Task[Any]] = [f.task for f in self.frames]
        if self.reader is not None:
            tasks.append(self.reader)
        for task in tasks:
            task.cancel()
        # Awaited, so no task outlives the call; their outcomes no longer matter.
        await asyncio.gather(*tasks, return_exceptions=True)
        self.frames.clear()


async def _raise(err: BaseException) -> pb.ExplainResponse:
    raise err


async def _empty() -> AsyncGenerator[pb.ExplainStreamRequest, None]:
    return
    yield


async def explain_stream(
    core: InferenceCore,
    requests: AsyncIterator[pb.ExplainStreamRequest],
    deadline: float | None,
) -> AsyncGenerator[pb.ExplainStreamResponse, None]:
    """Answers an ExplainStream (see the module doc); `deadline` bounds the whole stream."""
    stream = _Stream(core, deadline)
    try:
        first = await stream.first(requests)
        if first is None:
            return  # an empty stream: nothing to answer
        # After a bad first frame nothing more is read: nothing after it is answered.
        rest = requests if stream.start(first, 0) else _empty()
        stream.reader = asyncio.create_task(stream.read(rest, 1), name="salience-stream-reader")
        async with contextlib.aclosing(stream.answers()) as answers:
            async for response in answers:
                yield response
    finally:
        await stream.close()
