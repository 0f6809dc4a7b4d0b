"""Group commit's rules: the bounded, deadline-aware queue, the writer's retry rules, and the
server's limits on queued liquidations, cycle streams, connections and lock waits.

The queue (GroupCommitter, on an asyncio loop, over a SyncWriter whose plain write function
is written here): calls that queue behind a transaction being written go together as the
next one, each with its own reply; a call cancelled before its transaction holds its locks,
or past its deadline when `admit` is asked, is not handed on or not admitted (the late one is
answered DeadlineExceeded), while one already admitted stands; at most `pending_max` items
wait, a call beyond it is refused at once and counts for nothing; close() answers what is
queued and refuses what comes after.

The batch runner (BatchRunner) on real SQLite and PostgreSQL connections, with batch
functions that fail on purpose: a request's own error fails it alone; an exception that fails
the whole batch rolls it back and reruns its requests one by one, so only the one at fault
fails; a real driver error reruns the batch on a fresh connection; a batch the database keeps
refusing is tried BATCH_ATTEMPTS_MAX times and every request gets Unavailable; what was
written lands exactly once.

The server, on SQLite and PostgreSQL with real gRPC clients: a liquidation whose deadline
passed, or whose caller cancelled, while it waited for the writer's locks is not written, and
one that was committing when its deadline passed stands; `--pending-max` bounds what waits
(the items of a RecordLiquidations count), refusing at once with RESOURCE_EXHAUSTED and
writing nothing for the refused; at most `streams_max` CloseCycle/PreviewCycle streams are
open at once, and a silent stream is ended with DEADLINE_EXCEEDED, writing nothing; a short
maximum connection age keeps serving across the reconnects it causes; a lock held past the
writer's lock timeout fails a liquidation with UNAVAILABLE, writing nothing, and the server
serves again once it is released; `ledger serve` refuses limits below one and creates nothing.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from ledger.api.v1 import insurance_pb2 as pb
from ledger.db.session import Database, WriterConnection
from ledger.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from ledger.group_commit import (
    BATCH_ATTEMPTS_MAX,
    EXPIRED,
    RETRY_EXHAUSTED,
    Admit,
    BatchRunner,
    GroupCommitter,
    Pending,
    SyncWriter,
)
from ledger.limits import BATCH_ITEMS_MAX_DEFAULT, PENDING_LIQUIDATIONS_MAX_DEFAULT
from ledger.server.app import LedgerServer, Settings, server_options
from ledger.server.liquidation_writer import (
    ABANDONED,
    UNARY,
    Admission,
    WriterProcess,
    WriterSettings,
)
from ledger.server.status import status_for
from tests import cycle_streams as cs
from tests.conftest import BACKENDS, Client, fresh_database
from tests.cycle_streams import Positions
from tests.ledger_db import snapshot
from tests.test_cycle import deposit, liquidate, market
from tests.test_liquidation import INFLOW, LONG, liq, setup_market
from tests.test_server_process import EXIT_SECONDS, database_lock, free_port, ledger_serve

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
WAIT_SECONDS = 20.0  # the most any poll here waits for what it waits for


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not seen within {timeout:g} s: {what}")
        time.sleep(0.01)


# --- GroupCommitter: the queue, on an asyncio loop, over a plain write function --------------


class HeldWriter:
    """A write function over strings: records every batch it is handed and the admit flags;
    its first batch waits for `release` (before asking admit) while calls queue behind it."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.flags: list[list[bool]] = []
        self.holding = threading.Event()  # the first batch is in the writer, held
        self.release = threading.Event()

    def write(self, calls: Sequence[str], admit: Admit) -> list[str | Exception | None]:
        self.batches.append(list(calls))
        if len(self.batches) == 1:
            self.holding.set()
            assert self.release.wait(WAIT_SECONDS), "the first batch was never released"
        flags = list(admit())
        self.flags.append(flags)
        return [_reply(call) if keep else None for call, keep in zip(calls, flags, strict=True)]


def _reply(call: str) -> str | Exception:
    return ValueError(f"refused {call}") if call.startswith("bad") else f"done:{call}"


def run_on_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 2 * WAIT_SECONDS + 10))


async def held(writer: HeldWriter) -> None:
    """Until the writer holds its first batch (waited for off the loop)."""
    assert await asyncio.to_thread(writer.holding.wait, WAIT_SECONDS), "no batch reached it"


async def answer(committer: GroupCommitter[str, str], pending: Pending[str, str]) -> object:
    try:
        return await asyncio.wait_for(committer.result(pending), WAIT_SECONDS)
    except TimeoutError:
        pytest.fail(f"{pending.call!r} was never answered")


def committer_of(writer: HeldWriter, **limits: int) -> GroupCommitter[str, str]:
    return GroupCommitter(SyncWriter(writer.write), **limits)


def test_calls_queued_behind_a_batch_go_together_as_the_next() -> None:
    async def scenario() -> None:
        writer = HeldWriter()
        committer = committer_of(writer)
        try:
            first = committer.submit("first", 1, None)
            await held(writer)
            calls = [f"call-{k}" if k % 5 else f"bad-{k}" for k in range(15)]
            queued = [committer.submit(call, 1, None) for call in calls]
            assert committer.pending_items == 16
            writer.release.set()
            assert await answer(committer, first) == "done:first"
            replies = [await answer(committer, p) for p in queued]
        finally:
            writer.release.set()
            await asyncio.to_thread(committer.close)
        assert writer.batches == [["first"], calls], "the 15 were not handed over together"
        for call, reply in zip(calls, replies, strict=True):  # each call its own reply
            if call.startswith("bad"):
                assert isinstance(reply, ValueError) and str(reply) == f"refused {call}"
            else:
                assert reply == f"done:{call}"
        assert committer.pending_items == 0

    run_on_loop(scenario)


