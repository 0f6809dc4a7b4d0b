"""RecordLiquidation: the engine's result for every contract kind × side, its flow into the
ledger, idempotency, closed cycles, validation, group commit under concurrent clients, and two
servers writing to one database at once.

Expected results are computed by hand in the table (with the reasoning in each row), not by
the code under test; the concurrency test recomputes the fund and the loss independently.
"""

from __future__ import annotations

import math
import random
import threading
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

import grpc
import pytest
from sqlalchemy import create_engine, text

from ledger import liquidation
from ledger.api.v1 import insurance_pb2 as pb
from ledger.currency import ContractKind
from ledger.server.app import LedgerServer, Settings
from tests.conftest import Client
from tests.ledger_db import balances_from_journal, cached_balances, snapshot

LINEAR, INVERSE = pb.CONTRACT_KIND_LINEAR, pb.CONTRACT_KIND_INVERSE
LONG, SHORT = pb.SIDE_LONG, pb.SIDE_SHORT
INFLOW, LOSS, EVEN = pb.OUTCOME_FUND_INFLOW, pb.OUTCOME_SYSTEM_LOSS, pb.OUTCOME_BREAK_EVEN


def setup_market(client: Client) -> None:
    client.admin.CreateCurrency(pb.CreateCurrencyRequest(code="USDT", scale=6))
    client.admin.CreateCurrency(pb.CreateCurrencyRequest(code="BTC", scale=8))
    client.admin.CreateCurrency(pb.CreateCurrencyRequest(code="JPY", scale=0))
    contracts = [
        ("BTCUSDT", "USDT", LINEAR, "0.001"),
        ("ETHUSDT", "USDT", LINEAR, "0.01"),
        ("BTCUSD", "BTC", INVERSE, "100"),
        ("XJPY", "JPY", LINEAR, "1"),
        ("IJPY", "JPY", INVERSE, "1"),
    ]
    for symbol, currency, kind, multiplier in contracts:
        client.admin.UpsertContract(
            pb.UpsertContractRequest(
                symbol=symbol, margin_currency=currency, kind=kind, multiplier=multiplier
            )
        )


def liq(
    lid: str,
    symbol: str,
    side: int,
    quantity: str,
    takeover: str,
    close: str,
    margin: int,
    cycle: str = "c1",
) -> pb.RecordLiquidationRequest:
    return pb.RecordLiquidationRequest(
        liquidation_id=lid,
        cycle_id=cycle,
        symbol=symbol,
        account_id=7,
        position_id=11,
        side=side,
        quantity=quantity,
        takeover_price=takeover,
        close_price=close,
        remaining_margin=margin,
    )


