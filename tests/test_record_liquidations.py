"""RecordLiquidations: many liquidations in one call, each exactly what the unary call with it
would be.

Proves, on SQLite and PostgreSQL, that a batch answers one outcome per item in request order;
that each item gets the unary call's validation, status code, message and idempotency (an
item failing fails alone, its neighbours are written); that items apply in order (each
fund_balance counts the items before it); that an id repeated within the batch gets the first
item's result with the same content and ALREADY_EXISTS with other content; that a replayed
batch writes nothing and answers the same; that an empty batch and one above 10,000 items are
refused whole and write nothing, while 10,000 items go through; that the ledger's invariants
hold after a mixed batch; and, as a property over random liquidations cut into random
batches, that the batch call and the unary call give the same outcomes and the same ledger.

Expected engine results come from the Fraction reference of tests.test_liquidation (not the
code under test), expected fund balances from summing them in request order, and expected
status codes are written by hand in the table.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from ledger.api.v1 import insurance_pb2 as pb
from ledger.server.app import LedgerServer, Settings
from tests import cycle_streams as cs
from tests.conftest import BACKENDS, Client, fresh_database
from tests.ledger_db import balances_from_journal, cached_balances, snapshot
from tests.test_liquidation import (
    INVALID,
    INVERSE,
    LINEAR,
    LONG,
    SHORT,
    _reference_result,
    liq,
    setup_market,
)

INT64_MAX = 2**63 - 1
LIMIT = 10_000  # items of one RecordLiquidations call, as the contract says

OK = 0
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

# What setup_market creates, written out for the reference:
# symbol → (margin currency, kind, multiplier, the currency's scale)
CONTRACTS = {
    "BTCUSDT": ("USDT", LINEAR, "0.001", 6),
    "ETHUSDT": ("USDT", LINEAR, "0.01", 6),
    "BTCUSD": ("BTC", INVERSE, "100", 8),
    "XJPY": ("JPY", LINEAR, "1", 0),
    "IJPY": ("JPY", INVERSE, "1", 0),
}
CURRENCIES = ("USDT", "BTC", "JPY")
CLOSED = "closed"  # a USDT cycle closed (through CloseCycle) before every batch of the table
LIQUIDATION_ACCOUNTS = ("insurance_fund", "liquidation_engine", "system_loss")


def number(code: grpc.StatusCode) -> int:
    return int(code.value[0])


# --- calls -----------------------------------------------------------------------------------


def record_batch(
    client: Client, requests: Sequence[pb.RecordLiquidationRequest]
) -> list[pb.LiquidationOutcome]:
    reply = client.clearing.RecordLiquidations(
        pb.RecordLiquidationsRequest(liquidations=list(requests)), timeout=120
    )
    return list(reply.outcomes)


def record_unary(client: Client, request: pb.RecordLiquidationRequest) -> pb.LiquidationOutcome:
    """The unary call's answer in the shape of a batch outcome."""
    try:
        result = client.clearing.RecordLiquidation(request, timeout=30)
    except grpc.RpcError as error:
        return pb.LiquidationOutcome(code=number(error.code()), message=error.details())
    return pb.LiquidationOutcome(code=OK, result=result)


def close_empty_cycle(client: Client, cycle_id: str, currency: str) -> None:
    """Close a cycle without liquidations or positions: no money moves, the cycle is closed."""
    summary = cs.close(client.channel, cycle_id, currency, cs.Positions.of([]))
    assert summary.state == pb.CYCLE_STATE_CLOSED


def changed(request: pb.RecordLiquidationRequest, **fields: object) -> pb.RecordLiquidationRequest:
    copy = pb.RecordLiquidationRequest()
    copy.CopyFrom(request)
    for name, value in fields.items():
        setattr(copy, name, value)
    return copy


def list_entries(client: Client, currency: str, account: str) -> list[pb.Entry]:
    """Every entry of the currency touching the account, all pages."""
    found: list[pb.Entry] = []
    token = ""
    while True:
        page = client.query.ListEntries(
            pb.ListEntriesRequest(
                currency=currency, account=account, page_size=1000, page_token=token
            )
        )
        found.extend(page.entries)
        token = page.next_page_token
        if not token:
            return found


