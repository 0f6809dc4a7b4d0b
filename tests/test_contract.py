"""The insurance.v1 contract as the issue fixes it, and the committed stubs generated from it.

Proves that the committed Python stubs are exactly what scripts/gen_proto.py generates from
proto/ today (so a stale stub fails here), and that the descriptor carries the fixed names and
numbers: the three services and each RPC's request, response and streaming shape; every enum
value's number, with _UNSPECIFIED = 0 first; the named messages, their fields and wire types
(money sint64 in unary messages, sfixed64/fixed64 in columnar chunks, decimal strings for
ratios and prices, Timestamp for times).
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from ledger.api.v1 import insurance_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
STUBS = ROOT / "ledger" / "api" / "v1"
F = FieldDescriptor


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    generate = runpy.run_path(str(ROOT / "scripts" / "gen_proto.py"))["generate"]
    generate(tmp_path)
    generated_dir = tmp_path / "ledger" / "api" / "v1"
    generated = {p.name for p in generated_dir.iterdir() if p.suffix in (".py", ".pyi")}
    committed = {p.name for p in STUBS.iterdir() if p.suffix in (".py", ".pyi")} - {"__init__.py"}
    assert (
        generated
        == committed
        == {
            "insurance_pb2.py",
            "insurance_pb2.pyi",
            "insurance_pb2_grpc.py",
        }
    )
    stale = [
        name
        for name in sorted(generated)
        if (generated_dir / name).read_bytes() != (STUBS / name).read_bytes()
    ]
    assert not stale, f"stale stubs {stale}: run python scripts/gen_proto.py and commit them"


def test_package_and_services() -> None:
    assert pb.DESCRIPTOR.package == "insurance.v1"
    assert sorted(pb.DESCRIPTOR.services_by_name) == ["Admin", "Clearing", "Query"]


# service, RPC, request, response, client streaming, server streaming
RPCS = [
    ("Admin", "CreateCurrency", "CreateCurrencyRequest", "Currency", False, False),
    ("Admin", "ListCurrencies", "ListCurrenciesRequest", "ListCurrenciesResponse", False, False),
    ("Admin", "UpsertContract", "UpsertContractRequest", "Contract", False, False),
    ("Admin", "SetPolicy", "SetPolicyRequest", "Policy", False, False),
    ("Admin", "TransferFund", "TransferFundRequest", "Entry", False, False),
    ("Admin", "ReverseLiquidation", "ReverseLiquidationRequest", "Entry", False, False),
    ("Admin", "ReverseCycle", "ReverseCycleRequest", "CycleSummary", False, False),
    (
        "Clearing",
        "RecordLiquidation",
        "RecordLiquidationRequest",
        "LiquidationResult",
        False,
        False,
    ),
    (
        "Clearing",
        "RecordLiquidations",
        "RecordLiquidationsRequest",
        "RecordLiquidationsResponse",
        False,
        False,
    ),
    # The table makes the request of the two cycle RPCs a stream of CycleInput.
    ("Clearing", "CloseCycle", "CycleInput", "CycleSummary", True, False),
    ("Clearing", "PreviewCycle", "CycleInput", "CycleSummary", True, False),
    ("Query", "GetFund", "GetFundRequest", "Fund", False, False),
    ("Query", "GetCycle", "GetCycleRequest", "CycleSummary", False, False),
    ("Query", "StreamAllocations", "StreamAllocationsRequest", "AllocationChunk", False, True),
    ("Query", "ListEntries", "ListEntriesRequest", "ListEntriesResponse", False, False),
    ("Query", "VerifyLedger", "VerifyLedgerRequest", "VerifyReport", False, False),
    ("Query", "ListCycles", "ListCyclesRequest", "ListCyclesResponse", False, False),
    ("Query", "GetPolicy", "GetPolicyRequest", "Policy", False, False),
    ("Query", "ListPolicies", "ListPoliciesRequest", "ListPoliciesResponse", False, False),
    ("Query", "ListContracts", "ListContractsRequest", "ListContractsResponse", False, False),
    ("Query", "GetLiquidation", "GetLiquidationRequest", "Liquidation", False, False),
    ("Query", "ListOpenCycles", "ListOpenCyclesRequest", "ListOpenCyclesResponse", False, False),
    (
        "Query",
        "ExplainAllocation",
        "ExplainAllocationRequest",
        "AllocationExplanation",
        False,
        False,
    ),
]


def test_every_rpc_of_the_table_and_no_other() -> None:
    served = {
        (service.name, method.name)
        for service in pb.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert served == {(service, rpc) for service, rpc, *_ in RPCS}


@pytest.mark.parametrize(
    ("service", "rpc", "request_name", "response", "client_stream", "server_stream"),
    RPCS,
    ids=[rpc for _, rpc, *_ in RPCS],
)
def test_rpc_shape(
    service: str,
    rpc: str,
    request_name: str,
    response: str,
    client_stream: bool,
    server_stream: bool,
) -> None:
    method = pb.DESCRIPTOR.services_by_name[service].methods_by_name[rpc]
    assert method.input_type.full_name == f"insurance.v1.{request_name}"
    assert method.output_type.full_name == f"insurance.v1.{response}"
    assert method.client_streaming == client_stream
    assert method.server_streaming == server_stream


ENUMS = {
    "ContractKind": ["LINEAR", "INVERSE"],
    "TransferDirection": ["DEPOSIT", "WITHDRAW"],
    "Side": ["LONG", "SHORT"],
    "Outcome": ["FUND_INFLOW", "SYSTEM_LOSS", "BREAK_EVEN"],
    "EntryKind": [
        "FUND_DEPOSIT",
        "FUND_WITHDRAWAL",
        "LIQUIDATION_PROFIT",
        "LIQUIDATION_LOSS",
        "INSURANCE_COVER",
        "ALLOCATION",
        "UNCOVERED_LOSS",
    ],
    "CycleState": ["PREVIEW", "CLOSED", "REVERSED"],
    "Ranking": ["POSITION", "ACCOUNT"],
}


@pytest.mark.parametrize(("enum", "values"), ENUMS.items(), ids=list(ENUMS))
def test_enum_numbers(enum: str, values: list[str]) -> None:
    """Values carry the style guide's prefix; _UNSPECIFIED = 0 comes first, then 1, 2, …"""
    prefix = "".join(f"_{c}" if c.isupper() else c.upper() for c in enum).lstrip("_") + "_"
    descriptor = pb.DESCRIPTOR.enum_types_by_name[enum]
    numbered = [(v.name, v.number) for v in descriptor.values]
    assert numbered == [(f"{prefix}UNSPECIFIED", 0)] + [
        (f"{prefix}{name}", number) for number, name in enumerate(values, start=1)
    ]


