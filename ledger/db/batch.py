"""The statements of a write batch, sent straight through the driver in as few round trips as
the backend allows.

On PostgreSQL every statement of a `round_trip()` is queued in one psycopg pipeline and the
lot costs a single network round trip; keys go as one array (`= ANY(%s)`) and rows as one
`unnest` of column arrays, so the SQL text does not vary with the batch size and the server
reuses its prepared plan. On SQLite, in-process, the same statements simply run one after
the other (IN lists, executemany).

A group commit's single writer runs these for every batch while the calls wait for it:
SQLAlchemy's execution path costs tens of microseconds a statement, the driver's a few.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import BigInteger, Integer, SmallInteger, Table
from sqlalchemy.orm import Session

IN_LIST_MAX = 500  # keys per SQLite IN (...) list, well under its parameter limit


class Pending:
    """The rows of statements already sent; read them after their round trip."""

    def __init__(self, cursors: list[Any]) -> None:
        self._cursors = cursors

    def rows(self) -> list[tuple[Any, ...]]:
        found: list[tuple[Any, ...]] = []
        for cursor in self._cursors:
            if cursor.description is not None:
                found.extend(cursor.fetchall())
        return found


class BatchStatements:
    """Runs SQL on the DBAPI connection of the session (so inside its transaction)."""

    def __init__(self, session: Session) -> None:
        connection = session.connection()
        self.is_sqlite = connection.dialect.name == "sqlite"
        self._dbapi: Any = connection.connection.dbapi_connection
        self._mark = "?" if self.is_sqlite else "%s"  # sqlite3: qmark; psycopg: format

    @property
    def for_update(self) -> str:
        """Row locks on PostgreSQL; SQLite's BEGIN IMMEDIATE already excludes other writers."""
        return "" if self.is_sqlite else " FOR UPDATE"

    @contextmanager
    def round_trip(self) -> Iterator[None]:
        """Statements executed inside are sent together; their rows can be read after."""
        if self.is_sqlite:
            yield
            return
        with self._dbapi.pipeline():
            yield

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Pending:
        """`sql` with `?` placeholders, whatever the backend."""
        if not self.is_sqlite:
            sql = sql.replace("?", "%s")
        cursor = self._dbapi.cursor()
        cursor.execute(sql, params)
        return Pending([cursor])

    def select_in(self, sql: str, keys: Iterable[Any], params: Sequence[Any] = ()) -> Pending:
        """`sql` with one `{}` where the key condition goes, as in `WHERE id {}`, after
        `params` for its other placeholders."""
        keys = sorted(set(keys))
        if not self.is_sqlite:
            return self.execute(sql.format("= ANY(?)"), [*params, keys])
        cursors = []
        for start in range(0, len(keys), IN_LIST_MAX):
            chunk = keys[start : start + IN_LIST_MAX]
            condition = "IN (" + ", ".join(["?"] * len(chunk)) + ")"
            cursors.extend(self.execute(sql.format(condition), [*params, *chunk])._cursors)
        return Pending(cursors)

    def insert(self, table: Table, rows: Sequence[Sequence[Any]]) -> None:
        """Insert rows holding every column of `table`, in the table's column order."""
        if not rows:
            return
        names = ", ".join(table.columns.keys())
        if self.is_sqlite:
            marks = ", ".join(["?"] * len(table.columns))
            cursor = self._dbapi.cursor()
            cursor.executemany(f"INSERT INTO {table.name} ({names}) VALUES ({marks})", rows)
            return
        arrays = ", ".join(f"%s::{_pg_type(column.type)}[]" for column in table.columns)
        cursor = self._dbapi.cursor()
        cursor.execute(
            f"INSERT INTO {table.name} ({names}) SELECT * FROM unnest({arrays})",
            [list(column) for column in zip(*rows, strict=True)],
        )


def _pg_type(column_type: Any) -> str:
    if isinstance(column_type, SmallInteger):
        return "smallint"
    if isinstance(column_type, BigInteger):
        return "bigint"
    if isinstance(column_type, Integer):
        return "integer"
    return "text"
