"""Errors that carry their gRPC status, and the one interceptor that reports them.

Every failure a caller can cause is a `ServiceError` whose message names the field
and the allowed values. The interceptor turns those into statuses; anything else
becomes INTERNAL with a message that leaks nothing, and is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

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


def label_call(model: str, method: str) -> None:
    """Names the model and method of the RPC being handled (outside one: nothing)."""
    call = _CALL.get()
    if call is not None:
        call.model, call.method = model, method


Observer = Callable[[Call], None]
"""Told of each RPC twice: when it starts, and once answered (`Call.done`)."""


def _guard(method: str, handler: Handler, observe: Observer) -> Handler:
    rpc = method.rsplit("/", 1)[-1]

    async def guarded(request: Any, context: aio.ServicerContext) -> Any:
        start = time.perf_counter()
        # A fresh object per call, so concurrent calls never share labels.
        call = Call(rpc, request_bytes=request.ByteSize())
        token = _CALL.set(call)
        observe(call)

        def answered(code: grpc.StatusCode) -> None:
            # Observed before the status is sent: a caller that has its answer can
            # scrape the metrics and find the call counted.
            if not call.done:
                call.code, call.seconds, call.done = code, time.perf_counter() - start, True
                observe(call)

        try:
            response = await handler(request, context)
            call.response_bytes = response.ByteSize()
            answered(grpc.StatusCode.OK)
            return response
        except ServiceError as err:
            answered(err.code)
            await context.abort(err.code, err.message)
        except aio.AbortError:
            answered(context.code() or grpc.StatusCode.UNKNOWN)
            raise
        except asyncio.CancelledError:
            answered(grpc.StatusCode.CANCELLED)
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

    return guarded


class ErrorInterceptor(aio.ServerInterceptor):
    """Maps exceptions raised by unary-unary handlers to gRPC statuses, in one place,
    and reports every answered call to an observer (the metrics).
    """

    def __init__(self, observe: Observer = lambda call: None) -> None:
        self._observe = observe

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            _guard(handler_call_details.method, handler.unary_unary, self._observe),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
