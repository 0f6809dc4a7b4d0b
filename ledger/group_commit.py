"""Group commit: concurrent liquidations share one database transaction and one durable commit.

Each RecordLiquidation call, and each RecordLiquidations call with all its items, is one
`Pending` in a bounded queue of the server process; the next transaction takes everything
queued (up to `batch_max` items) while the calls wait, so a unary call is a batch of one and
a batch is many, and every reply follows its own durable write.

`GroupCommitter` lives on the server's event loop, with no thread of its own: queueing,
handing a batch to the writer, its admission and its answers are callbacks of the loop that
serves the calls. (A thread of its own had to take the interpreter lock from the busy loop
at each of those steps, and waited for it: measured, unary calls from 16 callers spent a
third of their time so.)

It keeps the rules a standard server keeps:
- At most `pending_max` items wait per process, counted from the moment a call is queued to
  its answer; beyond it a call is refused at once (ResourceExhausted), nothing queued.
- A call whose deadline passed, or whose caller went away, before its transaction took its
  locks is not written (grpc tells the client DEADLINE_EXCEEDED or CANCELLED). Once the
  locks are taken the call is committing: it stands, and a retry with the same id returns
  its result.
- Group commit's delay: while the writer is idle and fewer items are queued than the last
  transaction held (its callers have not come back yet), the next transaction waits up to
  BATCH_LINGER_SECONDS for them, so that concurrent callers keep sharing commits instead of
  each paying for one.

`BatchRunner` keeps the rules of a transaction that fails: a request's own rule failure fails
it alone; a driver error (a concurrent writer, a lock or statement timeout, a lost
connection) reruns the transaction on a fresh connection; any other failure reruns the
batch's requests one by one, so that only the one at fault fails; a transaction the
database keeps refusing fails as a whole with Unavailable (nothing of it was written; the
client retries, idempotently).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from ledger.db.batch import DRIVER_ERRORS
from ledger.db.session import WriterConnection
from ledger.errors import Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable
from ledger.limits import BATCH_ITEMS_MAX_DEFAULT, PENDING_LIQUIDATIONS_MAX_DEFAULT

log = logging.getLogger("ledger.group_commit")

Call = TypeVar("Call")
Reply = TypeVar("Reply")
Request = TypeVar("Request")
Result = TypeVar("Result")

# At most this long an idle writer waits for the callers of its last transaction to come back
# (PostgreSQL's commit_delay, MySQL's binlog_group_commit_sync_delay, by another name).
BATCH_LINGER_SECONDS = 0.002


BATCH_ATTEMPTS_MAX = 3  # a transaction that hit a driver error is rerun on a fresh connection
# Worth a fresh connection: the driver's errors, and a lock wait that timed out.
_RETRYABLE: tuple[type[Exception], ...] = (*DRIVER_ERRORS, Unavailable)
RETRY_EXHAUSTED = "the database kept refusing this write; nothing was written, try again"

PIPELINE_DEPTH = 2  # transactions handed to the writer at once (one being written, one next)
# Queued items from which the next transaction is handed over while one is being written:
# enough that its own cost (a commit, a dozen statements) is small beside its items'. Unary
# calls never queue so many; RecordLiquidations calls of a few hundred items and more do.
# (Measured with 4 callers of 1,000 items: on SQLite +8% items/s against waiting for half of
# batch_max, which 4,000 queued items never reached.)
PIPELINE_ITEMS_MIN = 256

Admit = Callable[[], Sequence[bool]]


class Writer(Protocol[Call, Reply]):
    """Writes batches of calls, each as one transaction, in the order they were handed over
    (a batch may be handed over while the one before it is being written: the writer
    prepares it meanwhile).

    `write` returns each call's reply (or error), None for a call not admitted. Once the
    batch's transaction holds its locks, the calls still wanted are admitted: those not
    abandoned and not past their deadline. `admit`, a plain function to be called on the
    loop, tells which; a writer may instead keep track itself (each call's `deadline`, and
    its `on_abandon`, which it may set and the committer calls when the caller goes away
    while the call is being written).
    """

    async def write(
        self, batch: Sequence[Pending[Call, Reply]], admit: Admit
    ) -> Sequence[Reply | Exception | None]: ...

    async def aclose(self) -> None: ...


class _State(enum.Enum):
    QUEUED = 1  # waiting for the writer
    TAKEN = 2  # in the writer's next transaction, which is waiting for its locks
    COMMITTING = 3  # the transaction holds its locks: it will be written
    ANSWERED = 4  # its reply is set, or it was abandoned


class Pending(Generic[Call, Reply]):
    """One call on its way through the writer."""

    __slots__ = ("call", "counted", "deadline", "future", "items", "on_abandon", "state")

    def __init__(
        self,
        call: Call,
        items: int,
        deadline: float | None,
        future: asyncio.Future[Reply | Exception],
    ) -> None:
        self.call = call
        self.items = items  # liquidations it carries (what pending_max counts)
        self.deadline = deadline  # time.monotonic() seconds, None without a deadline
        self.future = future
        self.state = _State.QUEUED
        self.counted = True  # its items count toward pending_max
        self.on_abandon: Callable[[], None] | None = None  # set by the writer that has it

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    @property
    def abandoned(self) -> bool:
        """Taken for a batch, then left by its caller before the writer had it."""
        return self.state is _State.ANSWERED


class GroupCommitter(Generic[Call, Reply]):
    """The process's liquidation queue, drained into `writer` one transaction at a time.

    Everything but `close` and `pending_items` runs on the event loop of the calls (the one
    of the first `submit`).
    """

    def __init__(
        self,
        writer: Writer[Call, Reply],
        *,
        pending_max: int = PENDING_LIQUIDATIONS_MAX_DEFAULT,
        batch_max: int = BATCH_ITEMS_MAX_DEFAULT,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._writer = writer
        self.pending_max = pending_max
        self._batch_max = batch_max
        self._pipeline_items = min(PIPELINE_ITEMS_MIN, max(1, batch_max // 2))
        self._on_batch = on_batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: collections.deque[Pending[Call, Reply]] = collections.deque()
        self._pending_items = 0
        self._queued_items = 0
        self._last_batch_items = 0
        self._in_flight = 0  # batches handed to the writer, not yet answered
        self._linger: asyncio.TimerHandle | None = None
        self._closing = False
        self._drained: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending_items(self) -> int:
        """Items queued or being written, not yet answered (read from any thread)."""
        return self._pending_items

    def submit(self, call: Call, items: int, timeout_s: float | None) -> Pending[Call, Reply]:
        """Queue one call carrying `items` liquidations, or refuse it at once: the queue is
        full (ResourceExhausted) or the server is stopping (Unavailable)."""
        if self._closing:
            raise Unavailable("the server is stopping; nothing was written, try again")
        if items > self.pending_max:
            raise ResourceExhausted(
                f"this call carries {items} liquidations, more than the {self.pending_max} "
                f"a server process lets wait (--pending-max; {self._pending_items} are "
                "waiting now); nothing was written: retry them in smaller calls"
            )
        if self._pending_items + items > self.pending_max:
            raise ResourceExhausted(
                f"{self._pending_items} liquidations are already waiting to be written "
                f"(at most {self.pending_max} per server process, --pending-max); nothing "
                "was written, retry after a short pause"
            )
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending: Pending[Call, Reply] = Pending(call, items, deadline, loop.create_future())
        self._pending_items += items
        self._queued_items += items
        self._queue.append(pending)
        self._schedule()
        return pending

    async def result(self, pending: Pending[Call, Reply]) -> Reply | Exception:
        """The call's reply once durable. grpc cancels the call when the client goes away or
        its deadline passes (the client is then told CANCELLED or DEADLINE_EXCEEDED); a call
        cancelled before its transaction holds its locks is not written."""
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._abandon(pending)
            raise

    def _abandon(self, pending: Pending[Call, Reply]) -> None:
        """Drop a call that is not yet committing (the writer skips it); one that is stands."""
        if pending.state is _State.QUEUED:
            self._queued_items -= pending.items
            self._release(pending)
        elif pending.state is not _State.TAKEN:
            return
        elif pending.on_abandon is not None:
            pending.on_abandon()
        # Taken, its items count until its batch is answered: the writer may be writing them.
        pending.state = _State.ANSWERED

    def _release(self, pending: Pending[Call, Reply]) -> None:
        """The call's items no longer count toward pending_max (once, whatever comes first)."""
        if pending.counted:
            pending.counted = False
            self._pending_items -= pending.items

    def close(self) -> None:
        """From any thread but the loop's: answer everything queued, then close the writer;
        calls submitted from now on are refused."""
        loop = self._loop
        if loop is None or loop.is_closed():  # never used
            self._closing = True
            asyncio.run(self._writer.aclose())
            return
        asyncio.run_coroutine_threadsafe(self._close(), loop).result()

    async def _close(self) -> None:
        self._closing = True
        self._drained = asyncio.Event()
        self._schedule()
        await self._drained.wait()
        await self._writer.aclose()

    # --- handing batches to the writer ------------------------------------------------------

    def _schedule(self) -> None:
        """Hand the next batch over if it is time: the writer is idle and the queue holds what
        the last transaction held (else within BATCH_LINGER_SECONDS of now), or one batch is
        being written and PIPELINE_ITEMS_MIN items (or half of batch_max, if less) are queued
        (RecordLiquidations calls: the batch waits in the writer's pipe, ready when the one
        before commits). Unary calls queued behind a transaction go together in the next
        one."""
        while self._queue and self._queue[0].state is not _State.QUEUED:
            self._queue.popleft()
        if not self._queue:
            if self._closing and self._in_flight == 0 and self._drained is not None:
                self._drained.set()
            return
        if self._in_flight == 0:
            wanted = min(self._last_batch_items, self._batch_max)
            if self._queued_items < wanted and not self._closing:
                if self._linger is None:
                    assert self._loop is not None
                    self._linger = self._loop.call_later(BATCH_LINGER_SECONDS, self._lingered)
                return
        elif self._in_flight >= PIPELINE_DEPTH or self._queued_items < self._pipeline_items:
            return
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._start(self._take_queued())

    def _lingered(self) -> None:
        self._linger = None
        self._last_batch_items = 0  # whoever is queued goes now
        self._schedule()

    def _take_queued(self) -> list[Pending[Call, Reply]]:
        """The queued calls up to batch_max items (at least one)."""
        batch: list[Pending[Call, Reply]] = []
        items = 0
        while self._queue:
            pending = self._queue[0]
            if pending.state is _State.QUEUED:
                if batch and items + pending.items > self._batch_max:
                    break
                pending.state = _State.TAKEN
                batch.append(pending)
                items += pending.items
            self._queue.popleft()
        self._queued_items -= items
        self._last_batch_items = items
        return batch

    def _start(self, batch: list[Pending[Call, Reply]]) -> None:
        if self._on_batch is not None:
            try:
                self._on_batch(sum(p.items for p in batch))
            except Exception:  # a metric must never strand a batch
                log.exception("the batch observer failed")
        self._in_flight += 1
        assert self._loop is not None
        task = self._loop.create_task(self._write(batch))
        self._tasks.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)

    async def _write(self, batch: list[Pending[Call, Reply]]) -> None:
        try:
            replies = await self._writer.write(batch, lambda: self._admit(batch))
            if len(replies) != len(batch):
                raise AssertionError(f"{len(replies)} replies for {len(batch)} calls")
        except BaseException as error:  # never leave a caller waiting
            log.exception("the liquidation writer failed", exc_info=error)
            reply = error if isinstance(error, Exception) else Unavailable(RETRY_EXHAUSTED)
            replies = [reply] * len(batch)
        finally:
            self._in_flight -= 1
        self._answer(batch, replies)
        self._schedule()

    def _admit(self, batch: Sequence[Pending[Call, Reply]]) -> list[bool]:
        """With the transaction's locks held: the calls still wanted become committing; those
        abandoned or past their deadline are dropped (answered DeadlineExceeded). One flag per
        call."""
        now = time.monotonic()
        flags: list[bool] = []
        for pending in batch:
            if pending.state is _State.TAKEN and pending.expired(now):
                pending.state = _State.ANSWERED
                self._release(pending)
                _set(pending, DeadlineExceeded(EXPIRED))
            elif pending.state is _State.TAKEN:
                pending.state = _State.COMMITTING
            flags.append(pending.state is _State.COMMITTING)
        return flags

    def _answer(
        self,
        batch: Sequence[Pending[Call, Reply]],
        replies: Sequence[Reply | Exception | None],
    ) -> None:
        """Set each committed call's reply; calls dropped at admission were answered then."""
        for pending, reply in zip(batch, replies, strict=True):
            self._release(pending)
            if pending.state is _State.ANSWERED:
                continue
            pending.state = _State.ANSWERED
            _set(pending, Cancelled(_UNWRITTEN) if reply is None else reply)


