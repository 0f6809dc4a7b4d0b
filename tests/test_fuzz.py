"""Fuzzing every RPC of the contract through a real server, and the native decoder briefly
(issue items 8 and 9).

Why: every other test sends requests a well-behaved client would send. A server facing an
exchange's network also gets requests no client meant: fields out of range, unknown enum
numbers, strings with control characters or digits of other scripts, messages cut short or
with a bit flipped. Each must end in a status that says what was wrong (INVALID_ARGUMENT,
NOT_FOUND, …) within a deadline, never in UNKNOWN or INTERNAL (an unhandled exception: a
crash path), never in a hang, and never with a half-written ledger.

For each backend one server is started and seeded with a small ledger (two currencies,
contracts, a policy, deposits, liquidations, a closed cycle and open ones), so that random
lookups hit real rows as well as missing ones. Then, for each of the contract's RPCs (taken
from the descriptors, so an RPC added later is fuzzed too):

- typed: messages built by hypothesis from the message descriptor: every field may be left
  out, strings are random unicode (control characters too), ids and currencies of the
  seeded rows, or decimal-looking texts; integers span their type (huge and negative),
  enums take unknown numbers too; streams are several such messages;
- raw: random bytes, and serialized typed messages truncated, bit-flipped, spliced, sent
  with a raw channel method (no serializer), several messages for the client-streaming RPCs.

Every call has a 10 s timeout: DEADLINE_EXCEEDED means the server hung. Each answer is
checked: its status is neither UNKNOWN nor INTERNAL nor DEADLINE_EXCEEDED, and it reached
the client (not grpc's own RESOURCE_EXHAUSTED for trailers over the client's limit); an OK
reply parses as the RPC's response type (for
RecordLiquidations: one outcome per item, none UNKNOWN or INTERNAL). For a mutating RPC the
tables (tests/ledger_db.snapshot) are unchanged by every call that did not return OK, and by
a RecordLiquidations whose items all failed; a read-only RPC's whole run changes nothing.
Violations are collected over the whole run (the shortest input kept per kind of problem)
and fail the test at its end, so one bug does not hide another and every case is counted.
The last test of each backend checks that the server still answers health checks with
SERVING, that VerifyLedger (every currency) is ok after all of it, and that the run did
thousands of cases (printed; `pytest -s` shows the figures).

LEDGER_FUZZ_EXAMPLES sets the examples per test (default 90; the minimum count scales
with it). The last test runs scripts/fuzz_decoder.py (atheris on the Rust CycleInput
decoder) for ~10 s: the brief run of that target in CI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ledger.api.v1 import insurance_pb2 as pb
from ledger.server.app import LedgerServer, Settings
from tests.conftest import BACKENDS, Client, fresh_database
from tests.ledger_db import snapshot

ROOT = Path(__file__).resolve().parent.parent
CALL_TIMEOUT_SECONDS = 10.0
EXAMPLES_DEFAULT = 90
EXAMPLES = int(os.environ.get("LEDGER_FUZZ_EXAMPLES") or EXAMPLES_DEFAULT)
# The issue asks for thousands of cases per backend; a smaller LEDGER_FUZZ_EXAMPLES (a quick
# local run) lowers the bar in proportion.
CASES_MIN = 2000 * EXAMPLES // EXAMPLES_DEFAULT

# A status no input may produce: an unhandled exception (UNKNOWN, INTERNAL), or the
# client's own timeout (the server hung). UNIMPLEMENTED is allowed: the contract has RPCs
# that are not served yet.
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}
# grpc's own RESOURCE_EXHAUSTED when the trailers (the status message and its details) are
# larger than the client accepts (8 KiB by default): the server's status never arrived.
TRANSPORT_LIMIT = "received metadata size exceeds"
FORBIDDEN_NUMBERS = {code.value[0] for code in FORBIDDEN}

METHODS: list[MethodDescriptor] = [
    method for service in pb.DESCRIPTOR.services_by_name.values() for method in service.methods
]
# From the contract, not from the server: these may write nothing at all (the Query service
# is "read-only readers"; a preview computes a close and writes nothing).
READ_ONLY = {m.full_name for m in METHODS if m.containing_service.name == "Query"} | {
    "insurance.v1.Admin.ListCurrencies",
    "insurance.v1.Clearing.PreviewCycle",
}
SERVING = health_pb2.HealthCheckResponse.SERVING


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def message_class(descriptor: Descriptor) -> type[Message]:
    cls: type[Message] = getattr(pb, descriptor.name)
    return cls


# --- the seeded ledger -----------------------------------------------------------------------

FUZ, FZJ = "FUZ", "FZJ"  # scale 2 and scale 0
CLOSED_CYCLE = "c-closed"
OPEN_CYCLES = ("open-1", "open-2", "open-3", "open-4")


@dataclass(frozen=True)
class Known:
    """Values of rows that exist (and a few near misses), for the strategies to draw from."""

    currencies: tuple[str, ...] = (FUZ, FZJ, "NOPE", "fuz", "FUZ ", "")
    symbols: tuple[str, ...] = ("FUZ-PERP", "FUZ-INV", "FZJ-PERP", "NOPE-PERP")
    cycles: tuple[str, ...] = (CLOSED_CYCLE, *OPEN_CYCLES, "never")
    liquidations: tuple[str, ...] = ("liq-c1", "liq-c2", "liq-o1", "liq-o2", "liq-b1")
    transfers: tuple[str, ...] = ("dep-1", "dep-2", "wd-1")
    accounts: tuple[str, ...] = (
        "insurance_fund",
        "liquidation_engine",
        "system_loss",
        "uncovered_loss",
        "external",
        "user:1",
        "user:7",
        "user:0",
        "user:18446744073709551615",
        "user:18446744073709551616",
        "user:-1",
        "user:",
        "user:01",
        "USER:1",
    )
    page_tokens: tuple[str, ...] = ()


def liquidation(
    lid: str, cycle_id: str, symbol: str, quantity: str, close_price: str
) -> pb.RecordLiquidationRequest:
    """A LONG of `quantity` taken over at 100: closed below that it is a loss, above a
    profit."""
    return pb.RecordLiquidationRequest(
        liquidation_id=lid,
        cycle_id=cycle_id,
        symbol=symbol,
        account_id=7,
        position_id=70,
        side=pb.SIDE_LONG,
        quantity=quantity,
        takeover_price="100",
        close_price=close_price,
        remaining_margin=0,
    )


def seed(client: Client) -> Known:
    """The small ledger the fuzzing starts from; every call of it must succeed."""
    admin, clearing, query = client.admin, client.clearing, client.query
    admin.CreateCurrency(pb.CreateCurrencyRequest(code=FUZ, scale=2), timeout=30)
    admin.CreateCurrency(pb.CreateCurrencyRequest(code=FZJ, scale=0), timeout=30)
    for symbol, currency, kind, multiplier in (
        ("FUZ-PERP", FUZ, pb.CONTRACT_KIND_LINEAR, "1"),
        ("FUZ-INV", FUZ, pb.CONTRACT_KIND_INVERSE, "100"),
        ("FZJ-PERP", FZJ, pb.CONTRACT_KIND_LINEAR, "0.5"),
    ):
        admin.UpsertContract(
            pb.UpsertContractRequest(
                symbol=symbol, margin_currency=currency, kind=kind, multiplier=multiplier
            ),
            timeout=30,
        )
    admin.SetPolicy(
        pb.SetPolicyRequest(currency=FUZ, insurance_share="0.3", coverage_ratio="0.8"), timeout=30
    )
    for tid, currency, direction, amount in (
        ("dep-1", FUZ, pb.TRANSFER_DIRECTION_DEPOSIT, 50_000_000),
        ("dep-2", FZJ, pb.TRANSFER_DIRECTION_DEPOSIT, 1_000_000),
        ("wd-1", FUZ, pb.TRANSFER_DIRECTION_WITHDRAW, 1_000),
    ):
        admin.TransferFund(
            pb.TransferFundRequest(
                transfer_id=tid, currency=currency, direction=direction, amount=amount
            ),
            timeout=30,
        )
    clearing.RecordLiquidation(
        liquidation("liq-c1", CLOSED_CYCLE, "FUZ-PERP", "30", "90"), timeout=30
    )
    clearing.RecordLiquidation(
        liquidation("liq-c2", CLOSED_CYCLE, "FUZ-PERP", "2", "101"), timeout=30
    )
    for n, cycle_id in enumerate(OPEN_CYCLES, 1):
        clearing.RecordLiquidation(
            liquidation(f"liq-o{n}", cycle_id, "FUZ-PERP", str(5 * n), "99"), timeout=30
        )
    batch = clearing.RecordLiquidations(
        pb.RecordLiquidationsRequest(
            liquidations=[
                liquidation("liq-b1", OPEN_CYCLES[0], "FZJ-PERP", "4", "95"),
                liquidation("liq-b2", OPEN_CYCLES[0], "FUZ-INV", "3", "120"),
            ]
        ),
        timeout=30,
    )
    assert [o.code for o in batch.outcomes] == [0, 0], batch
    summary = clearing.CloseCycle(
        iter(
            [
                pb.CycleInput(header=pb.CycleHeader(cycle_id=CLOSED_CYCLE, currency=FUZ)),
                pb.CycleInput(
                    positions=pb.PositionChunk(
                        position_id=list(range(1, 41)),
                        account_id=[1 + i % 9 for i in range(40)],
                        pnl=[(i * 7919) % 5000 - 1500 for i in range(40)],
                    )
                ),
            ]
        ),
        timeout=60,
    )
    assert summary.state == pb.CYCLE_STATE_CLOSED and summary.allocated_total > 0, summary
    page = query.ListEntries(
        pb.ListEntriesRequest(currency=FUZ, account="insurance_fund", page_size=1), timeout=30
    )
    assert page.next_page_token, page
    return Known(page_tokens=(page.next_page_token,))


@dataclass
class Fuzzed:
    backend: str
    database_url: str
    client: Client
    known: Known
    cases: Counter[str] = field(default_factory=Counter)  # per RPC and kind
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (RPC and kind, status)


@pytest.fixture(scope="module", params=BACKENDS)
def fuzzed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fuzzed]:
    """One server per backend for the whole module: the fuzzing accumulates on one ledger,
    as a long-running server's does."""
    directory = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    with fresh_database(request.param, directory) as url:
        server = LedgerServer(Settings(listen="127.0.0.1:0", database_url=url))
        server.start()
        try:
            client = Client.connect(f"127.0.0.1:{server.port}")
            try:
                yield Fuzzed(request.param, url, client, seed(client))
            finally:
                client.channel.close()
        finally:
            server.stop(grace_seconds=5)


