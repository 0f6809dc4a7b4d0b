"""The liquidation writer: a process of its own beside each server process.

The server process keeps the queue (ledger.group_commit: limits, deadlines, cancellation)
and hands each batch of calls over a pipe, as the calls' raw request bytes; the writer
process parses and validates them, records them in one transaction (ledger.liquidation),
and returns each call's reply, serialized. So the event loop that serves every call does
no work per liquidation but pass bytes, and the writer's work (validation, the batch's
decisions, its SQL) does not wait for the loop's interpreter lock, nor the loop for it:
measured, that lock shared by both held a unary RecordLiquidation to half the rate of an
empty grpc.aio server on a 2-core host.

The protocol, over one duplex pipe (a socket pair, framed as multiprocessing.connection
frames it), read and written by the server's event loop without blocking:
- server → writer: ("batch", n, first slot, [(kind, raw bytes), ...], [deadline, ...]);
  ("stop",). Batch n + 1 may be sent while batch n is being written; they are written in
  order.
- writer → server: ("done", n, [reply per call]): the serialized response, (code, message,
  status), or None for a call cancelled before its transaction held its locks.
Admission needs no round trip: each call of a batch has a byte in memory shared by both
processes (its slot), which the server sets when the call's caller goes away; once the
transaction holds its locks, the writer admits the calls whose byte is clear and whose
deadline (time.monotonic(), the same clock in both processes) has not passed, and answers
the late ones DEADLINE_EXCEEDED. (Asked over the pipe, the admission cost a round trip
through the busy event loop in the middle of every transaction: a tenth of the writer's
time with unary calls.)
If the writer process dies, the batch it had is answered UNAVAILABLE (it may or may not have
committed; a retry with the same ids returns their results) and the next batch starts a
new writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from google.protobuf.message import DecodeError

from ledger import liquidation
from ledger.api.v1 import insurance_pb2 as pb
from ledger.db.session import Database
from ledger.errors import InvalidArgument, Unavailable
from ledger.group_commit import EXPIRED, PIPELINE_DEPTH, Admit, BatchRunner, Pending
from ledger.liquidation import LiquidationRequest, LiquidationResult
from ledger.server import heap
from ledger.server.codes import Code, reply_status
from ledger.server.details import status_details

log = logging.getLogger("ledger.writer")

UNARY = 1  # a RecordLiquidationRequest
BATCH = 2  # a RecordLiquidationsRequest
RECORD_LIQUIDATION = "/insurance.v1.Clearing/RecordLiquidation"
RECORD_LIQUIDATIONS = "/insurance.v1.Clearing/RecordLiquidations"

Call = tuple[int, bytes]  # (UNARY or BATCH, the request as received)
# The serialized response, or (status code, message, serialized google.rpc.Status or None).
Reply = bytes | tuple[int, str, bytes | None]
Replies = list[Reply | Exception | None]

ABANDONED = 1  # a slot's byte once its call's caller has gone


@dataclass(frozen=True, slots=True)
class WriterSettings:
    database_url: str
    lock_timeout_s: float
    statement_timeout_s: float
    log_level: str
    batch_max: int  # items of one transaction (so calls, but for one larger call)


class WriterProcess:
    """The server side: starts the writer process, and relays batches to it over the pipe,
    from the event loop (the GroupCommitter's Writer). A writer process found gone is
    replaced when the next batch is sent."""

    def __init__(self, settings: WriterSettings) -> None:
        self._settings = settings
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload([__name__])
        # A slot for each call that can be in the writer at once, twice over: a slot is
        # reused only long after its batch was answered.
        self._slots = SharedMemory(create=True, size=2 * PIPELINE_DEPTH * settings.batch_max)
        self._flags = _buffer(self._slots)
        self._next_slot = 0
        self._process: Any = None
        self._pipe: Connection | None = None  # the server's end, until the loop takes it over
        self._link: _Link | None = None
        # Held while a batch is sent (and the link made first, if it must be): batches go out
        # in order, and two never make the link at once.
        self._sending = asyncio.Lock()
        self._sent = 0  # batches sent: each batch's sequence number
        self._closed = False
        try:
            self._start()
        except BaseException:
            self._release_slots()
            raise

    def _start(self) -> None:
        server_end, writer_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=writer_main,
            args=(writer_end, self._settings, self._slots.name),
            name="ledger-liquidation-writer",
            daemon=True,
        )
        process.start()
        writer_end.close()
        self._process, self._pipe = process, server_end

    @property
    def pid(self) -> int | None:
        return None if self._process is None else int(self._process.pid)

    @property
    def sending(self) -> asyncio.Lock:
        """Held while a batch is being sent (tests hold it to hold a batch back)."""
        return self._sending

    async def write(self, batch: Sequence[Pending[Call, Reply]], _admit: Admit) -> Replies:
        """Hand a batch to the writer process (sent while the batch before it is being
        written, it is there when that one commits) and wait for its replies."""
        async with self._sending:
            link = self._link  # broken once the writer process's end of the pipe is closed
            if link is None or link.broken:
                link = await self._restart() if link is not None else await self._connect()
            # Each call's slot, marked already if its caller went away meanwhile (before
            # on_abandon was set, the committer could not tell the writer).
            first, size, flags = self._next_slot, len(self._flags), self._flags
            for k, pending in enumerate(batch):
                slot = (first + k) % size
                flags[slot] = ABANDONED if pending.abandoned else 0
                pending.on_abandon = _abandon(flags, slot)
            self._next_slot = (first + len(batch)) % size
            self._sent += 1
            message = (
                "batch",
                self._sent,
                first,
                [p.call for p in batch],
                [p.deadline for p in batch],
            )
            future = await link.send(self._sent, message)
        return await link.replies(future, len(batch))

    async def _connect(self) -> _Link:
        pipe, self._pipe = self._pipe, None
        assert pipe is not None
        sock = socket.socket(fileno=os.dup(pipe.fileno()))
        pipe.close()
        self._link = await _Link.open(sock)
        return self._link

    async def _restart(self) -> _Link:
        await self._stop_process(timeout_s=1.0)
        self._start()
        return await self._connect()

    async def aclose(self) -> None:
        """After the GroupCommitter has drained: nothing is in flight. Closing twice is
        closing once."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._stop_process(timeout_s=30.0)
        finally:
            self._release_slots()

    def _release_slots(self) -> None:
        self._flags.release()
        self._slots.close()
        with contextlib.suppress(FileNotFoundError):
            self._slots.unlink()

    async def _stop_process(self, timeout_s: float) -> None:
        link, pipe, process = self._link, self._pipe, self._process
        self._link = self._pipe = self._process = None
        try:
            if link is not None:
                await link.close()
            if pipe is not None:
                with contextlib.suppress(OSError, ValueError):
                    pipe.send(("stop",))
                pipe.close()
        finally:
            if process is not None:
                await asyncio.get_running_loop().run_in_executor(None, _join, process, timeout_s)


def _buffer(shared: SharedMemory) -> memoryview:
    buffer = shared.buf
    assert buffer is not None
    return buffer


def _abandon(flags: memoryview, slot: int) -> Callable[[], None]:
    def abandon() -> None:
        flags[slot] = ABANDONED

    return abandon


def _join(process: Any, timeout_s: float) -> None:
    process.join(timeout_s)
    if process.is_alive():
        process.kill()
        process.join()


class _Link:
    """The loop's end of the pipe: batches out, and a task reading the writer's replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._waiting: dict[int, asyncio.Future[Replies]] = {}
        self.broken = False
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, sock: socket.socket) -> _Link:
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    async def send(self, sequence: int, message: tuple[Any, ...]) -> asyncio.Future[Replies]:
        """Send a batch; its replies come to the future returned."""
        future: asyncio.Future[Replies] = asyncio.get_running_loop().create_future()
        self._waiting[sequence] = future
        try:
            self._send(message)
            await self._writer.drain()
        except (OSError, ValueError) as error:
            self._fail(error)
        return future

    async def replies(self, future: asyncio.Future[Replies], count: int) -> Replies:
        replies = await future
        return replies if replies else _gone(count)

    def _send(self, message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) <= 0x7FFFFFFF:
            header = struct.pack("!i", len(data))
        else:
            header = struct.pack("!iQ", -1, len(data))
        self._writer.write(header + data)

    async def _read(self) -> None:
        error: BaseException = EOFError("the server is stopping")
        try:
            while True:
                (size,) = struct.unpack("!i", await self._reader.readexactly(4))
                if size == -1:
                    (size,) = struct.unpack("!Q", await self._reader.readexactly(8))
                _done, sequence, replies = pickle.loads(await self._reader.readexactly(size))
                future = self._waiting.pop(sequence, None)
                if future is not None and not future.done():
                    future.set_result(replies)
        except asyncio.CancelledError:  # closing: the writer has been told to stop
            self.broken = True
            raise
        except BaseException as failure:  # the pipe closed, or a reply that makes no sense
            error = failure
        finally:
            # Whatever ended the reading, no batch waits for ever: they are answered
            # UNAVAILABLE, and the next one starts a new writer.
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        """The writer process is gone: every batch it had is answered UNAVAILABLE."""
        if not self.broken:
            log.error("the liquidation writer process stopped: %s", error)
        self.broken = True
        for future in self._waiting.values():
            if not future.done():
                future.set_result([])
        self._waiting.clear()

    async def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._send(("stop",))
            await self._writer.drain()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # _fail logged it
            await self._task
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


def _gone(count: int) -> Replies:
    return [
        Unavailable(
            "the liquidation writer stopped; the call may or may not have been "
            "written: retry it (the same liquidation_id returns its result)"
        )
        for _ in range(count)
    ]


def writer_main(pipe: Connection, settings: WriterSettings, slots_name: str) -> None:
    """The writer process: batches in, replies out, until told to stop or the server goes.

    One thread reads a batch, parses and validates it, and writes it; the next batch waits
    in the pipe meanwhile. (A reader thread parsing ahead made no batch ready sooner: it held
    the interpreter lock each time the database answered the writer, which then waited up to
    a switch interval for it, at every round trip.)"""
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s writer %(name)s %(message)s",
    )
    slots = SharedMemory(name=slots_name)
    flags = _buffer(slots)
    database = Database(
        settings.database_url,
        pool_size=1,
        lock_timeout_s=settings.lock_timeout_s,
        statement_timeout_s=settings.statement_timeout_s,
    )
    runner: BatchRunner[LiquidationRequest, LiquidationResult] = BatchRunner(
        database.writer_connection, liquidation.record_batch
    )
    heap.settle()
    try:
        while True:
            try:
                message = pipe.recv()
            except (EOFError, OSError):  # the server process is gone
                return
            if message[0] == "stop":
                return
            _batch, sequence, first, calls, deadlines = message
            parsed = [_parse(kind, raw) for kind, raw in calls]
            admission = Admission(flags, first, deadlines)
            replies = record_calls(runner, parsed, admission.admit)
            try:
                pipe.send(("done", sequence, admission.answer(replies)))
            except (EOFError, OSError):
                return
    finally:
        runner.discard()
        database.dispose()
        flags.release()
        slots.close()


class Admission:
    """A batch's admission, from the calls' slots and deadlines, decided the first time it is
    asked (once its transaction holds its locks): an admitted call is committing, and stays
    admitted if the transaction is run again."""

    def __init__(self, flags: memoryview, first: int, deadlines: Sequence[float | None]) -> None:
        self._flags = flags
        self._first = first
        self._deadlines = deadlines
        self._expired: list[bool] = []
        self._admitted: list[bool] | None = None

    def admit(self) -> list[bool]:
        if self._admitted is None:
            now = time.monotonic()
            flags, size, first = self._flags, len(self._flags), self._first
            self._expired = [d is not None and now >= d for d in self._deadlines]
            self._admitted = [
                not late and flags[(first + k) % size] != ABANDONED
                for k, late in enumerate(self._expired)
            ]
        return self._admitted

    def answer(self, replies: list[Reply | None]) -> list[Reply | None]:
        """The late calls not admitted are answered DEADLINE_EXCEEDED (the others, None)."""
        for k, late in enumerate(self._expired):
            if late and replies[k] is None:
                replies[k] = (Code.DEADLINE_EXCEEDED, EXPIRED, None)
        return replies


@dataclass(slots=True)
class _Parsed:
    """One call's items: each validated, or the error it gets without the database."""

    kind: int
    items: Sequence[LiquidationRequest | Exception]


def record_calls(
    runner: BatchRunner[LiquidationRequest, LiquidationResult],
    parsed: Sequence[_Parsed],
    admit_calls: Admit,
) -> list[Reply | None]:
    """The calls' replies once their valid items are durable, as one transaction."""
    valid: list[LiquidationRequest] = []
    owner: list[int] = []  # the call of each valid item
    for index, call in enumerate(parsed):
        for item in call.items:
            if isinstance(item, LiquidationRequest):
                valid.append(item)
                owner.append(index)
    flags: list[bool] | None = None

    def admit_items() -> list[bool]:
        nonlocal flags
        flags = list(admit_calls())
        return [flags[index] for index in owner]

    outcomes = iter(runner.run(valid, admit_items) if valid else [])
    replies: list[Reply | None] = []
    for index, call in enumerate(parsed):
        if flags is not None and not flags[index]:
            replies.append(None)
            for item in call.items:  # its items' outcomes are None: not written
                if isinstance(item, LiquidationRequest):
                    next(outcomes)
            continue
        results = [
            next(outcomes) if isinstance(item, LiquidationRequest) else item for item in call.items
        ]
        replies.append(_reply(call.kind, results))
    return replies


def _parse(kind: int, raw: bytes) -> _Parsed:
    plain = liquidation.validate_encoded(raw, batch=kind == BATCH)
    if plain is not None:
        return _Parsed(kind, plain)
    try:
        if kind == UNARY:
            return _Parsed(kind, [_validated(pb.RecordLiquidationRequest.FromString(raw))])
        request = pb.RecordLiquidationsRequest.FromString(raw)
    except DecodeError as error:
        problem = f"is not a valid message: {error}"
        return _Parsed(kind, [InvalidArgument("request", f"{len(raw)} bytes", problem)])
    except Exception as error:  # a field the validation refuses
        return _Parsed(kind, [error])
    items: list[LiquidationRequest | Exception] = []
    for item in request.liquidations:
        try:
            items.append(_validated(item))
        except Exception as error:
            items.append(error)
    return _Parsed(kind, items)


def _validated(request: pb.RecordLiquidationRequest) -> LiquidationRequest:
    return liquidation.validate(
        request.liquidation_id,
        request.cycle_id,
        request.symbol,
        request.account_id,
        request.position_id,
        request.side,
        request.quantity,
        request.takeover_price,
        request.close_price,
        request.remaining_margin,
    )


def _reply(kind: int, results: Sequence[LiquidationResult | Exception | None]) -> Reply:
    if kind == UNARY:
        (outcome,) = results
        if isinstance(outcome, LiquidationResult):
            return _result(outcome).SerializeToString()
        assert outcome is not None
        code, message = reply_status(RECORD_LIQUIDATION, outcome)
        return code, message, status_details(outcome, code, message)
    # Each item's outcome filled in place (code 0 left unset when OK): three times faster
    # than building each message from keywords and handing over the list.
    response = pb.RecordLiquidationsResponse()
    add = response.outcomes.add
    for outcome in results:
        item = add()
        if isinstance(outcome, LiquidationResult):
            _fill(item.result, outcome)
        else:
            assert outcome is not None
            item.code, item.message = reply_status(RECORD_LIQUIDATIONS, outcome)
    return response.SerializeToString()


def _result(result: LiquidationResult) -> pb.LiquidationResult:
    message = pb.LiquidationResult()
    _fill(message, result)
    return message


def _fill(message: pb.LiquidationResult, result: LiquidationResult) -> None:
    message.liquidation_id = result.liquidation_id
    message.currency = result.currency
    message.engine_result = result.engine_result
    message.outcome = int(result.outcome)  # type: ignore[assignment]
    message.fund_balance = result.fund_balance
    message.entry_id = result.entry_id