# (symbol, side, quantity, takeover, close, remaining_margin, engine_result, outcome)
ARITHMETIC = [
    # LINEAR LONG: (60000 − 59000) × 2 × 0.001 = −2 USDT = −2,000,000; + margin 500,000
    ("BTCUSDT", LONG, "2", "60000", "59000", 500_000, -1_500_000, LOSS),
    # LINEAR LONG, better close: (60100.5 − 60000) × 1 × 0.001 = 0.1005 USDT = 100,500
    ("BTCUSDT", LONG, "1", "60000", "60100.5", 0, 100_500, INFLOW),
    # LINEAR SHORT: (60000 − 59000) × 3 × 0.001 = 3 USDT; + margin 1 → 3,000,001
    ("BTCUSDT", SHORT, "3", "60000", "59000", 1, 3_000_001, INFLOW),
    # LINEAR SHORT, worse close: (3000 − 3000.0000001) × 1 × 0.01 = −0.000000001 USDT
    # = −0.001 minor → floor −1 (a loss is never understated)
    ("ETHUSDT", SHORT, "1", "3000", "3000.0000001", 0, -1, LOSS),
    # LINEAR LONG exact to a fraction: (3000.0000001 − 3000) × 1 × 0.01 = 0.001 minor → 0
    ("ETHUSDT", LONG, "1", "3000", "3000.0000001", 0, 0, EVEN),
    # LINEAR in a scale-0 currency: (100 − 99.5) × 3 × 1 = 1.5 JPY → floor 1; margin 0
    ("XJPY", LONG, "3", "99.5", "100", 0, 1, INFLOW),
    # ... and the short of it: −1.5 → floor −2; margin 2 → 0, break-even
    ("XJPY", SHORT, "3", "99.5", "100", 2, 0, EVEN),
    # INVERSE LONG: 1 × 100 × (1/50000 − 1/40000) = −0.0005 BTC = −50,000 sat
    ("BTCUSD", LONG, "1", "50000", "40000", 0, -50_000, LOSS),
    # INVERSE SHORT: 10 × 100 × (1/40000 − 1/50000) = 0.005 BTC = 500,000 sat; + 7
    ("BTCUSD", SHORT, "10", "50000", "40000", 7, 500_007, INFLOW),
    # INVERSE LONG needing rounding: 1 × 100 × (1/30000 − 1/70000) = 100 × 4/210000
    # = 0.00190476190… BTC = 190476.19… sat → 190476
    ("BTCUSD", LONG, "1", "30000", "70000", 0, 190_476, INFLOW),
    # INVERSE SHORT needing rounding: the same move against the short: −190476.19… → −190477
    ("BTCUSD", SHORT, "1", "30000", "70000", 0, -190_477, LOSS),
    # INVERSE in JPY scale 0: 1 × 1 × (1/3 − 1/7) = 4/21 = 0.19… → 0; margin 5 → 5
    ("IJPY", LONG, "1", "3", "7", 5, 5, INFLOW),
    # INVERSE SHORT in JPY: −4/21 → floor −1; margin 1 → 0
    ("IJPY", SHORT, "1", "3", "7", 1, 0, EVEN),
]


@pytest.mark.parametrize(
    ("symbol", "side", "quantity", "takeover", "close", "margin", "expected", "outcome"),
    ARITHMETIC,
)
def test_engine_result_by_kind_and_side(
    client: Client,
    symbol: str,
    side: int,
    quantity: str,
    takeover: str,
    close: str,
    margin: int,
    expected: int,
    outcome: int,
) -> None:
    setup_market(client)
    result = client.clearing.RecordLiquidation(
        liq("L1", symbol, side, quantity, takeover, close, margin)
    )
    assert result.engine_result == expected
    assert result.outcome == outcome
    currency = {"BTCUSDT": "USDT", "ETHUSDT": "USDT", "BTCUSD": "BTC"}.get(symbol, "JPY")
    assert result.currency == currency
    fund = client.query.GetFund(pb.GetFundRequest(currency=currency))
    assert result.fund_balance == fund.balance == max(expected, 0)
    if outcome == EVEN:
        assert result.entry_id == 0
        return
    entries = client.query.ListEntries(
        pb.ListEntriesRequest(currency=currency, account="liquidation_engine")
    ).entries
    assert [e.entry_id for e in entries] == [result.entry_id]
    entry = entries[0]
    assert entry.reference == "L1"
    assert sum(p.amount for p in entry.postings) == 0
    postings = {p.account: p.amount for p in entry.postings}
    if outcome == INFLOW:
        assert entry.kind == pb.ENTRY_KIND_LIQUIDATION_PROFIT
        assert postings == {"liquidation_engine": -expected, "insurance_fund": expected}
    else:
        assert entry.kind == pb.ENTRY_KIND_LIQUIDATION_LOSS
        assert postings == {"system_loss": expected, "liquidation_engine": -expected}


