"""The Rust codec against the generated protobuf classes: CycleInput bytes decode to the same
columns protobuf sees (packed, unpacked, unknown fields), bad messages are refused whole,
the input digest follows its definition, and AllocationChunk bytes parse back exactly."""

from __future__ import annotations

import hashlib
import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.alloc import (
    ColumnLengthError,
    CycleHeader,
    CycleInputDecoder,
    DuplicatePositionError,
    MalformedMessageError,
    PositionLimitError,
    allocate,
    encode_allocation_chunks,
)
from ledger.api.v1 import insurance_pb2 as pb

Rows = list[tuple[int, int, int]]


def chunk_message(rows: Rows) -> bytes:
    chunk = pb.PositionChunk(
        position_id=[r[0] for r in rows], account_id=[r[1] for r in rows], pnl=[r[2] for r in rows]
    )
    return pb.CycleInput(positions=chunk).SerializeToString()


def unpacked_chunk_message(rows: Rows) -> bytes:
    """The same chunk with each value as its own field (what a non-packing encoder sends)."""
    body = b"".join(
        bytes([0x09])
        + struct.pack("<Q", i)
        + bytes([0x11])
        + struct.pack("<Q", a)
        + bytes([0x19])
        + struct.pack("<q", p)
        for i, a, p in rows
    )
    return bytes([0x12]) + varint(len(body)) + body


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


rows_strategy = st.lists(
    st.tuples(
        st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(-(2**63), 2**63 - 1)
    ),
    max_size=50,
)


def test_header_then_chunks() -> None:
    decoder = CycleInputDecoder(positions_max=100)
    header = pb.CycleInput(header=pb.CycleHeader(cycle_id="c-1", currency="USDT"))
    assert decoder.feed(header.SerializeToString()) == CycleHeader("c-1", "USDT")
    assert decoder.feed(chunk_message([(1, 10, 500), (2, 20, -3)])) is None
    assert decoder.feed(unpacked_chunk_message([(3, 30, 7)])) is None
    assert decoder.feed(b"") is None
    assert decoder.positions_total == len(decoder) == 3


@settings(max_examples=200, deadline=None)
@given(st.lists(rows_strategy, max_size=5), st.booleans())
def test_decoded_columns_match_protobuf(chunks: list[Rows], unpacked: bool) -> None:
    decoder = CycleInputDecoder(positions_max=10**6)
    for rows in chunks:
        message = unpacked_chunk_message(rows) if unpacked else chunk_message(rows)
        parsed = pb.CycleInput.FromString(message)  # protobuf agrees it is valid
        assert list(parsed.positions.position_id) == [r[0] for r in rows]
        decoder.feed(message)
    everything = [row for rows in chunks for row in rows]
    ids = {r[0] for r in everything}
    if len(ids) == len(everything):
        expected = hashlib.sha256(
            b"".join(struct.pack("<QQq", *row) for row in sorted(everything))
        ).hexdigest()
        assert decoder.input_digest() == expected
    else:
        with pytest.raises(DuplicatePositionError):
            decoder.input_digest()


def test_unknown_fields_are_skipped() -> None:
    message = chunk_message([(1, 2, 3)])
    unknown = bytes([0x48, 0x05]) + bytes([0x55]) + b"\x00" * 4  # field 9 varint, 10 fixed32
    decoder = CycleInputDecoder(positions_max=10)
    decoder.feed(unknown + message)
    assert len(decoder) == 1


def test_allocation_over_decoded_positions_matches_allocate() -> None:
    rows = [(1, 11, 500), (2, 12, 300), (3, 13, 150), (4, 14, 50), (5, 15, -80)]
    decoder = CycleInputDecoder(positions_max=10)
    random.Random(1).shuffle(rows)
    decoder.feed(chunk_message(rows[:2]))
    decoder.feed(chunk_message(rows[2:]))
    result = decoder.allocate(1000, 10_000, "0.2", "0.9")
    assert result.amount.tolist() == [421, 253, 126]
    direct = allocate(
        1000,
        10_000,
        "0.2",
        "0.9",
        np.array([r[0] for r in rows], np.uint64),
        np.array([r[1] for r in rows], np.uint64),
        np.array([r[2] for r in rows], np.int64),
    )
    assert result.position_id.tolist() == direct.position_id.tolist()


@pytest.mark.parametrize(
    ("message", "error", "text"),
    [
        pytest.param(
            pb.CycleInput(
                positions=pb.PositionChunk(position_id=[1, 2], account_id=[1], pnl=[1, 2])
            ).SerializeToString(),
            ColumnLengthError,
            "unequal lengths: position_id 2, account_id 1, pnl 2",
            id="unequal columns",
        ),
        pytest.param(b"\x12\x05\x0a", MalformedMessageError, "past the end", id="truncated"),
        pytest.param(b"\x80", MalformedMessageError, "varint", id="bad varint"),
        pytest.param(b"\x12\x03\x0a\x01\x00", MalformedMessageError, "multiple of 8", id="packed"),
        pytest.param(b"\x0b", MalformedMessageError, "wire type", id="group"),
    ],
)
def test_bad_messages_are_refused_whole(message: bytes, error: type[Exception], text: str) -> None:
    decoder = CycleInputDecoder(positions_max=10)
    with pytest.raises(error, match=text):
        decoder.feed(message)
    assert len(decoder) == 0


def test_position_limit() -> None:
    decoder = CycleInputDecoder(positions_max=2)
    decoder.feed(chunk_message([(1, 1, 1)]))
    with pytest.raises(PositionLimitError, match="3 positions exceed the limit of 2"):
        decoder.feed(chunk_message([(2, 1, 1), (3, 1, 1)]))
    assert len(decoder) == 1


@pytest.mark.parametrize("rows_per_chunk", [1, 2, 3, 1000])
def test_allocation_chunks_parse_back(rows_per_chunk: int) -> None:
    rows = [(1, 11, 500), (2, 12, 300), (3, 13, 150), (4, 14, 50)]
    result = allocate(
        1000,
        0,
        "0",
        "1",
        np.array([r[0] for r in rows], np.uint64),
        np.array([r[1] for r in rows], np.uint64),
        np.array([r[2] for r in rows], np.int64),
    )
    chunks = [
        pb.AllocationChunk.FromString(b) for b in encode_allocation_chunks(result, rows_per_chunk)
    ]
    assert all(len(c.position_id) <= rows_per_chunk for c in chunks)
    assert [i for c in chunks for i in c.position_id] == result.position_id.tolist()
    assert [a for c in chunks for a in c.account_id] == result.account_id.tolist()
    assert [p for c in chunks for p in c.pnl] == result.pnl.tolist()
    assert [a for c in chunks for a in c.amount] == result.amount.tolist()
    expected = pb.AllocationChunk(
        position_id=result.position_id.tolist()[:rows_per_chunk],
        account_id=result.account_id.tolist()[:rows_per_chunk],
        pnl=result.pnl.tolist()[:rows_per_chunk],
        amount=result.amount.tolist()[:rows_per_chunk],
    ).SerializeToString()
    assert encode_allocation_chunks(result, rows_per_chunk)[0] == expected