MONEY = F.TYPE_SINT64
STRING = F.TYPE_STRING
U64 = F.TYPE_UINT64
TIME = "google.protobuf.Timestamp"

# The fields each message of the contract must have: name → wire type (or message type).
# Messages may carry more fields than these (e.g. Entry.memo), never other types for them.
MESSAGES: dict[str, dict[str, object]] = {
    "Currency": {"code": STRING, "scale": F.TYPE_UINT32},
    "Contract": {
        "symbol": STRING,
        "margin_currency": STRING,
        "kind": "insurance.v1.ContractKind",
        "multiplier": STRING,
    },
    "Policy": {
        "currency": STRING,
        "insurance_share": STRING,
        "coverage_ratio": STRING,
        "version": U64,
    },
    "Posting": {"account": STRING, "amount": MONEY},
    "Entry": {
        "entry_id": U64,
        "kind": "insurance.v1.EntryKind",
        "currency": STRING,
        "reference": STRING,
        "postings": "insurance.v1.Posting",
        "created_at": TIME,
    },
    "Fund": {"currency": STRING, "balance": MONEY, "inflow_total": MONEY, "outflow_total": MONEY},
    "LiquidationResult": {
        "liquidation_id": STRING,
        "currency": STRING,
        "engine_result": MONEY,
        "outcome": "insurance.v1.Outcome",
        "fund_balance": MONEY,
        "entry_id": U64,
    },
    "CycleHeader": {"cycle_id": STRING, "currency": STRING},
    "CycleInput": {"header": "insurance.v1.CycleHeader", "positions": "insurance.v1.PositionChunk"},
    "CycleSummary": {
        "cycle_id": STRING,
        "currency": STRING,
        "state": "insurance.v1.CycleState",
        **{
            name: MONEY
            for name in (
                "loss_total",
                "fund_balance_before",
                "fund_share",
                "fund_paid",
                "user_due",
                "allocated_total",
                "uncovered",
                "profit_total",
                "participant_profit",
                "cutoff_pnl",
            )
        },
        "positions_total": U64,
        "profitable_count": U64,
        "participant_count": U64,
        "widened": F.TYPE_BOOL,
        "input_digest": STRING,
        "insurance_share": STRING,
        "coverage_ratio": STRING,
        "closed_at": TIME,
    },
    "VerifyReport": {"ok": F.TYPE_BOOL, "entries_checked": U64, "problems": STRING},
    "CreateCurrencyRequest": {"code": STRING, "scale": F.TYPE_UINT32},
    "ListCurrenciesResponse": {"currencies": "insurance.v1.Currency"},
    "UpsertContractRequest": {
        "symbol": STRING,
        "margin_currency": STRING,
        "kind": "insurance.v1.ContractKind",
        "multiplier": STRING,
    },
    "SetPolicyRequest": {"currency": STRING, "insurance_share": STRING, "coverage_ratio": STRING},
    "TransferFundRequest": {
        "transfer_id": STRING,
        "currency": STRING,
        "direction": "insurance.v1.TransferDirection",
        "amount": MONEY,
        "memo": STRING,
    },
    "RecordLiquidationRequest": {
        "liquidation_id": STRING,
        "cycle_id": STRING,
        "symbol": STRING,
        "account_id": U64,
        "position_id": U64,
        "side": "insurance.v1.Side",
        "quantity": STRING,
        "takeover_price": STRING,
        "close_price": STRING,
        "remaining_margin": MONEY,
    },
    "RecordLiquidationsRequest": {"liquidations": "insurance.v1.RecordLiquidationRequest"},
    "RecordLiquidationsResponse": {"outcomes": "insurance.v1.LiquidationOutcome"},
    "LiquidationOutcome": {
        "code": F.TYPE_UINT32,
        "message": STRING,
        "result": "insurance.v1.LiquidationResult",
    },
    "GetFundRequest": {"currency": STRING},
    "GetCycleRequest": {"cycle_id": STRING, "currency": STRING},
    "StreamAllocationsRequest": {"cycle_id": STRING, "currency": STRING, "account_id": U64},
    "ListEntriesRequest": {
        "currency": STRING,
        "account": STRING,
        "kind": "insurance.v1.EntryKind",
        "page_size": F.TYPE_UINT32,
        "page_token": STRING,
    },
    "ListEntriesResponse": {"entries": "insurance.v1.Entry", "next_page_token": STRING},
    "VerifyLedgerRequest": {"currency": STRING},
}


