"""The liquidation path's Rust validation against the Python one it stands in for.

`validate_encoded` may decline a request (None: the writer then decodes and validates it in
Python), but what it takes must be exactly what protobuf decoding and `liquidation.validate`
give, its hash the canonical JSON's (`request_hash`, the slow independent path), and it must
never take a request the Python path refuses. It must take every plainly valid request, or
it would be no fast path.
"""

from __future__ import annotations

import random
import string

from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import liquidation
from ledger.api.v1 import insurance_pb2 as pb
from ledger.idempotency import request_hash
from ledger.liquidation import LiquidationRequest

PRINTABLE = string.printable[:-5]  # ASCII 0x20..0x7e, without \t\n\r\x0b\x0c
ids = st.one_of(
    st.text(alphabet=PRINTABLE, min_size=1, max_size=20),
    st.sampled_from(['a"b', "c\\d", "x" * 128, "x" * 129, "", " ", "~", "\x7f"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6),
)
decimals = st.one_of(
    st.from_regex(r"[0-9]{1,40}(\.[0-9]{1,19})?", fullmatch=True),
    st.from_regex(r"0{0,3}[1-9][0-9]{0,5}(\.[0-9]{0,4}0{0,3})?", fullmatch=True),
    st.sampled_from(["0", "0.000", "00.10", "1.", "", ".5", "-1", "1e5", "1.2.3", " 1", "١"]),
    st.text(max_size=6, alphabet=st.characters(blacklist_categories=("Cs",))),
)
sides = st.sampled_from([0, 1, 2, 3, -1, 2**31 - 1])
uint64s = st.one_of(st.sampled_from([0, 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
margins = st.one_of(
    st.sampled_from([0, -1, 1, -(2**63), 2**63 - 1]), st.integers(-(2**63), 2**63 - 1)
)
requests = st.builds(
    pb.RecordLiquidationRequest,
    liquidation_id=ids,
    cycle_id=ids,
    symbol=ids,
    account_id=uint64s,
    position_id=uint64s,
    side=sides,
    quantity=decimals,
    takeover_price=decimals,
    close_price=decimals,
    remaining_margin=margins,
)


def python_path(message: bytes, batch: bool) -> list[LiquidationRequest] | None:
    """What the Python path makes of a request; None if it refuses any item."""
    try:
        if batch:
            items = list(pb.RecordLiquidationsRequest.FromString(message).liquidations)
        else:
            items = [pb.RecordLiquidationRequest.FromString(message)]
        return [
            liquidation.validate(
                r.liquidation_id,
                r.cycle_id,
                r.symbol,
                r.account_id,
                r.position_id,
                r.side,
                r.quantity,
                r.takeover_price,
                r.close_price,
                r.remaining_margin,
            )
            for r in items
        ]
    except (DecodeError, liquidation.InvalidArgument):
        return None


def plain(request: pb.RecordLiquidationRequest) -> bool:
    """What the fast path must take: ids of 1 to 128 printable ASCII characters, LONG or SHORT,
    no negative margin, decimals > 0 of ASCII digits with at most 18 places and 38 digits."""

    def plain_id(text: str) -> bool:
        return 1 <= len(text) <= 128 and all(c in PRINTABLE for c in text)

    def plain_decimal(text: str) -> bool:
        whole, point, fraction = text.partition(".")
        digits = (whole + fraction).isascii() and (whole + fraction).isdigit()
        return (
            digits
            and bool(whole)
            and (not point or 1 <= len(fraction) <= 18)
            and len(whole + fraction) <= 38
            and int(whole + fraction) > 0
        )

    return (
        all(plain_id(i) for i in (request.liquidation_id, request.cycle_id, request.symbol))
        and request.side in (1, 2)
        and request.remaining_margin >= 0
        and all(map(plain_decimal, (request.quantity, request.takeover_price, request.close_price)))
    )


def canonical_hash(r: LiquidationRequest) -> str:
    return request_hash(
        liquidation_id=r.liquidation_id,
        cycle_id=r.cycle_id,
        symbol=r.symbol,
        account_id=r.account_id,
        position_id=r.position_id,
        side=int(r.side),
        quantity=r.quantity_text,
        takeover_price=r.takeover_price_text,
        close_price=r.close_price_text,
        remaining_margin=r.remaining_margin,
    )


def check(message: bytes, batch: bool) -> list[LiquidationRequest] | None:
    """The fast path's answer, checked against the Python path's."""
    fast = liquidation.validate_encoded(message, batch=batch)
    if fast is not None:
        assert fast == python_path(message, batch)
        for r in fast:
            assert type(r.side) is liquidation.Side
            assert r.digest == canonical_hash(r)
    return fast


@settings(max_examples=600, deadline=None)
@given(requests)
def test_a_request_is_taken_as_python_takes_it_or_declined(request: pb.RecordLiquidationRequest):
    message = request.SerializeToString()
    fast = check(message, batch=False)
    if plain(request):
        assert fast is not None and len(fast) == 1
    if python_path(message, batch=False) is None:
        assert fast is None


@settings(max_examples=200, deadline=None)
@given(st.lists(requests, max_size=6))
def test_a_batch_is_taken_whole_or_declined(items: list[pb.RecordLiquidationRequest]):
    message = pb.RecordLiquidationsRequest(liquidations=items).SerializeToString()
    fast = check(message, batch=True)
    assert (fast is not None) == all(plain(r) for r in items)


def valid_request(n: int) -> pb.RecordLiquidationRequest:
    return pb.RecordLiquidationRequest(
        liquidation_id=f'liq-"{n}"\\',
        cycle_id="c1",
        symbol="BTCUSDT",
        account_id=n,
        position_id=2**64 - 1 - n,
        side=1 + n % 2,
        quantity="000.500",
        takeover_price="64123.5",
        close_price=f"{64000 + n}.25",
        remaining_margin=1000 * n,
    )


def test_damaged_bytes_are_declined_or_read_as_protobuf_reads_them():
    """Every byte flipped, dropped or doubled in turn, and random damage: whatever the fast path
    takes, protobuf decodes and Python validates to the same."""
    rng = random.Random(7)
    for batch in (False, True):
        if batch:
            items = [valid_request(n) for n in range(3)]
            message = pb.RecordLiquidationsRequest(liquidations=items).SerializeToString()
        else:
            message = valid_request(5).SerializeToString()
        assert check(message, batch) is not None
        damaged = []
        for k in range(len(message)):
            damaged.append(message[:k] + bytes([message[k] ^ 0xFF]) + message[k + 1 :])
            damaged.append(message[:k] + message[k + 1 :])
            damaged.append(message[:k] + message[k : k + 1] * 2 + message[k + 1 :])
        for _ in range(2000):
            copy = bytearray(message)
            for _ in range(rng.randint(1, 4)):
                copy[rng.randrange(len(copy))] = rng.randrange(256)
            damaged.append(bytes(copy))
        for bad in damaged:
            check(bad, batch)


def test_other_valid_encodings_are_read_as_protobuf_reads_them():
    """Fields out of order, overlong varints and explicit zeros are valid protobuf."""
    request = valid_request(3)
    fields = request.SerializeToString()
    # Each field's bytes, found by parsing the message field by field.
    parts = []
    for name in (f.name for f in pb.RecordLiquidationRequest.DESCRIPTOR.fields):
        part = pb.RecordLiquidationRequest()
        setattr(part, name, getattr(request, name))
        parts.append(part.SerializeToString())
    assert b"".join(parts) == fields
    reversed_order = b"".join(reversed(parts))
    assert check(reversed_order, batch=False) is not None
    overlong_side = parts[5][:1] + bytes([0x80 | request.side, 0x80, 0x00])
    message = b"".join([*parts[:5], overlong_side, *parts[6:]])
    assert pb.RecordLiquidationRequest.FromString(message).side == request.side
    assert check(message, batch=False) is not None
    zero_account = bytes([4 << 3, 0])  # account_id = 0, written out
    message = b"".join([*parts[:3], zero_account, *parts[4:]])
    assert check(message, batch=False) is not None


def test_unknown_and_repeated_fields_are_left_to_python():
    message = valid_request(1).SerializeToString()
    unknown = message + bytes([11 << 3, 1])
    repeated = message + bytes([4 << 3, 9])  # protobuf: the last account_id wins
    for variant in (unknown, repeated):
        assert python_path(variant, batch=False) is not None
        assert liquidation.validate_encoded(variant, batch=False) is None


EDGES = {
    "liquidation_id": ["", "x" * 128, "x" * 129, "a\tb", "é", "\x7f", '"', "\\"],
    "cycle_id": ["", " ", "\x00", "ü", "y" * 129],
    "symbol": ["", "BTC\nUSDT", "z" * 128],
    "account_id": [0, 2**64 - 1],
    "position_id": [0, 2**64 - 1],
    "side": [0, 1, 2, 3, -1, -2],
    "quantity": ["0", "0.0", "1.", ".1", "1.0000000000000000000", "1." + "1" * 18, "9" * 38],
    "takeover_price": ["9" * 39, "9" * 40, "9" * 41, "1e3", "+1", "0x10", "1_000", "٣"],
    "close_price": ["00001.10000", "0.000000000000000001", "0.0000000000000000001", " 1"],
    "remaining_margin": [0, -1, -5, 2**63 - 1, -(2**63)],
}


def test_each_field_at_its_edges_is_taken_exactly_when_plain():
    """One field at a time at each edge value, the others plainly valid."""
    for field, values in EDGES.items():
        for value in values:
            request = valid_request(2)
            setattr(request, field, value)
            message = request.SerializeToString()
            fast = check(message, batch=False)
            assert (fast is not None) == plain(request), (field, value)
            if python_path(message, batch=False) is None:
                assert fast is None, (field, value)
