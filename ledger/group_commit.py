"""Group commit: concurrent liquidations share one database transaction and one durable commit.

Each RecordLiquidation call, and each RecordLiquidations call with all its items, is one
`Pending` in a bounded queue; one writer thread per process takes everything queued (up to
`batch_max` items) as the next transaction while the calls wait on the event loop, so a
unary call is a batch of one and a batch is many, and every reply follows its own durable
write.

The rules a standard server keeps:
- At most `pending_max` items wait per process, counted from the moment a call is queued to
  its answer; beyond it a call is refused at once (ResourceExhausted), nothing queued.
- A call whose deadline passed, or whose caller went away, before its transaction took its
  locks is not written and is answered DeadlineExceeded (or Cancelled). Once the locks are
  taken the call is committing: it stands, and a retry with the same id returns its result.
- A request's own rule failure fails it alone; a driver error (a concurrent writer, a lock
  or statement timeout, a lost connection) reruns the transaction on a fresh connection; any
  other failure reruns the batch's requests one by one, so that only the one at fault fails;
  a transaction the database keeps refusing fails as a whole with Unavailable (nothing of it
  was written; the client retries, idempotently).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from ledger.db.batch import DRIVER_ERRORS
from ledger.db.session import WriterConnection
from ledger.errors import Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable
from ledger.limits import BATCH_ITEMS_MAX_DEFAULT, PENDING_LIQUIDATIONS_MAX_DEFAULT

log = logging.getLogger("ledger.group_commit")

Request = TypeVar("Request")
Result = TypeVar("Result")

BATCH_ATTEMPTS_MAX = 3  # a transaction that hit a driver error is rerun on a fresh connection
# Worth a fresh connection: the driver's errors, and a lock wait that timed out.
_RETRYABLE: tuple[type[Exception], ...] = (*DRIVER_ERRORS, Unavailable)
RETRY_EXHAUSTED = "the database kept refusing this write; nothing was written, try again"

# Runs the requests as one transaction on the connection; `admit`, called once the
# transaction holds its locks, says which requests are still wanted. Returns each request's
# result or error, None for one not admitted.
BatchFn = Callable[
    [WriterConnection, Sequence[Request], Callable[[], Sequence[bool]]],
    list[Result | Exception | None],
]


class _State(enum.Enum):
    QUEUED = 1  # waiting for the writer
    TAKEN = 2  # in the writer's next transaction, which is waiting for its locks
    COMMITTING = 3  # the transaction holds its locks: it will be written
    ANSWERED = 4  # its outcomes are set, or it was abandoned


class Pending(Generic[Request, Result]):
    """One call's requests on their way through the writer."""

    __slots__ = ("deadline", "future", "requests", "state", "timer")

    def __init__(
        self,
        requests: Sequence[Request],
        deadline: float | None,
        future: asyncio.Future[list[Result | Exception]],
    ) -> None:
        self.requests = requests
        self.deadline = deadline  # time.monotonic() seconds, None without a deadline
        self.future = future
        self.state = _State.QUEUED
        self.timer: asyncio.TimerHandle | None = None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


