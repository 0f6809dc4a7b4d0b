"""The read APIs and ReverseLiquidation of issue 13 through a real server, on SQLite and
PostgreSQL.

Proves, each as a table of cases with their statuses: GetPolicy is the policy in force and
ListPolicies every version oldest first; ListContracts lists a currency's contracts (or all)
by symbol; GetLiquidation gives back the request as recorded, the unary call's own result,
when it was recorded and whether it was reversed; ListCycles pages through every close newest
first, each close once; ListOpenCycles lists the cycles with liquidations and no close in
force, with their loss, count and first and last times. ReverseLiquidation posts the opposite
of the entry in an open cycle, naming it, takes the loss out of the cycle, keeps the id taken
and returns the same entry on a repeat; a closed cycle, a break-even, a fund that cannot give
back an inflow, an unknown id and a bad reason are each refused with their status, naming what
is wrong, and write nothing. The expectations are written from the requests, not from the
server's code.
"""

from __future__ import annotations

import time

import grpc
import pytest

from ledger.api.v1 import insurance_pb2 as pb
from tests import cycle_streams as cs
from tests import test_cycle as tc
from tests.conftest import Client
from tests.ledger_db import snapshot

JPY, KRW = tc.JPY, tc.KRW
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED = grpc.StatusCode.FAILED_PRECONDITION
ALREADY = grpc.StatusCode.ALREADY_EXISTS


def rejected_writing_nothing(
    database_url: str, call: object, code: grpc.StatusCode, *words: str
) -> None:
    before = snapshot(database_url)
    tc.assert_rejected(call, code, *words)  # type: ignore[arg-type]
    assert snapshot(database_url) == before


def loss_request(
    lid: str, cycle_id: str, loss: int, symbol: str = "XJPY"
) -> pb.RecordLiquidationRequest:
    """A LONG of `loss` taken over at 2 and closed at 1: a loss of `loss` yen."""
    return pb.RecordLiquidationRequest(
        liquidation_id=lid,
        cycle_id=cycle_id,
        symbol=symbol,
        account_id=2**64 - 1,
        position_id=2**63 + 5,
        side=pb.SIDE_LONG,
        quantity=str(loss),
        takeover_price="2",
        close_price="1",
        remaining_margin=0,
    )


# --- policies and contracts ----------------------------------------------------------------


def test_policies_in_force_and_every_version(client: Client, database_url: str) -> None:
    tc.market(client)
    policy = client.query.GetPolicy(pb.GetPolicyRequest(currency=JPY))
    assert (policy.currency, policy.insurance_share, policy.coverage_ratio, policy.version) == (
        JPY,
        "0.2",
        "0.9",
        1,
    )
    assert policy.ranking == pb.RANKING_POSITION
    client.admin.SetPolicy(
        pb.SetPolicyRequest(currency=JPY, insurance_share="0.35", coverage_ratio="0.8")
    )
    client.admin.SetPolicy(
        pb.SetPolicyRequest(currency=JPY, insurance_share="0.35", coverage_ratio="0.8", ranking=2)
    )
    now = client.query.GetPolicy(pb.GetPolicyRequest(currency=JPY))
    assert (now.insurance_share, now.coverage_ratio, now.version, now.ranking) == (
        "0.35",
        "0.8",
        3,
        pb.RANKING_ACCOUNT,
    )
    every = client.query.ListPolicies(pb.ListPoliciesRequest(currency=JPY)).policies
    assert [(p.version, p.insurance_share, p.coverage_ratio, p.ranking) for p in every] == [
        (1, "0.2", "0.9", pb.RANKING_POSITION),
        (2, "0.35", "0.8", pb.RANKING_POSITION),
        (3, "0.35", "0.8", pb.RANKING_ACCOUNT),
    ]
    assert [
        p.version for p in client.query.ListPolicies(pb.ListPoliciesRequest(currency=KRW)).policies
    ] == [1]
    cases = [
        ("EUR", NOT_FOUND, "EUR"),
        ("jpy", INVALID, "currency"),
        ("", INVALID, "currency"),
    ]
    for currency, code, word in cases:
        tc.assert_rejected(
            lambda c=currency: client.query.GetPolicy(pb.GetPolicyRequest(currency=c)), code, word
        )
        tc.assert_rejected(
            lambda c=currency: client.query.ListPolicies(pb.ListPoliciesRequest(currency=c)),
            code,
            word,
        )