def test_cancelled_calls_are_not_written() -> None:
    """Cancelled while QUEUED: never handed to the writer. Cancelled while TAKEN (its
    transaction waits for its locks): not admitted, so not written either."""

    async def scenario() -> None:
        writer = HeldWriter()
        committer = committer_of(writer)
        try:
            taken = committer.submit("taken", 1, None)
            await held(writer)
            queued = committer.submit("queued", 1, None)
            waiters = [asyncio.create_task(committer.result(p)) for p in (taken, queued)]
            await asyncio.sleep(0)  # both tasks start and wait on their futures
            for waiter in waiters:
                waiter.cancel()
            for waiter in waiters:
                with pytest.raises(asyncio.CancelledError):
                    await waiter
            # The queued one no longer counts; the taken one does until its batch is answered
            # (the writer may be writing it: pending_max bounds what the writer holds too).
            assert committer.pending_items == 1, "cancelled calls counted wrong"
            after = committer.submit("after", 1, None)
            writer.release.set()
            assert await answer(committer, after) == "done:after"
        finally:
            writer.release.set()
            await asyncio.to_thread(committer.close)
        assert writer.batches == [["taken"], ["after"]], "a call cancelled while queued was written"
        assert writer.flags == [[False], [True]], "a call cancelled while taken was admitted"
        assert committer.pending_items == 0

    run_on_loop(scenario)


async def _past(pending: Pending[str, str]) -> None:
    assert pending.deadline is not None
    while time.monotonic() < pending.deadline:
        await asyncio.sleep(0.005)


def test_a_call_past_its_deadline_at_admission_is_dropped() -> None:
    async def scenario() -> None:
        writer = HeldWriter()
        committer = committer_of(writer)
        try:
            first = committer.submit("first", 1, None)
            await held(writer)
            late = committer.submit("late", 1, 0.05)
            patient = committer.submit("patient", 1, 60.0)
            await _past(late)
            writer.release.set()
            assert await answer(committer, first) == "done:first"
            expired = await answer(committer, late)
            assert await answer(committer, patient) == "done:patient"
        finally:
            writer.release.set()
            await asyncio.to_thread(committer.close)
        assert writer.batches == [["first"], ["late", "patient"]]
        assert writer.flags == [[True], [False, True]], "admit did not drop the late call"
        assert isinstance(expired, DeadlineExceeded), expired
        assert status_for(expired) == DEADLINE_EXCEEDED
        assert "nothing was written" in str(expired)
        assert committer.pending_items == 0

    run_on_loop(scenario)


def test_a_call_admitted_before_its_deadline_stands() -> None:
    """Its transaction holds its locks (admit said yes) before the deadline: the call is
    committing, and its reply is its result even though the deadline passed meanwhile."""
    admitted = threading.Event()
    past_deadline = threading.Event()
    flags: list[list[bool]] = []

    def write(calls: Sequence[str], admit: Admit) -> list[str | Exception | None]:
        flags.append(list(admit()))
        admitted.set()
        assert past_deadline.wait(WAIT_SECONDS)
        return [f"done:{call}" for call in calls]

    async def scenario() -> None:
        committer: GroupCommitter[str, str] = GroupCommitter(SyncWriter(write))
        try:
            pending = committer.submit("committing", 1, 0.2)
            assert await asyncio.to_thread(admitted.wait, WAIT_SECONDS)
            await _past(pending)
            past_deadline.set()
            assert await answer(committer, pending) == "done:committing"
        finally:
            past_deadline.set()
            await asyncio.to_thread(committer.close)
        assert flags == [[True]]
        assert committer.pending_items == 0

    run_on_loop(scenario)


def test_the_queue_refuses_calls_beyond_pending_max() -> None:
    async def scenario() -> None:
        writer = HeldWriter()
        committer = committer_of(writer, pending_max=5)
        try:
            accepted = [committer.submit("first", 1, None)]
            await held(writer)
            accepted.append(committer.submit("three-items", 3, None))
            assert committer.pending_items == 4
            with pytest.raises(ResourceExhausted) as refused:
                committer.submit("two-items", 2, None)  # 4 + 2 > 5
            message = str(refused.value)
            assert "retry" in message and "--pending-max" in message, message
            assert committer.pending_items == 4, "a refused call changed the count"
            accepted.append(committer.submit("fifth", 1, None))  # exactly 5
            with pytest.raises(ResourceExhausted):
                committer.submit("sixth", 1, None)
            assert committer.pending_items == 5
            writer.release.set()
            replies = [await answer(committer, p) for p in accepted]
            assert replies == ["done:first", "done:three-items", "done:fifth"]
            assert committer.pending_items == 0, "answered calls still count"
            again = committer.submit("five-items", 5, None)  # the room is back
            assert await answer(committer, again) == "done:five-items"
        finally:
            writer.release.set()
            await asyncio.to_thread(committer.close)
        written = [call for batch in writer.batches for call in batch]
        assert written == ["first", "three-items", "fifth", "five-items"]

    run_on_loop(scenario)


def test_close_answers_what_is_queued_and_refuses_what_comes_after() -> None:
    async def scenario() -> None:
        writer = HeldWriter()
        committer = committer_of(writer)
        closed = None
        try:
            accepted = [committer.submit("first", 1, None)]
            await held(writer)
            accepted += [committer.submit(f"queued-{k}", 1, None) for k in range(3)]
            closed = asyncio.create_task(asyncio.to_thread(committer.close))
            give_up = time.monotonic() + WAIT_SECONDS
            while True:  # close() marks the queue closed at once, then waits for the thread
                try:
                    accepted.append(committer.submit(f"racing-{len(accepted)}", 1, None))
                except Unavailable:
                    break
                assert time.monotonic() < give_up, "close() never refused a call"
                await asyncio.sleep(0.005)
            assert not closed.done(), "close() returned with a batch still being written"
            writer.release.set()
            replies = [await answer(committer, p) for p in accepted]
            await closed
            with pytest.raises(Unavailable, match="stopping"):
                committer.submit("after-close", 1, None)
        finally:
            writer.release.set()
            if closed is not None:
                await closed
        assert replies == [f"done:{p.call}" for p in accepted]
        assert [c for batch in writer.batches for c in batch] == [p.call for p in accepted]
        assert committer.pending_items == 0

    run_on_loop(scenario)