def liquidation_entries(client: Client, currency: str) -> dict[int, pb.Entry]:
    """Every entry of the currency on the liquidation accounts, by id."""
    return {
        e.entry_id: e
        for account in LIQUIDATION_ACCOUNTS
        for e in list_entries(client, currency, account)
    }


@contextmanager
def serving(backend: str, directory: Path) -> Iterator[tuple[Client, str]]:
    """A server of its own on a fresh database of the backend; its client and database URL."""
    directory.mkdir(parents=True, exist_ok=True)
    with fresh_database(backend, directory) as url:
        server = LedgerServer(Settings(listen="127.0.0.1:0", database_url=url))
        server.start()
        try:
            client = Client.connect(f"127.0.0.1:{server.port}")
            try:
                yield client, url
            finally:
                client.channel.close()
        finally:
            server.stop(grace_seconds=5)


# --- the independent expectation ---------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """An OK item's result as the rules say it must be."""

    liquidation_id: str
    currency: str
    engine_result: int
    outcome: int
    fund_balance: int

    @property
    def posted(self) -> bool:
        return self.engine_result != 0


def reference_value(request: pb.RecordLiquidationRequest) -> int:
    _, kind, multiplier, scale = CONTRACTS[request.symbol]
    return _reference_result(
        kind,
        request.side,
        request.quantity,
        request.takeover_price,
        request.close_price,
        multiplier,
        request.remaining_margin,
        scale,
    )


def outcome_of(value: int) -> int:
    if value > 0:
        return pb.OUTCOME_FUND_INFLOW
    return pb.OUTCOME_SYSTEM_LOSS if value < 0 else pb.OUTCOME_BREAK_EVEN


class Model:
    """The fund of each currency and the results recorded so far, applied in request order.
    Only told about items that must succeed: the codes come from the table, not from here."""

    def __init__(self) -> None:
        self.fund: defaultdict[str, int] = defaultdict(int)
        self.recorded: dict[str, Expected] = {}
        self.new: list[Expected] = []  # the items that record something, in order

    def ok(self, request: pb.RecordLiquidationRequest) -> Expected:
        earlier = self.recorded.get(request.liquidation_id)
        if earlier is not None:  # a repeat with the same content: the first result
            return earlier
        value = reference_value(request)
        currency = CONTRACTS[request.symbol][0]
        self.fund[currency] += max(value, 0)
        expected = Expected(
            request.liquidation_id, currency, value, outcome_of(value), self.fund[currency]
        )
        self.recorded[request.liquidation_id] = expected
        self.new.append(expected)
        return expected


def assert_result(result: pb.LiquidationResult, expected: Expected) -> None:
    assert result.liquidation_id == expected.liquidation_id
    assert result.currency == expected.currency
    assert result.engine_result == expected.engine_result
    assert result.outcome == expected.outcome
    assert result.fund_balance == expected.fund_balance
    assert (result.entry_id != 0) == expected.posted


def assert_same_outcome(got: pb.LiquidationOutcome, want: pb.LiquidationOutcome) -> None:
    """Field by field, entry ids too: two databases given the same calls in the same order,
    however batched, give their entries the same ids."""
    assert (got.code, got.message) == (want.code, want.message)
    assert got.HasField("result") == want.HasField("result")
    g, w = got.result, want.result
    assert (g.liquidation_id, g.currency, g.engine_result, g.outcome, g.fund_balance) == (
        w.liquidation_id,
        w.currency,
        w.engine_result,
        w.outcome,
        w.fund_balance,
    )
    assert g.entry_id == w.entry_id


def assert_outcome_shape(outcome: pb.LiquidationOutcome) -> None:
    """A message exactly when failing; a result exactly when OK."""
    assert (outcome.message == "") == (outcome.code == OK), outcome
    assert outcome.HasField("result") == (outcome.code == OK), outcome


# --- the table ------------------------------------------------------------------------------

Item = tuple[pb.RecordLiquidationRequest, int, str]  # request, expected code, text of message


def ok(request: pb.RecordLiquidationRequest) -> Item:
    return (request, OK, "")


def fails(request: pb.RecordLiquidationRequest, code: grpc.StatusCode, fragment: str) -> Item:
    return (request, number(code), fragment)


