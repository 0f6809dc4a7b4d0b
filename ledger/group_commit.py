"""Group commit: concurrent requests share one database transaction and one durable commit.

Callers await their outcome; one writer task on the server's event loop takes everything
queued as one batch, runs it in one transaction on its own connection and commits, and only
then answers each caller, so every reply still follows its own durable write. A request's own
rule failure (a conflicting id, a closed cycle) is returned by the batch function for that
request alone and never fails its batch-mates; a driver error (a concurrent writer's row, a
lost connection) reruns the batch on a fresh connection, and a batch that fails otherwise is
split into single requests, so that only the request at fault fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from sqlalchemy.orm import Session

from ledger.db.batch import DRIVER_ERRORS
from ledger.db.session import Database

log = logging.getLogger("ledger.group_commit")

Request = TypeVar("Request")
Result = TypeVar("Result")

BATCH_REQUESTS_MAX = 1024
BATCH_ATTEMPTS_MAX = 3  # a batch that hit a concurrent writer's row (another process) re-reads


def run_alone(
    database: Database,
    batch_fn: Callable[[Session, Sequence[Request]], list[Result | Exception]],
    request: Request,
) -> Result:
    """One request in a transaction of its own (no group commit), on the calling thread:
    the benchmark's comparison, and the same rules (a driver error reruns it)."""
    for attempt in range(1, BATCH_ATTEMPTS_MAX + 1):
        try:
            with database.write() as session:
                (outcome,) = batch_fn(session, [request])
        except DRIVER_ERRORS as error:
            log.warning("request failed (attempt %d): %s", attempt, error)
            continue
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
    raise RuntimeError("the database kept refusing this write; try again")


# Runs a batch on the connection as one transaction and commits it.
BatchFn = Callable[[Any, Sequence[Request]], Awaitable[list[Result | Exception]]]


class GroupCommitter(Generic[Request, Result]):
    """The writer task and its queue. While a batch is being written the loop goes on
    serving: the batch's waits (database round trips, the write lock, the commit) are
    awaited, not blocked on, and no second thread contends with the loop for the GIL.

    `connect` makes the writer's connection (anything with async rollback() and close());
    `batch_fn` runs a batch on it as one transaction and commits it.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[Any]],
        batch_fn: BatchFn[Request, Result],
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