# --- strategies from the descriptors ---------------------------------------------------------

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),  # proto3 enums are open
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
DECIMAL_FIELDS = {
    "multiplier",
    "insurance_share",
    "coverage_ratio",
    "quantity",
    "takeover_price",
    "close_price",
}
# Texts a decimal parser gets wrong: exponents, signs, blanks, other scripts' digits,
# separators, too many places or digits, specials.
DECIMAL_EDGES = (
    "0",
    "1",
    "0.2",
    "0.5",
    "1.0",
    "-1",
    "-0",
    "+1",
    "0.000000000000000001",
    "0.0000000000000000001",
    "1." + "0" * 18,
    "1." + "0" * 19,
    "9" * 40,
    "9" * 41,
    "9" * 22 + "." + "9" * 18,
    "1e3",
    "1E-2",
    "NaN",
    "Infinity",
    "-Infinity",
    "inf",
    " 1",
    "1 ",
    "1.",
    ".5",
    ".",
    "",
    "1_000",
    "1,5",
    "0x10",
    "--1",
    "1.2.3",
    "١٢٣",
    "٠.٥",
    "１",
    "²",
    "1\x00",
)


def boundaries(low: int, high: int) -> list[int]:
    values = {low, low + 1, high - 1, high, 0, 1, 2**31 - 1, 2**31, 2**53, 2**63 - 1, 2**63}
    values |= {-v for v in values}
    return sorted(v for v in values if low <= v <= high)


