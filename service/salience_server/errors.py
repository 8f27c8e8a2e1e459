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
Observer = Callable[[str, grpc.StatusCode, float], None]
"""Told each answered RPC's method, status code and duration in seconds."""


def _guard(method: str, handler: Handler, observe: Observer) -> Handler:
    rpc = method.rsplit("/", 1)[-1]

    async def guarded(request: Any, context: aio.ServicerContext) -> Any:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await handler(request, context)
        except ServiceError as err:
            code = err.code
            await context.abort(err.code, err.message)
        except aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("unexpected failure in %s", method)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error while serving {rpc}; the server log has the details",
            )
        finally:
            observe(rpc, code, time.perf_counter() - start)

    return guarded


class ErrorInterceptor(aio.ServerInterceptor):
    """Maps exceptions raised by unary-unary handlers to gRPC statuses, in one place,
    and reports every answered call to an observer (the metrics).
    """

    def __init__(self, observe: Observer = lambda rpc, code, seconds: None) -> None:
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