def invalid_items(prefix: str) -> list[Item]:
    """The INVALID_ARGUMENT rows of tests.test_liquidation.INVALID, each on an item of its own
    id; the message must name the field."""
    base = liq("", "BTCUSDT", LONG, "1", "60000", "59000", 10)
    return [
        fails(changed(changed(base, liquidation_id=f"{prefix}{n}"), **change), code, name)
        for n, (name, change, code) in enumerate(INVALID)
        if code == INVALID_ARGUMENT
    ]


@dataclass(frozen=True)
class Batch:
    items: list[Item]
    before: list[pb.RecordLiquidationRequest] = field(default_factory=list)  # unary, first

    def requests(self) -> list[pb.RecordLiquidationRequest]:
        return [request for request, _, _ in self.items]


# LINEAR SHORT: (60000 − 59000) × 3 × 0.001 = 3 USDT = 3,000,000 → a profit
A = liq("A", "BTCUSDT", SHORT, "3", "60000", "59000", 0)
# LINEAR LONG: −2 USDT + margin 0.5 → a loss of 1,500,000
B = liq("B", "BTCUSDT", LONG, "2", "60000", "59000", 500_000)
# INVERSE SHORT: 10 × 100 × (1/40000 − 1/50000) BTC + 7 → 500,007 sat
C = liq("C", "BTCUSD", SHORT, "10", "50000", "40000", 7)
# (3000.0000001 − 3000) × 0.01 = 0.001 minor units → floor 0: break-even
E1 = liq("E1", "ETHUSDT", LONG, "1", "3000", "3000.0000001", 0)
# −1.5 JPY → floor −2; + margin 2 → 0: break-even
E2 = liq("E2", "XJPY", SHORT, "3", "99.5", "100", 2)


def _valid_between(n: int) -> pb.RecordLiquidationRequest:
    # a profit of (1000 − n) × 1000 + n minor units
    return liq(f"V{n}", "BTCUSDT", SHORT, "1", "60000", str(59000 + n), n)


