"""Group commit: concurrent requests share one database transaction and one durable commit.

Callers block in `submit` until the batch holding their request has committed, so every reply
still follows its own durable write. A request's own rule failure (a conflicting id, a closed
cycle) is returned by the batch function for that request alone and never fails its
batch-mates; an unexpected failure of a whole batch is retried, then each request is run in a
transaction of its own so that only the request at fault fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar, cast

from sqlalchemy.orm import Session

from ledger.db.batch import DRIVER_ERRORS
from ledger.db.session import Database

log = logging.getLogger("ledger.group_commit")

Request = TypeVar("Request")
Result = TypeVar("Result")

# What a batch function returns for each request: its result, or the error that is its alone.
BatchFn = Callable[[Session, Sequence[Request]], list[Result | Exception]]

BATCH_REQUESTS_MAX = 1024
BATCH_ATTEMPTS_MAX = 3  # a batch that hit a concurrent writer's row (another process) re-reads


class _Job(Generic[Request, Result]):
    """A request and, once its batch has committed, its outcome.

    A caller on a thread blocks on a bare lock, held from creation until the outcome is set
    (concurrent.futures.Future builds a Condition per call and takes it again on every state
    change; at thousands of calls a second, under the GIL, that is measurable). A caller on
    an event loop awaits an asyncio future instead, which the writer resolves on that loop.
    """

    __slots__ = ("_done", "_outcome", "future", "loop", "request")

    def __init__(
        self,
        request: Request,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.request = request
        self.loop = loop
        self.future: asyncio.Future[Result] | None = None
        self._outcome: Result | BaseException | None = None
        self._done: threading.Lock | None = None
        if loop is None:
            self._done = threading.Lock()
            self._done.acquire()
        else:
            self.future = loop.create_future()

    def finish(self, outcome: Result | BaseException) -> None:
        """Set the outcome; for an awaited job, call this on its loop (see _resolve)."""
        self._outcome = outcome
        if self._done is not None:
            self._done.release()
        elif self.future is not None and not self.future.done():  # not given up by its caller
            if isinstance(outcome, BaseException):
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)

    def result(self) -> Result:
        assert self._done is not None
        self._done.acquire()
        outcome = self._outcome
        if isinstance(outcome, BaseException):
            raise outcome
        return cast(Result, outcome)


def _resolve(finished: list[tuple[_Job[Any, Any], Any]]) -> None:
    for job, outcome in finished:
        job.finish(outcome)


class GroupCommitter(Generic[Request, Result]):
    """One writer thread per process gathers what is queued into one transaction."""

    def __init__(
        self,
        database: Database,
        batch_fn: BatchFn[Request, Result],
        *,
        enabled: bool = True,
        name: str = "group-commit",
    ) -> None:
        self._db = database
        self._batch_fn = batch_fn
        self._enabled = enabled
        self._queue: queue.SimpleQueue[_Job[Request, Result] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(target=self._run_forever, name=name, daemon=True)
            self._thread.start()

    def submit(self, request: Request) -> Result:
        """Return the request's result once its batch is durable, or raise its error."""
        job: _Job[Request, Result] = _Job(request)
        if self._enabled:
            self._queue.put(job)
        else:
            self._run_batch([job], self._db.write)
        return job.result()

    async def submit_async(self, request: Request, pool: Executor) -> Result:
        """`submit` for a caller on an event loop, which goes on serving while it waits.

        Without group commit the request's own transaction runs on a thread of `pool`.
        """
        if not self._enabled:
            return await asyncio.get_running_loop().run_in_executor(pool, self.submit, request)
        job: _Job[Request, Result] = _Job(request, asyncio.get_running_loop())
        self._queue.put(job)
        assert job.future is not None
        return await job.future

    def close(self) -> None:
        """Finish what is queued, then stop the writer."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run_forever(self) -> None:
        writer = self._db.dedicated_writer()
        try:
            self._gather(writer.write)
        finally:
            writer.close()

    def _gather(self, write: Callable[[], AbstractContextManager[Session]]) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while len(batch) < BATCH_REQUESTS_MAX:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._run_batch(batch, write)
            if stop:
                return

    def _run_batch(
        self,
        batch: list[_Job[Request, Result]],
        write: Callable[[], AbstractContextManager[Session]],
    ) -> None:
        for attempt in range(1, BATCH_ATTEMPTS_MAX + 1):
            try:
                with write() as session:
                    outcomes = self._batch_fn(session, [job.request for job in batch])
                    if len(outcomes) != len(batch):
                        raise AssertionError(f"{len(outcomes)} outcomes for {len(batch)} requests")
            except DRIVER_ERRORS as error:
                log.warning("batch of %d failed (attempt %d): %s", len(batch), attempt, error)
                continue
            except Exception as error:
                if len(batch) == 1:
                    self._finish([(batch[0], error)])
                    return
                log.exception("batch of %d failed; running its requests one by one", len(batch))
                break
            self._finish(list(zip(batch, outcomes, strict=True)))
            return
        if len(batch) == 1:
            refused = RuntimeError("the database kept refusing this write; try again")
            self._finish([(batch[0], refused)])
            return
        for job in batch:
            self._run_batch([job], write)

    @staticmethod
    def _finish(finished: list[tuple[_Job[Request, Result], Result | BaseException]]) -> None:
        """Hand out the outcomes: at once to blocked threads, and with one wake-up per event
        loop for the awaited ones (not one per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job[Any, Any], Any]]] = {}
        for job, outcome in finished:
            if job.loop is None:
                job.finish(outcome)
            else:
                by_loop.setdefault(job.loop, []).append((job, outcome))
        for loop, jobs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_resolve, jobs)