def ints(low: int, high: int) -> st.SearchStrategy[int]:
    """The whole range, its edges, and small values (which hit real rows and amounts)."""
    return st.one_of(
        st.integers(max(low, -1000), min(high, 1000)),
        st.sampled_from(boundaries(low, high)),
        st.integers(low, high),
    )


UNICODE = st.characters(codec="utf-8")  # any character a protobuf string can hold


def texts() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(UNICODE, max_size=24),
        st.text(st.characters(codec="utf-8", max_codepoint=0x9F), max_size=12),  # and controls
        st.text(st.characters(codec="utf-8", min_codepoint=0x80), max_size=12),  # beyond ASCII
        st.sampled_from([0, 1, 16, 17, 128, 129, 1024, 1025, 5000]).map(lambda n: "A" * n),
    )


def decimals() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(DECIMAL_EDGES),
        st.decimals(allow_nan=True, allow_infinity=True).map(str),
        st.integers(-(10**30), 10**30).map(str),
        st.builds(lambda i, f: f"{i}.{f}", st.integers(0, 10**6), st.integers(0, 10**20)),
        texts(),
    )


def string_field(name: str, known: Known) -> st.SearchStrategy[str]:
    """A string for this field: the seeded rows' values, near misses, and random text."""
    hints: dict[str, Sequence[str]] = {
        "code": known.currencies,
        "currency": known.currencies,
        "margin_currency": known.currencies,
        "symbol": known.symbols,
        "cycle_id": known.cycles,
        "liquidation_id": known.liquidations,
        "transfer_id": known.transfers,
        "account": known.accounts,
        "page_token": known.page_tokens,
    }
    choices: list[st.SearchStrategy[str]] = [texts()]
    if name in DECIMAL_FIELDS:
        choices.insert(0, decimals())
    if hints.get(name):
        choices.insert(0, st.sampled_from(list(hints[name])))
    if name in {"code", "currency", "margin_currency"}:
        choices.append(st.from_regex(r"[A-Z0-9]{1,17}", fullmatch=True))
    if name == "page_token":  # the real token with a character changed or cut
        choices.append(
            st.builds(
                lambda token, i, c: token[:i] + c + token[i + 1 :],
                st.sampled_from(list(known.page_tokens)),
                st.integers(0, 40),
                st.text(UNICODE, max_size=1),
            )
        )
    return st.one_of(choices)


