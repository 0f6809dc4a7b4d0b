"""The files the CLI reads and writes, CSV or Parquet by the file's suffix, as columns.

pyarrow reads a file into typed columns (CSV is parsed on several threads; a Parquet file's
types come with it), which become numpy arrays for the streams: no Python object per row. A
file is read and checked whole before anything is sent, so that a bad value in its last row
cannot leave half a cycle streamed. Money columns must be integers (minor units) and decimal
columns strings (or Parquet decimals): a float column is refused, since it cannot hold every
amount or price exactly.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ledger.api.v1 import insurance_pb2 as pb
from ledger.client.connection import UsageProblem
from ledger.client.streams import Allocations, Positions

if TYPE_CHECKING:
    import pyarrow as pa

CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")

LIQUIDATION_TEXT_COLUMNS = (
    "liquidation_id",
    "cycle_id",
    "symbol",
    "quantity",
    "takeover_price",
    "close_price",
)
LIQUIDATION_COLUMNS = (
    "liquidation_id",
    "cycle_id",
    "symbol",
    "account_id",
    "position_id",
    "side",
    "quantity",
    "takeover_price",
    "close_price",
    "remaining_margin",
)
SIDES = {
    "long": pb.SIDE_LONG,
    "side_long": pb.SIDE_LONG,
    str(pb.SIDE_LONG): pb.SIDE_LONG,
    "short": pb.SIDE_SHORT,
    "side_short": pb.SIDE_SHORT,
    str(pb.SIDE_SHORT): pb.SIDE_SHORT,
}


def file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise UsageProblem(f"{path}: name a .csv or .parquet file (the suffix tells the format)")


def _read(path: Path, types: dict[str, pa.DataType]) -> pa.Table:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    kind = file_format(path)
    if not path.is_file():
        raise UsageProblem(f"{path}: no such file")
    try:
        if kind == "csv":
            options = pacsv.ConvertOptions(column_types=types)
            return pacsv.read_csv(path, convert_options=options)
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise UsageProblem(f"{path}: {_named(path, str(error))}") from None


def _named(path: Path, message: str) -> str:
    """pyarrow names a CSV column by its number; the operator knows it by its name."""
    match = re.search(r"CSV column #(\d+)", message)
    if match is None:
        return message
    try:
        with path.open(newline="") as file:
            names = next(csv.reader(file))
        return f"column {names[int(match.group(1))]}: {message}"
    except (OSError, StopIteration, IndexError, UnicodeDecodeError):
        return message


def _columns(
    path: Path, table: pa.Table, required: tuple[str, ...], types: dict[str, pa.DataType]
) -> dict[str, pa.Array]:
    """The named columns, each cast to its type, without nulls (an empty cell is an error:
    no default amount or id is guessed)."""
    import pyarrow as pa

    missing = [name for name in required if name not in table.column_names]
    if missing:
        raise UsageProblem(
            f"{path}: no column {', '.join(missing)} (the file has "
            f"{', '.join(table.column_names) or 'no columns'}; it needs {', '.join(required)})"
        )
    out: dict[str, pa.Array] = {}
    for name, wanted in types.items():
        if name not in table.column_names:
            continue
        column = table.column(name).combine_chunks()
        if column.null_count:
            raise UsageProblem(f"{path}: column {name} has {column.null_count} empty cells")
        if pa.types.is_floating(column.type):
            raise UsageProblem(
                f"{path}: column {name} is floating point ({column.type}); write integers "
                "(minor units, ids) or decimal strings, which are exact"
            )
        if pa.types.is_string(wanted) and pa.types.is_decimal(column.type):
            out[name] = column  # formatted exactly when the messages are built
            continue
        try:
            out[name] = column.cast(wanted)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise UsageProblem(f"{path}: column {name} is not {wanted}: {error}") from None
    return out


def read_positions(path: Path) -> Positions:
    """A cycle's positions file: columns position_id, account_id, pnl (minor units)."""
    import pyarrow as pa

    types = {"position_id": pa.uint64(), "account_id": pa.uint64(), "pnl": pa.int64()}
    table = _read(path, types)
    columns = _columns(path, table, tuple(types), types)
    return Positions(
        np.asarray(columns["position_id"].to_numpy(zero_copy_only=False), dtype=np.uint64),
        np.asarray(columns["account_id"].to_numpy(zero_copy_only=False), dtype=np.uint64),
        np.asarray(columns["pnl"].to_numpy(zero_copy_only=False), dtype=np.int64),
    )