def test_the_writer_admits_by_slot_and_deadline() -> None:
    """The writer's side of admission: a call is admitted unless its slot says its caller
    went away or its deadline has passed; decided once (an admitted call is committing and
    stays so if the transaction runs again); late calls are answered DEADLINE_EXCEEDED,
    abandoned ones nothing. Slots wrap around the ring."""
    flags = memoryview(bytearray(8))
    now = time.monotonic()
    admission = Admission(flags, 5, [None, None, now - 1, now + 60, None])  # slots 5 6 7 0 1
    flags[6] = flags[1] = ABANDONED  # calls 1 and 4
    flags[0] = 0
    assert admission.admit() == [True, False, False, True, False]
    flags[5] = ABANDONED  # too late: call 0 is committing
    assert admission.admit() == [True, False, False, True, False]
    replies: list[Any] = [b"r0", None, None, b"r3", None]
    assert admission.answer(replies) == [b"r0", None, (4, EXPIRED, None), b"r3", None]
    assert status_for(DeadlineExceeded(EXPIRED)) == DEADLINE_EXCEEDED


def test_the_documented_defaults() -> None:
    """10,000 liquidations waiting, 4 cycle streams, 60 s of stream silence; the connection
    age and keepalive settings reach grpc's channel arguments."""
    settings = Settings()
    assert settings.pending_max == PENDING_LIQUIDATIONS_MAX_DEFAULT == 10_000
    assert settings.streams_max == 4
    assert settings.stream_idle_s == 60.0
    options = dict(server_options(Settings(max_connection_age_s=1.5, keepalive_s=2.0), False))
    assert options["grpc.max_connection_age_ms"] == 1500
    assert options["grpc.keepalive_time_ms"] == 2000


# --- BatchRunner on real SQLite and PostgreSQL connections -----------------------------------

POISON = "poison"  # fails the whole batch it is in (an unexpected exception)
REFUSED = "refused"  # fails alone: its own outcome is an error, and it writes nothing
UNWANTED = "unwanted"  # not admitted: no outcome, never written
FLAKY = "flaky"  # its first transaction hits a real driver error


class Refused(Exception):
    pass