def scalar_field(fd: FieldDescriptor, known: Known) -> st.SearchStrategy[Any]:
    if fd.type == FieldDescriptor.TYPE_STRING:
        return string_field(fd.name, known)
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=32)
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if fd.type == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(numbers), ints(*INT_RANGES[fd.type]))
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return message_strategy(fd.message_type, known)
    return ints(*INT_RANGES[fd.type])


def field_value(fd: FieldDescriptor, known: Known) -> st.SearchStrategy[Any]:
    value = scalar_field(fd, known)
    if fd.is_repeated:
        return st.lists(value, max_size=4 if fd.type == FieldDescriptor.TYPE_MESSAGE else 24)
    return value


def assign(message: Message, name: str, value: Any) -> None:
    fd = message.DESCRIPTOR.fields_by_name[name]
    if fd.is_repeated:
        target = getattr(message, name)
        del target[:]
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif fd.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(message, name).CopyFrom(value)
    else:
        setattr(message, name, value)  # sets presence too (proto3 optional)


def build(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        assign(message, name, value)
    return message


def message_strategy(descriptor: Descriptor, known: Known) -> st.SearchStrategy[Message]:
    """Any message of this type: each field left out or set to a value of its type; of a
    oneof, one member or none."""
    plain = {
        fd.name: field_value(fd, known)
        for fd in descriptor.fields
        if fd.containing_oneof is None or fd.containing_oneof.name.startswith("_")
    }
    oneofs = [
        [(fd.name, field_value(fd, known)) for fd in oneof.fields]
        for oneof in descriptor.oneofs
        if not oneof.name.startswith("_")  # a synthetic oneof of a proto3 optional field
    ]
    cls = message_class(descriptor)

    @st.composite
    def draw_message(draw: st.DrawFn) -> Message:
        values = {name: draw(s) for name, s in plain.items() if draw(st.booleans())}
        for members in oneofs:
            chosen = draw(st.sampled_from([None, *members]))
            if chosen is not None:
                values[chosen[0]] = draw(chosen[1])
        return build(cls, values)

    return draw_message()


def coherent_chunk() -> st.SearchStrategy[pb.CycleInput]:
    """A position chunk whose columns have one length, so it gets past the decoder to the
    allocation: duplicate ids, extreme pnls, many accounts."""

    @st.composite
    def draw_chunk(draw: st.DrawFn) -> pb.CycleInput:
        n = draw(st.integers(0, 30))
        ids = draw(
            st.lists(st.one_of(st.integers(1, 60), ints(0, 2**64 - 1)), min_size=n, max_size=n)
        )
        accounts = draw(st.lists(ints(0, 2**64 - 1), min_size=n, max_size=n))
        pnls = draw(st.lists(ints(-(2**63), 2**63 - 1), min_size=n, max_size=n))
        return pb.CycleInput(
            positions=pb.PositionChunk(position_id=ids, account_id=accounts, pnl=pnls)
        )

    return draw_chunk()


def cycle_stream(known: Known) -> st.SearchStrategy[list[bytes]]:
    """Several CycleInput messages: any order and kind, or a header of a seeded cycle
    followed by chunks, which reaches the allocation and the close."""
    any_input = message_strategy(pb.CycleInput.DESCRIPTOR, known)
    header = st.builds(
        lambda cycle_id, currency: pb.CycleInput(
            header=pb.CycleHeader(cycle_id=cycle_id, currency=currency)
        ),
        st.one_of(st.sampled_from(known.cycles), texts()),
        st.sampled_from(known.currencies),
    )
    anything = st.lists(st.one_of(any_input, coherent_chunk()), max_size=6)
    headed = st.builds(
        lambda h, rest: [h, *rest],
        header,
        st.lists(st.one_of(coherent_chunk(), any_input), max_size=4),
    )
    return st.one_of(anything, headed).map(lambda ms: [m.SerializeToString() for m in ms])


# A valid request of each type, on the seeded rows: near_valid changes a few of its fields,
# so that each field's own checks are reached and some calls go through and write.
TEMPLATES: dict[str, Callable[[str], Message]] = {  # each made with a tag for its ids
    "CreateCurrencyRequest": lambda tag: pb.CreateCurrencyRequest(code=f"N{tag}", scale=2),
    "UpsertContractRequest": lambda tag: pb.UpsertContractRequest(
        symbol=f"N{tag}-PERP", margin_currency=FUZ, kind=pb.CONTRACT_KIND_LINEAR, multiplier="1"
    ),
    "SetPolicyRequest": lambda tag: pb.SetPolicyRequest(
        currency=FUZ, insurance_share="0.3", coverage_ratio="0.8"
    ),
    "TransferFundRequest": lambda tag: pb.TransferFundRequest(
        transfer_id=f"t-{tag}", currency=FUZ, direction=pb.TRANSFER_DIRECTION_DEPOSIT, amount=100
    ),
    "RecordLiquidationRequest": lambda tag: liquidation(
        f"l-{tag}", OPEN_CYCLES[1], "FUZ-PERP", "3", "99"
    ),
    "RecordLiquidationsRequest": lambda tag: pb.RecordLiquidationsRequest(
        liquidations=[liquidation(f"l-{tag}", OPEN_CYCLES[1], "FUZ-PERP", "3", "99")]
    ),
    "GetFundRequest": lambda tag: pb.GetFundRequest(currency=FUZ),
    "GetCycleRequest": lambda tag: pb.GetCycleRequest(cycle_id=CLOSED_CYCLE, currency=FUZ),
    "StreamAllocationsRequest": lambda tag: pb.StreamAllocationsRequest(
        cycle_id=CLOSED_CYCLE, currency=FUZ
    ),
    "ListEntriesRequest": lambda tag: pb.ListEntriesRequest(
        currency=FUZ, account="insurance_fund", page_size=2
    ),
    "VerifyLedgerRequest": lambda tag: pb.VerifyLedgerRequest(currency=FUZ),
    "ReverseLiquidationRequest": lambda tag: pb.ReverseLiquidationRequest(
        liquidation_id="liq-o4", reason=f"fuzz {tag}"
    ),
    "ReverseCycleRequest": lambda tag: pb.ReverseCycleRequest(
        cycle_id=CLOSED_CYCLE, currency=FUZ, reason=f"fuzz {tag}"
    ),
    "ListCyclesRequest": lambda tag: pb.ListCyclesRequest(currency=FUZ, page_size=2),
    "GetPolicyRequest": lambda tag: pb.GetPolicyRequest(currency=FUZ),
    "ListPoliciesRequest": lambda tag: pb.ListPoliciesRequest(currency=FUZ),
    "ListContractsRequest": lambda tag: pb.ListContractsRequest(currency=FUZ),
    "GetLiquidationRequest": lambda tag: pb.GetLiquidationRequest(liquidation_id="liq-c1"),
    "ListOpenCyclesRequest": lambda tag: pb.ListOpenCyclesRequest(currency=FUZ),
    "ExplainAllocationRequest": lambda tag: pb.ExplainAllocationRequest(
        cycle_id=CLOSED_CYCLE, currency=FUZ, position_id=5
    ),
}


def near_valid(descriptor: Descriptor, known: Known) -> st.SearchStrategy[Message]:
    """The type's template with up to two fields changed to a random value of their type or
    left out; the items of a repeated message field are near-valid themselves."""
    template = TEMPLATES.get(descriptor.name)
    if template is None:
        return message_strategy(descriptor, known)
    values: dict[str, st.SearchStrategy[Any]] = {}
    for fd in descriptor.fields:
        if fd.type == FieldDescriptor.TYPE_MESSAGE and fd.is_repeated:
            values[fd.name] = st.lists(near_valid(fd.message_type, known), max_size=6)
        else:
            values[fd.name] = field_value(fd, known)

    @st.composite
    def draw_near(draw: st.DrawFn) -> Message:
        message = template(str(draw(st.integers(0, 10**6))))  # a repeated tag: a replay
        for name in draw(st.lists(st.sampled_from(sorted(values)), max_size=2, unique=True)):
            if draw(st.integers(0, 3)) == 0:
                message.ClearField(name)
            else:
                assign(message, name, draw(values[name]))
        return message

    return draw_near()


def typed_requests(method: MethodDescriptor, known: Known) -> st.SearchStrategy[Any]:
    """The serialized request (a list of them for a client-streaming RPC)."""
    if method.client_streaming:
        return cycle_stream(known)
    return st.one_of(
        message_strategy(method.input_type, known), near_valid(method.input_type, known)
    ).map(lambda m: m.SerializeToString())


EDGE_BYTES = (
    b"",
    b"\x00",
    b"\xff" * 11,  # an overlong varint
    b"\x0a",  # a tag without its length
    b"\x0a\x7f",  # a length past the end
    b"\x0a\xff\xff\xff\xff\x0f",  # a 4 GiB length
    b"\x0a\x02\xff\xfe",  # a string that is not UTF-8
    b"\x08" + b"\x80" * 10 + b"\x01",  # a varint of 11 bytes
    b"\x78\x01",  # field 15 (unknown), varint
    b"\x0b\x0c",  # a group start and end
    b"\x0f",  # wire type 7 (invalid)
    b"\x00\x01",  # field number 0
    b"\x12\x03\x0a\x01\xff",  # a nested message whose inner string is cut
)


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid serialized message, damaged: truncated, bits flipped, bytes changed, inserted,
    deleted or repeated, one to four times."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "set", "insert", "delete", "repeat"]))
        at = draw(st.integers(0, len(data)))
        if op == "truncate":
            del data[at:]
        elif op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "repeat":
            data[at:at] = data[at:]
    return bytes(data)


def raw_message(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(EDGE_BYTES), st.binary(max_size=200), mutated(valid), valid)


def raw_requests(method: MethodDescriptor, known: Known) -> st.SearchStrategy[Any]:
    if not method.client_streaming:
        return raw_message(typed_requests(method, known))
    one = raw_message(
        st.one_of(message_strategy(pb.CycleInput.DESCRIPTOR, known), coherent_chunk()).map(
            lambda m: m.SerializeToString()
        )
    )
    # Damaged streams: random messages, or a valid headed stream with some messages damaged.
    headed = cycle_stream(known).flatmap(
        lambda ms: st.tuples(*[st.one_of(st.just(m), mutated(st.just(m))) for m in ms]).map(list)
    )
    return st.one_of(st.lists(one, max_size=6), headed)


# --- calls and checks ------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    details: str
    replies: list[bytes]  # the reply (or the streamed ones) of an OK call
    seconds: float


def call(channel: grpc.Channel, method: MethodDescriptor, request: Any) -> Answer:
    """One call with raw bytes in and out, and the status it ended with."""
    path = path_of(method)
    raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
    started = time.monotonic()
    replies: list[bytes] = []
    try:
        if method.client_streaming:
            replies.append(
                channel.stream_unary(path, **raw)(iter(request), timeout=CALL_TIMEOUT_SECONDS)
            )
        elif method.server_streaming:
            replies.extend(channel.unary_stream(path, **raw)(request, timeout=CALL_TIMEOUT_SECONDS))
        else:
            replies.append(channel.unary_unary(path, **raw)(request, timeout=CALL_TIMEOUT_SECONDS))
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        return Answer(code, details, [], time.monotonic() - started)
    return Answer(grpc.StatusCode.OK, "", replies, time.monotonic() - started)


def show(request: Any, limit: int = 300) -> str:
    """A request in a form that can be pasted back into a call."""
    text = repr(request)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} chars)"


