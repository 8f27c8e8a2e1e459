"""Errors that carry their gRPC status, and the one interceptor that reports them.

Every failure a caller can cause is a `ServiceError` whose message names the field
and the allowed values. The interceptor turns those into statuses; anything else
becomes INTERNAL with a message that leaks nothing, and is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from salience_server.explain import catalog

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """A failure with the status code the caller should see."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ServiceError):
    """The server is at capacity (a full queue) or a device ran out of memory:
    retryable, after a back-off, or with a smaller batch.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class QueueFull(ResourceExhausted):
    """A model's queue has no room for the request now: it fits once others leave
    (a stream waits for that instead of failing).
    """


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the work was done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def allowed(values: Any, limit: int = 12) -> str:
    """Lists allowed values for a message, shortened when there are many."""
    items = [repr(v) if isinstance(v, str) else str(v) for v in values]
    if len(items) > limit:
        return ", ".join(items[:limit]) + f", … ({len(items) - limit} more)"
    return ", ".join(items)


Handler = Callable[[Any, aio.ServicerContext], Awaitable[Any]]


@dataclass
class Call:
    """One RPC as the metrics see it. The interceptor fills in the RPC, sizes, status
    and duration; the handler names the model and method it served (`label_call`),
    since only it has decoded the request.
    """

    rpc: str
    model: str = ""
    method: str = ""
    request_bytes: int = 0
    response_bytes: int = 0
    code: grpc.StatusCode = grpc.StatusCode.OK
    seconds: float = 0.0
    done: bool = False  # False while it runs, True once answered


_CALL: ContextVar[Call | None] = ContextVar("salience_call", default=None)

# A caller whose deadline passes cancels the call itself, a moment before the
# server's copy of that deadline passes: the copy is later by the request's transit
# and by gRPC rounding the timeout up on the wire (to 10 ms between 1 and 10 s, to
# 100 ms up to 100 s: at most 1 %).
DEADLINE_SLACK_SECONDS = 0.05
DEADLINE_SLACK_FRACTION = 0.01


def deadline_passed(remaining: float | None, budget: float | None) -> bool:
    """Whether a call cancelled with `remaining` seconds left of its deadline, out of
    the `budget` it started with (None: no deadline), was cancelled because of it.
    """
    if remaining is None:
        return False
    return remaining <= DEADLINE_SLACK_SECONDS + DEADLINE_SLACK_FRACTION * (budget or 0.0)


def label_call(model: str, method: str) -> None:
    """Names the model and method of the RPC being handled (outside one: nothing)."""
    call = _CALL.get()
    if call is not None:
        call.model, call.method = model, method


def label_explain(model: str, method: str) -> None:
    """Labels an explanation RPC by the method it asks for ("" asks for the default,
    vanilla); an unknown method is labelled "", so callers cannot grow the label set.
    The one rule for Explain, ExplainStream and ModelInfer's saliency outputs.
    """
    method = method or catalog.DEFAULT_METHOD
    label_call(model, method if method in catalog.METHODS else "")


class CallGone(Exception):
    """Reading or writing a message of a call failed because the call is over: its
    client cancelled it, closed the connection, or its deadline passed. gRPC reports
    that as a failed batch (`aio.InternalError`) when the failure reaches the
    handler before the news of the cancellation does; it is the caller's doing,
    so it is counted as the cancellation it is, never as INTERNAL.
    """


Observer = Callable[[Call], None]
"""Told of each RPC twice: when it starts, and once answered (`Call.done`)."""


async def _observed(
    method: str,
    call: Call,
    context: aio.ServicerContext,
    observe: Observer,
    serve: Callable[[], Awaitable[Any]],
) -> Any:
    """Runs `serve` as the RPC `call`: counts it when it starts and once answered, and
    turns what it raises into the RPC's status (the same way for every kind of RPC).
    """
    start = time.perf_counter()
    budget = context.time_remaining()
    token = _CALL.set(call)
    observe(call)

    def answered(code: grpc.StatusCode) -> None:
        # Observed before the status is sent: a caller that has its answer can
        # scrape the metrics and find the call counted.
        if not call.done:
            call.code, call.seconds, call.done = code, time.perf_counter() - start, True
            observe(call)

    rpc = call.rpc
    try:
        response = await serve()
        answered(grpc.StatusCode.OK)
        return response
    except ServiceError as err:
        answered(err.code)
        await context.abort(err.code, _fit(err.message))
    except aio.AbortError:
        answered(context.code() or grpc.StatusCode.UNKNOWN)
        raise
    except (asyncio.CancelledError, CallGone) as err:
        # A call cancelled by its deadline counts as its caller sees it.
        expired = deadline_passed(context.time_remaining(), budget)
        answered(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)
        if isinstance(err, CallGone):
            # As gRPC itself ends a call its client cancelled: nothing more is sent.
            raise asyncio.CancelledError from None
        raise
    except Exception:
        log.exception("unexpected failure in %s", method)
        answered(grpc.StatusCode.INTERNAL)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error while serving {rpc}; the server log has the details",
        )
    finally:
        _CALL.reset(token)


# A status message travels percent-encoded in a header that gRPC clients refuse
# beyond 8 to 16 KiB: a longer one would reach the caller as a transport error
# instead of the refusal, so messages are cut to this many bytes.
MAX_DETAILS_BYTES = 2048


def _fit(message: str) -> str:
    data = message.encode()
    if len(data) <= MAX_DETAILS_BYTES:
        return message
    return data[:MAX_DETAILS_BYTES].decode(errors="ignore") + " …"


Deserializer = Callable[[bytes], Any]


def _parse(deserialize: Deserializer, raw: bytes) -> Any:
    """The request message of raw bytes; bytes that are none are the caller's fault."""
    try:
        return deserialize(raw)
    except Exception as err:  # protobuf's DecodeError, whatever the parser's failure
        raise InvalidArgument(
            f"the request is not a valid protobuf message of the method's request type ({err})"
        ) from None