EXPIRED = "the call's deadline passed while it waited to be written; nothing was written"
_UNWRITTEN = "the call was cancelled before it was written"


def _set(pending: Pending[Any, Any], reply: Any) -> None:
    if not pending.future.done():
        pending.future.set_result(reply)


class _Committed(RuntimeError):
    """A batch committed but its outcomes cannot be told (a bug): each request gets this
    error (INTERNAL), and nothing is run again."""


BatchFn = Callable[
    [WriterConnection, Sequence[Request], Admit], Sequence[Result | Exception | None]
]


class BatchRunner(Generic[Request, Result]):
    """A writer's connection, and the rules that keep a failure to its own request.

    Used from one thread at a time. `connect` makes the connection; `batch_fn` runs a batch
    on it as one transaction and commits it, asking `admit` (one flag per request) once it
    holds its locks.
    """

    def __init__(
        self, connect: Callable[[], WriterConnection], batch_fn: BatchFn[Request, Result]
    ) -> None:
        self._connect = connect
        self._batch_fn = batch_fn
        self._connection: WriterConnection | None = None

    def run(self, requests: Sequence[Request], admit: Admit) -> list[Result | Exception | None]:
        """Each request's result once its batch is durable, its error, or None for one not
        admitted."""
        for attempt in range(1, BATCH_ATTEMPTS_MAX + 1):
            try:
                return self._once(requests, admit)
            except _Committed as error:  # written: running it again would write it twice
                log.error("%s", error)
                return [error for _ in requests]
            except (EOFError, BrokenPipeError):  # the server asking admit() is gone: stop
                raise
            except _RETRYABLE as error:
                log.warning("batch of %d failed (attempt %d): %s", len(requests), attempt, error)
                self.discard()
                continue
            except Exception as error:
                if len(requests) == 1:
                    return [error]
                log.exception("batch of %d failed; running its requests one by one", len(requests))
                outcomes: list[Result | Exception | None] = []
                for request, wanted in zip(requests, admit(), strict=True):
                    outcomes.extend(self.run([request], lambda: [True]) if wanted else [None])
                return outcomes
        # The database, not a request, is at fault: the transaction fails as a whole, at once.
        return [Unavailable(RETRY_EXHAUSTED) for _ in requests]

    def _once(self, requests: Sequence[Request], admit: Admit) -> list[Result | Exception | None]:
        if self._connection is None:
            self._connection = self._connect()
        connection = self._connection
        try:
            outcomes = list(self._batch_fn(connection, requests, admit))  # and commits
        except BaseException:
            try:
                connection.rollback()
            except Exception:  # the connection is gone; discard() closes what is left
                self.discard()
            raise
        if len(outcomes) != len(requests):  # committed, but nobody is told a wrong outcome
            raise _Committed(
                f"a committed batch gave {len(outcomes)} outcomes for {len(requests)} requests"
            )
        return outcomes

    def discard(self) -> None:
        """Close the connection; the next batch makes a new one."""
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                log.debug("closing the writer's connection failed", exc_info=True)


class SyncWriter(Generic[Call, Reply]):
    """A Writer over a plain function that writes a batch on a thread of its own, one batch
    after the other; its `admit` is answered on the loop."""

    def __init__(
        self, write: Callable[[Sequence[Call], Admit], Sequence[Reply | Exception | None]]
    ) -> None:
        self._write = write
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ledger-sync-writer"
        )

    async def write(
        self, batch: Sequence[Pending[Call, Reply]], admit: Admit
    ) -> Sequence[Reply | Exception | None]:
        loop = asyncio.get_running_loop()
        calls = [p.call for p in batch]

        def admit_on_loop() -> Sequence[bool]:
            flags: concurrent.futures.Future[Sequence[bool]] = concurrent.futures.Future()

            def run() -> None:
                flags.set_result(admit())

            loop.call_soon_threadsafe(run)
            return flags.result()

        return await loop.run_in_executor(self._thread, self._write, calls, admit_on_loop)

    async def aclose(self) -> None:
        self._thread.shutdown(wait=False)
