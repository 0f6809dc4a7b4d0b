"""The CLI commands of issue 13's RPCs, as subprocesses against a real server (both backends).

`contract list`, `policy show|history`, `liquidation show|reverse`, `cycle list|open|explain`:
each `--json` output equals the RPC's reply as protobuf JSON (written here, not imported from
the CLI), each table shows the numbers at the currency's scale, and each refusal prints the
status on stderr with exit 1 (2 for INVALID_ARGUMENT and usage errors), writing nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ledger.api.v1 import insurance_pb2 as pb
from ledger.server.app import LedgerServer
from tests import cycle_streams as cs
from tests.conftest import Client
from tests.test_cli import as_json, connect, ledger


@pytest.fixture
def rpc(server: LedgerServer) -> Iterator[Client]:
    client = connect(server)
    try:
        yield client
    finally:
        client.channel.close()


def usd_market(rpc: Client) -> None:
    """USD at scale 2 with a linear contract of multiplier 1, a fund of 50.00."""
    rpc.admin.CreateCurrency(pb.CreateCurrencyRequest(code="USD", scale=2))
    rpc.admin.UpsertContract(
        pb.UpsertContractRequest(
            symbol="XUSD", margin_currency="USD", kind=pb.CONTRACT_KIND_LINEAR, multiplier="1"
        )
    )
    rpc.admin.TransferFund(
        pb.TransferFundRequest(
            transfer_id="d1",
            currency="USD",
            direction=pb.TRANSFER_DIRECTION_DEPOSIT,
            amount=5_000,
        )
    )


def loss(rpc: Client, lid: str, cycle_id: str, cents: int) -> pb.LiquidationResult:
    """A LONG of `cents` hundredths taken over at 2 and closed at 1: a loss of `cents`."""
    return rpc.clearing.RecordLiquidation(
        pb.RecordLiquidationRequest(
            liquidation_id=lid,
            cycle_id=cycle_id,
            symbol="XUSD",
            account_id=7,
            position_id=70,
            side=pb.SIDE_LONG,
            quantity=str(cents / 100),
            takeover_price="2",
            close_price="1",
        )
    )


def single(port: int, *args: str) -> dict:
    ran = ledger(port, *args, "--json")
    assert ran.code == 0, ran
    lines = ran.json_lines()
    assert len(lines) == 1, ran.out
    return lines[0]


def test_contracts_and_policies(server: LedgerServer, rpc: Client) -> None:
    usd_market(rpc)
    port = server.port
    assert single(port, "contract", "list") == as_json(
        rpc.query.ListContracts(pb.ListContractsRequest())
    )
    ran = ledger(port, "contract", "list", "--currency", "USD")
    assert ran.code == 0 and "XUSD" in ran.out and "linear" in ran.out, ran
    ran = ledger(port, "policy", "set", "USD", "--insurance-share", "0.25",
                 "--coverage-ratio", "0.9", "--ranking", "account")  # fmt: skip
    assert ran.code == 0 and "account" in ran.out, ran
    assert single(port, "policy", "show", "USD") == as_json(
        rpc.query.GetPolicy(pb.GetPolicyRequest(currency="USD"))
    )
    history = single(port, "policy", "history", "USD")
    assert history == as_json(rpc.query.ListPolicies(pb.ListPoliciesRequest(currency="USD")))
    assert [p["ranking"] for p in history["policies"]] == ["RANKING_POSITION", "RANKING_ACCOUNT"]
    ran = ledger(port, "policy", "history", "USD")
    assert ran.code == 0 and "0.25" in ran.out and "position" in ran.out, ran

    ran = ledger(port, "policy", "set", "USD", "--insurance-share", "0.25",
                 "--coverage-ratio", "0.9", "--ranking", "by-size")  # fmt: skip
    assert ran.code == 2 and "--ranking 'by-size' is not position or account" in ran.err, ran
    ran = ledger(port, "policy", "show", "EUR")
    assert ran.code == 1 and "ledger: NOT_FOUND: " in ran.err, ran
    after = rpc.query.ListPolicies(pb.ListPoliciesRequest(currency="USD")).policies
    assert len(after) == 2, "a refused command wrote a policy"


def test_liquidations_shown_and_reversed(server: LedgerServer, rpc: Client) -> None:
    usd_market(rpc)
    port = server.port
    loss(rpc, "L1", "c1", 1_234)
    shown = single(port, "liquidation", "show", "L1")
    assert shown == as_json(rpc.query.GetLiquidation(pb.GetLiquidationRequest(liquidation_id="L1")))
    ran = ledger(port, "liquidation", "show", "L1")
    assert ran.code == 0 and "-12.34" in ran.out and "reversed" in ran.out, ran
    opened = single(port, "cycle", "open", "--currency", "USD")
    assert opened == as_json(rpc.query.ListOpenCycles(pb.ListOpenCyclesRequest(currency="USD")))
    ran = ledger(port, "cycle", "open", "--currency", "USD")
    assert ran.code == 0 and "12.34" in ran.out, ran

    reversed_entry = single(port, "liquidation", "reverse", "L1", "--reason", "wrong price")
    assert rpc.query.GetLiquidation(pb.GetLiquidationRequest(liquidation_id="L1")).reversed
    again = single(port, "liquidation", "reverse", "L1", "--reason", "wrong price")
    assert again == reversed_entry, "a repeat is the same entry"
    assert reversed_entry["reverses"] == str(
        rpc.query.GetLiquidation(pb.GetLiquidationRequest(liquidation_id="L1")).result.entry_id
    )
    ran = ledger(port, "liquidation", "reverse", "L9", "--reason", "typo")
    assert ran.code == 1 and "ledger: NOT_FOUND: " in ran.err, ran
    ran = ledger(port, "liquidation", "show", "L9")
    assert ran.code == 1 and "ledger: NOT_FOUND: " in ran.err, ran


def test_cycles_listed_and_explained(server: LedgerServer, rpc: Client) -> None:
    usd_market(rpc)
    port = server.port
    for number in (1, 2):
        loss(rpc, f"L{number}", f"c{number}", 10_000)
        cs.close(
            rpc.channel,
            f"c{number}",
            "USD",
            cs.Positions.of([(1, 11, 6_000), (2, 12, 3_000), (3, 13, 900), (4, 14, -50)]),
        )
    ran = ledger(port, "cycle", "list", "--currency", "USD", "--json")
    assert ran.code == 0, ran
    assert ran.json_lines() == [
        as_json(rpc.query.ListCycles(pb.ListCyclesRequest(currency="USD", page_size=100)))
    ]
    ran = ledger(port, "cycle", "list", "--currency", "USD", "--limit", "1", "--json")
    assert [c["cycle_id"] for line in ran.json_lines() for c in line["cycles"]] == ["c2"], ran
    ran = ledger(port, "cycle", "list", "--currency", "USD")
    assert ran.code == 0 and "c1" in ran.out and "c2" in ran.out, ran

    request = pb.ExplainAllocationRequest(cycle_id="c1", currency="USD", position_id=2)
    assert single(port, "cycle", "explain", "c1", "--currency", "USD", "--position", "2") == (
        as_json(rpc.query.ExplainAllocation(request))
    )
    ran = ledger(port, "cycle", "explain", "c1", "--currency", "USD", "--position", "2")
    assert ran.code == 0 and "30.00" in ran.out and "rank" in ran.out, ran
    ran = ledger(port, "cycle", "explain", "c1", "--currency", "USD", "--position", "9")
    assert ran.code == 1 and "ledger: NOT_FOUND: position 9" in ran.err, ran
    ran = ledger(port, "cycle", "explain", "c1", "--currency", "USD", "--position", "-1")
    assert ran.code == 2, ran


def test_a_cycle_reversed_and_closed_again(server: LedgerServer, rpc: Client) -> None:
    usd_market(rpc)
    port = server.port
    loss(rpc, "L1", "c1", 10_000)
    rows = cs.Positions.of([(1, 11, 6_000), (2, 12, 3_000), (3, 13, 900), (4, 14, -50)])
    cs.close(rpc.channel, "c1", "USD", rows)
    ran = ledger(port, "cycle", "reverse", "c1", "--currency", "USD", "--reason", "wrong file")
    assert ran.code == 0, ran
    assert "REVERSED" in ran.out and "80.00" in ran.out, ran  # the allocated total given back
    reversed_ = rpc.query.GetCycle(pb.GetCycleRequest(cycle_id="c1", currency="USD"))
    assert reversed_.state == pb.CYCLE_STATE_REVERSED
    again = single(port, "cycle", "reverse", "c1", "--currency", "USD", "--reason", "again")
    assert again == as_json(reversed_)  # a repeat: the same summary
    cs.close(rpc.channel, "c1", "USD", rows)
    ran = ledger(port, "cycle", "list", "--currency", "USD")
    assert ran.code == 0 and "REVERSED" in ran.out and "CLOSED" in ran.out, ran
    shown = single(port, "cycle", "show", "c1", "--currency", "USD", "--version", "1")
    assert shown == as_json(reversed_)
    ran = ledger(port, "cycle", "reverse", "c9", "--currency", "USD", "--reason", "typo")
    assert ran.code == 1 and "ledger: NOT_FOUND: " in ran.err, ran
