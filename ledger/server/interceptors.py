"""Every call passes here: domain errors become statuses, and one log line is written."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import grpc

from ledger.server.status import status_for

log = logging.getLogger("ledger.calls")

Behavior = Callable[[Any, grpc.ServicerContext], Any]


if TYPE_CHECKING:  # generic only in grpc-stubs; at runtime the class takes no parameters
    _ServerInterceptor = grpc.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:
    _ServerInterceptor = grpc.ServerInterceptor
    _Handler = grpc.RpcMethodHandler


class CallInterceptor(_ServerInterceptor):
    """Wraps each method's handler once and reuses the wrapper for every later call to it."""

    def __init__(self) -> None:
        # method → (the handler as registered, its wrapper); grpc asks for every call
        self._wrapped: dict[str, tuple[_Handler, _Handler]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, _wrap(method, handler))
            self._wrapped[method] = cached
        return cached[1]


def _wrap(method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary(method, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _unary(method, handler.stream_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(method, handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


def _unary(method: str, behavior: Behavior) -> Behavior:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        started = time.perf_counter()
        try:
            return behavior(request, context)
        except Exception as error:
            _abort(context, method, error)
        finally:
            _log(method, context, started)

    return call


def _streaming(method: str, behavior: Behavior) -> Behavior:
    def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        started = time.perf_counter()
        try:
            yield from behavior(request, context)
        except Exception as error:
            _abort(context, method, error)
        finally:
            _log(method, context, started)

    return call


def _abort(context: grpc.ServicerContext, method: str, error: Exception) -> None:
    code = status_for(error)
    if code is not None:
        context.abort(code, str(error))
    already = _code(context)
    if already not in (None, grpc.StatusCode.OK):
        # The handler set its own status (context.abort, or UNIMPLEMENTED from a generated
        # base class): end the call with it, quietly.
        if isinstance(error, NotImplementedError):
            context.abort(already, "method not implemented")
        raise error
    if not context.is_active():
        # The client cancelled or the deadline passed while the handler ran: not a fault.
        context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")
    log.exception("%s failed unexpectedly", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")


def _log(method: str, context: grpc.ServicerContext, started: float) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    code = _code(context) or grpc.StatusCode.OK
    if not context.is_active() and code == grpc.StatusCode.OK:
        code = grpc.StatusCode.CANCELLED
    elapsed_ms = (time.perf_counter() - started) * 1000
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    log.info("method=%s status=%s duration_ms=%.2f", method, name, elapsed_ms)


def _code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The status set so far (ServicerContext.code() exists since grpcio 1.38; not in stubs)."""
    return cast(Any, context).code()  # type: ignore[no-any-return]
