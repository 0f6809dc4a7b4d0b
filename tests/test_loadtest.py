"""`ledger loadtest` (issue 12, item 2): the console script against a real server.

Each scenario runs for about a second and its `--json` report is checked against the ledger
itself: every liquidation the report counts as recorded is in the load's open cycles, every
close it counts is a closed cycle, nothing failed; `--processes 2` spreads the callers and
still counts every call; the table without `--json` names each RPC with its latency columns;
a refused load (no token on a server with an auth file) exits 1 with the status on stderr.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ledger.api.v1 import insurance_pb2 as pb
from ledger.server.app import LedgerServer, Settings
from tests.conftest import Client
from tests.test_auth import TOKENS, auth_toml, role_tokens
from tests.test_cli import Ran, connect, ledger

SECONDS = "1"


def report_of(ran: Ran) -> dict[str, Any]:
    assert ran.code == 0, ran
    lines = [line for line in ran.out.splitlines() if line.strip()]
    assert len(lines) == 1, ran.out
    report: dict[str, Any] = json.loads(lines[0])
    assert report["errors"] == {} and report["item_errors"] == {}, report
    return report


def recorded_in_open_cycles(rpc: Client, currency: str) -> int:
    cycles = rpc.query.ListOpenCycles(pb.ListOpenCyclesRequest(currency=currency)).cycles
    return sum(c.liquidations_count for c in cycles)


def closed_cycles(rpc: Client, currency: str) -> int:
    reply = rpc.query.ListCycles(pb.ListCyclesRequest(currency=currency, page_size=1000))
    assert not reply.next_page_token
    return sum(1 for c in reply.cycles if c.state == pb.CYCLE_STATE_CLOSED)


@pytest.fixture
def rpc(server: LedgerServer) -> Iterator[Client]:
    client = connect(server)
    try:
        yield client
    finally:
        client.channel.close()


def test_liquidations_and_batch_are_all_recorded(server: LedgerServer, rpc: Client) -> None:
    unary = report_of(
        ledger(server.port, "loadtest", "liquidations", "--seconds", SECONDS, "--callers", "4",
               "--currency", "LA", "--json")
    )  # fmt: skip
    assert unary["scenario"] == "liquidations" and unary["callers"] == 4
    stats = unary["rpcs"]["RecordLiquidation"]
    assert stats["calls"] > 0 and stats["items"] == stats["calls"]
    latency = stats["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert recorded_in_open_cycles(rpc, "LA") == stats["calls"]

    batch = report_of(
        ledger(server.port, "loadtest", "batch", "--seconds", SECONDS, "--callers", "2",
               "--batch-size", "50", "--currency", "LB", "--json")
    )  # fmt: skip
    stats = batch["rpcs"]["RecordLiquidations"]
    assert stats["calls"] > 0 and stats["items"] == 50 * stats["calls"]
    assert recorded_in_open_cycles(rpc, "LB") == stats["items"]
    # The fund the load set up holds its seed and the liquidations' results: never negative.
    assert rpc.query.GetFund(pb.GetFundRequest(currency="LB")).balance > 0


def test_close_and_mixed(server: LedgerServer, rpc: Client) -> None:
    close = report_of(
        ledger(server.port, "loadtest", "close", "--seconds", SECONDS, "--callers", "1",
               "--positions", "20000", "--distribution", "flat", "--currency", "LC", "--json")
    )  # fmt: skip
    stats = close["rpcs"]["CloseCycle"]
    assert stats["calls"] > 0 and stats["items"] == 20_000 * stats["calls"]
    assert closed_cycles(rpc, "LC") == stats["calls"]

    mixed = report_of(
        ledger(server.port, "loadtest", "mixed", "--seconds", SECONDS, "--callers", "2",
               "--positions", "5000", "--batch-size", "20", "--currency", "LM", "--json")
    )  # fmt: skip
    rpcs = mixed["rpcs"]
    assert {"RecordLiquidation", "RecordLiquidations", "CloseCycle"} <= set(rpcs), rpcs
    assert all(r["calls"] > 0 for r in rpcs.values()), rpcs
    assert closed_cycles(rpc, "LM") == rpcs["CloseCycle"]["calls"]
    # What was recorded is either still open or was closed by the load's closer.
    recorded = rpcs["RecordLiquidation"]["items"] + rpcs["RecordLiquidations"]["items"]
    assert recorded_in_open_cycles(rpc, "LM") <= recorded


def test_processes_and_the_table(server: LedgerServer, rpc: Client) -> None:
    spread = report_of(
        ledger(server.port, "loadtest", "liquidations", "--seconds", SECONDS, "--callers", "4",
               "--processes", "2", "--currency", "LP", "--json")
    )  # fmt: skip
    assert spread["processes"] == 2
    assert recorded_in_open_cycles(rpc, "LP") == spread["rpcs"]["RecordLiquidation"]["calls"]

    ran = ledger(server.port, "loadtest", "batch", "--seconds", SECONDS, "--callers", "1",
                 "--batch-size", "10", "--currency", "LT")  # fmt: skip
    assert ran.code == 0, ran
    for header in ("rpc", "calls/s", "items/s", "p50 ms", "p90 ms", "p99 ms", "max ms"):
        assert header in ran.out, ran.out
    assert "RecordLiquidations" in ran.out

    ran = ledger(server.port, "loadtest", "sideways", "--seconds", SECONDS)
    assert ran.code == 2 and "SCENARIO 'sideways' is not one of" in ran.err, ran


def test_a_refused_load_exits_1_with_the_status(database_url: str, tmp_path: Path) -> None:
    auth_file = tmp_path / "auth.toml"
    auth_file.write_text(auth_toml(role_tokens()))
    server = LedgerServer(
        Settings(listen="127.0.0.1:0", database_url=database_url, auth_file=str(auth_file))
    )
    server.start()
    try:
        ran = ledger(server.port, "loadtest", "liquidations", "--seconds", SECONDS)
        assert ran.code == 1 and "UNAUTHENTICATED" in ran.err, ran
        ran = ledger(server.port, "loadtest", "liquidations", "--seconds", SECONDS,
                     env={"LEDGER_TOKEN": TOKENS["reader"]})  # fmt: skip
        assert ran.code == 2 and "ledger currency create LT" in ran.err, ran
        # A clearing token before an admin set the load up: told how, nothing sent.
        ran = ledger(server.port, "loadtest", "liquidations", "--seconds", SECONDS,
                     env={"LEDGER_TOKEN": TOKENS["clearing"]})  # fmt: skip
        assert ran.code == 2 and "run the load once with an admin token" in ran.err, ran
        # An admin sets the load up, but may not post liquidations (Clearing): every call
        # fails, the report says so by status, and the exit is 1.
        ran = ledger(server.port, "loadtest", "liquidations", "--seconds", SECONDS, "--json",
                     env={"LEDGER_TOKEN": TOKENS["admin"]})  # fmt: skip
        assert ran.code == 1, ran
        report = json.loads(ran.out.strip().splitlines()[-1])
        assert set(report["errors"]) == {"PERMISSION_DENIED"}, report
        # Set up now: a clearing token loads, and every call is recorded.
        ran = ledger(server.port, "loadtest", "liquidations", "--seconds", SECONDS, "--json",
                     env={"LEDGER_TOKEN": TOKENS["clearing"]})  # fmt: skip
        stats = report_of(ran)["rpcs"]["RecordLiquidation"]
        assert stats["calls"] > 0 and stats["items"] == stats["calls"]
        # A reader may not post: every call refused, counted by status.
        ran = ledger(server.port, "loadtest", "liquidations", "--seconds", SECONDS, "--json",
                     env={"LEDGER_TOKEN": TOKENS["reader"]})  # fmt: skip
        assert ran.code == 1, ran
        assert set(json.loads(ran.out.strip().splitlines()[-1])["errors"]) == {"PERMISSION_DENIED"}
    finally:
        server.stop()
