"""CycleInput streams built from numpy columns, cut into chunks however a test wants.

Position chunks are encoded here by hand from the wire format (a packed fixed64 field is a
tag, a length and the little-endian values), so a stream of millions of positions costs a few
numpy copies instead of a protobuf object per chunk; `test_cycle` checks the encoding against
the generated classes byte for byte. The digest and the allocation reader are independent of
the server's code too: hashlib over the 24-byte rows, and the generated AllocationChunk.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from ledger.api.v1 import insurance_pb2 as pb

CLOSE_METHOD = "/insurance.v1.Clearing/CloseCycle"
PREVIEW_METHOD = "/insurance.v1.Clearing/PreviewCycle"
CHUNK_ROWS_MAX = 65_536  # the contract's rows per PositionChunk / AllocationChunk

Row = tuple[int, int, int]  # (position_id, account_id, pnl)


@dataclass(frozen=True)
class Positions:
    """A cycle's positions as the three columns of the contract."""

    position_id: npt.NDArray[np.uint64]
    account_id: npt.NDArray[np.uint64]
    pnl: npt.NDArray[np.int64]

    @classmethod
    def of(cls, rows: Iterable[Row]) -> Positions:
        listed = list(rows)
        return cls(
            np.array([r[0] for r in listed], dtype=np.uint64),
            np.array([r[1] for r in listed], dtype=np.uint64),
            np.array([r[2] for r in listed], dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self.pnl)

    def rows(self) -> list[Row]:
        return list(
            zip(self.position_id.tolist(), self.account_id.tolist(), self.pnl.tolist(), strict=True)
        )

    def take(self, order: npt.NDArray[np.intp]) -> Positions:
        return Positions(self.position_id[order], self.account_id[order], self.pnl[order])

    def shuffled(self, seed: int) -> Positions:
        return self.take(np.random.default_rng(seed).permutation(len(self)))


def input_digest(positions: Positions) -> str:
    """Issue 5's digest, computed here: SHA-256 over the rows sorted by position_id, each
    position_id u64, account_id u64, pnl i64, little-endian."""
    table = np.empty(len(positions), dtype=[("id", "<u8"), ("account", "<u8"), ("pnl", "<i8")])
    table["id"], table["account"], table["pnl"] = (
        positions.position_id,
        positions.account_id,
        positions.pnl,
    )
    table.sort(order="id", kind="stable")
    return hashlib.sha256(table.tobytes()).hexdigest()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _packed(field: int, values: npt.NDArray[Any], dtype: str) -> bytes:
    if len(values) == 0:
        return b""  # proto3 leaves an empty repeated field out
    data = np.ascontiguousarray(values, dtype=dtype).tobytes()
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def header(cycle_id: str, currency: str) -> bytes:
    return pb.CycleInput(
        header=pb.CycleHeader(cycle_id=cycle_id, currency=currency)
    ).SerializeToString()


def chunk(
    position_id: npt.NDArray[Any], account_id: npt.NDArray[Any], pnl: npt.NDArray[Any]
) -> bytes:
    """One serialized CycleInput holding a PositionChunk (columns may differ in length)."""
    inner = _packed(1, position_id, "<u8") + _packed(2, account_id, "<u8") + _packed(3, pnl, "<i8")
    return _varint(2 << 3 | 2) + _varint(len(inner)) + inner


def cut(count: int, sizes: Sequence[int] | None = None, seed: int | None = None) -> list[int]:
    """Chunk boundaries over `count` rows: fixed `sizes` repeated, or random sizes (some of
    them zero: an empty chunk is allowed) from `seed`, never above CHUNK_ROWS_MAX."""
    bounds = [0]
    rng = random.Random(seed)
    k = 0
    while bounds[-1] < count:
        if sizes is not None:
            size = sizes[k % len(sizes)]
        else:
            size = rng.choice([0, 1, 2, 7, rng.randint(1, 500), rng.randint(1, CHUNK_ROWS_MAX)])
        bounds.append(min(bounds[-1] + size, count))
        k += 1
    return bounds


def messages(
    cycle_id: str,
    currency: str,
    positions: Positions,
    sizes: Sequence[int] | None = (CHUNK_ROWS_MAX,),
    seed: int | None = None,
) -> Iterator[bytes]:
    """The header, then the positions cut by `cut`."""
    yield header(cycle_id, currency)
    bounds = cut(len(positions), sizes, seed)
    for start, stop in itertools.pairwise(bounds):
        yield chunk(
            positions.position_id[start:stop],
            positions.account_id[start:stop],
            positions.pnl[start:stop],
        )


def raw_call(channel: grpc.Channel, method: str) -> Any:
    """CloseCycle / PreviewCycle taking already-serialized CycleInput messages."""
    return channel.stream_unary(
        method, request_serializer=None, response_deserializer=pb.CycleSummary.FromString
    )


def close(
    channel: grpc.Channel,
    cycle_id: str,
    currency: str,
    positions: Positions,
    sizes: Sequence[int] | None = (CHUNK_ROWS_MAX,),
    seed: int | None = None,
    timeout: float = 120,
) -> pb.CycleSummary:
    call = raw_call(channel, CLOSE_METHOD)
    summary: pb.CycleSummary = call(
        messages(cycle_id, currency, positions, sizes, seed), timeout=timeout
    )
    return summary


def preview(
    channel: grpc.Channel,
    cycle_id: str,
    currency: str,
    positions: Positions,
    sizes: Sequence[int] | None = (CHUNK_ROWS_MAX,),
    seed: int | None = None,
) -> pb.CycleSummary:
    call = raw_call(channel, PREVIEW_METHOD)
    summary: pb.CycleSummary = call(
        messages(cycle_id, currency, positions, sizes, seed), timeout=120
    )
    return summary


@dataclass(frozen=True)
class Streamed:
    """StreamAllocations' reply: the rows in the order received, and each chunk's size."""

    rows: list[tuple[int, int, int, int]]  # (position_id, account_id, pnl, amount)
    chunk_sizes: list[int]


def stream_allocations(
    query: Any, cycle_id: str, currency: str, account_id: int | None = None
) -> Streamed:
    request = pb.StreamAllocationsRequest(cycle_id=cycle_id, currency=currency)
    if account_id is not None:
        request.account_id = account_id
    rows: list[tuple[int, int, int, int]] = []
    sizes: list[int] = []
    for part in query.StreamAllocations(request, timeout=120):
        columns = (part.position_id, part.account_id, part.pnl, part.amount)
        assert len({len(c) for c in columns}) == 1, "unequal columns in an AllocationChunk"
        sizes.append(len(part.amount))
        rows.extend(zip(*columns, strict=True))
    return Streamed(rows, sizes)
