"""Every call passes here: domain errors become statuses, and one log line is written.

grpc.aio serves every call: the event loop does the network work of every call, and a
coroutine handler (the liquidation calls) never leaves it. The other handlers are plain
blocking functions (database sessions, Rust calls); each call of one runs on a thread of the
pool, and is given a `ThreadContext`, the part of a servicer context that they use. A
request stream read from a thread that stays silent for `stream_idle_s` ends the call with
DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, NoReturn, cast

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from ledger.errors import Cancelled, DeadlineExceeded, InvalidArgument
from ledger.limits import STREAM_IDLE_SECONDS_DEFAULT
from ledger.server.details import DETAILS_KEY, status_details
from ledger.server.metrics import Metrics
from ledger.server.status import internal_details, status_for

log = logging.getLogger("ledger.calls")

AsyncBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]

if TYPE_CHECKING:  # generic only in grpc-stubs; at runtime the class takes no parameters
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Context = grpc.aio.ServicerContext[Any, Any]
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Handler = grpc.RpcMethodHandler
    _Context = grpc.aio.ServicerContext
    _ServerInterceptor = grpc.aio.ServerInterceptor

_Loop = asyncio.AbstractEventLoop
_END = object()  # the end of a request stream, passed from the loop to a handler's thread


class Aborted(Exception):
    """A handler ended its call with this status (ThreadContext.abort, or a reply from the
    liquidation writer), with its serialized google.rpc.Status when it has rich details."""

    def __init__(self, code: grpc.StatusCode, details: str, status: bytes | None = None) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.status = status


class ThreadContext:
    """What a blocking handler may ask of its call, from its thread.

    The aio context itself belongs to the event loop; these only read its state, and an
    abort is carried back to the loop as an exception.
    """

    def __init__(self, context: _Context, loop: _Loop) -> None:
        self._context = context
        self._loop = loop
        self._cancelled = False

    def is_active(self) -> bool:
        """False once the client cancelled or the deadline passed."""
        return not (self._cancelled or self._context.cancelled() or self._context.done())

    def write(self, response: Any) -> None:
        """Send one response of a streaming call, and wait until the loop has sent it (so a
        slow client slows the handler, not memory)."""
        if not self.is_active():
            raise Cancelled("the client cancelled the call")
        asyncio.run_coroutine_threadsafe(self._context.write(response), self._loop).result()

    def auth_context(self) -> Any:
        """The call's auth context (its peer's certificate names), read on the loop."""

        async def read() -> Any:
            return self._context.auth_context()

        return asyncio.run_coroutine_threadsafe(read(), self._loop).result()

    def mark_cancelled(self) -> None:
        """grpc cancelled the handler's task on the loop: the client is gone."""
        self._cancelled = True

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise Aborted(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        """Called by a generated base class before it raises NotImplementedError; _abort
        answers UNIMPLEMENTED from the exception."""

    def set_details(self, details: str) -> None:
        """See set_code."""


class CallInterceptor(_ServerInterceptor):
    """Wraps each method's handler once and reuses the wrapper for every later call to it."""

    def __init__(
        self,
        pool: Executor,
        *,
        stream_idle_s: float = STREAM_IDLE_SECONDS_DEFAULT,
        metrics: Metrics | None = None,
    ) -> None:
        self._pool = pool
        self._stream_idle_s = stream_idle_s
        self._metrics = metrics
        # method → (the handler as registered, its wrapper); grpc asks for every call
        self._wrapped: dict[str, tuple[_Handler, _Handler]] = {}

    async def intercept_service(  # type: ignore[override]  # None: no such method
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(method, handler))
            self._wrapped[method] = cached
        return cached[1]

    def _wrap(self, method: str, handler: _Handler) -> _Handler:
        """The handler with the call log, metrics and error mapping around it; its request is
        parsed inside (grpc would answer UNKNOWN for bytes that do not parse, outside any
        interceptor), so that such a request gets INVALID_ARGUMENT like any bad input."""
        parse = handler.request_deserializer
        serdes = {"request_deserializer": None, "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, "unary", _parsed(handler.unary_unary, parse)), **serdes
            )
        if handler.stream_unary is not None and parse is None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(method, "client_stream", handler.stream_unary, streamed_requests=True),
                **serdes,
            )
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            if inspect.iscoroutinefunction(behavior):
                return grpc.unary_stream_rpc_method_handler(
                    self._in_loop(
                        method, "server_stream", cast(AsyncBehavior, _parsed(behavior, parse))
                    ),
                    **serdes,
                )
            if not inspect.isasyncgenfunction(behavior):
                return grpc.unary_stream_rpc_method_handler(
                    self._streaming(method, _parsed(behavior, parse)), **serdes
                )
        return handler

    def _unary(
        self,
        method: str,
        grpc_type: str,
        behavior: Callable[..., Any],
        *,
        streamed_requests: bool = False,
    ) -> AsyncBehavior:
        if inspect.iscoroutinefunction(behavior):
            return self._in_loop(method, grpc_type, cast(AsyncBehavior, behavior))
        pool = self._pool
        idle_s = self._stream_idle_s
        finish = self._finish

        async def call(request: Any, context: _Context) -> Any:
            started = self._start(method, grpc_type)
            loop = asyncio.get_running_loop()
            thread_context = ThreadContext(context, loop)
            if streamed_requests:
                request = _BlockingRequests(request, loop, thread_context, idle_s)
            try:
                return await loop.run_in_executor(pool, behavior, request, thread_context)
            except asyncio.CancelledError:
                thread_context.mark_cancelled()
                raise
            except Exception as error:
                await _abort(context, method, error)
            finally:
                finish(method, grpc_type, context, started)

        return call

    def _streaming(self, method: str, behavior: Callable[..., Iterator[Any]]) -> AsyncBehavior:
        """A blocking generator runs on one thread from start to end (its database session
        stays on that thread) and hands each response to the loop, which sends it."""

        def produce(request: Any, context: ThreadContext) -> None:
            for response in behavior(request, context):
                context.write(response)

        return self._unary(method, "server_stream", produce)

    def _in_loop(self, method: str, grpc_type: str, behavior: AsyncBehavior) -> AsyncBehavior:
        finish = self._finish

        async def call(request: Any, context: _Context) -> Any:
            started = self._start(method, grpc_type)
            try:
                return await behavior(request, context)
            except Exception as error:
                await _abort(context, method, error)
            finally:
                finish(method, grpc_type, context, started)

        return call

    def _start(self, method: str, grpc_type: str) -> float:
        if self._metrics is not None:
            self._metrics.call_started(method, grpc_type)
        return time.perf_counter()

    def _finish(self, method: str, grpc_type: str, context: _Context, started: float) -> None:
        """The call's one log line, and its metrics."""
        metrics = self._metrics
        if metrics is None and not log.isEnabledFor(logging.INFO):
            return
        elapsed = time.perf_counter() - started
        code = context.code() or grpc.StatusCode.OK
        if context.cancelled():
            code = grpc.StatusCode.CANCELLED
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        if metrics is not None:
            metrics.call_handled(method, grpc_type, name, elapsed)
        log.info("method=%s status=%s duration_ms=%.2f", method, name, elapsed * 1000)


