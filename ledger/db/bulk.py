"""Allocation rows in bulk, through each backend's fastest path, inside the caller's transaction.

PostgreSQL: binary COPY, the rows laid out by numpy (every field is an int8, so a row has a
fixed size and the whole chunk is one structured array). SQLite: executemany of plain tuples.
No ORM object is made per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy.orm import Session

from ledger.alloc import table_order
from ledger.db.u64 import to_signed

ROWS_PER_WRITE = 1 << 17  # rows per COPY block: bounds memory, lets work overlap
# Rows per executemany on SQLite: between two of them a long writer lets waiting writers in
# (see cycle close), so this bounds how long a liquidation waits behind it.
SQLITE_ROWS_PER_STEP = 1 << 13
_PG_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_PG_COPY_TRAILER = (-1).to_bytes(2, "big", signed=True)
_COLUMNS = ("cycle_pk", "account_id", "position_id", "pnl", "amount", "entry_id")
_PG_ROW = np.dtype(
    [("fields", ">i2")]
    + [item for name in _COLUMNS for item in ((f"{name}_len", ">i4"), (name, ">i8"))]
)


@dataclass(frozen=True, slots=True)
class AllocationRows:
    """A cycle's allocation rows in the table's key order, as its int64 columns; an entry's
    id is first_entry_id + its rank by position (both set once the ids are reserved)."""

    account_id: npt.NDArray[np.int64]
    position_id: npt.NDArray[np.int64]
    pnl: npt.NDArray[np.int64]
    amount: npt.NDArray[np.int64]
    rank: npt.NDArray[np.int64]
    cycle_pk: int = 0
    first_entry_id: int = 0

    def __len__(self) -> int:
        return len(self.amount)

    def placed(self, cycle_pk: int, first_entry_id: int) -> AllocationRows:
        """The same rows, in the cycle `cycle_pk` with their entry ids from first_entry_id."""
        return replace(self, cycle_pk=cycle_pk, first_entry_id=first_entry_id)

    def entry_id(self, start: int, stop: int) -> npt.NDArray[np.int64]:
        return self.rank[start:stop] + self.first_entry_id


def allocation_rows(
    position_id: npt.NDArray[np.uint64],
    account_id: npt.NDArray[np.uint64],
    pnl: npt.NDArray[np.int64],
    amount: npt.NDArray[np.int64],
) -> AllocationRows:
    """One cycle's allocations, given in position order, as rows sorted by the table's key
    (see models.Allocation), before the write takes any lock."""
    return AllocationRows(*table_order(position_id, account_id, pnl, amount))


def insert_allocations(
    connection: Any, rows: AllocationRows, between: Callable[[], None] = lambda: None
) -> None:
    """SQLite: executemany in steps of SQLITE_ROWS_PER_STEP rows, calling `between` after
    each; the next step's Python ints are made on another thread while SQLite steps through
    this one (the driver lets go of the GIL while it steps)."""
    if not len(rows):
        return
    insert = f"INSERT INTO allocations ({', '.join(_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?)"

    def params(start: int) -> list[tuple[int, ...]]:
        stop = min(start + SQLITE_ROWS_PER_STEP, len(rows))
        return list(
            zip(
                repeat(rows.cycle_pk, stop - start),
                rows.account_id[start:stop].tolist(),
                rows.position_id[start:stop].tolist(),
                rows.pnl[start:stop].tolist(),
                rows.amount[start:stop].tolist(),
                rows.entry_id(start, stop).tolist(),
                strict=True,
            )
        )

    starts = range(0, len(rows), SQLITE_ROWS_PER_STEP)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulk-params") as pool:
        pending = pool.submit(params, starts[0])
        for following in [*starts[1:], None]:
            batch = pending.result()
            if following is not None:
                pending = pool.submit(params, following)
            cursor = connection.cursor()
            try:
                cursor.executemany(insert, batch)
            finally:
                cursor.close()
            del batch
            if following is not None:
                between()


def copy_allocations(connection: Any, rows: AllocationRows) -> None:
    """PostgreSQL: the rows as one binary COPY, laid out by numpy a block at a time."""
    if not len(rows):
        return
    with (
        connection.cursor() as cursor,
        cursor.copy(f"COPY allocations ({', '.join(_COLUMNS)}) FROM STDIN (FORMAT BINARY)") as copy,
    ):
        copy.write(_PG_COPY_HEADER)
        for start in range(0, len(rows), ROWS_PER_WRITE):
            stop = min(start + ROWS_PER_WRITE, len(rows))
            block = np.empty(stop - start, dtype=_PG_ROW)
            block["fields"] = len(_COLUMNS)
            for name in _COLUMNS:
                block[f"{name}_len"] = 8
            block["cycle_pk"] = rows.cycle_pk
            for name in _COLUMNS[1:-1]:
                block[name] = getattr(rows, name)[start:stop]
            block["entry_id"] = rows.entry_id(start, stop)
            copy.write(block.tobytes())
        copy.write(_PG_COPY_TRAILER)


def _table(name: str) -> str:
    if name not in ("allocations", "allocation_reversals"):
        raise ValueError(f"not a table of allocation rows: {name!r}")
    return name


def write_allocations(session: Session, rows: AllocationRows) -> None:
    """Append the rows in the session's transaction by the backend's fastest path."""
    connection = driver_connection(session)
    if session.get_bind().dialect.name == "postgresql":
        copy_allocations(connection, rows)
    else:
        insert_allocations(connection, rows)


def driver_connection(session: Session) -> Any:
    """The driver's own connection (psycopg or sqlite3) of the session's transaction."""
    connection = session.connection().connection.driver_connection
    assert connection is not None
    return connection


@dataclass(frozen=True, slots=True)
class AllocationColumns:
    position_id: npt.NDArray[np.uint64]
    account_id: npt.NDArray[np.uint64]
    pnl: npt.NDArray[np.int64]
    amount: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.amount)


_READ_COLUMNS = ("position_id", "account_id", "pnl", "amount")
_PG_COPY_SIGNATURE_BYTES = 11


def read_allocations(
    session: Session, cycle_pk: int, account_id: int | None, rows_per_chunk: int
) -> Iterator[AllocationColumns]:
    """A cycle's allocations (or one account's) in unsigned position_id order, in chunks.

    The rows come in key order (account, position) and are put in position order in memory:
    32 bytes a row, a sort that costs far less than an index maintained on every write.
    """
    where = f"cycle_pk = {int(cycle_pk)}"
    if account_id is not None:
        where += f" AND account_id = {int(to_signed(account_id))}"
    table = _read(session, _READ_COLUMNS, where)
    order = np.argsort(table["position_id"].view(np.uint64))
    for start in range(0, len(order), rows_per_chunk):
        rows = order[start : start + rows_per_chunk]
        yield AllocationColumns(
            table["position_id"][rows].view(np.uint64),
            table["account_id"][rows].view(np.uint64),
            table["pnl"][rows],
            table["amount"][rows],
        )


@dataclass(frozen=True, slots=True)
class AllocationTable:
    """A cycle's allocation rows in position order, with their entry ids."""

    position_id: npt.NDArray[np.uint64]
    account_id: npt.NDArray[np.uint64]
    pnl: npt.NDArray[np.int64]
    amount: npt.NDArray[np.int64]
    entry_id: npt.NDArray[np.int64]