def _guard(
    method: str, handler: Handler, observe: Observer, deserialize: Deserializer | None = None
) -> Handler:
    """Wraps a unary-unary handler. With `deserialize`, the request arrives as bytes and
    is parsed inside the call, so that bytes which are no valid message get
    INVALID_ARGUMENT (gRPC's own parsing answers UNKNOWN) and are counted like any call.
    """
    rpc = method.rsplit("/", 1)[-1]

    async def guarded(request: Any, context: aio.ServicerContext) -> Any:
        # A fresh object per call, so concurrent calls never share labels.
        size = len(request) if deserialize is not None else request.ByteSize()
        call = Call(rpc, request_bytes=size)

        async def serve() -> Any:
            parsed = _parse(deserialize, request) if deserialize is not None else request
            response = await handler(parsed, context)
            call.response_bytes = response.ByteSize()
            return response

        return await _observed(method, call, context, observe, serve)

    return guarded


StreamHandler = Callable[[AsyncIterator[Any], aio.ServicerContext], Any]
"""A stream-stream behaviour: an async generator of responses, or a coroutine that
writes them with `context.write`."""


class _Counted:
    """A stream's requests, adding each one's size to its call as it is read, and
    parsing each with `deserialize` when they arrive as bytes (see `_guard`).
    """

    def __init__(
        self, requests: AsyncIterator[Any], call: Call, deserialize: Deserializer | None
    ) -> None:
        self._requests = requests
        self._call = call
        self._deserialize = deserialize

    def __aiter__(self) -> _Counted:
        return self

    async def __anext__(self) -> Any:
        try:
            request = await anext(self._requests)
        except aio.InternalError as err:  # see CallGone
            raise CallGone(str(err)) from None
        if self._deserialize is None:
            self._call.request_bytes += request.ByteSize()
            return request
        self._call.request_bytes += len(request)
        return _parse(self._deserialize, request)


def _guard_stream(
    method: str, handler: StreamHandler, observe: Observer, deserialize: Deserializer | None = None
) -> StreamHandler:
    """`_guard` for a stream-stream RPC: the whole stream is one call (its sizes are
    the sums over its messages, its duration from start to status), and what the
    handler raises at any point becomes the stream's status the same way; a message
    that is no valid protobuf ends the stream with INVALID_ARGUMENT.
    """
    rpc = method.rsplit("/", 1)[-1]

    async def guarded(requests: AsyncIterator[Any], context: aio.ServicerContext) -> None:
        call = Call(rpc)

        async def serve() -> None:
            responses = handler(_Counted(requests, call, deserialize), context)
            if not hasattr(responses, "__aiter__"):
                await responses  # the handler writes its responses itself
                return
            # Closed here, not by the garbage collector, so its clean-up (cancelling
            # what it started) runs inside this call, before its status is sent.
            async with contextlib.aclosing(responses):
                async for response in responses:
                    call.response_bytes += response.ByteSize()
                    try:
                        await context.write(response)
                    except aio.InternalError as err:  # see CallGone
                        raise CallGone(str(err)) from None

        await _observed(method, call, context, observe, serve)

    return guarded


class ErrorInterceptor(aio.ServerInterceptor):
    """Maps exceptions raised by unary-unary and stream-stream handlers to gRPC
    statuses, in one place, and reports every answered call to an observer (the
    metrics).
    """

    def __init__(self, observe: Observer = lambda call: None) -> None:
        self._observe = observe
        # Wrapped handlers by (method, the handler it wraps): bounded by the methods
        # served (a method no service has gets no handler and nothing is kept).
        self._wrapped: dict[tuple[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        # The wrapper of a method's handler is made once: this runs for every call.
        key = (handler_call_details.method, handler)
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrapped[key] = self._wrap(handler_call_details.method, handler)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _guard_stream(
                    method,
                    handler.stream_stream,
                    self._observe,
                    handler.request_deserializer,
                ),
                request_deserializer=None,  # parsed by the guard, message by message
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            _guard(
                method,
                handler.unary_unary,
                self._observe,
                handler.request_deserializer,
            ),
            request_deserializer=None,  # parsed by the guard (see `_guard`)
            response_serializer=handler.response_serializer,
        )