def test_idempotent_repeat_and_conflict(client: Client, database_url: str) -> None:
    setup_market(client)
    request = liq("L1", "BTCUSDT", SHORT, "3", "60000", "59000", 0)
    first = client.clearing.RecordLiquidation(request)
    client.admin.TransferFund(
        pb.TransferFundRequest(transfer_id="d", currency="USDT", direction=1, amount=5)
    )
    before = snapshot(database_url)
    again = client.clearing.RecordLiquidation(request)
    assert again == first  # the same result, the fund balance as it was right after it
    assert snapshot(database_url) == before
    for changed in (
        liq("L1", "BTCUSDT", SHORT, "3", "60000", "59001", 0),
        liq("L1", "BTCUSDT", SHORT, "3", "60000", "59000", 1),
        liq("L1", "BTCUSDT", LONG, "3", "60000", "59000", 0),
        liq("L1", "BTCUSDT", SHORT, "3", "60000", "59000", 0, cycle="c2"),
    ):
        with pytest.raises(grpc.RpcError) as error:
            client.clearing.RecordLiquidation(changed)
        assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "L1" in error.value.details()
    assert snapshot(database_url) == before


def test_same_decimal_written_differently_is_a_repeat(client: Client) -> None:
    setup_market(client)
    first = client.clearing.RecordLiquidation(liq("L1", "BTCUSDT", SHORT, "3", "60000", "59000", 0))
    again = client.clearing.RecordLiquidation(
        liq("L1", "BTCUSDT", SHORT, "3.0", "60000.00", "59000", 0)
    )
    assert again == first


def test_closed_cycle_rejects_liquidations(client: Client, database_url: str) -> None:
    setup_market(client)
    client.clearing.RecordLiquidation(liq("L1", "BTCUSDT", LONG, "1", "100", "90", 0))
    engine = create_engine(database_url)
    # Close the cycle through the ledger's own tables; the CloseCycle RPC has its own tests.
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO cycles (currency, cycle_id, loss_total, fund_balance_before, "
                "fund_share, fund_paid, user_due, allocated_total, uncovered, positions_total, "
                "profitable_count, profit_total, participant_count, participant_profit, "
                "cutoff_pnl, widened, input_digest, insurance_share, coverage_ratio, "
                "policy_version, allocation_first_entry_id, closed_at_us) VALUES "
                "('USDT', 'c1', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, false, '', '0.2', '0.9', "
                "1, 0, 0)"
            )
        )
    engine.dispose()
    before = snapshot(database_url)
    with pytest.raises(grpc.RpcError) as error:
        client.clearing.RecordLiquidation(liq("L2", "BTCUSDT", LONG, "1", "100", "90", 0))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "c1" in error.value.details()
    assert snapshot(database_url) == before
    # Another currency's cycle of the same name is still open.
    client.clearing.RecordLiquidation(liq("L3", "BTCUSD", LONG, "1", "100", "90", 0))