def size_of(request: Any) -> int:
    return sum(len(m) for m in request) if isinstance(request, list) else len(request)


@dataclass
class Problems:
    """Violations of a run, one per kind (the method and the start of what went wrong), each
    with the shortest input that showed it."""

    method: str
    found: dict[str, tuple[int, str]] = field(default_factory=dict)
    hung: bool = False

    def add(self, kind: str, request: Any, what: str) -> None:
        size = size_of(request)
        kept = self.found.get(kind)
        if kept is None or size < kept[0]:
            self.found[kind] = (size, f"{what}\n    input: {show(request)}")

    def report(self) -> str:
        lines = [f"{self.method}: {len(self.found)} kind(s) of problem"]
        lines += [f"  - {text}" for _, text in sorted(self.found.values())]
        return "\n".join(lines)


def kind_of(details: str) -> str:
    """The part of a status message that names the problem, without the values in it."""
    return re.sub(r"'[^']*'|\"[^\"]*\"|\d+", "…", details)[:70]


def check_answer(
    method: MethodDescriptor, request: Any, answer: Answer, problems: Problems
) -> None:
    """The status is an allowed one and reached the client; an OK reply is a valid message of
    the response type."""
    if answer.code == grpc.StatusCode.RESOURCE_EXHAUSTED and TRANSPORT_LIMIT in answer.details:
        problems.add(
            "status lost: metadata over the client's limit",
            request,
            "expected the server's status, got the client's RESOURCE_EXHAUSTED: the status "
            f"the server sent is larger than a client takes by default: {answer.details[:160]!r}",
        )
        return
    if answer.code in FORBIDDEN:
        if answer.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            problems.hung = True
        problems.add(
            f"{answer.code.name} {kind_of(answer.details)}",
            request,
            f"expected a status naming the problem, got {answer.code.name} "
            f"after {answer.seconds:.1f} s: {answer.details!r}",
        )
        return
    if answer.code != grpc.StatusCode.OK:
        return
    response_class = message_class(method.output_type)
    for reply in answer.replies:
        try:
            response = response_class.FromString(reply)
        except DecodeError as error:
            problems.add(
                "bad reply", request, f"OK reply is not a {response_class.__name__}: {error}"
            )
            return
        if isinstance(response, pb.RecordLiquidationsResponse):
            check_outcomes(request, response, problems)
        if isinstance(response, pb.AllocationChunk):
            columns = (response.position_id, response.account_id, response.pnl, response.amount)
            if len({len(c) for c in columns}) != 1:
                problems.add("unequal columns", request, f"AllocationChunk columns: {response}")


