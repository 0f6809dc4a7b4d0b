"""SQL sent straight through the driver, in as few round trips as the backend allows.

On PostgreSQL a batch's reads are one or two statements in one pipeline, and its writes one
statement of data-modifying WITH clauses; keys go as one array (`= ANY(%s)`) and rows as one
JSON array, so the SQL text does not vary with the batch size and the server reuses its
prepared plan. On SQLite, in-process, the same statements simply run one after the other
(IN lists, executemany).

The liquidation writer runs these for every batch while the calls wait for it: SQLAlchemy's
execution path costs tens of microseconds a statement, the driver's a few. The other writers
(fund transfers, the cycle close) use the same statements on their session's connection, so
that each rule of the store is written once.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import BigInteger, Boolean, Integer, SmallInteger, Table
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

# What the drivers raise from statements sent straight through them (SQLAlchemy wraps the
# same errors in DBAPIError only on its own execution path): a conflict with a concurrent
# writer, a lock or statement timeout, a lost connection; the batch is worth running again.
DRIVER_ERRORS: tuple[type[Exception], ...] = (DBAPIError, sqlite3.Error, psycopg.Error)

IN_LIST_MAX = 500  # keys per SQLite IN (...) list, well under its parameter limit
COPY_ROWS_MIN = 64  # from this many rows an insert goes by COPY on PostgreSQL


@dataclass(frozen=True, slots=True)
class Query:
    """A query of select_together: `sql` holds `{}` where the key condition goes when `keys`
    is given (`IN (…)` on SQLite, `= ANY(?)` on PostgreSQL); `params` fill the `?` placed
    before it."""

    sql: str
    keys: Iterable[Any] | None = None
    params: Sequence[Any] = ()


Statement = tuple[str, Sequence[Any]]  # SQL with `?` placeholders, and its parameters


@dataclass(frozen=True, slots=True)
class Insert:
    """Rows holding every column of `table`, in the table's column order."""

    table: Table
    rows: Sequence[Sequence[Any]]