def read_allocation_table(
    session: Session, cycle_pk: int, table: str = "allocations"
) -> AllocationTable:
    """Every row with the cycle_pk of `allocations` (or of `allocation_reversals`, the same
    shape), as stored (VerifyLedger's read)."""
    read = _read(
        session, (*_READ_COLUMNS, "entry_id"), f"cycle_pk = {int(cycle_pk)}", _table(table)
    )
    order = np.argsort(read["position_id"].view(np.uint64), kind="stable")
    return AllocationTable(
        read["position_id"][order].view(np.uint64),
        read["account_id"][order].view(np.uint64),
        read["pnl"][order],
        read["amount"][order],
        read["entry_id"][order],
    )


def _read(
    session: Session, columns: tuple[str, ...], where: str, table: str = "allocations"
) -> dict[str, npt.NDArray[np.int64]]:
    """int8 columns of the allocation rows that match, by the backend's fastest path."""
    query = f"SELECT {', '.join(columns)} FROM {table} WHERE {where}"
    connection = driver_connection(session)
    if session.get_bind().dialect.name == "postgresql":
        return _copy_out(connection, query, columns)
    return _fetch_all(connection, query, columns)


def _fetch_all(
    connection: Any, query: str, columns: tuple[str, ...]
) -> dict[str, npt.NDArray[np.int64]]:
    cursor = connection.cursor()
    try:
        cursor.execute(query)
        blocks = []
        while rows := cursor.fetchmany(ROWS_PER_WRITE):
            blocks.append(np.array(rows, dtype=np.int64).reshape(-1, len(columns)))
    finally:
        cursor.close()
    table = np.concatenate(blocks) if blocks else np.empty((0, len(columns)), dtype=np.int64)
    return {name: np.ascontiguousarray(table[:, n]) for n, name in enumerate(columns)}


def _copy_out(
    connection: Any, query: str, columns: tuple[str, ...]
) -> dict[str, npt.NDArray[np.int64]]:
    """Binary COPY of int8 columns: per row a 2-byte field count, then (4-byte length,
    8 bytes) per column."""
    row_type = np.dtype(
        [("fields", ">i2")]
        + [item for name in columns for item in ((f"{name}_len", ">i4"), (name, ">i8"))]
    )
    data = bytearray()
    with (
        connection.cursor() as cursor,
        cursor.copy(f"COPY ({query}) TO STDOUT (FORMAT BINARY)") as copy,
    ):
        for block in copy:
            data += block
    extension = int.from_bytes(data[15:19], "big")
    body = memoryview(data)[_PG_COPY_SIGNATURE_BYTES + 8 + extension : len(data) - 2]
    rows = np.frombuffer(body, dtype=row_type)
    return {name: rows[name].astype(np.int64) for name in columns}