TABLE = [
    pytest.param(
        Batch(
            [
                ok(A),
                ok(B),
                ok(C),
                ok(liq("P4", "ETHUSDT", SHORT, "1", "3000", "3000.0000001", 0)),  # −1
                ok(liq("P5", "BTCUSDT", LONG, "1", "60000", "60100.5", 0)),  # +100,500
                ok(liq("P6", "IJPY", LONG, "1", "3", "7", 5)),  # 4/21 → 0; + 5
                ok(liq("P7", "BTCUSD", LONG, "1", "30000", "70000", 0)),  # +190,476
                ok(liq("P8", "BTCUSD", SHORT, "1", "30000", "70000", 0)),  # −190,477
                ok(liq("P9", "XJPY", LONG, "3", "99.5", "100", 0)),  # 1.5 → 1
            ]
        ),
        id="profits-and-losses-in-order",
    ),
    pytest.param(
        Batch(
            [ok(_valid_between(0))]
            + [
                item
                for n, bad in enumerate(invalid_items("X"), start=1)
                for item in (bad, ok(_valid_between(n)))
            ]
        ),
        id="invalid-items-fail-alone",
    ),
    pytest.param(
        Batch(
            [
                ok(A),
                fails(changed(B, symbol="NOPE"), NOT_FOUND, "NOPE"),
                fails(changed(C, symbol="ETHUSD"), NOT_FOUND, "ETHUSD"),
                ok(liq("D", "XJPY", LONG, "1", "1", "2", 0)),
            ]
        ),
        id="unknown-symbol",
    ),
    pytest.param(
        Batch(
            [
                ok(A),
                ok(B),
                ok(C),
                ok(A),  # A's result: the fund as it was right after A, not after C
                ok(changed(A, quantity="3.0", takeover_price="60000.00")),  # the same decimals
                ok(B),
                ok(liq("D", "BTCUSDT", SHORT, "1", "60000", "59000", 0)),  # counts A once
            ]
        ),
        id="repeat-with-same-content",
    ),
    pytest.param(
        Batch(
            [
                ok(A),
                fails(changed(A, remaining_margin=1), ALREADY_EXISTS, "'A'"),
                fails(changed(A, side=LONG), ALREADY_EXISTS, "'A'"),
                fails(changed(A, close_price="59001"), ALREADY_EXISTS, "'A'"),
                fails(changed(A, cycle_id="c2"), ALREADY_EXISTS, "'A'"),
                fails(changed(A, account_id=8), ALREADY_EXISTS, "'A'"),
                fails(changed(A, position_id=12), ALREADY_EXISTS, "'A'"),
                fails(changed(A, symbol="ETHUSDT"), ALREADY_EXISTS, "'A'"),
                fails(changed(A, symbol="BTCUSD"), ALREADY_EXISTS, "'A'"),  # another currency
                ok(B),
                ok(A),  # still A's result
            ]
        ),
        id="repeat-with-other-content",
    ),
    pytest.param(
        Batch(
            [
                # A first item that failed recorded nothing: its id is free for the next.
                fails(changed(A, cycle_id=CLOSED), FAILED_PRECONDITION, CLOSED),
                ok(A),
                fails(changed(B, quantity="0"), INVALID_ARGUMENT, "quantity"),
                ok(B),
                fails(changed(C, symbol="NOPE"), NOT_FOUND, "NOPE"),
                ok(C),
            ]
        ),
        id="repeat-after-a-failed-first",
    ),
    pytest.param(
        Batch(
            [
                ok(E1),
                ok(E2),
                ok(A),
                ok(E1),  # the repeat of a break-even: its result, fund 0
                fails(changed(E1, remaining_margin=1), ALREADY_EXISTS, "'E1'"),
                fails(changed(E2, cycle_id="c2"), ALREADY_EXISTS, "'E2'"),
                fails(
                    changed(E1, liquidation_id="E3", cycle_id=CLOSED), FAILED_PRECONDITION, CLOSED
                ),
            ]
        ),
        id="break-even",
    ),
    pytest.param(
        Batch(
            [
                fails(
                    liq("K1", "BTCUSDT", LONG, "1", "100", "90", 0, CLOSED),
                    FAILED_PRECONDITION,
                    CLOSED,
                ),
                ok(liq("K2", "BTCUSD", LONG, "1", "100", "90", 0, CLOSED)),  # BTC's is open
                ok(liq("K3", "BTCUSDT", SHORT, "1", "100", "90", 0)),
                fails(
                    liq("K4", "ETHUSDT", SHORT, "1", "100", "90", 0, CLOSED),
                    FAILED_PRECONDITION,
                    CLOSED,
                ),
                ok(liq("K5", "ETHUSDT", SHORT, "1", "100", "90", 0)),
            ]
        ),
        id="closed-cycle",
    ),
    pytest.param(
        Batch(
            [
                ok(liq("F1", "XJPY", LONG, "1", "1", "1", INT64_MAX)),  # the fund at int64's top
                fails(liq("F2", "XJPY", LONG, "1", "1", "2", 0), INVALID_ARGUMENT, "engine_result"),
                ok(liq("F3", "XJPY", LONG, "1", "2", "1", 0)),  # a loss: the fund is not moved
                fails(liq("F2", "XJPY", LONG, "1", "1", "2", 0), INVALID_ARGUMENT, "engine_result"),
                ok(liq("F4", "BTCUSDT", SHORT, "1", "60000", "59000", 0)),  # another currency
                ok(liq("F1", "XJPY", LONG, "1", "1", "1", INT64_MAX)),
            ]
        ),
        id="fund-bound-fails-alone",
    ),
    pytest.param(
        Batch(
            [
                ok(A),  # the result recorded by the unary call before
                fails(changed(A, close_price="59001"), ALREADY_EXISTS, "'A'"),
                ok(B),
                ok(E1),
                ok(C),
            ],
            before=[A, E1],
        ),
        id="recorded-before-the-batch",
    ),
]

ROWS: list[Batch] = [p.values[0] for p in TABLE]


def market_with_closed_cycle(client: Client) -> None:
    setup_market(client)
    close_empty_cycle(client, CLOSED, "USDT")