def _type_of(field: FieldDescriptor) -> object:
    if field.message_type is not None:
        return field.message_type.full_name
    if field.enum_type is not None:
        return field.enum_type.full_name
    return field.type


@pytest.mark.parametrize(("message", "fields"), MESSAGES.items(), ids=list(MESSAGES))
def test_message_fields(message: str, fields: dict[str, object]) -> None:
    descriptor = pb.DESCRIPTOR.message_types_by_name[message]
    got = {name: _type_of(descriptor.fields_by_name[name]) for name in fields}
    assert got == fields


@pytest.mark.parametrize(
    ("message", "columns"),
    [
        ("PositionChunk", ["position_id", "account_id", "pnl"]),
        ("AllocationChunk", ["position_id", "account_id", "pnl", "amount"]),
    ],
)
def test_columnar_chunks(message: str, columns: list[str]) -> None:
    """Ids are fixed64 and money sfixed64, packed columns with the fixed field numbers."""
    descriptor = pb.DESCRIPTOR.message_types_by_name[message]
    wire = {"position_id": F.TYPE_FIXED64, "account_id": F.TYPE_FIXED64}
    assert [(f.name, f.number, f.type) for f in descriptor.fields] == [
        (name, number, wire.get(name, F.TYPE_SFIXED64))
        for number, name in enumerate(columns, start=1)
    ]
    for field in descriptor.fields:
        assert field.is_repeated and field.is_packed, field.name


def test_cycle_input_is_a_oneof_of_header_and_positions() -> None:
    descriptor = pb.CycleInput.DESCRIPTOR
    (item,) = descriptor.oneofs
    assert item.name == "item"
    assert [(f.name, f.number) for f in item.fields] == [("header", 1), ("positions", 2)]


def test_stream_allocations_account_id_is_optional() -> None:
    assert pb.StreamAllocationsRequest.DESCRIPTOR.fields_by_name["account_id"].has_presence


def _all_messages() -> list[Descriptor]:
    found: list[Descriptor] = []
    pending = list(pb.DESCRIPTOR.message_types_by_name.values())
    while pending:
        message = pending.pop()
        found.append(message)
        pending.extend(message.nested_types)
    return found


def test_no_plain_int64_and_no_floats() -> None:
    """Money is sint64 (zigzag) in unary messages; no field is a float or a double."""
    unwanted = {F.TYPE_INT64, F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_FLOAT, F.TYPE_DOUBLE}
    offending = [
        f"{m.name}.{f.name}" for m in _all_messages() for f in m.fields if f.type in unwanted
    ]
    assert offending == []


def test_a_serialised_contract_is_an_upsert_request() -> None:
    contract = pb.Contract(
        symbol="BTCUSD", margin_currency="BTC", kind=pb.CONTRACT_KIND_INVERSE, multiplier="100"
    )
    request = pb.UpsertContractRequest.FromString(contract.SerializeToString())
    assert (request.symbol, request.margin_currency, request.kind, request.multiplier) == (
        "BTCUSD",
        "BTC",
        pb.CONTRACT_KIND_INVERSE,
        "100",
    )


def test_record_liquidations_messages_are_exactly_the_issues() -> None:
    """RecordLiquidations' messages, field numbers and all, as the transport issue fixes them."""

    def shape(name: str) -> list[tuple[str, int, object, bool]]:
        descriptor = pb.DESCRIPTOR.message_types_by_name[name]
        return [(f.name, f.number, _type_of(f), f.is_repeated) for f in descriptor.fields]

    assert shape("RecordLiquidationsRequest") == [
        ("liquidations", 1, "insurance.v1.RecordLiquidationRequest", True)
    ]
    assert shape("RecordLiquidationsResponse") == [
        ("outcomes", 1, "insurance.v1.LiquidationOutcome", True)
    ]
    assert shape("LiquidationOutcome") == [
        ("code", 1, F.TYPE_UINT32, False),
        ("message", 2, STRING, False),
        ("result", 3, "insurance.v1.LiquidationResult", False),
    ]
