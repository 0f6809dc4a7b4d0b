"""Group commit: concurrent liquidations share one database transaction and one durable commit.

Each RecordLiquidation call, and each RecordLiquidations call with all its items, is one
`Pending` in a bounded queue of the server process; one writer takes everything queued (up
to `batch_max` items) as the next transaction while the calls wait on the event loop, so a
unary call is a batch of one and a batch is many, and every reply follows its own durable
write.

`GroupCommitter` keeps the rules a standard server keeps:
- At most `pending_max` items wait per process, counted from the moment a call is queued to
  its answer; beyond it a call is refused at once (ResourceExhausted), nothing queued.
- A call whose deadline passed, or whose caller went away, before its transaction took its
  locks is not written (grpc tells the client DEADLINE_EXCEEDED or CANCELLED). Once the
  locks are taken the call is committing: it stands, and a retry with the same id returns
  its result.
- Group commit's delay: while fewer items are queued than the last transaction held (its
  callers have not come back yet), the writer waits up to BATCH_LINGER_SECONDS for them, so
  that concurrent callers keep sharing commits instead of each paying for one.

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
import enum
import logging
import threading
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
CallIn = TypeVar("CallIn", contravariant=True)
ReplyOut = TypeVar("ReplyOut", covariant=True)
Request = TypeVar("Request")
Result = TypeVar("Result")

# At most this long the writer waits for the callers of its last transaction to come back
# (PostgreSQL's commit_delay, MySQL's binlog_group_commit_sync_delay, by another name).
BATCH_LINGER_SECONDS = 0.002


BATCH_ATTEMPTS_MAX = 3  # a transaction that hit a driver error is rerun on a fresh connection
# Worth a fresh connection: the driver's errors, and a lock wait that timed out.
_RETRYABLE: tuple[type[Exception], ...] = (*DRIVER_ERRORS, Unavailable)
RETRY_EXHAUSTED = "the database kept refusing this write; nothing was written, try again"

PIPELINE_DEPTH = 2  # transactions handed to the writer at once (one being written, one next)

Admit = Callable[[], Sequence[bool]]


class Writer(Protocol[CallIn, ReplyOut]):
    """Writes batches of calls, each as one transaction, in the order they were sent.

    `send` hands a batch over (the writer may start on it while an earlier one is being
    written: parsing, validating); `finish` waits for it and returns each call's reply (or
    error), None for a call not admitted. `admit`, called once the batch's transaction holds
    its locks, says which calls are still wanted.
    """

    def send(self, calls: Sequence[CallIn]) -> object: ...

    def finish(self, ticket: object, admit: Admit) -> Sequence[ReplyOut | Exception | None]: ...


class _State(enum.Enum):
    QUEUED = 1  # waiting for the writer
    TAKEN = 2  # in the writer's next transaction, which is waiting for its locks
    COMMITTING = 3  # the transaction holds its locks: it will be written
    ANSWERED = 4  # its reply is set, or it was abandoned


class Pending(Generic[Call, Reply]):
    """One call on its way through the writer."""

    __slots__ = ("call", "deadline", "future", "items", "state")

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

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


class GroupCommitter(Generic[Call, Reply]):
    """The process's liquidation queue and the thread that drains it into `write`.

    `submit` and `result` are called on the event loop; the thread answers each call by
    setting its future on the loop (one wake-up per transaction).
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
        self._on_batch = on_batch
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[Pending[Call, Reply]] = collections.deque()
        self._pending_items = 0
        self._queued_items = 0
        self._last_batch_items = 0
        self._wake_at = 1  # queued items at which a submit wakes the waiting writer
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()

    @property
    def pending_items(self) -> int:
        """Items queued or being written, not yet answered."""
        return self._pending_items

    # --- on the event loop -----------------------------------------------------------------

    def submit(self, call: Call, items: int, timeout_s: float | None) -> Pending[Call, Reply]:
        """Queue one call carrying `items` liquidations, or refuse it at once: the queue is
        full (ResourceExhausted) or the server is stopping (Unavailable)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending: Pending[Call, Reply] = Pending(call, items, deadline, loop.create_future())
        with self._lock:
            if self._closing:
                raise Unavailable("the server is stopping; nothing was written, try again")
            if items > self.pending_max:
                raise ResourceExhausted(
                    f"this call carries {items} liquidations, more than the {self.pending_max} "
                    f"a server process lets wait (--pending-max; {self._pending_items} are "
                    "waiting now); nothing was written: send them in smaller calls"
                )
            if self._pending_items + items > self.pending_max:
                raise ResourceExhausted(
                    f"{self._pending_items} liquidations are already waiting to be written "
                    f"(at most {self.pending_max} per server process, --pending-max); nothing "
                    "was written, retry after a short pause"
                )
            self._pending_items += items
            self._queued_items += items
            self._queue.append(pending)
            if self._queued_items >= self._wake_at:  # wake the writer only when it wants to be
                self._wake.notify()
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
        with self._lock:
            if pending.state is _State.QUEUED:
                self._queued_items -= pending.items
            elif pending.state is not _State.TAKEN:
                return
            pending.state = _State.ANSWERED
            self._pending_items -= pending.items

    # --- on the writer thread --------------------------------------------------------------

    def close(self) -> None:
        """Answer everything queued, then stop the thread; calls submitted from now on are
        refused."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        self._thread.join()

    def _run(self) -> None:
        """Take batches and have them written. While one is being written, the next is
        handed over as soon as half a transaction's worth is queued, so that the writer
        prepares it meanwhile (large RecordLiquidations calls); unary calls wait for the
        commit in progress and go together in the next."""
        in_flight: collections.deque[tuple[list[Pending[Call, Reply]], object]] = (
            collections.deque()
        )
        while True:
            if not in_flight:
                batch = self._take(wait=True)
                if batch is None:
                    return
                self._start(batch, in_flight)
            if len(in_flight) < PIPELINE_DEPTH:
                following = self._take(wait=False)
                if following:
                    self._start(following, in_flight)
            if in_flight:
                self._finish(*in_flight.popleft())

    def _start(
        self,
        batch: list[Pending[Call, Reply]],
        in_flight: collections.deque[tuple[list[Pending[Call, Reply]], object]],
    ) -> None:
        if self._on_batch is not None:
            self._on_batch(sum(p.items for p in batch))
        try:
            in_flight.append((batch, self._writer.send([p.call for p in batch])))
        except BaseException as error:  # never leave a caller waiting
            self._fail(batch, error)

    def _finish(self, batch: list[Pending[Call, Reply]], ticket: object) -> None:
        try:
            replies = self._writer.finish(ticket, lambda: self._admit(batch))
            if len(replies) != len(batch):
                raise AssertionError(f"{len(replies)} replies for {len(batch)} calls")
        except BaseException as error:  # never leave a caller waiting
            self._fail(batch, error)
            return
        self._answer(batch, replies)

    def _fail(self, batch: list[Pending[Call, Reply]], error: BaseException) -> None:
        log.exception("the liquidation writer failed", exc_info=error)
        reply = error if isinstance(error, Exception) else Unavailable(RETRY_EXHAUSTED)
        self._answer(batch, [reply] * len(batch))

    def _take(self, *, wait: bool) -> list[Pending[Call, Reply]] | None:
        """Take the queued calls, up to batch_max items (at least one call); calls abandoned
        meanwhile are skipped.

        wait: block for calls, then group commit's delay; None once closing and drained.
        Otherwise take them only if half a transaction's worth is queued (else None)."""
        with self._lock:
            while self._queue and self._queue[0].state is not _State.QUEUED:
                self._queue.popleft()
            if not wait:
                if self._queued_items * 2 < self._batch_max or not self._queue:
                    return None
                return self._take_queued()
            while not self._queue:
                if self._closing:
                    return None
                self._wake.wait()
                while self._queue and self._queue[0].state is not _State.QUEUED:
                    self._queue.popleft()
            linger_until = time.monotonic() + BATCH_LINGER_SECONDS
            self._wake_at = min(self._last_batch_items, self._batch_max)
            while self._queued_items < self._wake_at and not self._closing:
                remaining = linger_until - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.wait(remaining)
            self._wake_at = 1
            return self._take_queued()

    def _take_queued(self) -> list[Pending[Call, Reply]]:
        """With the lock held: the queued calls up to batch_max items (at least one)."""
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

    def _admit(self, batch: Sequence[Pending[Call, Reply]]) -> list[bool]:
        """With the transaction's locks held: the calls still wanted become committing; those
        abandoned or past their deadline are dropped. One flag per call."""
        now = time.monotonic()
        expired: list[Pending[Call, Reply]] = []
        flags: list[bool] = []
        with self._lock:
            for pending in batch:
                if pending.state is _State.TAKEN and pending.expired(now):
                    pending.state = _State.ANSWERED
                    self._pending_items -= pending.items
                    expired.append(pending)
                elif pending.state is _State.TAKEN:
                    pending.state = _State.COMMITTING
                flags.append(pending.state is _State.COMMITTING)
        for pending in expired:
            _on_loop(pending, DeadlineExceeded(_EXPIRED))
        return flags

    def _answer(
        self,
        batch: Sequence[Pending[Call, Reply]],
        replies: Sequence[Reply | Exception | None],
    ) -> None:
        """Set each committed call's reply on the loop; calls dropped at admission were
        answered then."""
        done: list[tuple[Pending[Call, Reply], Reply | Exception]] = []
        with self._lock:
            for pending, reply in zip(batch, replies, strict=True):
                if pending.state is _State.ANSWERED:
                    continue
                pending.state = _State.ANSWERED
                self._pending_items -= pending.items
                done.append((pending, Cancelled(_UNWRITTEN) if reply is None else reply))
        if done:
            loop = done[0][0].future.get_loop()
            try:
                loop.call_soon_threadsafe(_set_results, done)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                log.debug("answers of %d calls dropped: the event loop is closed", len(done))


_EXPIRED = "the call's deadline passed while it waited to be written; nothing was written"
_UNWRITTEN = "the call was cancelled before it was written"


def _on_loop(pending: Pending[Any, Any], error: Exception) -> None:
    try:
        pending.future.get_loop().call_soon_threadsafe(_set_results, [(pending, error)])
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        log.debug("an expired call's answer dropped: the event loop is closed")


def _set_results(done: list[tuple[Pending[Any, Any], Any]]) -> None:
    for pending, reply in done:
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
    """A Writer over a plain function that writes a batch on the calling thread."""

    def __init__(
        self, write: Callable[[Sequence[Call], Admit], Sequence[Reply | Exception | None]]
    ) -> None:
        self._write = write

    def send(self, calls: Sequence[Call]) -> object:
        return list(calls)

    def finish(self, ticket: object, admit: Admit) -> Sequence[Reply | Exception | None]:
        assert isinstance(ticket, list)
        return self._write(ticket, admit)