class BatchStatements:
    """Runs SQL on a DBAPI connection, inside the transaction open on it."""

    def __init__(self, dbapi_connection: Any, *, is_sqlite: bool) -> None:
        self.is_sqlite = is_sqlite
        self._dbapi = dbapi_connection

    @classmethod
    def of_session(cls, session: Session) -> BatchStatements:
        """On the connection of the session (so in its transaction)."""
        connection = session.connection()
        dbapi = connection.connection.dbapi_connection
        return cls(dbapi, is_sqlite=connection.dialect.name == "sqlite")

    @property
    def for_update(self) -> str:
        """Row locks on PostgreSQL; SQLite's BEGIN IMMEDIATE already excludes other writers."""
        return "" if self.is_sqlite else " FOR UPDATE"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """`sql` with `?` placeholders, whatever the backend (so no literal `?` or `%`);
        returns the cursor."""
        if not self.is_sqlite:
            sql = sql.replace("?", "%s")
        cursor = self._dbapi.cursor()
        cursor.execute(sql, params)
        return cursor

    def rows(self, query: Query) -> list[tuple[Any, ...]]:
        """The rows of one query, on its own round trip."""
        return self.select_together([query])[0]

    def select_together(self, *statements: Sequence[Query]) -> list[list[tuple[Any, ...]]]:
        """The rows of each query of each statement, in order: on PostgreSQL the statements of
        pg_select in one pipeline, on SQLite each query on its own (chunked IN lists)."""
        if self.is_sqlite:
            return [self._sqlite_rows(query) for queries in statements for query in queries]
        with self._dbapi.pipeline():  # with the transaction's BEGIN: one round trip
            cursors = [self.execute(*pg_select(queries)) for queries in statements]
        return [column for cursor in cursors for column in pg_columns(cursor.fetchone())]

    def _sqlite_rows(self, query: Query) -> list[tuple[Any, ...]]:
        if query.keys is None:
            return list(self.execute(query.sql, query.params).fetchall())
        ordered = sorted(set(query.keys))
        rows: list[tuple[Any, ...]] = []
        for start in range(0, len(ordered), IN_LIST_MAX):
            chunk = ordered[start : start + IN_LIST_MAX]
            condition = "IN (" + ", ".join(["?"] * len(chunk)) + ")"
            sql = query.sql.format(condition)
            rows.extend(self.execute(sql, [*query.params, *chunk]).fetchall())
        return rows

    def write_together(self, statements: Sequence[Statement | Insert]) -> None:
        """Run data-changing statements in their order (see pg_write)."""
        if not self.is_sqlite:
            if statements:
                self.execute(*pg_write(statements))
            return
        for statement in statements:
            if not isinstance(statement, Insert):
                self.execute(*statement)
            elif statement.rows:
                table = statement.table
                names = ", ".join(table.columns.keys())
                marks = ", ".join(["?"] * len(table.columns))
                self._dbapi.cursor().executemany(
                    f"INSERT INTO {table.name} ({names}) VALUES ({marks})", statement.rows
                )

    def write_and_commit(self, statements: Sequence[Statement | Insert]) -> None:
        """On PostgreSQL, write_together and the COMMIT in one pipeline: one round trip to a
        durable batch. The COMMIT is sent as a statement of the pipeline: commit() would
        sync the pipeline itself, and leaving the pipeline then costs a second, empty round
        trip; the connection reads the transaction's end when the pipeline syncs.

        Inserts of COPY_ROWS_MIN rows or more go first, each as a binary COPY (a round trip
        of its own, outside the pipeline): the server reads binary rows for a fraction of
        what unpacking JSON costs it, which pays for the round trip many times over."""
        assert not self.is_sqlite, "PostgreSQL only"
        rest: list[Statement | Insert] = []
        for statement in statements:
            if isinstance(statement, Insert) and len(statement.rows) >= COPY_ROWS_MIN:
                self.copy(statement)
            else:
                rest.append(statement)
        with self._dbapi.pipeline():
            if rest:
                self.execute(*pg_write(rest))
            self._dbapi.execute("COMMIT")

    def copy(self, insert: Insert) -> None:
        """PostgreSQL: the rows by binary COPY."""
        table = insert.table
        names = ", ".join(table.columns.keys())
        with (
            self._dbapi.cursor() as cursor,
            cursor.copy(f"COPY {table.name} ({names}) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types([_pg_type(column.type) for column in table.columns])
            for row in insert.rows:
                copy.write_row(row)


def pg_select(queries: Sequence[Query]) -> tuple[str, list[Any]]:
    """One PostgreSQL statement whose columns are the queries, each aggregated to a JSON array.

    A batch's reads go as one or two such statements in one pipeline: one round trip (with
    its BEGIN), and the driver parses one row per statement instead of running its pipeline
    machinery per query. Each statement reads its own snapshot, so the statement that takes
    row locks comes first, and the reads that must see what the locks waited for come next.
    A query's rows come back as JSON objects, read in column order: its column names must
    be distinct.
    """
    columns: list[str] = []
    params: list[Any] = []
    for query in queries:
        sql = query.sql
        params.extend(query.params)
        if query.keys is not None:
            sql = sql.format("= ANY(?)")
            params.append(sorted(set(query.keys)))
        columns.append(f"(SELECT coalesce(json_agg(t), '[]') FROM ({sql}) t)")
    return "SELECT " + ", ".join(columns), params


def pg_columns(row: Sequence[Any]) -> list[list[tuple[Any, ...]]]:
    return [[tuple(item.values()) for item in column] for column in row]


def pg_write(statements: Sequence[Statement | Insert]) -> Statement:
    """Data-changing statements as one PostgreSQL statement of data-modifying WITH clauses (so
    one round trip and one plan); the rows of an insert as one parameter, so that the SQL
    does not vary with the number of rows and the server reuses its prepared plan."""
    parts = [_pg_insert(s) if isinstance(s, Insert) else s for s in statements]
    *clauses, (last, params) = parts
    if not clauses:
        return last, params
    sql = "WITH " + ", ".join(f"w{n} AS ({c})" for n, (c, _) in enumerate(clauses)) + " "
    return sql + last, [*(p for _, clause_params in clauses for p in clause_params), *params]


def _pg_insert(insert: Insert) -> Statement:
    """The rows go as one JSON array of arrays, unpacked by the server, so the driver adapts a
    single string (json.dumps, in C) rather than a typed array per column. As jsonb it is
    parsed once (json would re-scan a row's text for each column: a sixth of the server's
    time for a batch); numbers keep their exact digits (jsonb's are numeric)."""
    table = insert.table
    names = ", ".join(table.columns.keys())
    values = ", ".join(
        f"(r->>{n})::{_pg_type(column.type)}" for n, column in enumerate(table.columns)
    )
    sql = (
        f"INSERT INTO {table.name} ({names}) SELECT {values} FROM jsonb_array_elements(?::jsonb) r"
    )
    return sql, [json.dumps(insert.rows)]


def _pg_type(column_type: Any) -> str:
    if isinstance(column_type, Boolean):
        return "boolean"
    if isinstance(column_type, SmallInteger):
        return "smallint"
    if isinstance(column_type, BigInteger):
        return "bigint"
    if isinstance(column_type, Integer):
        return "integer"
    return "text"
