"""Allocation rows in bulk, through each backend's fastest path, inside the caller's transaction.

PostgreSQL: binary COPY, the rows laid out by numpy (every field is an int8, so a row has a
fixed size and the whole chunk is one structured array). SQLite: executemany of plain tuples.
No ORM object is made per row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy.orm import Session

from ledger.db.u64 import to_signed

ROWS_PER_WRITE = 1 << 20  # bounds the memory of one COPY / executemany chunk
_PG_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_PG_COPY_TRAILER = (-1).to_bytes(2, "big", signed=True)
_COLUMNS = ("cycle_pk", "position_id", "account_id", "pnl", "amount", "entry_id")
_PG_ROW = np.dtype(
    [("fields", ">i2")]
    + [item for name in _COLUMNS for item in ((f"{name}_len", ">i4"), (name, ">i8"))]
)


def write_allocations(
    session: Session,
    cycle_pk: int,
    first_entry_id: int,
    position_id: npt.NDArray[np.uint64],
    account_id: npt.NDArray[np.uint64],
    pnl: npt.NDArray[np.int64],
    amount: npt.NDArray[np.int64],
) -> None:
    """Append one cycle's allocations; entry ids are first_entry_id + rank (position order)."""
    count = len(amount)
    if count == 0:
        return
    if session.get_bind().dialect.name == "postgresql":
        _copy_postgres(session, cycle_pk, first_entry_id, position_id, account_id, pnl, amount)
        return
    insert = (
        "INSERT INTO allocations (cycle_pk, position_id, account_id, pnl, amount, entry_id) "
        "VALUES (?, ?, ?, ?, ?, ?)"
    )
    cursor = _driver_connection(session).cursor()
    try:
        for start in range(0, count, ROWS_PER_WRITE):
            stop = min(start + ROWS_PER_WRITE, count)
            ids = position_id[start:stop].view(np.int64).tolist()
            accounts = account_id[start:stop].view(np.int64).tolist()
            entries = range(first_entry_id + start, first_entry_id + stop)
            cursor.executemany(
                insert,
                zip(
                    [cycle_pk] * (stop - start),
                    ids,
                    accounts,
                    pnl[start:stop].tolist(),
                    amount[start:stop].tolist(),
                    entries,
                    strict=True,
                ),
            )
    finally:
        cursor.close()


def _driver_connection(session: Session) -> Any:
    """The driver's own connection (psycopg or sqlite3) of the session's transaction."""
    connection = session.connection().connection.driver_connection
    assert connection is not None
    return connection


def _copy_postgres(
    session: Session,
    cycle_pk: int,
    first_entry_id: int,
    position_id: npt.NDArray[np.uint64],
    account_id: npt.NDArray[np.uint64],
    pnl: npt.NDArray[np.int64],
    amount: npt.NDArray[np.int64],
) -> None:
    dbapi = _driver_connection(session)
    count = len(amount)
    with (
        dbapi.cursor() as cursor,
        cursor.copy(f"COPY allocations ({', '.join(_COLUMNS)}) FROM STDIN (FORMAT BINARY)") as copy,
    ):
        copy.write(_PG_COPY_HEADER)
        for start in range(0, count, ROWS_PER_WRITE):
            stop = min(start + ROWS_PER_WRITE, count)
            rows = np.empty(stop - start, dtype=_PG_ROW)
            rows["fields"] = len(_COLUMNS)
            for name in _COLUMNS:
                rows[f"{name}_len"] = 8
            rows["cycle_pk"] = cycle_pk
            rows["position_id"] = position_id[start:stop].view(np.int64)
            rows["account_id"] = account_id[start:stop].view(np.int64)
            rows["pnl"] = pnl[start:stop]
            rows["amount"] = amount[start:stop]
            rows["entry_id"] = np.arange(
                first_entry_id + start, first_entry_id + stop, dtype=np.int64
            )
            copy.write(rows.tobytes())
        copy.write(_PG_COPY_TRAILER)