def check_outcomes(
    request: bytes, response: pb.RecordLiquidationsResponse, problems: Problems
) -> None:
    items = len(pb.RecordLiquidationsRequest.FromString(request).liquidations)
    if len(response.outcomes) != items:
        problems.add("outcome count", request, f"{items} items, {len(response.outcomes)} outcomes")
    for outcome in response.outcomes:
        if outcome.code in FORBIDDEN_NUMBERS:
            problems.add(
                f"item code {outcome.code} {kind_of(outcome.message)}",
                request,
                f"an item's outcome is code {outcome.code}: {outcome.message!r}",
            )


def wrote_nothing(method: MethodDescriptor, answer: Answer) -> bool:
    """Whether the call must have left the tables as they were: it failed, or it is a batch
    of which no item went through."""
    if answer.code != grpc.StatusCode.OK:
        return True
    if method.name == "RecordLiquidations":
        response = pb.RecordLiquidationsResponse.FromString(answer.replies[0])
        return all(o.code != 0 for o in response.outcomes)
    return False


def fuzz(fz: Fuzzed, method: MethodDescriptor, requests: st.SearchStrategy[Any], kind: str) -> None:
    """Sends EXAMPLES requests drawn from `requests` and checks every answer; fails at the end
    with every kind of problem seen."""
    name = method.full_name
    problems = Problems(f"{name} ({kind}, {fz.backend})")
    read_only = name in READ_ONLY
    before_all = snapshot(fz.database_url)
    state = {"before": before_all}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # problems are collected, not raised
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests)
    def run(request: Any) -> None:
        if problems.hung:
            return  # the server hung once: more calls would wait out their deadlines too
        answer = call(fz.client.channel, method, request)
        fz.cases[f"{name} {kind}"] += 1
        fz.codes[(f"{name} {kind}", answer.code.name)] += 1
        check_answer(method, request, answer, problems)
        if read_only or answer.code in FORBIDDEN:
            return
        after = snapshot(fz.database_url)
        if wrote_nothing(method, answer) and after != state["before"]:
            problems.add(
                f"wrote on {answer.code.name}",
                request,
                f"the call ended {answer.code.name} ({answer.details!r}) but the tables "
                f"changed: {diff(state['before'], after)}",
            )
        state["before"] = after

    run()
    if read_only:
        after_all = snapshot(fz.database_url)
        if after_all != before_all:
            problems.add("read-only wrote", b"", f"tables changed: {diff(before_all, after_all)}")
    label = f"{name} {kind}"
    codes = ", ".join(f"{c} {n}" for (m, c), n in sorted(fz.codes.items()) if m == label)
    print(f"\nfuzz {fz.backend}: {label}: {fz.cases[label]} cases ({codes})")
    assert not problems.found, problems.report()