@pytest.mark.parametrize("batch", TABLE)
def test_mixed_batch(client: Client, database_url: str, batch: Batch) -> None:
    """Each item's code, message and result as the table and the reference say, in request
    order; and the journal holds exactly the entries of the items that recorded something."""
    market_with_closed_cycle(client)
    model = Model()
    entry_of: dict[str, int] = {}  # the entry of each id recorded, from its first result
    for request in batch.before:
        before = record_unary(client, request)
        assert before.code == OK, before
        assert_result(before.result, model.ok(request))
        entry_of[request.liquidation_id] = before.result.entry_id
    outcomes = record_batch(client, batch.requests())

    assert len(outcomes) == len(batch.items)
    for index, (outcome, (request, code, fragment)) in enumerate(
        zip(outcomes, batch.items, strict=True)
    ):
        where = f"item {index} ({request.liquidation_id!r})"
        assert outcome.code == code, (where, outcome)
        assert_outcome_shape(outcome)
        if code != OK:
            assert fragment in outcome.message, (where, outcome.message)
            continue
        expected = model.ok(request)
        assert_result(outcome.result, expected)
        lid = request.liquidation_id
        if lid in entry_of:  # a repeat: the same entry as the first
            assert outcome.result.entry_id == entry_of[lid], where
        else:
            entry_of[lid] = outcome.result.entry_id

    # Durable before the reply, and nothing for the items that failed: the journal holds
    # exactly the entries of the items that recorded something, as the reference says.
    posted = [e for e in model.new if e.posted]
    assert len({entry_of[e.liquidation_id] for e in posted}) == len(posted)
    journal: dict[int, pb.Entry] = {}
    for currency in CURRENCIES:
        journal |= liquidation_entries(client, currency)
        fund = client.query.GetFund(pb.GetFundRequest(currency=currency))
        assert fund.balance == model.fund[currency], currency
    assert sorted(journal) == sorted(entry_of[e.liquidation_id] for e in posted)
    for expected in posted:
        entry = journal[entry_of[expected.liquidation_id]]
        assert (entry.reference, entry.currency) == (expected.liquidation_id, expected.currency)
        postings = {p.account: p.amount for p in entry.postings}
        value = expected.engine_result
        if value > 0:
            assert entry.kind == pb.ENTRY_KIND_LIQUIDATION_PROFIT
            assert postings == {"liquidation_engine": -value, "insurance_fund": value}
        else:
            assert entry.kind == pb.ENTRY_KIND_LIQUIDATION_LOSS
            assert postings == {"system_loss": value, "liquidation_engine": -value}
    counts = snapshot(database_url)["counts"]
    assert counts["liquidations"] == len(model.recorded)


# --- the same as the unary call -----------------------------------------------------------------

# Every request of the table, in order, as one list: the rows' repeats now also repeat ids of
# the rows before them.
EVERY_REQUEST = [r for row in ROWS for r in (*row.before, *row.requests())]