@dataclass(frozen=True, slots=True)
class AllocationColumns:
    position_id: npt.NDArray[np.uint64]
    account_id: npt.NDArray[np.uint64]
    pnl: npt.NDArray[np.int64]
    amount: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.amount)


_READ_COLUMNS = "position_id, account_id, pnl, amount"
# Binary COPY of four int8 columns: a 2-byte field count, then (4-byte length, 8 bytes) × 4.
_PG_READ_ROW = np.dtype(
    [("fields", ">i2")]
    + [
        item
        for name in _READ_COLUMNS.split(", ")
        for item in ((f"{name}_len", ">i4"), (name, ">i8"))
    ]
)
_PG_COPY_SIGNATURE_BYTES = 11


def read_allocations(
    session: Session, cycle_pk: int, account_id: int | None, rows_per_chunk: int
) -> Iterator[AllocationColumns]:
    """A cycle's allocations in unsigned position_id order, in chunks of rows_per_chunk.

    position_id is stored as signed bits: ids from 2**63 up come back negative, so the
    non-negative range is read first, then the negative one, each in index order.
    """
    dialect = session.get_bind().dialect.name
    for sign in (">= 0", "< 0"):
        where = f"cycle_pk = {int(cycle_pk)} AND position_id {sign}"
        if account_id is not None:
            where += f" AND account_id = {int(to_signed(account_id))}"
        query = f"SELECT {_READ_COLUMNS} FROM allocations WHERE {where} ORDER BY position_id"
        if dialect == "postgresql":
            yield from _copy_out(session, query, rows_per_chunk)
        else:
            yield from _fetch(session, query, rows_per_chunk)


def _columns(table: npt.NDArray[np.int64]) -> AllocationColumns:
    return AllocationColumns(
        np.ascontiguousarray(table[:, 0]).view(np.uint64),
        np.ascontiguousarray(table[:, 1]).view(np.uint64),
        np.ascontiguousarray(table[:, 2]),
        np.ascontiguousarray(table[:, 3]),
    )


def _fetch(session: Session, query: str, rows_per_chunk: int) -> Iterator[AllocationColumns]:
    cursor = _driver_connection(session).cursor()
    try:
        cursor.execute(query)
        while rows := cursor.fetchmany(rows_per_chunk):
            yield _columns(np.array(rows, dtype=np.int64).reshape(-1, 4))
    finally:
        cursor.close()


def _copy_out(session: Session, query: str, rows_per_chunk: int) -> Iterator[AllocationColumns]:
    dbapi = _driver_connection(session)
    chunk_bytes = rows_per_chunk * _PG_READ_ROW.itemsize
    buffer = bytearray()
    header_skipped = False
    with dbapi.cursor() as cursor, cursor.copy(f"COPY ({query}) TO STDOUT (FORMAT BINARY)") as copy:
        for block in copy:
            buffer += block
            if not header_skipped:
                if len(buffer) < _PG_COPY_SIGNATURE_BYTES + 8:
                    continue
                extension = int.from_bytes(buffer[15:19], "big")
                del buffer[: _PG_COPY_SIGNATURE_BYTES + 8 + extension]
                header_skipped = True
            while len(buffer) >= chunk_bytes:
                yield _pg_rows(bytes(buffer[:chunk_bytes]))
                del buffer[:chunk_bytes]
    rest = len(buffer) - 2  # the trailer: a field count of -1
    assert rest >= 0 and rest % _PG_READ_ROW.itemsize == 0, "unexpected COPY framing"
    if rest:
        yield _pg_rows(bytes(buffer[:rest]))


def _pg_rows(data: bytes) -> AllocationColumns:
    rows = np.frombuffer(data, dtype=_PG_READ_ROW)
    return AllocationColumns(
        rows["position_id"].astype(np.int64).view(np.uint64),
        rows["account_id"].astype(np.int64).view(np.uint64),
        rows["pnl"].astype(np.int64),
        rows["amount"].astype(np.int64),
    )