class BatchTable:
    """A table `written` and a one-row table `gate` that each batch locks first, on a real
    database, and a batch function over them that fails as its requests say."""

    def __init__(self, database_url: str, *, lock_timeout_s: float = 5.0) -> None:
        self.url = database_url
        self.database = Database(database_url, lock_timeout_s=lock_timeout_s)
        with self.database.write() as session:
            session.execute(text("CREATE TABLE written (value VARCHAR(64) NOT NULL)"))
            session.execute(text("CREATE TABLE gate (id INTEGER PRIMARY KEY)"))
            session.execute(text("INSERT INTO gate (id) VALUES (1)"))
        self.attempts: list[list[str]] = []
        self.connections = 0
        self.flaky_failed = False

    def connect(self) -> WriterConnection:
        self.connections += 1
        return self.database.writer_connection()

    def batch(
        self, connection: WriterConnection, requests: Sequence[str], admit: Admit
    ) -> list[str | Exception | None]:
        self.attempts.append(list(requests))
        db = connection.begin()
        db.execute("SELECT id FROM gate WHERE id = 1" + db.for_update).fetchall()  # the locks
        wanted = admit()
        for value, keep in zip(requests, wanted, strict=True):
            if keep and not value.startswith(REFUSED):
                db.execute("INSERT INTO written (value) VALUES (?)", (value,))
        admitted = [v for v, keep in zip(requests, wanted, strict=True) if keep]
        if POISON in admitted:
            raise RuntimeError("a bug that fails the whole batch")
        if FLAKY in admitted and not self.flaky_failed:
            self.flaky_failed = True
            db.execute("INSERT INTO no_such_table VALUES (1)")  # a real driver error
        connection.commit([])
        return [
            None if not keep else Refused(v) if v.startswith(REFUSED) else v.upper()
            for v, keep in zip(requests, wanted, strict=True)
        ]

    def written(self) -> list[str]:
        engine = create_engine(self.url)
        try:
            with engine.connect() as conn:
                return sorted(conn.execute(text("SELECT value FROM written")).scalars())
        finally:
            engine.dispose()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Another session holds the gate row (on SQLite: the database's write lock)."""
        engine = create_engine(self.url)
        try:
            with engine.connect() as conn:
                conn.execute(text("UPDATE gate SET id = id"))
                yield
                conn.rollback()
        finally:
            engine.dispose()

    def close(self) -> None:
        self.database.dispose()


def _admit_all_but_unwanted(requests: Sequence[str]) -> Admit:
    return lambda: [not r.startswith(UNWANTED) for r in requests]


def test_batch_runner_keeps_failures_to_their_requests(database_url: str) -> None:
    table = BatchTable(database_url)
    runner: BatchRunner[str, str] = BatchRunner(table.connect, table.batch)
    try:
        # A real driver error: the whole batch again, on a fresh connection.
        first = ["a0", "a1", "a2", FLAKY, f"{UNWANTED}-a", "a3"]
        outcomes = runner.run(first, _admit_all_but_unwanted(first))
        assert table.flaky_failed
        assert outcomes == ["A0", "A1", "A2", "FLAKY", None, "A3"]
        assert table.attempts == [first, first], "the batch was not rerun whole"
        assert table.connections == 2, "a driver error must discard the connection"

        # A request's own error fails it alone; an exception failing the batch rolls it
        # back and reruns the admitted requests one by one.
        table.attempts.clear()
        second = ["b0", f"{REFUSED}-1", "b1", POISON, f"{UNWANTED}-b", "b2", f"{REFUSED}-2"]
        outcomes = runner.run(second, _admit_all_but_unwanted(second))
        results = dict(zip(second, outcomes, strict=True))
        assert [results[v] for v in ("b0", "b1", "b2")] == ["B0", "B1", "B2"]
        assert isinstance(results[POISON], RuntimeError), results[POISON]
        for refused in (f"{REFUSED}-1", f"{REFUSED}-2"):
            assert isinstance(results[refused], Refused) and str(results[refused]) == refused
        assert results[f"{UNWANTED}-b"] is None
        assert table.attempts == [second] + [[v] for v in second if not v.startswith(UNWANTED)]
        # Each value committed exactly once; the failed batch and the poison wrote nothing.
        assert table.written() == sorted(["a0", "a1", "a2", "a3", FLAKY, "b0", "b1", "b2"])
    finally:
        runner.discard()
        table.close()


def test_batch_runner_fails_a_batch_the_database_keeps_refusing(database_url: str) -> None:
    """The database, not a request, is at fault: the batch is tried BATCH_ATTEMPTS_MAX times,
    each on a fresh connection, never split, and every request is answered Unavailable."""
    table = BatchTable(database_url, lock_timeout_s=0.2)
    runner: BatchRunner[str, str] = BatchRunner(table.connect, table.batch)
    try:
        requests = ["c0", "c1", "c2"]
        with table.locked():
            outcomes = runner.run(requests, lambda: [True] * 3)
        assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
        assert all(str(o) == RETRY_EXHAUSTED for o in outcomes)
        assert status_for(outcomes[0]) == UNAVAILABLE
        assert "nothing was written" in str(outcomes[0])
        assert table.attempts == [requests] * BATCH_ATTEMPTS_MAX
        assert table.connections == BATCH_ATTEMPTS_MAX
        assert table.written() == []
        # Released: the same runner writes again.
        assert runner.run(requests, lambda: [True] * 3) == ["C0", "C1", "C2"]
        assert table.written() == requests
    finally:
        runner.discard()
        table.close()


# --- the server: helpers ------------------------------------------------------------------


@contextmanager
def ledger_server(database_url: str, **settings: Any) -> Iterator[tuple[LedgerServer, Client]]:
    server = LedgerServer(Settings(listen="127.0.0.1:0", database_url=database_url, **settings))
    server.start()
    client = Client.connect(f"127.0.0.1:{server.port}")
    try:
        yield server, client
    finally:
        client.channel.close()
        server.stop(grace_seconds=5)


def liquidation_rows(database_url: str) -> Counter[str]:
    """Rows of the liquidations table, by liquidation_id, read with plain SQL."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            ids = conn.execute(text("SELECT liquidation_id FROM liquidations")).scalars()
            return Counter(ids)
    finally:
        engine.dispose()


def profit(lid: str) -> pb.RecordLiquidationRequest:
    """1 USDT of profit (1,000,000 minor units × 0.001): an INFLOW of 1,000."""
    return liq(lid, "BTCUSDT", LONG, "1", "60000", "60001", 0)


def batch_of(*ids: str) -> pb.RecordLiquidationsRequest:
    return pb.RecordLiquidationsRequest(liquidations=[profit(lid) for lid in ids])


PENDING_MAX = 5


def pending_now(client: Client) -> int:
    """What the server says waits: a batch larger than the limit is always refused, nothing
    queued, and the refusal says it can never fit and names the liquidations waiting now."""
    probe = batch_of(*(f"probe-{k}" for k in range(PENDING_MAX + 1)))
    with pytest.raises(grpc.RpcError) as refused:
        client.clearing.RecordLiquidations(probe, timeout=10)
    assert refused.value.code() == RESOURCE_EXHAUSTED, refused.value
    details = refused.value.details() or ""
    assert "retry them in smaller calls" in details, details
    found = re.search(r"(\d+) are waiting now", details)
    assert found, details
    return int(found.group(1))


# --- the server: deadlines and cancellation ---------------------------------------------------


def test_liquidations_past_their_deadline_at_the_locks_are_not_written(database_url: str) -> None:
    """The lock holds the writer before its locks; the calls' deadlines pass meanwhile. Once
    it is released, the late calls (a unary one, a batch) are not written, the patient one is,
    and the late one sent again is recorded afresh."""
    with ledger_server(database_url, pending_max=PENDING_MAX) as (_, client):
        setup_market(client)
        client.clearing.RecordLiquidation(profit("warm-up"), timeout=30)
        with database_lock(database_url):
            late = client.clearing.RecordLiquidation.future(profit("late"), timeout=1.0)
            late_batch = client.clearing.RecordLiquidations.future(
                batch_of("late-b1", "late-b2"), timeout=1.0
            )
            patient = client.clearing.RecordLiquidation.future(profit("patient"), timeout=60)
            wait_until(lambda: pending_now(client) == 4, "the 4 liquidations in the queue")
            for call in (late, late_batch):
                error = call.exception(timeout=WAIT_SECONDS)
                assert isinstance(error, grpc.RpcError), error
                assert error.code() == DEADLINE_EXCEEDED, error
            # The server's deadline runs from when it received the call, a little after the
            # client's: released before it, a call would still be admitted, and stand. Once
            # only the patient call counts, the server has seen both deadlines pass.
            wait_until(lambda: pending_now(client) == 1, "the server past the deadlines")
            assert not patient.done(), "the lock did not hold the writer"
        assert patient.result(timeout=60).outcome == INFLOW
        # The writer finishes its transactions in order: once this is answered, so are they.
        client.clearing.RecordLiquidation(profit("after"), timeout=30)
        rows = liquidation_rows(database_url)
        assert rows["patient"] == rows["after"] == 1
        for lid in ("late", "late-b1", "late-b2"):
            assert rows[lid] == 0, f"{lid} was written after its deadline had passed"
        retried = client.clearing.RecordLiquidation(profit("late"), timeout=30)
        assert retried.outcome == INFLOW and retried.engine_result == 1_000
        assert liquidation_rows(database_url)["late"] == 1


def test_a_cancelled_liquidation_is_not_written(database_url: str) -> None:
    """Cancelled by their callers while the lock holds the writer: neither the unary call
    (its transaction waiting for the locks) nor the batch behind it is written."""
    with ledger_server(database_url, pending_max=PENDING_MAX) as (_, client):
        setup_market(client)
        client.clearing.RecordLiquidation(profit("warm-up"), timeout=30)
        before = snapshot(database_url)
        with database_lock(database_url):
            unary = client.clearing.RecordLiquidation.future(profit("gone"), timeout=60)
            batch = client.clearing.RecordLiquidations.future(
                batch_of("gone-1", "gone-2"), timeout=60
            )
            wait_until(lambda: pending_now(client) == 3, "the 3 liquidations in the queue")
            assert unary.cancel() and batch.cancel()
            # An abandoned call stops counting: the cancels have reached the queue.
            wait_until(lambda: pending_now(client) == 0, "the cancels seen by the server")
        assert snapshot(database_url) == before
        client.clearing.RecordLiquidation(profit("after"), timeout=30)
        rows = liquidation_rows(database_url)
        assert rows["gone"] == rows["gone-1"] == rows["gone-2"] == 0, rows
        assert rows["after"] == 1


def test_a_liquidation_writer_killed_mid_batch_is_replaced(database_url: str) -> None:
    """SIGKILL of the writer process while it waits for the locks: its call is answered
    UNAVAILABLE (nothing was written: it held no locks yet), the next call starts a new
    writer, and the retry is written once, with the result a fresh recording gives."""
    with ledger_server(database_url) as (server, client):
        setup_market(client)
        client.clearing.RecordLiquidation(profit("warm-up"), timeout=30)
        before = snapshot(database_url)
        writer = server.writer_pid()
        assert writer is not None
        with database_lock(database_url):
            call = client.clearing.RecordLiquidation.future(profit("killed"), timeout=60)
            wait_until(lambda: server.pending_liquidations() == 1, "the call in the writer")
            os.kill(writer, signal.SIGKILL)
            error = call.exception(timeout=WAIT_SECONDS)
            assert isinstance(error, grpc.RpcError) and error.code() == UNAVAILABLE, error
            assert "retry" in (error.details() or ""), error.details()
        assert snapshot(database_url) == before, "a killed writer's batch left a trace"
        retried = client.clearing.RecordLiquidation(profit("killed"), timeout=30)
        assert retried.outcome == INFLOW and retried.engine_result == 1_000
        assert server.writer_pid() != writer
        again = client.clearing.RecordLiquidation(profit("killed"), timeout=30)
        assert again == retried
        assert liquidation_rows(database_url)["killed"] == 1


def test_a_killed_writer_answers_every_batch_it_had(database_url: str) -> None:
    """Two batches in the writer process when it is killed (one waiting for the locks, one
    sent behind it: half a transaction's worth), each answered UNAVAILABLE, nothing written;
    both sent again are written once."""
    with ledger_server(database_url, batch_max=4) as (server, client):
        setup_market(client)
        client.clearing.RecordLiquidation(profit("warm-up"), timeout=30)
        before = snapshot(database_url)
        writer = server.writer_pid()
        assert writer is not None
        ids = [f"behind-{k}" for k in range(2)]
        with database_lock(database_url):
            first = client.clearing.RecordLiquidation.future(profit("first"), timeout=60)
            wait_until(lambda: server.pending_liquidations() == 1, "the first in the writer")
            behind = client.clearing.RecordLiquidations.future(batch_of(*ids), timeout=60)
            wait_until(lambda: server.pending_liquidations() == 3, "the batch behind it")
            os.kill(writer, signal.SIGKILL)
            for call in (first, behind):
                error = call.exception(timeout=WAIT_SECONDS)
                assert isinstance(error, grpc.RpcError) and error.code() == UNAVAILABLE, error
        assert snapshot(database_url) == before, "a killed writer's batches left a trace"
        assert client.clearing.RecordLiquidation(profit("first"), timeout=30).outcome == INFLOW
        outcomes = client.clearing.RecordLiquidations(batch_of(*ids), timeout=30).outcomes
        assert [o.code for o in outcomes] == [0, 0]
        rows = liquidation_rows(database_url)
        assert [rows[lid] for lid in ("first", *ids)] == [1, 1, 1]


def writer_settings(database_url: str) -> WriterSettings:
    return WriterSettings(database_url, 5.0, 30.0, "WARNING", BATCH_ITEMS_MAX_DEFAULT)


def unary(lid: str) -> tuple[int, bytes]:
    return (UNARY, profit(lid).SerializeToString())


def test_a_call_left_before_its_batch_is_sent_is_not_written(database_url: str) -> None:
    """The writer process's link is busy (held here) when the batch is taken: its caller
    goes away before the batch is sent, so before the call has a slot to be marked in. The
    call is not written; the next one is."""
    with ledger_server(database_url) as (_, client):
        setup_market(client)
    results: list[object] = []

    async def scenario() -> None:
        writer = WriterProcess(writer_settings(database_url))
        committer: GroupCommitter[Any, Any] = GroupCommitter(writer)
        try:
            async with writer.sending:  # the batch waits to be sent
                left = committer.submit(unary("left"), 1, None)
                waiter = asyncio.create_task(committer.result(left))
                await asyncio.sleep(0.05)
                waiter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiter
            results.append(await answer(committer, committer.submit(unary("kept"), 1, None)))
        finally:
            await asyncio.to_thread(committer.close)

    run_on_loop(scenario)
    (kept,) = results
    assert isinstance(kept, bytes), kept
    assert pb.LiquidationResult.FromString(kept).outcome == INFLOW
    rows = liquidation_rows(database_url)
    assert rows["left"] == 0, "a call left before its batch was sent was written"
    assert rows["kept"] == 1


def test_batches_sent_together_to_a_new_writer_both_reach_it(database_url: str) -> None:
    """A second batch handed over while the first is still making the link to a new writer
    process (pipelined: half a transaction queued) waits for that link, and is written."""
    with ledger_server(database_url) as (_, client):
        setup_market(client)

    replies: list[object] = []

    async def scenario() -> None:
        writer = WriterProcess(writer_settings(database_url))
        committer: GroupCommitter[Any, Any] = GroupCommitter(writer, batch_max=2)
        try:
            first = committer.submit(unary("first"), 1, None)
            second = committer.submit(unary("second"), 1, None)  # 1 × 2 ≥ batch_max: sent
            replies.extend([await answer(committer, first), await answer(committer, second)])
        finally:
            await asyncio.to_thread(committer.close)

    run_on_loop(scenario)
    assert len(replies) == 2
    for reply in replies:
        assert isinstance(reply, bytes), reply
        assert pb.LiquidationResult.FromString(reply).outcome == INFLOW
    rows = liquidation_rows(database_url)
    assert rows["first"] == rows["second"] == 1


@pytest.mark.skipif("postgresql" not in BACKENDS, reason="LEDGER_TEST_BACKENDS leaves it out")
def test_a_liquidation_committing_when_its_deadline_passes_stands(tmp_path: Path) -> None:
    """PostgreSQL only (SQLite's writer takes the whole write lock before it admits, so
    nothing can hold it after): another transaction has inserted the same liquidation_id and
    not committed, so the writer, past its locks and its admission, waits on the id's index
    while the call's deadline passes. The other transaction rolls back: the liquidation is
    written although its caller was told DEADLINE_EXCEEDED, and a retry returns its result."""
    with fresh_database("postgresql", tmp_path) as url:
        server = LedgerServer(Settings(listen="127.0.0.1:0", database_url=url))
        server.start()
        client = Client.connect(f"127.0.0.1:{server.port}")
        libpq = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        try:
            setup_market(client)
            client.clearing.RecordLiquidation(profit("warm-up"), timeout=30)
            with psycopg.connect(libpq) as holder, psycopg.connect(libpq, autocommit=True) as watch:
                holder.execute(
                    "INSERT INTO liquidations (liquidation_id, request_hash, currency, cycle_id,"
                    " symbol, account_id, position_id, side, quantity, takeover_price,"
                    " close_price, remaining_margin, engine_result, outcome, fund_balance_after,"
                    " entry_id, created_at_us) VALUES ('X', '', 'USDT', 'c1', 'BTCUSDT', 7, 11,"
                    " 1, '1', '60000', '60001', 0, 1000, 1, 0, NULL, 0)"
                )
                call = client.clearing.RecordLiquidation.future(profit("X"), timeout=1.0)

                def waits_on_the_index() -> bool:
                    row = watch.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND wait_event_type = 'Lock' "
                        "AND wait_event = 'transactionid'"
                    ).fetchone()
                    return bool(row and row[0])

                wait_until(waits_on_the_index, "the writer waiting on the uncommitted id")
                error = call.exception(timeout=WAIT_SECONDS)
                assert isinstance(error, grpc.RpcError) and error.code() == DEADLINE_EXCEEDED
                holder.rollback()
            wait_until(lambda: liquidation_rows(url)["X"] == 1, "the committing call written")
            engine = create_engine(url)
            with engine.connect() as conn:
                entry_id = conn.execute(
                    text("SELECT entry_id FROM liquidations WHERE liquidation_id = 'X'")
                ).scalar_one()
            engine.dispose()
            retried = client.clearing.RecordLiquidation(profit("X"), timeout=30)
            assert retried.entry_id == entry_id and retried.engine_result == 1_000
            assert liquidation_rows(url)["X"] == 1
        finally:
            client.channel.close()
            server.stop(grace_seconds=5)


# --- the server: the bounded queue (`ledger serve --pending-max 5`) ---------------------------


def fire(client: Client, ids: Sequence[str]) -> list[grpc.Future[pb.LiquidationResult]]:
    return [client.clearing.RecordLiquidation.future(profit(lid), timeout=60) for lid in ids]


def refused_at_once(calls: Sequence[grpc.Future[Any]], count: int) -> list[int]:
    """Wait until `count` calls have ended (while the lock still holds the rest): each a
    RESOURCE_EXHAUSTED telling to retry. Returns the indexes of the calls still pending."""
    wait_until(lambda: sum(c.done() for c in calls) >= count, f"{count} refusals")
    for call in calls:
        if call.done():
            error = call.exception()
            assert isinstance(error, grpc.RpcError) and error.code() == RESOURCE_EXHAUSTED, error
            assert "retry" in (error.details() or ""), error.details()
    return [k for k, call in enumerate(calls) if not call.done()]


def test_serve_bounds_the_liquidations_waiting(database_url: str, tmp_path: Path) -> None:
    """`ledger serve --pending-max 5`, the writer held by the lock: of 20 concurrent unary
    calls exactly 5 wait and 15 are refused at once, as is a batch that does not fit; with a
    batch of 3 waiting, 2 of 20 unary calls fit. Released, every accepted call is answered
    OK and written once; no refused call is written."""
    port = free_port()
    command = [
        *[sys.executable, "-m", "ledger.cli", "serve", "--listen", f"127.0.0.1:{port}"],
        *["--database-url", database_url, "--pending-max", str(PENDING_MAX)],
    ]
    with ledger_serve(command, tmp_path / "workdir", port) as (process, _stderr):
        client = Client.connect(f"127.0.0.1:{port}")
        try:
            setup_market(client)
            assert pending_now(client) == 0

            # 20 unary calls at once: exactly 5 wait, 15 are refused at once.
            with database_lock(database_url):
                ids = [f"u{k}" for k in range(20)]
                calls = fire(client, ids)
                waiting = refused_at_once(calls, 20 - PENDING_MAX)
                assert len(waiting) == PENDING_MAX
                assert pending_now(client) == PENDING_MAX
                with pytest.raises(grpc.RpcError) as refused:  # a batch that does not fit
                    client.clearing.RecordLiquidations(batch_of("nb1", "nb2"), timeout=10)
                assert refused.value.code() == RESOURCE_EXHAUSTED
                assert "retry" in (refused.value.details() or "")
                assert sum(c.done() for c in calls) == 20 - PENDING_MAX, "the lock gave way"
            for k in waiting:
                assert calls[k].result(timeout=60).outcome == INFLOW
            accepted = {ids[k] for k in waiting}

            # A batch's items count: 3 of them waiting leave room for 2 unary calls.
            with database_lock(database_url):
                held_batch = client.clearing.RecordLiquidations.future(
                    batch_of("b1", "b2", "b3"), timeout=60
                )
                wait_until(lambda: pending_now(client) == 3, "the batch's 3 items waiting")
                more_ids = [f"v{k}" for k in range(20)]
                more = fire(client, more_ids)
                more_waiting = refused_at_once(more, 18)
                assert len(more_waiting) == 2
                assert not held_batch.done()
            outcomes = held_batch.result(timeout=60).outcomes
            assert [o.code for o in outcomes] == [0, 0, 0], outcomes
            for k in more_waiting:
                assert more[k].result(timeout=60).outcome == INFLOW
            accepted |= {"b1", "b2", "b3"} | {more_ids[k] for k in more_waiting}

            assert pending_now(client) == 0, "answered calls still count"
            rows = liquidation_rows(database_url)
            assert {lid for lid, n in rows.items() if n} == accepted, "refused calls written"
            assert all(n == 1 for n in rows.values()), rows
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=EXIT_SECONDS) == 0
        finally:
            client.channel.close()


# --- the server: cycle streams ----------------------------------------------------------------

POSITIONS = Positions.of([(1, 1, 3_000), (2, 2, 1_000), (3, 3, -500)])
EMPTY_CHUNK = cs.chunk(np.array([], np.uint64), np.array([], np.uint64), np.array([], np.int64))


def kept_open(
    cycle_id: str, currency: str, sending: threading.Event, release: threading.Event
) -> Iterator[bytes]:
    """A cycle's whole input, but held open until `release`: an empty chunk (allowed) every
    0.1 s keeps the stream from being idle meanwhile."""
    yield from cs.messages(cycle_id, currency, POSITIONS)
    yield EMPTY_CHUNK
    sending.set()
    while not release.wait(0.1):
        yield EMPTY_CHUNK


def silent(cycle_id: str, currency: str, release: threading.Event) -> Iterator[bytes]:
    """The header and the positions, then nothing until `release`."""
    yield from cs.messages(cycle_id, currency, POSITIONS)
    release.wait(WAIT_SECONDS)


def streams_open_becomes(server: LedgerServer, count: int) -> bool:
    """Whether the server's ledger_cycle_streams_open gauge reaches `count` within
    WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if server.metrics.registry.get_sample_value("ledger_cycle_streams_open") == count:
            return True
        time.sleep(0.01)
    return False


def test_cycle_streams_are_bounded_and_idle_ones_ended(database_url: str) -> None:
    """streams_max=2: with a CloseCycle and a PreviewCycle held open, a third stream of either
    kind is refused (RESOURCE_EXHAUSTED) and writes nothing; a stream silent for longer than
    stream_idle_s=1 is ended by the server with DEADLINE_EXCEEDED and writes nothing; every
    place is free again afterwards."""
    with ledger_server(database_url, streams_max=2, stream_idle_s=1.0) as (server, client):
        market(client)
        deposit(client, "d1", 10_000)
        liquidate(client, "L1", "c1", -2_000)
        liquidate(client, "L2", "k1", -1_000, symbol="XKRW")
        release = threading.Event()
        sending = [threading.Event(), threading.Event()]
        try:
            close = cs.raw_call(client.channel, cs.CLOSE_METHOD).future(
                kept_open("c1", "JPY", sending[0], release), timeout=60
            )
            preview = cs.raw_call(client.channel, cs.PREVIEW_METHOD).future(
                kept_open("k1", "KRW", sending[1], release), timeout=60
            )
            for event in sending:
                assert event.wait(WAIT_SECONDS)
            # The server counts a stream once its handler has started, moments after the
            # call: wait for its gauge to show both (a probe stream would take a place).
            assert streams_open_becomes(server, 2), "the two streams never held their places"
            before = snapshot(database_url)
            for method in (cs.CLOSE_METHOD, cs.PREVIEW_METHOD):
                with pytest.raises(grpc.RpcError) as refused:
                    cs.raw_call(client.channel, method)(
                        cs.messages("k1", "KRW", POSITIONS), timeout=30
                    )
                assert refused.value.code() == RESOURCE_EXHAUSTED, refused.value
                assert "--streams-max" in (refused.value.details() or "")
                assert "retry" in (refused.value.details() or "")
            assert snapshot(database_url) == before
            assert not close.done() and not preview.done()
        finally:
            release.set()
        assert close.result(timeout=60).cycle_id == "c1"
        assert preview.result(timeout=60).cycle_id == "k1"

        # A stream silent for longer than the idle timeout is ended by the server.
        before = snapshot(database_url)
        quiet = threading.Event()
        try:
            started = time.monotonic()
            stalled = cs.raw_call(client.channel, cs.CLOSE_METHOD).future(
                silent("k1", "KRW", quiet), timeout=60
            )
            error = stalled.exception(timeout=WAIT_SECONDS)
            elapsed = time.monotonic() - started
        finally:
            quiet.set()
        assert isinstance(error, grpc.RpcError) and error.code() == DEADLINE_EXCEEDED, error
        assert "sent nothing for 1 s" in (error.details() or ""), error.details()
        assert elapsed < 10, f"ended after {elapsed:.1f} s: by the client's deadline?"
        assert snapshot(database_url) == before, "the idle stream wrote something"
        # Neither the refused, the finished nor the ended streams hold a place.
        assert streams_open_becomes(server, 0), "a stream still holds its place"
        summaries = [
            cs.close(client.channel, "k1", "KRW", POSITIONS, timeout=30),
            cs.preview(client.channel, "c2", "JPY", POSITIONS),
        ]
        assert [s.cycle_id for s in summaries] == ["k1", "c2"]


# --- the server: connections and lock waits ---------------------------------------------------


def test_a_short_connection_age_keeps_serving_across_reconnects(database_url: str) -> None:
    """max_connection_age_s=1 (and keepalive pings every 0.5 s): calls on one channel go on
    until the channel has reconnected twice (it left READY twice; at most 30 s, as a loaded
    host may age a connection late), and every one of them succeeds."""
    ready = grpc.ChannelConnectivity.READY

    def reconnects(states: list[grpc.ChannelConnectivity]) -> int:
        return sum(1 for a, b in pairwise(list(states)) if a is ready and b is not ready)

    with ledger_server(database_url, max_connection_age_s=1.0, keepalive_s=0.5) as (_, client):
        states: list[grpc.ChannelConnectivity] = []
        record = states.append
        client.channel.subscribe(record, try_to_connect=False)
        try:
            setup_market(client)
            sent: list[str] = []
            deadline = time.monotonic() + 30.0
            while reconnects(states) < 2:  # every call must succeed meanwhile
                assert time.monotonic() < deadline, f"the connection was not aged out: {states}"
                lid = f"age-{len(sent)}"
                reply = client.clearing.RecordLiquidation(profit(lid), timeout=10)
                assert reply.liquidation_id == lid
                sent.append(lid)
                client.query.GetFund(pb.GetFundRequest(currency="USDT"), timeout=10)
            # and the connection after those serves too
            reply = client.clearing.RecordLiquidation(profit("age-last"), timeout=10)
            assert reply.liquidation_id == "age-last"
            sent.append("age-last")
        finally:
            client.channel.unsubscribe(record)
        rows = liquidation_rows(database_url)
        assert {lid: rows[lid] for lid in sent} == dict.fromkeys(sent, 1)


def test_a_lock_held_past_the_lock_timeout_fails_a_liquidation(database_url: str) -> None:
    """lock_timeout_s=0.5 and the lock held until the call ends: UNAVAILABLE after the
    writer's attempts, nothing written; released, the same liquidation is recorded."""
    with ledger_server(database_url, lock_timeout_s=0.5) as (_, client):
        setup_market(client)
        client.clearing.RecordLiquidation(profit("warm-up"), timeout=30)
        before = snapshot(database_url)
        with database_lock(database_url):
            started = time.monotonic()
            call = client.clearing.RecordLiquidation.future(profit("locked-out"), timeout=60)
            error = call.exception(timeout=30)
            elapsed = time.monotonic() - started
            assert snapshot(database_url) == before
        assert isinstance(error, grpc.RpcError) and error.code() == UNAVAILABLE, error
        assert "nothing was written" in (error.details() or ""), error.details()
        # Each attempt waited about the lock timeout (SQLite's busy handler: at least 1 s),
        # not the default of 5 s, and the batch was tried again before it failed.
        assert 1.0 < elapsed < BATCH_ATTEMPTS_MAX * 2.5, f"gave up after {elapsed:.2f} s"
        assert snapshot(database_url) == before
        reply = client.clearing.RecordLiquidation(profit("locked-out"), timeout=30)
        assert reply.outcome == INFLOW
        assert liquidation_rows(database_url)["locked-out"] == 1


# --- `ledger serve` refuses limits below one ---------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "env", "named"),
    [
        (["--batch-max", "0"], {}, "--batch-max must be at least 1 (got 0)"),
        (["--pending-max", "0"], {}, "--pending-max must be at least 1 (got 0)"),
        (["--streams-max", "0"], {}, "--streams-max must be at least 1 (got 0)"),
        ([], {"LEDGER_PENDING_MAX": "0"}, "--pending-max must be at least 1 (got 0)"),
    ],
    ids=["batch-max", "pending-max", "streams-max", "env-pending-max"],
)
def test_serve_refuses_a_limit_below_one(
    tmp_path: Path, arguments: list[str], env: dict[str, str], named: str
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    result = subprocess.run(
        [sys.executable, "-m", "ledger.cli", "serve", *arguments],
        cwd=tmp_path,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result
    assert named in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == [], "nothing may be created"