class GroupCommitter(Generic[Request, Result]):
    """The process's one liquidation writer: a bounded queue and the thread that drains it.

    `submit` and `result` are called on the event loop; the writer thread answers each call by
    setting its future on the loop (one wake-up per transaction).
    """

    def __init__(
        self,
        connect: Callable[[], WriterConnection],
        batch_fn: BatchFn[Request, Result],
        *,
        pending_max: int = PENDING_LIQUIDATIONS_MAX_DEFAULT,
        batch_max: int = BATCH_ITEMS_MAX_DEFAULT,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._connect = connect
        self._batch_fn = batch_fn
        self.pending_max = pending_max
        self._batch_max = batch_max
        self._on_batch = on_batch
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[Pending[Request, Result]] = collections.deque()
        self._pending_items = 0
        self._closing = False
        self._connection: WriterConnection | None = None
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()

    @property
    def pending_items(self) -> int:
        """Items queued or being written, not yet answered."""
        return self._pending_items

    # --- on the event loop -----------------------------------------------------------------

    def submit(
        self, requests: Sequence[Request], timeout_s: float | None
    ) -> Pending[Request, Result]:
        """Queue one call's requests, or refuse them at once: the queue is full
        (ResourceExhausted) or the server is stopping (Unavailable)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending: Pending[Request, Result] = Pending(requests, deadline, loop.create_future())
        count = len(requests)
        with self._lock:
            if self._closing:
                raise Unavailable("the server is stopping; nothing was written, try again")
            if self._pending_items + count > self.pending_max:
                raise ResourceExhausted(
                    f"{self._pending_items} liquidations are already waiting to be written "
                    f"(at most {self.pending_max} per server process, --pending-max); nothing "
                    f"was written, retry after a short pause"
                )
            self._pending_items += count
            self._queue.append(pending)
            self._wake.notify()
        if timeout_s is not None:
            pending.timer = loop.call_at(loop.time() + timeout_s, self._expire, pending)
        return pending

    async def result(self, pending: Pending[Request, Result]) -> list[Result | Exception]:
        """The call's outcomes once durable. If the call is cancelled (the client went away,
        or grpc ended it at its deadline) while it is still queued, it is not written."""
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._abandon(pending, Cancelled("the call was cancelled before it was written"))
            raise

    def _expire(self, pending: Pending[Request, Result]) -> None:
        self._abandon(
            pending,
            DeadlineExceeded(
                "the call's deadline passed while it waited to be written; nothing was written"
            ),
        )

    def _abandon(self, pending: Pending[Request, Result], error: Exception) -> None:
        """Drop a call that is not yet committing (the writer skips it); one that is stands."""
        with self._lock:
            if pending.state not in (_State.QUEUED, _State.TAKEN):
                return
            pending.state = _State.ANSWERED
            self._pending_items -= len(pending.requests)
        if not pending.future.done():
            pending.future.set_exception(error)

    # --- on the writer thread --------------------------------------------------------------

    def close(self) -> None:
        """Answer everything queued, then stop the thread and close the connection; calls
        submitted from now on are refused."""
        with self._lock:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        self._discard()

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._write(batch)
            except BaseException as error:  # never leave a caller waiting
                log.exception("the liquidation writer failed")
                failed: list[list[Result | Exception | None]] = [
                    [error if isinstance(error, Exception) else Unavailable(RETRY_EXHAUSTED)]
                    * len(p.requests)
                    for p in batch
                ]
                self._answer(batch, failed)

    def _take(self) -> list[Pending[Request, Result]] | None:
        """Wait for calls and take the queued ones, up to batch_max items (at least one call);
        calls abandoned meanwhile are skipped. None once closing and drained."""
        with self._lock:
            while True:
                while self._queue and self._queue[0].state is not _State.QUEUED:
                    self._queue.popleft()
                if self._queue:
                    break
                if self._closing:
                    return None
                self._wake.wait()
            batch: list[Pending[Request, Result]] = []
            items = 0
            while self._queue:
                pending = self._queue[0]
                if pending.state is _State.QUEUED:
                    if batch and items + len(pending.requests) > self._batch_max:
                        break
                    pending.state = _State.TAKEN
                    batch.append(pending)
                    items += len(pending.requests)
                self._queue.popleft()
            return batch

    def _admit(self, batch: Sequence[Pending[Request, Result]]) -> list[bool]:
        """With the transaction's locks held: the calls still wanted become committing; those
        abandoned or past their deadline are dropped. One flag per request."""
        now = time.monotonic()
        expired: list[Pending[Request, Result]] = []
        flags: list[bool] = []
        with self._lock:
            for pending in batch:
                if pending.state is _State.TAKEN and pending.expired(now):
                    pending.state = _State.ANSWERED
                    self._pending_items -= len(pending.requests)
                    expired.append(pending)
                elif pending.state is _State.TAKEN:
                    pending.state = _State.COMMITTING
                flags.extend([pending.state is _State.COMMITTING] * len(pending.requests))
        for pending in expired:
            self._on_loop(pending, _deadline_error)
        return flags

    def _write(self, batch: list[Pending[Request, Result]]) -> None:
        requests = [r for pending in batch for r in pending.requests]
        if self._on_batch is not None:
            self._on_batch(len(requests))
        outcomes = self._transaction(requests, lambda: self._admit(batch))
        per_call: list[list[Result | Exception | None]] = []
        start = 0
        for pending in batch:
            per_call.append(outcomes[start : start + len(pending.requests)])
            start += len(pending.requests)
        self._answer(batch, per_call)

    def _transaction(
        self, requests: Sequence[Request], admit: Callable[[], Sequence[bool]]
    ) -> list[Result | Exception | None]:
        for attempt in range(1, BATCH_ATTEMPTS_MAX + 1):
            try:
                return self._once(requests, admit)
            except _RETRYABLE as error:
                log.warning("batch of %d failed (attempt %d): %s", len(requests), attempt, error)
                self._discard()
                continue
            except Exception as error:
                if len(requests) == 1:
                    alone: list[Result | Exception | None] = [error]
                    return alone
                log.exception("batch of %d failed; running its requests one by one", len(requests))
                flags = list(admit())
                outcomes: list[Result | Exception | None] = []
                for request, wanted in zip(requests, flags, strict=True):
                    if wanted:
                        outcomes.extend(self._transaction([request], lambda: [True]))
                    else:
                        outcomes.append(None)
                return outcomes
        # The database, not a request, is at fault: the transaction fails as a whole, at once.
        refused: list[Result | Exception | None] = [Unavailable(RETRY_EXHAUSTED) for _ in requests]
        return refused

    def _once(
        self, requests: Sequence[Request], admit: Callable[[], Sequence[bool]]
    ) -> list[Result | Exception | None]:
        if self._connection is None:
            self._connection = self._connect()
        connection = self._connection
        try:
            outcomes = self._batch_fn(connection, requests, admit)  # and commits
        except BaseException:
            try:
                connection.rollback()
            except Exception:  # the connection is gone; _discard closes what is left
                self._discard()
            raise
        if len(outcomes) != len(requests):  # committed, but nobody is told a wrong outcome
            raise AssertionError(f"{len(outcomes)} outcomes for {len(requests)} requests")
        return outcomes

    def _answer(
        self,
        batch: Sequence[Pending[Request, Result]],
        outcomes: Sequence[Sequence[Result | Exception | None]],
    ) -> None:
        """Set each committed call's outcomes on the loop; calls dropped at admission were
        answered then."""
        done: list[tuple[Pending[Request, Result], list[Result | Exception]]] = []
        with self._lock:
            for pending, results in zip(batch, outcomes, strict=True):
                if pending.state is _State.ANSWERED:
                    continue
                pending.state = _State.ANSWERED
                self._pending_items -= len(pending.requests)
                done.append((pending, [_unwritten() if o is None else o for o in results]))
        if done:
            loop = done[0][0].future.get_loop()
            try:
                loop.call_soon_threadsafe(_set_results, done)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                log.debug("answers of %d calls dropped: the event loop is closed", len(done))

    def _on_loop(self, pending: Pending[Request, Result], error: Callable[[], Exception]) -> None:
        try:
            pending.future.get_loop().call_soon_threadsafe(_set_error, pending, error())
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.debug("an expired call's answer dropped: the event loop is closed")

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                log.debug("closing the writer's connection failed", exc_info=True)


def _deadline_error() -> Exception:
    return DeadlineExceeded(
        "the call's deadline passed while it waited to be written; nothing was written"
    )


def _unwritten() -> Exception:
    return Cancelled("the call was cancelled before it was written")


def _set_results(done: list[tuple[Pending[Any, Any], list[Any]]]) -> None:
    for pending, results in done:
        if pending.timer is not None:
            pending.timer.cancel()
        if not pending.future.done():
            pending.future.set_result(results)


def _set_error(pending: Pending[Any, Any], error: Exception) -> None:
    if pending.timer is not None:
        pending.timer.cancel()
    if not pending.future.done():
        pending.future.set_exception(error)