def test_contracts_of_a_currency_or_all_by_symbol(client: Client) -> None:
    tc.market(client)
    client.admin.UpsertContract(
        pb.UpsertContractRequest(
            symbol="AJPY-INV", margin_currency=JPY, kind=pb.CONTRACT_KIND_INVERSE, multiplier="100"
        )
    )
    jpy = client.query.ListContracts(pb.ListContractsRequest(currency=JPY)).contracts
    assert [(c.symbol, c.margin_currency, c.kind, c.multiplier) for c in jpy] == [
        ("AJPY-INV", JPY, pb.CONTRACT_KIND_INVERSE, "100"),
        ("XJPY", JPY, pb.CONTRACT_KIND_LINEAR, "1"),
    ]
    every = client.query.ListContracts(pb.ListContractsRequest()).contracts
    assert [c.symbol for c in every] == ["AJPY-INV", "XJPY", "XKRW"]
    tc.assert_rejected(
        lambda: client.query.ListContracts(pb.ListContractsRequest(currency="EUR")),
        NOT_FOUND,
        "EUR",
    )
    tc.assert_rejected(
        lambda: client.query.ListContracts(pb.ListContractsRequest(currency="e")),
        INVALID,
        "currency",
    )


# --- liquidations --------------------------------------------------------------------------


def test_a_liquidation_as_recorded(client: Client) -> None:
    tc.market(client)
    tc.deposit(client, "d1", 1_000)
    request = loss_request("L1", "c1", 300)
    started_us = time.time_ns() // 1000
    result = client.clearing.RecordLiquidation(request)
    stored = client.query.GetLiquidation(pb.GetLiquidationRequest(liquidation_id="L1"))
    assert stored.request == request
    assert stored.result == result
    assert (result.engine_result, result.outcome) == (-300, pb.OUTCOME_SYSTEM_LOSS)
    recorded_us = stored.recorded_at.seconds * 10**6 + stored.recorded_at.nanos // 1000
    assert started_us - 1_000_000 <= recorded_us <= time.time_ns() // 1000 + 1_000_000
    assert not stored.reversed
    client.admin.ReverseLiquidation(pb.ReverseLiquidationRequest(liquidation_id="L1"))
    assert client.query.GetLiquidation(pb.GetLiquidationRequest(liquidation_id="L1")).reversed
    for lid, code, word in (("L9", NOT_FOUND, "L9"), ("", INVALID, "liquidation_id")):
        tc.assert_rejected(
            lambda i=lid: client.query.GetLiquidation(pb.GetLiquidationRequest(liquidation_id=i)),
            code,
            word,
        )