def diff(before: dict[str, object], after: dict[str, object]) -> str:
    parts = []
    for key in before:
        if before[key] != after[key]:
            if isinstance(before[key], dict):
                old, new = before[key], after[key]
                assert isinstance(old, dict) and isinstance(new, dict)
                parts.append(", ".join(f"{t} {old[t]}→{new[t]}" for t in old if old[t] != new[t]))
            else:
                parts.append(f"{key} differ")
    return "; ".join(parts)


# --- the tests -------------------------------------------------------------------------------


def test_every_rpc_has_a_valid_request_to_start_from() -> None:
    """The fuzz tests take the RPCs from the contract (all three services, 14 RPCs or more);
    each unary RPC with request fields needs a template here, or its random requests would
    rarely get past the first check (an RPC added to the contract fails here until then)."""
    services = {m.containing_service.name for m in METHODS}
    assert services == {"Admin", "Clearing", "Query"} and len(METHODS) >= 14, services
    missing = [
        m.full_name
        for m in METHODS
        if not m.client_streaming and m.input_type.fields and m.input_type.name not in TEMPLATES
    ]
    assert not missing, f"no template in TEMPLATES for the request of {missing}"
    assert {"insurance.v1.Admin.ListCurrencies", "insurance.v1.Clearing.PreviewCycle"} <= {
        m.full_name for m in METHODS
    }


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_typed_random_messages(fuzzed: Fuzzed, method: MethodDescriptor) -> None:
    """Messages of the request type with random field values: a named status each time."""
    fuzz(fuzzed, method, typed_requests(method, fuzzed.known), "typed")


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_raw_random_bytes(fuzzed: Fuzzed, method: MethodDescriptor) -> None:
    """Random bytes and damaged valid messages, without a serializer: a named status each
    time, INVALID_ARGUMENT for what does not parse."""
    fuzz(fuzzed, method, raw_requests(method, fuzzed.known), "raw")


