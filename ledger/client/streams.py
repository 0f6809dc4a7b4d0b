"""The columnar streams of the contract, from and to numpy columns.

A cycle's positions go to CloseCycle/PreviewCycle as CycleInput messages: a header, then
PositionChunks of at most 65,536 rows. Each chunk is encoded here from the arrays' bytes (a
packed fixed64 field is its tag, its length and the little-endian values), so a stream of
millions of positions costs a few array copies and no Python object per row. The reply of
StreamAllocations comes back the other way: each AllocationChunk is parsed by the generated
class and its repeated fields are taken as numpy arrays, then concatenated.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ledger.api.v1 import insurance_pb2 as pb
from ledger.limits import CHUNK_ROWS_MAX

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Positions:
    """A cycle's positions: the three columns of PositionChunk."""

    position_id: U64
    account_id: U64
    pnl: I64

    def __len__(self) -> int:
        return len(self.pnl)


@dataclass(frozen=True, slots=True)
class Allocations:
    """A cycle's allocation rows: the four columns of AllocationChunk."""

    position_id: U64
    account_id: U64
    pnl: I64
    amount: I64

    def __len__(self) -> int:
        return len(self.amount)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def packed(field: int, values: npt.NDArray[Any], dtype: str) -> bytes:
    """A packed repeated fixed-width field; empty when there are no values (proto3 leaves an
    empty repeated field out)."""
    if len(values) == 0:
        return b""
    data = np.ascontiguousarray(values, dtype=dtype).tobytes()
    return varint(field << 3 | 2) + varint(len(data)) + data


def header(cycle_id: str, currency: str) -> bytes:
    message = pb.CycleInput(header=pb.CycleHeader(cycle_id=cycle_id, currency=currency))
    return message.SerializeToString()


def position_chunk(position_id: U64, account_id: U64, pnl: I64) -> bytes:
    """One serialized CycleInput holding a PositionChunk of these rows."""
    inner = packed(1, position_id, "<u8") + packed(2, account_id, "<u8") + packed(3, pnl, "<i8")
    return varint(2 << 3 | 2) + varint(len(inner)) + inner


def cycle_input(
    cycle_id: str, currency: str, positions: Positions, rows_per_chunk: int = CHUNK_ROWS_MAX
) -> Iterator[tuple[bytes, int]]:
    """The header, then one chunk per `rows_per_chunk` rows, each with the rows it holds."""
    yield header(cycle_id, currency), 0
    for start in range(0, len(positions), rows_per_chunk):
        stop = min(start + rows_per_chunk, len(positions))
        message = position_chunk(
            positions.position_id[start:stop],
            positions.account_id[start:stop],
            positions.pnl[start:stop],
        )
        yield message, stop - start


def allocation_columns(chunks: Iterable[pb.AllocationChunk]) -> Iterator[Allocations]:
    """Each AllocationChunk's repeated fields as arrays (the columns must be as long as each
    other: a reply that breaks the contract is an error, not a silent truncation)."""
    for chunk in chunks:
        columns = Allocations(
            np.array(chunk.position_id, dtype=np.uint64),
            np.array(chunk.account_id, dtype=np.uint64),
            np.array(chunk.pnl, dtype=np.int64),
            np.array(chunk.amount, dtype=np.int64),
        )
        lengths = {len(columns.position_id), len(columns.account_id), len(columns.pnl)}
        if lengths != {len(columns)}:
            raise ValueError(f"an AllocationChunk with columns of unequal lengths {lengths}")
        yield columns


def concatenate(parts: list[Allocations]) -> Allocations:
    if not parts:
        empty_u = np.empty(0, dtype=np.uint64)
        empty_i = np.empty(0, dtype=np.int64)
        return Allocations(empty_u, empty_u, empty_i, empty_i)
    return Allocations(
        np.concatenate([p.position_id for p in parts]),
        np.concatenate([p.account_id for p in parts]),
        np.concatenate([p.pnl for p in parts]),
        np.concatenate([p.amount for p in parts]),
    )