def test_reverse_liquidation_rules(client: Client, database_url: str) -> None:
    tc.market(client)
    tc.deposit(client, "d1", 1_000)
    client.clearing.RecordLiquidation(loss_request("L1", "c1", 300))
    client.clearing.RecordLiquidation(loss_request("L2", "c1", 200))
    tc.liquidate(client, "P1", "c1", 700)  # a fund inflow of 700
    tc.liquidate(client, "P2", "c1", 50)
    client.clearing.RecordLiquidation(
        pb.RecordLiquidationRequest(
            liquidation_id="B1",
            cycle_id="c1",
            symbol="XJPY",
            side=pb.SIDE_LONG,
            quantity="5",
            takeover_price="2",
            close_price="2",
        )
    )
    client.clearing.RecordLiquidation(loss_request("C1", "closed", 100))
    cs.close(client.channel, "closed", JPY, cs.Positions.of([(1, 1, 500)]))

    # A loss reversed: the opposite entry, naming it; the cycle's loss no longer counts it.
    original = client.query.GetLiquidation(pb.GetLiquidationRequest(liquidation_id="L1"))
    entry = client.admin.ReverseLiquidation(
        pb.ReverseLiquidationRequest(liquidation_id="L1", reason="wrong price")
    )
    assert entry.reverses == original.result.entry_id
    assert (entry.kind, entry.reference, entry.memo) == (
        pb.ENTRY_KIND_LIQUIDATION_LOSS,
        "L1",
        "wrong price",
    )
    assert tc.postings(entry) == {"system_loss": 300, "liquidation_engine": -300}
    (open_cycle,) = [
        c
        for c in client.query.ListOpenCycles(pb.ListOpenCyclesRequest(currency=JPY)).cycles
        if c.cycle_id == "c1"
    ]
    assert open_cycle.loss_total == 200
    # A repeat returns the same entry and writes nothing; the id stays taken.
    before = snapshot(database_url)
    again = client.admin.ReverseLiquidation(
        pb.ReverseLiquidationRequest(liquidation_id="L1", reason="other words")
    )
    assert again == entry
    assert client.clearing.RecordLiquidation(loss_request("L1", "c1", 300)) == original.result
    assert snapshot(database_url) == before
    tc.assert_rejected(
        lambda: client.clearing.RecordLiquidation(loss_request("L1", "c1", 301)), ALREADY, "L1"
    )

    # An inflow reversed takes it back from the fund: 1,000 + 700 + 50, less the cover of
    # the closed cycle (20% of its 100), less 700.
    inflow = client.admin.ReverseLiquidation(pb.ReverseLiquidationRequest(liquidation_id="P1"))
    assert tc.postings(inflow) == {"insurance_fund": -700, "liquidation_engine": 700}
    assert tc.fund_balance(client) == 1_030
    client.admin.TransferFund(
        pb.TransferFundRequest(
            transfer_id="w1",
            currency=JPY,
            direction=pb.TRANSFER_DIRECTION_WITHDRAW,
            amount=1_000,
        )
    )  # 30 left: P2's 50 cannot be given back

    def reverse(lid: str, reason: str = "") -> object:
        return lambda: client.admin.ReverseLiquidation(
            pb.ReverseLiquidationRequest(liquidation_id=lid, reason=reason)
        )

    cases = [
        (reverse("P2"), FAILED, "insurance_fund"),
        (reverse("C1"), FAILED, "closed"),
        (reverse("B1"), FAILED, "broke even"),
        (reverse("L9"), NOT_FOUND, "L9"),
        (reverse(""), INVALID, "liquidation_id"),
        (reverse("L2", "x" * 1025), INVALID, "reason"),
    ]
    for call, code, word in cases:
        rejected_writing_nothing(database_url, call, code, word)
    assert tc.fund_balance(client) == 30


# --- cycles --------------------------------------------------------------------------------


def test_list_cycles_pages_newest_first(client: Client, database_url: str) -> None:
    tc.market(client)
    names = [f"c{n}" for n in range(7)]
    for name in names:
        client.clearing.RecordLiquidation(loss_request(f"L-{name}", name, 10))
        cs.close(client.channel, name, JPY, cs.Positions.of([(1, 1, 100)]))
    client.clearing.RecordLiquidation(loss_request("L-k", "k1", 10, "XKRW"))
    cs.close(client.channel, "k1", KRW, cs.Positions.of([(1, 1, 100)]))
    seen: list[str] = []
    token = ""
    while True:
        page = client.query.ListCycles(
            pb.ListCyclesRequest(currency=JPY, page_size=3, page_token=token)
        )
        assert len(page.cycles) <= 3
        seen += [c.cycle_id for c in page.cycles]
        assert all(c.state == pb.CYCLE_STATE_CLOSED and c.version == 1 for c in page.cycles)
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(names))
    default = client.query.ListCycles(pb.ListCyclesRequest(currency=JPY))
    assert [c.cycle_id for c in default.cycles] == list(reversed(names))
    assert default.next_page_token == ""
    assert default.cycles[0] == tc.get_cycle(client, "c6")
    krw = client.query.ListCycles(pb.ListCyclesRequest(currency=KRW)).cycles
    assert [c.cycle_id for c in krw] == ["k1"]
    cases = [
        (pb.ListCyclesRequest(currency=JPY, page_size=1001), INVALID, "page_size"),
        (pb.ListCyclesRequest(currency=JPY, page_token="nope"), INVALID, "page_token"),
        (pb.ListCyclesRequest(currency=JPY, page_token="\u00b2.1"), INVALID, "page_token"),
        (pb.ListCyclesRequest(currency=JPY, page_token="1.\u0662"), INVALID, "page_token"),
        (pb.ListCyclesRequest(currency=JPY, page_token=f"{2**63}.1"), INVALID, "page_token"),
        (pb.ListCyclesRequest(currency=JPY, page_token="1." + "9" * 19), INVALID, "page_token"),
        (pb.ListCyclesRequest(currency=JPY, page_token="1"), INVALID, "page_token"),
        (pb.ListCyclesRequest(currency="EUR"), NOT_FOUND, "EUR"),
        (pb.ListCyclesRequest(currency="x"), INVALID, "currency"),
    ]
    for request, code, word in cases:
        tc.assert_rejected(lambda r=request: client.query.ListCycles(r), code, word)