INVALID = [
    ("liquidation_id", {"liquidation_id": ""}, grpc.StatusCode.INVALID_ARGUMENT),
    ("cycle_id", {"cycle_id": ""}, grpc.StatusCode.INVALID_ARGUMENT),
    ("symbol", {"symbol": ""}, grpc.StatusCode.INVALID_ARGUMENT),
    ("side", {"side": pb.SIDE_UNSPECIFIED}, grpc.StatusCode.INVALID_ARGUMENT),
    ("quantity", {"quantity": "0"}, grpc.StatusCode.INVALID_ARGUMENT),
    ("quantity", {"quantity": "-1"}, grpc.StatusCode.INVALID_ARGUMENT),
    ("quantity", {"quantity": "1e3"}, grpc.StatusCode.INVALID_ARGUMENT),
    ("quantity", {"quantity": "\u0661\u0662"}, grpc.StatusCode.INVALID_ARGUMENT),  # Arabic-Indic 12
    ("quantity", {"quantity": ""}, grpc.StatusCode.INVALID_ARGUMENT),
    ("takeover_price", {"takeover_price": "0"}, grpc.StatusCode.INVALID_ARGUMENT),
    (
        "takeover_price",
        {"takeover_price": "0.0000000000000000001"},
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    ("close_price", {"close_price": "-5"}, grpc.StatusCode.INVALID_ARGUMENT),
    ("close_price", {"close_price": "1,5"}, grpc.StatusCode.INVALID_ARGUMENT),
    ("remaining_margin", {"remaining_margin": -1}, grpc.StatusCode.INVALID_ARGUMENT),
    (
        "engine_result",
        {"quantity": "100000000000000", "close_price": "99999999999"},
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    ("symbol", {"symbol": "NOPE"}, grpc.StatusCode.NOT_FOUND),
]


def _reference_result(
    kind: int, side: int, q: str, takeover: str, close: str, m: str, margin: int, scale: int
) -> int:
    """The rule as written, in Fractions: slow and obviously right."""
    fq, fm, ft, fc = Fraction(q), Fraction(m), Fraction(takeover), Fraction(close)
    if kind == LINEAR:
        pnl = (fc - ft if side == LONG else ft - fc) * fq * fm
    else:
        pnl = fq * fm * ((1 / ft - 1 / fc) if side == LONG else (1 / fc - 1 / ft))
    return margin + math.floor(pnl * 10**scale)


def _decimal_text(rng: random.Random) -> str:
    whole, places = rng.randint(0, 10**6), rng.randint(0, 18)
    text = str(whole) + ("." + str(rng.randint(0, 10**places - 1)).zfill(places) if places else "")
    return text if Decimal(text) > 0 else "1"


def test_engine_result_matches_the_fraction_reference() -> None:
    rng = random.Random(11)
    for _ in range(5000):
        kind, side = rng.choice([LINEAR, INVERSE]), rng.choice([LONG, SHORT])
        q, takeover, close, m = (_decimal_text(rng) for _ in range(4))
        margin, scale = rng.randint(0, 10**12), rng.randint(0, 18)
        got = liquidation.engine_result(
            ContractKind(kind),
            liquidation.Side(side),
            Decimal(q),
            Decimal(takeover),
            Decimal(close),
            Decimal(m),
            margin,
            scale,
        )
        assert got == _reference_result(kind, side, q, takeover, close, m, margin, scale)


@pytest.mark.parametrize(("field", "change", "code"), INVALID)
def test_invalid_liquidation_writes_nothing(
    client: Client, database_url: str, field: str, change: dict[str, object], code: grpc.StatusCode
) -> None:
    setup_market(client)
    request = liq("L1", "BTCUSDT", LONG, "1", "60000", "59000", 10)
    for key, value in change.items():
        setattr(request, key, value)
    before = snapshot(database_url)
    with pytest.raises(grpc.RpcError) as error:
        client.clearing.RecordLiquidation(request)
    assert error.value.code() == code
    assert field in error.value.details()
    assert snapshot(database_url) == before


@dataclass(frozen=True)
class Sent:
    request: pb.RecordLiquidationRequest
    expected: int  # engine result computed here, independently


def _expected_linear(side: int, qty: int, takeover: int, close: int, margin: int) -> int:
    # BTCUSDT: multiplier 0.001, scale 6 → pnl_minor = move × qty × 1000 (all integers here)
    move = close - takeover if side == LONG else takeover - close
    return margin + move * qty * 1000


def assert_ledger_matches(client: Client, database_url: str, by_id: dict[str, int]) -> None:
    """The fund and the cycle's loss equal the sums of the expected results, computed by the
    test; every liquidation is recorded once and posts at most one entry."""
    inflow = sum(v for v in by_id.values() if v > 0)
    loss = -sum(v for v in by_id.values() if v < 0)
    fund = client.query.GetFund(pb.GetFundRequest(currency="USDT"))
    assert fund.balance == fund.inflow_total == inflow
    journal = balances_from_journal(database_url)
    assert journal[("USDT", "insurance_fund")] == inflow
    assert journal[("USDT", "system_loss")] == -loss
    assert cached_balances(database_url)[("USDT", "system_loss")] == -loss
    engine = create_engine(database_url)
    with engine.connect() as conn:
        counts = Counter(
            r for (r,) in conn.execute(text("SELECT reference FROM entries WHERE kind IN (3, 4)"))
        )
        recorded = conn.execute(text("SELECT count(*) FROM liquidations")).scalar_one()
    engine.dispose()
    assert recorded == len(by_id)
    assert max(counts.values()) == 1
    assert len(counts) == sum(1 for v in by_id.values() if v != 0)


def _random_liquidations(rng: random.Random, prefix: str, count: int) -> list[Sent]:
    """Distinct linear BTCUSDT liquidations, profits and losses, each with the result
    computed here by hand."""
    sent: list[Sent] = []
    for n in range(count):
        side = rng.choice([LONG, SHORT])
        qty, takeover = rng.randint(1, 50), rng.randint(50_000, 70_000)
        close = takeover + rng.randint(-500, 500)
        margin = rng.randint(0, 5_000_000)
        request = liq(f"{prefix}{n}", "BTCUSDT", side, str(qty), str(takeover), str(close), margin)
        sent.append(Sent(request, _expected_linear(side, qty, takeover, close, margin)))
    return sent


def _send_concurrently(
    shares: list[tuple[str, list[Sent]]],
) -> dict[str, list[pb.LiquidationResult]]:
    """Each (target, share) is one client on its own connection sending its share in order,
    all at once; every reply, by liquidation id. Fails if any call failed."""
    results: dict[str, list[pb.LiquidationResult]] = {}
    errors: list[Exception] = []
    lock = threading.Lock()

    def worker(target: str, share: list[Sent]) -> None:
        own = Client.connect(target)
        try:
            for sent in share:
                reply = own.clearing.RecordLiquidation(sent.request, timeout=60)
                with lock:
                    results.setdefault(sent.request.liquidation_id, []).append(reply)
        except Exception as error:  # collected and failed on below
            errors.append(error)
        finally:
            own.channel.close()

    threads = [threading.Thread(target=worker, args=share) for share in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    return results


def test_concurrent_clients_with_duplicates(client: Client, database_url: str) -> None:
    """16 clients, 5,000 liquidations, a tenth of them repeats of earlier ones."""
    setup_market(client)
    rng = random.Random(4)
    unique = _random_liquidations(rng, "L", 4500)
    sends = unique + [rng.choice(unique) for _ in range(500)]
    rng.shuffle(sends)
    results = _send_concurrently([(client.target, sends[k::16]) for k in range(16)])
    by_id = {s.request.liquidation_id: s.expected for s in unique}
    for lid, replies in results.items():
        assert all(r == replies[0] for r in replies), lid
        assert replies[0].engine_result == by_id[lid]
    assert_ledger_matches(client, database_url, by_id)


def test_two_servers_on_one_database_post_each_id_once(client: Client, database_url: str) -> None:
    """Two server processes' writers (here two servers in one process, each with its own
    engine, pool and group-commit writer) receive the same liquidations at once, every id
    sent to both: each id is posted once, both servers answer it alike, and the fund and the
    system loss equal the sums computed here."""
    setup_market(client)
    other = LedgerServer(Settings(listen="127.0.0.1:0", database_url=database_url))
    other.start()
    try:
        targets = [client.target, f"127.0.0.1:{other.port}"]
        rng = random.Random(7)
        unique = _random_liquidations(rng, "M", 1500)
        shares: list[tuple[str, list[Sent]]] = []
        for target in targets:  # each server gets every id, in its own order, from 8 clients
            sends = list(unique)
            rng.shuffle(sends)
            shares += [(target, sends[k::8]) for k in range(8)]
        results = _send_concurrently(shares)
    finally:
        other.stop(grace_seconds=5)
    by_id = {s.request.liquidation_id: s.expected for s in unique}
    assert {lid: len(replies) for lid, replies in results.items()} == dict.fromkeys(by_id, 2)
    for lid, replies in results.items():
        assert replies[0] == replies[1], lid
        assert replies[0].engine_result == by_id[lid]
    assert_ledger_matches(client, database_url, by_id)