# Runs a batch on the connection as one transaction and commits it.
AsyncBatchFn = Callable[[Any, Sequence[Request]], Awaitable[list[Result | Exception]]]


class AsyncGroupCommitter(Generic[Request, Result]):
    """Group commit as one writer task on the server's event loop, for an asyncio driver.

    Calls queue their request and await its outcome; the task takes everything queued as one
    batch, runs it in one transaction on its own connection and commits, while the loop goes
    on serving: the database round trips of a batch are awaited, not blocked on, and no
    second thread contends with the loop for the GIL. The same rules as GroupCommitter: a
    request's own failure is its alone, a driver error reruns the batch, and a batch that
    fails otherwise is split into single requests.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[Any]],
        batch_fn: AsyncBatchFn[Request, Result],
    ) -> None:
        self._connect = connect
        self._batch_fn = batch_fn
        self._connection: Any = None
        self._pending: list[tuple[Request, asyncio.Future[Result]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def submit(self, request: Request) -> Result:
        """The request's result once its batch is durable, or its error."""
        if self._closing:
            raise RuntimeError("the server is stopping")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="liquidation-writer")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        self._wake.set()
        return await future

    async def close(self) -> None:
        """Finish what is queued, then stop the writer and close its connection."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self._discard()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[:BATCH_REQUESTS_MAX]
                del self._pending[:BATCH_REQUESTS_MAX]
                await self._run_batch(batch)
            if self._closing:
                return

    async def _run_batch(self, batch: list[tuple[Request, asyncio.Future[Result]]]) -> None:
        for attempt in range(1, BATCH_ATTEMPTS_MAX + 1):
            try:
                outcomes = await self._transaction([request for request, _ in batch])
            except DRIVER_ERRORS as error:
                log.warning("batch of %d failed (attempt %d): %s", len(batch), attempt, error)
                await self._discard()
                continue
            except Exception as error:
                if len(batch) == 1:
                    _settle(batch[0][1], error)
                    return
                log.exception("batch of %d failed; running its requests one by one", len(batch))
                break
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                _settle(future, outcome)
            return
        if len(batch) == 1:
            _settle(batch[0][1], RuntimeError("the database kept refusing this write; try again"))
            return
        for job in batch:
            await self._run_batch([job])

    async def _transaction(self, requests: list[Request]) -> list[Result | Exception]:
        if self._connection is None:
            self._connection = await self._connect()
        connection = self._connection
        try:
            outcomes = await self._batch_fn(connection, requests)  # and commits
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.rollback()
            raise
        if len(outcomes) != len(requests):  # committed, but nobody is told a wrong outcome
            raise AssertionError(f"{len(outcomes)} outcomes for {len(requests)} requests")
        return outcomes

    async def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():  # its caller gave up (a cancel): the outcome stands in the ledger
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