def test_list_open_cycles(client: Client) -> None:
    tc.market(client)
    before_us = time.time_ns() // 1000
    client.clearing.RecordLiquidation(loss_request("A1", "a", 100))
    tc.liquidate(client, "A2", "a", 40)  # a profit: counted, no loss
    client.clearing.RecordLiquidation(loss_request("A3", "a", 25))
    client.clearing.RecordLiquidation(loss_request("B1", "b", 7))
    client.clearing.RecordLiquidation(loss_request("K1", "k", 9, "XKRW"))
    client.clearing.RecordLiquidation(loss_request("Z1", "z", 5))
    cs.close(client.channel, "z", JPY, cs.Positions.of([(1, 1, 100)]))
    after_us = time.time_ns() // 1000

    def micros(stamp: object) -> int:
        return stamp.seconds * 10**6 + stamp.nanos // 1000  # type: ignore[attr-defined]

    jpy = client.query.ListOpenCycles(pb.ListOpenCyclesRequest(currency=JPY)).cycles
    assert [(c.cycle_id, c.currency, c.loss_total, c.liquidations_count) for c in jpy] == [
        ("a", JPY, 125, 3),
        ("b", JPY, 7, 1),
    ]
    a = jpy[0]
    assert before_us - 10**6 <= micros(a.first_recorded_at) <= micros(a.last_recorded_at)
    assert micros(a.last_recorded_at) <= after_us + 10**6
    every = client.query.ListOpenCycles(pb.ListOpenCyclesRequest()).cycles
    assert sorted((c.currency, c.cycle_id) for c in every) == [(JPY, "a"), (JPY, "b"), (KRW, "k")]
    # A reversed liquidation stays recorded in its open cycle; its loss no longer counts.
    client.admin.ReverseLiquidation(pb.ReverseLiquidationRequest(liquidation_id="A1"))
    client.admin.ReverseLiquidation(pb.ReverseLiquidationRequest(liquidation_id="B1"))
    jpy = client.query.ListOpenCycles(pb.ListOpenCyclesRequest(currency=JPY)).cycles
    assert [(c.cycle_id, c.loss_total, c.liquidations_count) for c in jpy] == [
        ("a", 25, 3),
        ("b", 0, 1),
    ]
    tc.assert_rejected(
        lambda: client.query.ListOpenCycles(pb.ListOpenCyclesRequest(currency="EUR")),
        NOT_FOUND,
        "EUR",
    )


@pytest.mark.parametrize("page_size", [1, 2, 1000])
def test_list_cycles_every_close_once_with_reversals(client: Client, page_size: int) -> None:
    """A reversed close and the close after it are two entries of the list, newest first."""
    tc.market(client)
    client.clearing.RecordLiquidation(loss_request("L1", "c1", 10))
    cs.close(client.channel, "c1", JPY, cs.Positions.of([(1, 1, 100)]))
    client.admin.ReverseCycle(pb.ReverseCycleRequest(cycle_id="c1", currency=JPY))
    cs.close(client.channel, "c1", JPY, cs.Positions.of([(2, 2, 100)]))
    client.clearing.RecordLiquidation(loss_request("L2", "c2", 10))
    cs.close(client.channel, "c2", JPY, cs.Positions.of([(1, 1, 100)]))
    listed: list[tuple[str, int, int]] = []
    token = ""
    while True:
        page = client.query.ListCycles(
            pb.ListCyclesRequest(currency=JPY, page_size=page_size, page_token=token)
        )
        listed += [(c.cycle_id, c.version, c.state) for c in page.cycles]
        token = page.next_page_token
        if not token:
            break
    assert listed == [
        ("c2", 1, pb.CYCLE_STATE_CLOSED),
        ("c1", 2, pb.CYCLE_STATE_CLOSED),
        ("c1", 1, pb.CYCLE_STATE_REVERSED),
    ]