def _parsed(behavior: Callable[..., Any], parse: Callable[[bytes], Any] | None) -> Any:
    """`behavior` taking its request as bytes, parsed with `parse` (None: as it comes); a
    request that does not parse is INVALID_ARGUMENT."""
    if parse is None:
        return behavior

    def request_of(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError as error:
            raise InvalidArgument(
                "request", f"{len(raw)} bytes", f"is not a valid message: {error}"
            ) from None

    if inspect.iscoroutinefunction(behavior):

        async def parsed_async(raw: bytes, context: Any) -> Any:
            return await behavior(request_of(raw), context)

        return parsed_async

    def parsed(raw: bytes, context: Any) -> Any:
        return behavior(request_of(raw), context)

    return parsed


class _BlockingRequests:
    """The request stream of a call, read from a handler's thread: each message is awaited
    on the event loop, which owns the call.

    A client's cancel also ends the stream, as if it were complete; grpc cancels the
    handler's task right after, so the end is confirmed a few loop turns later, and a
    stream cut short by a cancel raises instead of ending.
    """

    def __init__(
        self, requests: AsyncIterator[Any], loop: _Loop, context: ThreadContext, idle_s: float
    ) -> None:
        self._requests = requests
        self._loop = loop
        self._context = context
        self._idle_s = idle_s

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        message = asyncio.run_coroutine_threadsafe(self._next(), self._loop).result()
        if message is _END:
            if not self._context.is_active():
                raise Cancelled("the client cancelled the call")
            raise StopIteration
        return message

    async def _next(self) -> Any:
        try:
            message = await asyncio.wait_for(anext(self._requests, _END), self._idle_s)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the request stream sent nothing for {self._idle_s:g} s; the call is ended "
                "and nothing of it was written"
            ) from None
        if message is _END:
            for _ in range(_END_CONFIRM_TURNS):
                await asyncio.sleep(0)
        return message


_END_CONFIRM_TURNS = 3


async def _abort(context: _Context, method: str, error: Exception) -> NoReturn:
    if isinstance(error, Aborted):
        await context.abort(error.code, error.details, _trailer(error.status))
    code = status_for(error)
    if code is not None:
        message = str(error)
        details = status_details(error, code.value[0], message)
        await context.abort(code, message, _trailer(details))
    if isinstance(error, NotImplementedError):
        # A generated base class: the method is in the contract but not served.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "method not implemented")
    if context.cancelled() or context.done():
        # The client cancelled or the deadline passed while the handler ran: not a fault.
        await context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")
    await context.abort(grpc.StatusCode.INTERNAL, internal_details(method, error))


def _trailer(status: bytes | None) -> tuple[tuple[str, bytes], ...]:
    """The rich details of a status as grpcio-status sends them."""
    return () if status is None else ((DETAILS_KEY, status),)