def test_after_fuzzing_serves_and_verifies(fuzzed: Fuzzed) -> None:
    """Runs after the fuzz tests of its backend (pytest keeps a module's order within one
    parameter of a module-scoped fixture): the server still serves, the ledger verifies,
    and thousands of cases ran."""
    health = health_pb2_grpc.HealthStub(fuzzed.client.channel)
    for service in ("", *pb.DESCRIPTOR.services_by_name):
        name = f"insurance.v1.{service}" if service else ""
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert reply.status == SERVING, (name, reply)
    report = fuzzed.client.query.VerifyLedger(pb.VerifyLedgerRequest(currency=""), timeout=120)
    assert report.ok and not report.problems, report
    total = sum(fuzzed.cases.values())
    print(
        f"\nfuzz {fuzzed.backend}: {total} cases over {len(METHODS)} RPCs "
        f"({sum(v for k, v in fuzzed.cases.items() if k.endswith('typed'))} typed, "
        f"{sum(v for k, v in fuzzed.cases.items() if k.endswith('raw'))} raw); "
        f"VerifyLedger ok over {report.entries_checked} entries"
    )
    assert total >= CASES_MIN, f"only {total} cases ran (at least {CASES_MIN}): {fuzzed.cases}"


def test_decoder_fuzz_target_runs_briefly(tmp_path: Path) -> None:
    """scripts/fuzz_decoder.py for ~10 s, the brief run of the native decoder's target in CI:
    it runs here, does many executions, keeps a corpus, and finds nothing (it exits 1 with
    each finding printed otherwise)."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "fuzz_decoder.py"),
            "--seconds",
            "10",
            "--corpus",
            str(tmp_path / "corpus"),
            "--findings",
            str(tmp_path / "findings"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    print("\n" + done.stdout.strip())
    executions = re.search(r"^executions: (\d+)$", done.stdout, re.MULTILINE)
    corpus = re.search(r"^corpus: (\d+) inputs", done.stdout, re.MULTILINE)
    assert executions and corpus, done.stdout[-3000:] + done.stderr[-3000:]
    assert int(executions.group(1)) > 0 and int(corpus.group(1)) > 0, done.stdout[-3000:]
    assert done.returncode == 0, "findings of the decoder's fuzz target:\n" + done.stdout[-6000:]