@dataclass(frozen=True, slots=True)
class LiquidationFile:
    """A file of liquidations, one per row, with columns named like RecordLiquidationRequest's
    fields (remaining_margin may be left out: 0)."""

    path: Path
    columns: dict[str, Any]
    rows: int

    def batches(self, size: int) -> Iterator[list[pb.RecordLiquidationRequest]]:
        for start in range(0, self.rows, size):
            yield [self._request(row) for row in range(start, min(start + size, self.rows))]

    def _request(self, row: int) -> pb.RecordLiquidationRequest:
        c = self.columns
        return pb.RecordLiquidationRequest(
            liquidation_id=c["liquidation_id"][row],
            cycle_id=c["cycle_id"][row],
            symbol=c["symbol"][row],
            account_id=c["account_id"][row],
            position_id=c["position_id"][row],
            side=c["side"][row],
            quantity=c["quantity"][row],
            takeover_price=c["takeover_price"][row],
            close_price=c["close_price"][row],
            remaining_margin=c["remaining_margin"][row] if "remaining_margin" in c else 0,
        )


def read_liquidations(path: Path) -> LiquidationFile:
    import pyarrow as pa
    import pyarrow.compute as pc

    types: dict[str, pa.DataType] = {name: pa.string() for name in LIQUIDATION_TEXT_COLUMNS}
    types |= {
        "account_id": pa.uint64(),
        "position_id": pa.uint64(),
        "side": pa.string(),
        "remaining_margin": pa.int64(),
    }
    table = _read(path, types)
    required = tuple(c for c in LIQUIDATION_COLUMNS if c != "remaining_margin")
    arrays = _columns(path, table, required, types)
    sides = pc.utf8_lower(pc.utf8_trim_whitespace(arrays["side"]))
    unknown = pc.invert(pc.is_in(sides, value_set=pa.array(list(SIDES))))
    if pc.any(unknown).as_py():
        first = int(pc.index(unknown, True).as_py())
        raise UsageProblem(
            f"{path}: row {first + 1}: side {arrays['side'][first].as_py()!r} is not long or short"
        )
    columns: dict[str, Any] = {
        name: [_decimal_text(v) for v in array.to_pylist()]
        if pa.types.is_decimal(array.type)
        else array.to_pylist()
        for name, array in arrays.items()
        if name != "side"
    }
    columns["side"] = [SIDES[s] for s in sides.to_pylist()]
    return LiquidationFile(path, columns, table.num_rows)


def _decimal_text(value: Decimal) -> str:
    """A Parquet decimal as the contract's decimal string: plain digits, no exponent."""
    return format(value, "f")


def write_allocations(path: Path, allocations: Allocations) -> None:
    """position_id, account_id, pnl, amount (minor units), in the order given."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    kind = file_format(path)
    table = pa.table(
        {
            "position_id": pa.array(allocations.position_id, type=pa.uint64()),
            "account_id": pa.array(allocations.account_id, type=pa.uint64()),
            "pnl": pa.array(allocations.pnl, type=pa.int64()),
            "amount": pa.array(allocations.amount, type=pa.int64()),
        }
    )
    try:
        if kind == "csv":
            pacsv.write_csv(table, path)
        else:
            pq.write_table(table, path)
    except (pa.ArrowException, OSError) as error:
        raise UsageProblem(f"{path}: cannot write: {error}") from None