def ledger_rows(database_url: str, currency: str | None = None) -> tuple[object, ...]:
    """What two databases given the same calls must hold alike: the cached balances, the
    entries with their ids, and the recorded liquidations with their entries' ids."""
    engine = create_engine(database_url)
    where, params = ("", {}) if currency is None else (" WHERE currency = :c", {"c": currency})
    try:
        with engine.connect() as conn:
            entries = conn.execute(
                text(
                    "SELECT id, currency, kind, reference, debit_account, credit_account, amount"
                    f" FROM entries{where}"
                ),
                params,
            ).all()
            liquidations = conn.execute(
                text(
                    "SELECT liquidation_id, request_hash, currency, cycle_id, symbol, account_id,"
                    " position_id, side, quantity, takeover_price, close_price, remaining_margin,"
                    " engine_result, outcome, fund_balance_after, entry_id"
                    f" FROM liquidations{where}"
                ),
                params,
            ).all()
    finally:
        engine.dispose()
    balances = {
        key: value
        for key, value in cached_balances(database_url).items()
        if currency is None or key[0] == currency
    }
    return (
        balances,
        Counter(tuple(r) for r in entries),
        sorted(tuple(r) for r in liquidations),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_unary_calls(backend: str, tmp_path: Path) -> None:
    """The same requests, one by one through RecordLiquidation on one fresh server and as one
    RecordLiquidations call on another: the same codes, messages, results and ledger."""
    with (
        serving(backend, tmp_path / "unary") as (unary, unary_url),
        serving(backend, tmp_path / "batch") as (batch, batch_url),
    ):
        market_with_closed_cycle(unary)
        market_with_closed_cycle(batch)
        want = [record_unary(unary, request) for request in EVERY_REQUEST]
        got = record_batch(batch, EVERY_REQUEST)
        assert len(got) == len(want)
        for index, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_outcome_shape(g)
            try:
                assert_same_outcome(g, w)
            except AssertionError as error:
                raise AssertionError(f"item {index}: batch {g} unary {w}") from error
        assert {o.code for o in want} == {0, 3, 5, 6, 9}  # the list does mix them all
        assert ledger_rows(batch_url) == ledger_rows(unary_url)


# --- replay ----------------------------------------------------------------------------------

# The table's requests, but for the row whose ids first fail and then succeed with other
# content: replayed, such a first item meets the id the second recorded, so the unary call
# (which each item follows) answers it ALREADY_EXISTS the second time, not its first failure.
REPLAYABLE = [
    r
    for param in TABLE
    if param.id != "repeat-after-a-failed-first"
    for r in (*param.values[0].before, *param.values[0].requests())
]


def test_replayed_batch_posts_nothing(client: Client, database_url: str) -> None:
    """A mixed batch sent again identically: no row or balance changes, the same outcomes."""
    market_with_closed_cycle(client)
    first = client.clearing.RecordLiquidations(
        pb.RecordLiquidationsRequest(liquidations=REPLAYABLE)
    )
    assert {o.code for o in first.outcomes} == {0, 3, 5, 6, 9}
    # The fund moves after the batch: a replay still answers the fund as it was.
    client.admin.TransferFund(
        pb.TransferFundRequest(
            transfer_id="d1", currency="USDT", direction=pb.TRANSFER_DIRECTION_DEPOSIT, amount=5
        )
    )
    before = snapshot(database_url)
    again = client.clearing.RecordLiquidations(
        pb.RecordLiquidationsRequest(liquidations=REPLAYABLE)
    )
    assert snapshot(database_url) == before
    assert list(again.outcomes) == list(first.outcomes)


# --- limits -------------------------------------------------------------------------------------


def many(count: int) -> list[pb.RecordLiquidationRequest]:
    """Distinct BTCUSDT liquidations: profits, losses and break-evens."""
    sides = (LONG, SHORT)
    return [
        liq(f"N{n}", "BTCUSDT", sides[n % 2], str(n % 7 + 1), "60000", str(59995 + n % 11), n % 3)
        for n in range(count)
    ]


def test_empty_and_oversized_batches_are_refused_whole(client: Client, database_url: str) -> None:
    """0 and 10,001 valid items: the call fails INVALID_ARGUMENT naming 10000, writes nothing."""
    setup_market(client)
    before = snapshot(database_url)
    for requests in ([], many(LIMIT + 1)):
        with pytest.raises(grpc.RpcError) as error:
            record_batch(client, requests)
        assert error.value.code() == INVALID_ARGUMENT, len(requests)
        details = error.value.details() or ""
        assert str(LIMIT) in details and f"{LIMIT:,}" in details, details
        assert "liquidations" in details, details  # the field
        assert snapshot(database_url) == before


def test_a_full_batch_of_ten_thousand(client: Client, database_url: str) -> None:
    """10,000 items, the limit, all recorded in order; replayed whole, nothing new."""
    setup_market(client)
    requests = many(LIMIT)
    outcomes = record_batch(client, requests)
    model = Model()
    assert len(outcomes) == LIMIT
    for request, outcome in zip(requests, outcomes, strict=True):
        assert outcome.code == OK, outcome
        assert_result(outcome.result, model.ok(request))
    assert {e.outcome for e in model.new} == {
        pb.OUTCOME_FUND_INFLOW,
        pb.OUTCOME_SYSTEM_LOSS,
        pb.OUTCOME_BREAK_EVEN,
    }
    entry_ids = [o.result.entry_id for o in outcomes if o.result.entry_id]
    assert len(set(entry_ids)) == len(entry_ids) == sum(e.posted for e in model.new)
    assert snapshot(database_url)["counts"]["liquidations"] == LIMIT
    fund = client.query.GetFund(pb.GetFundRequest(currency="USDT"))
    assert fund.balance == model.fund["USDT"]
    # Replayed whole, the full batch finds every id recorded: nothing new, the same answers.
    before = snapshot(database_url)
    assert record_batch(client, requests) == outcomes
    assert snapshot(database_url) == before


# --- invariants -------------------------------------------------------------------------------


def test_ledger_invariants_after_a_mixed_batch(client: Client, database_url: str) -> None:
    """Every entry balances; the cached balances are the journal's; each fund is its
    liquidation profits, each system loss its liquidation losses, as the outcomes say."""
    market_with_closed_cycle(client)
    outcomes = record_batch(client, EVERY_REQUEST)
    recorded = {o.result.liquidation_id: o.result for o in outcomes if o.code == OK}
    for currency in CURRENCIES:
        entries = liquidation_entries(client, currency).values()
        for entry in entries:
            assert sum(p.amount for p in entry.postings) == 0, entry
        profits = [e for e in entries if e.kind == pb.ENTRY_KIND_LIQUIDATION_PROFIT]
        inflow = sum(p.amount for e in profits for p in e.postings if p.account == "insurance_fund")
        fund = client.query.GetFund(pb.GetFundRequest(currency=currency))
        assert fund.balance == fund.inflow_total == inflow, currency
        # ... and that is the sum of the positive engine results of the recorded items
        results = [r.engine_result for r in recorded.values() if r.currency == currency]
        assert inflow == sum(v for v in results if v > 0), currency
        losses = [e for e in entries if e.kind == pb.ENTRY_KIND_LIQUIDATION_LOSS]
        loss = sum(p.amount for e in losses for p in e.postings if p.account == "system_loss")
        assert loss == sum(v for v in results if v < 0), currency
        assert len(profits) + len(losses) == len(entries) == sum(1 for v in results if v), currency
    journal = balances_from_journal(database_url)
    cached = cached_balances(database_url)
    system = {k for k in journal if not k[1].startswith("user:")} | set(cached)
    assert {k: journal.get(k, 0) for k in system} == {k: cached.get(k, 0) for k in system}


# --- the property: batches of any size are the unary call -------------------------------------


@dataclass(frozen=True)
class Spec:
    """A liquidation, with its names left to bind to the example's own market."""

    letter: str  # the id is "<example>-<letter>": few letters, so ids come back
    symbol: str  # "L" (linear), "I" (inverse) or "?" (no such contract)
    side: int
    quantity: str
    takeover: str
    close: str
    margin: int
    cycle: str
    account_id: int = 7
    invalid: int | None = None  # a row of INVALID applied last

    def request(self, tag: str) -> pb.RecordLiquidationRequest:
        symbol = {"L": f"L{tag}", "I": f"I{tag}", "?": f"Q{tag}"}[self.symbol]
        request = liq(
            f"{tag}-{self.letter}",
            symbol,
            self.side,
            self.quantity,
            self.takeover,
            self.close,
            self.margin,
            self.cycle,
        )
        request.account_id = self.account_id
        if self.invalid is not None:
            request = changed(request, **INVALID[self.invalid][1])
        return request


def _decimal(digits: int, places: int) -> str:
    """digits / 10**places written plainly, trailing zeros kept (another spelling)."""
    text = str(digits).rjust(places + 1, "0")
    return f"{text[:-places]}.{text[-places:]}" if places else text


def decimals(top: int, places: int) -> st.SearchStrategy[str]:
    return st.builds(_decimal, st.integers(1, top), st.integers(0, places))


def respelled(text: str) -> str:
    return text + "0" if "." in text else text + ".0"


@st.composite
def specs(draw: st.DrawFn) -> list[Spec]:
    # mostly a few items; sometimes enough that a batch's rows go by COPY on PostgreSQL
    count = draw(st.one_of(st.integers(1, 24), st.integers(64, 120)))
    made: list[Spec] = []
    for _ in range(count):
        how = draw(st.sampled_from(["new"] * 4 + ["repeat", "respelled", "even", "invalid"]))
        if how in ("repeat", "respelled") and made:
            earlier = draw(st.sampled_from(made))
            if how == "respelled":
                earlier = replace(earlier, quantity=respelled(earlier.quantity))
            made.append(earlier)
            continue
        takeover = draw(decimals(10**9, 6))
        spec = Spec(
            letter=draw(st.sampled_from("abcdefgh")),
            symbol=draw(st.sampled_from("LLLIII?")),
            side=draw(st.sampled_from([LONG, SHORT])),
            quantity=draw(decimals(10**6, 4)),
            takeover=takeover,
            close=takeover if how == "even" else draw(decimals(10**9, 6)),
            margin=0
            if how == "even"
            else draw(st.one_of(st.integers(0, 10**7), st.sampled_from([2**62, INT64_MAX]))),
            cycle=draw(st.sampled_from(["c1", "c1", "c2", CLOSED])),
            account_id=draw(st.sampled_from([7, 7, 2**63, 2**64 - 1])),
            invalid=draw(st.integers(0, len(INVALID) - 1)) if how == "invalid" else None,
        )
        made.append(spec)
    return made


@dataclass(frozen=True)
class Market:
    scale: int
    linear_multiplier: str
    inverse_multiplier: str


markets = st.builds(
    Market,
    st.integers(0, 8),
    st.sampled_from(["1", "0.001", "0.5", "25"]),
    st.sampled_from(["1", "100", "0.01"]),
)


def open_market(client: Client, tag: str, market: Market) -> str:
    currency = f"H{tag}"
    client.admin.CreateCurrency(pb.CreateCurrencyRequest(code=currency, scale=market.scale))
    for symbol, kind, multiplier in (
        (f"L{tag}", LINEAR, market.linear_multiplier),
        (f"I{tag}", INVERSE, market.inverse_multiplier),
    ):
        client.admin.UpsertContract(
            pb.UpsertContractRequest(
                symbol=symbol, margin_currency=currency, kind=kind, multiplier=multiplier
            )
        )
    close_empty_cycle(client, CLOSED, currency)
    return currency


def cut(
    items: list[pb.RecordLiquidationRequest], sizes: list[int]
) -> list[list[pb.RecordLiquidationRequest]]:
    """The items in consecutive batches of the sizes (cycled), the last holding the rest."""
    batches: list[list[pb.RecordLiquidationRequest]] = []
    start = 0
    for size in itertools.cycle(sizes):
        if start >= len(items):
            return batches
        batches.append(list(items[start : start + size]))
        start += size
    raise AssertionError("unreachable")


@pytest.mark.parametrize("backend", BACKENDS)
def test_property_batches_equal_unary_calls(backend: str, tmp_path: Path) -> None:
    """Random liquidations (profits, losses, break-evens, invalid ones, ids repeated with the
    same and with other content, closed cycles, the fund's bound), one by one through the
    unary call on one server and cut into batches of random sizes on another: the same
    outcomes, and the same ledger. Each example trades in a currency and contracts of its own,
    so the examples share the two servers without seeing each other."""
    examples = itertools.count()
    seen_codes: set[int] = set()
    seen_outcomes: set[int] = set()
    with (
        serving(backend, tmp_path / "unary") as (unary, unary_url),
        serving(backend, tmp_path / "batch") as (batch, batch_url),
    ):

        @settings(max_examples=25, deadline=None, database=None)
        @given(
            market=markets,
            items=specs(),
            sizes=st.lists(st.one_of(st.integers(1, 9), st.integers(64, 130)), min_size=1),
        )
        def check(market: Market, items: list[Spec], sizes: list[int]) -> None:
            tag = str(next(examples))
            currency = open_market(unary, tag, market)
            assert open_market(batch, tag, market) == currency
            requests = [spec.request(tag) for spec in items]
            want = [record_unary(unary, request) for request in requests]
            got = [o for part in cut(requests, sizes) for o in record_batch(batch, part)]
            assert len(got) == len(want)
            for index, (g, w) in enumerate(zip(got, want, strict=True)):
                assert_outcome_shape(g)
                try:
                    assert_same_outcome(g, w)
                except AssertionError as error:
                    raise AssertionError(f"item {index}: batch {g} unary {w}") from error
                seen_codes.add(g.code)
                seen_outcomes.add(g.result.outcome)
            assert ledger_rows(batch_url, currency) == ledger_rows(unary_url, currency)

        check()
    # The examples did reach every kind of outcome (else the property proved little).
    assert {0, 3, 5, 6, 9} <= seen_codes
    assert {pb.OUTCOME_FUND_INFLOW, pb.OUTCOME_SYSTEM_LOSS, pb.OUTCOME_BREAK_EVEN} <= seen_outcomes
