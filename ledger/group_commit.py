"""Group commit: concurrent requests share one database transaction and one durable commit.

The server's front end (rust_alloc/src/front.rs) queues concurrent RecordLiquidation calls and
hands everything queued to one writer thread as a batch; `BatchWriter` runs the batch in one
transaction on the writer's own connection and commits, and only then are the calls answered,
so every reply still follows its own durable write. A request's own rule failure (a
conflicting id, a closed cycle) is returned by the batch function for that request alone and
never fails its batch-mates; a driver error (a concurrent writer's row, a lost connection)
reruns the batch on a fresh connection, and a batch that fails otherwise is split into single
requests, so that only the request at fault fails. A batch the database keeps refusing fails
as a whole with Unavailable (nothing of it was written; the client retries, idempotently).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from sqlalchemy.orm import Session

from ledger.db.batch import DRIVER_ERRORS
from ledger.db.session import Database
from ledger.errors import Unavailable

log = logging.getLogger("ledger.group_commit")

Request = TypeVar("Request")
Result = TypeVar("Result")

BATCH_REQUESTS_MAX = 1024  # calls the front end hands over at most, as one transaction
BATCH_ATTEMPTS_MAX = 3  # a batch that hit a concurrent writer's row (another process) re-reads
RETRY_EXHAUSTED = "the database kept refusing this write; nothing was written, try again"


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
    raise Unavailable(RETRY_EXHAUSTED)


# Runs a batch on the connection as one transaction and commits it.
BatchFn = Callable[[Any, Sequence[Request]], list[Result | Exception]]


class BatchWriter(Generic[Request, Result]):
    """The writer's connection and the rules that keep a failure to its own request.

    Used from one thread at a time (the front end's writer). `connect` makes the connection
    (anything with rollback() and close()); `batch_fn` runs a batch on it as one transaction
    and commits it.
    """

    def __init__(self, connect: Callable[[], Any], batch_fn: BatchFn[Request, Result]) -> None:
        self._connect = connect
        self._batch_fn = batch_fn
        self._connection: Any = None
        self._closed = False

    def write(self, requests: Sequence[Request]) -> list[Result | Exception]:
        """Each request's result once its batch is durable, or its error."""
        if self._closed:
            raise RuntimeError("the server is stopping")
        for attempt in range(1, BATCH_ATTEMPTS_MAX + 1):
            try:
                return self._transaction(requests)
            except DRIVER_ERRORS as error:
                log.warning("batch of %d failed (attempt %d): %s", len(requests), attempt, error)
                self._discard()
                continue
            except Exception as error:
                if len(requests) == 1:
                    return [error]
                log.exception("batch of %d failed; running its requests one by one", len(requests))
                return [outcome for request in requests for outcome in self.write([request])]
        # The database, not a request, is at fault: the batch fails as a whole, at once.
        return [Unavailable(RETRY_EXHAUSTED) for _ in requests]

    def close(self) -> None:
        """Close the connection; later batches are refused."""
        self._closed = True
        self._discard()

    def _transaction(self, requests: Sequence[Request]) -> list[Result | Exception]:
        if self._connection is None:
            self._connection = self._connect()
        connection = self._connection
        try:
            outcomes = self._batch_fn(connection, requests)  # and commits
        except BaseException:
            with contextlib.suppress(Exception):
                connection.rollback()
            raise
        if len(outcomes) != len(requests):  # committed, but nobody is told a wrong outcome
            raise AssertionError(f"{len(outcomes)} outcomes for {len(requests)} requests")
        return outcomes

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()
