"""The insurance-fund dashboard (issue 12, item 4): its JSON endpoints and its page.

Proves, on SQLite and PostgreSQL, against a ledger seeded through gRPC with deposits,
withdrawals, liquidation profits, losses and a break-even, and two closed cycles (one whose
every profitable position takes part, one with positions below the cut), that:

- /api/currencies lists every currency with its scale;
- /api/currencies/{code}/fund-history has one point per fund entry, equal to the points
  computed here from the raw journal rows (plain SQL, oldest first, balance from 0), with
  every amount and balance a string (exact beyond 2^53), and ?limit= keeps the newest
  points with their exact balances;
- /api/currencies/{code}/cycles lists the closed cycles newest first with their summaries
  as GetCycle gives them, and the published allocation rate;
- /api/currencies/{code}/cycles/{id}/concentration?points=N has at most N points, from
  (0, 0) to (1, 1), monotone, each exact against the cycle's positions as generated here,
  with the cut at (participants / profitable, participant profit / profit total) among them,
  the tail below the cut as one segment, and the largest allocations as StreamAllocations
  gives them;
- errors are JSON with the listed HTTP statuses (unknown currency or cycle 404, a bad
  parameter 400, an unknown endpoint 404, a write method 405);
- with an auth file a request without a token, or with an unknown or malformed one, is 401,
  a reader's token reads every Query-backed endpoint, and the page itself needs no token;
  with mutual TLS, the dashboard's own certificate never stands in for a caller;
- the dashboard reaches a TLS server through its certificate;
- an address beyond loopback without an auth file refuses to start, and stop() closes the
  port;
- in headless Chromium, the page loads with no console error, its fund chart has one point
  per fund entry, a cycle can be selected and its concentration curve appears, an amount
  beyond 2^53 is shown exactly, and a screenshot is saved under test-artifacts/.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import itertools
import json
import logging
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import create_engine, text

from ledger.api.v1 import insurance_pb2 as pb
from ledger.server import auth
from ledger.server.app import LedgerServer, Settings, security_of
from ledger.server.dashboard import FUND_HISTORY_POINTS_MAX, Dashboard
from tests import cycle_streams as cs
from tests.conftest import BACKENDS, Client, fresh_database
from tests.test_auth import TOKENS, auth_toml, bearer, client_on, plain_client, role_tokens
from tests.test_cycle import published_rate
from tests.test_server_process import free_port
from tests.test_tls import Authority, Issued, _key, _pem_key

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BROWSER_SECONDS = 30
HTTP_SECONDS = 60
BIG = 2**53 + 1  # the first integer a JavaScript Number cannot hold

ENDPOINTS = (
    "/api/currencies",
    "/api/currencies/USD/fund-history",
    "/api/currencies/USD/cycles",
    "/api/currencies/USD/cycles/c2/concentration?points=10",
)


# --- HTTP ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json; charset=utf-8", self.headers
        return json.loads(self.body)

    def error(self) -> dict[str, str]:
        """The error object, checked to be the documented shape."""
        body = self.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        return dict(body["error"])


def request(
    port: int,
    path: str,
    *,
    token: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    method: str = "GET",
) -> Response:
    """One HTTP request on a connection of its own (headers may repeat)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_SECONDS)
    try:
        connection.putrequest(method, path)
        sent = [*headers, *((("Authorization", f"Bearer {token}"),) if token else ())]
        for name, value in sent:
            connection.putheader(name, value)
        connection.endheaders()
        reply = connection.getresponse()
        return Response(reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read())
    finally:
        connection.close()


def get_json(port: int, path: str, token: str | None = None) -> Any:
    reply = request(port, path, token=token)
    assert reply.status == 200, (path, reply.status, reply.body)
    return reply.json()


# --- the seeded ledger -------------------------------------------------------------------


def currency(admin: Any, code: str, scale: int) -> None:
    admin.CreateCurrency(pb.CreateCurrencyRequest(code=code, scale=scale))


def transfer(admin: Any, tid: str, code: str, direction: int, amount: int) -> None:
    admin.TransferFund(
        pb.TransferFundRequest(transfer_id=tid, currency=code, direction=direction, amount=amount)
    )


def liquidate(
    clearing: Any, lid: str, cycle_id: str, cents: int, symbol: str = "XUSD"
) -> pb.LiquidationResult:
    """A LONG on XUSD (0.01 USD a unit per price point; XEUR alike) of |cents| units taken
    over at 2 and closed at 3 (a profit of `cents` minor units), at 1 (a loss) or at 2
    (break-even)."""
    close = "2" if cents == 0 else ("3" if cents > 0 else "1")
    result: pb.LiquidationResult = clearing.RecordLiquidation(
        pb.RecordLiquidationRequest(
            liquidation_id=lid,
            cycle_id=cycle_id,
            symbol=symbol,
            account_id=9,
            position_id=9,
            side=pb.SIDE_LONG,
            quantity=str(abs(cents) or 1),
            takeover_price="2",
            close_price=close,
            remaining_margin=0,
        )
    )
    assert result.engine_result == cents
    return result


def positions(count: int, seed: int) -> cs.Positions:
    """A cycle's positions: heavy-tailed profits (with ties) and about a quarter losses."""
    rng = np.random.default_rng(seed)
    profit = (rng.pareto(1.3, count) * 400).astype(np.int64) + 1
    loss = -(rng.integers(1, 5_000, count))
    pnl = np.where(rng.random(count) < 0.25, loss, profit).astype(np.int64)
    return cs.Positions(
        np.arange(1, count + 1, dtype=np.uint64),
        (1_000 + np.arange(count) % 97).astype(np.uint64),
        pnl,
    )


@dataclass
class Seeded:
    """A server with a dashboard over the ledger seeded here."""

    server: LedgerServer
    client: Client
    database_url: str
    backend: str
    cycles: dict[str, tuple[str, cs.Positions]]  # cycle id → its currency, its positions

    @property
    def http(self) -> int:
        return self.server.http_port


def seed(admin: Any, clearing: Any, channel: grpc.Channel) -> dict[str, tuple[str, cs.Positions]]:
    """USD (scale 2): every kind of fund entry and two closed cycles; BIG: a balance beyond
    2^53; EUR: a cycle without positions, one without a loss, and one where a participant's
    allocated amount rounds to 0."""
    for code in ("USD", "BIG", "EUR"):
        currency(admin, code, 2)
    for symbol, code in (("XUSD", "USD"), ("XEUR", "EUR")):
        admin.UpsertContract(
            pb.UpsertContractRequest(
                symbol=symbol,
                margin_currency=code,
                kind=pb.CONTRACT_KIND_LINEAR,
                multiplier="0.01",
            )
        )
    deposit, withdraw = pb.TRANSFER_DIRECTION_DEPOSIT, pb.TRANSFER_DIRECTION_WITHDRAW
    # c1: every profitable position takes part (coverage ratio 1): no tail below the cut.
    admin.SetPolicy(pb.SetPolicyRequest(currency="USD", insurance_share="0.2", coverage_ratio="1"))
    transfer(admin, "d1", "USD", deposit, 500_000)
    liquidate(clearing, "L1", "c1", 1_500)
    liquidate(clearing, "L2", "c1", -40_000)
    transfer(admin, "w1", "USD", withdraw, 100_000)
    c1 = positions(40, seed=1)
    cs.close(channel, "c1", "USD", c1)
    # c2: the default coverage ratio 0.9 leaves positions below the cut.
    admin.SetPolicy(
        pb.SetPolicyRequest(currency="USD", insurance_share="0.2", coverage_ratio="0.9")
    )
    transfer(admin, "d2", "USD", deposit, 250_000)
    liquidate(clearing, "L3", "c2", 700)
    liquidate(clearing, "L4", "c2", -90_000)
    liquidate(clearing, "L5", "c2", 0)  # break-even: no entry, so no point
    c2 = positions(3_000, seed=2)
    cs.close(channel, "c2", "USD", c2)
    transfer(admin, "d3", "USD", deposit, 12_345)

    transfer(admin, "big-1", "BIG", deposit, BIG)
    transfer(admin, "big-2", "BIG", deposit, 1)

    cs.close(channel, "e0", "EUR", cs.Positions.of([]))
    cs.close(channel, "e1", "EUR", cs.Positions.of([(1, 1, 100), (2, 2, 50), (3, 3, -5)]))
    # e2: an empty fund, a loss of 10 to allocate over 4 participants (profit 19,000 of
    # 20,200, ratio 0.9): 10 × (10000, 5000, 3000, 1000) / 19000 = 5.26, 2.63, 1.58, 0.53
    # → 5, 3, 2, 0 by largest remainder: position 4 takes part but is allocated 0.
    liquidate(clearing, "E1", "e2", -10, symbol="XEUR")
    e2 = cs.Positions.of(
        [(n, n, pnl) for n, pnl in enumerate([10_000, 5_000, 3_000, 1_000, 500, 400, 300, -7], 1)]
    )
    cs.close(channel, "e2", "EUR", e2)
    return {"c1": ("USD", c1), "c2": ("USD", c2), "e2": ("EUR", e2)}


@pytest.fixture(scope="module", params=BACKENDS)
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seeded]:
    directory = tmp_path_factory.mktemp(f"dashboard-{request.param}")
    with fresh_database(request.param, directory) as url:
        server = LedgerServer(
            Settings(listen="127.0.0.1:0", database_url=url, http_listen="127.0.0.1:0")
        )
        server.start()
        client = Client.connect(f"127.0.0.1:{server.port}")
        try:
            cycles = seed(client.admin, client.clearing, client.channel)
            yield Seeded(server, client, url, request.param, cycles)
        finally:
            client.channel.close()
            server.stop(grace_seconds=5)


# --- what the endpoints must say, computed here --------------------------------------------


def fund_points_from_journal(database_url: str, code: str) -> list[dict[str, str]]:
    """The fund's points from the raw journal rows: every entry that debits or credits the
    currency's insurance_fund, in id order, with the balance from 0."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, kind, reference, debit_account, credit_account, amount, "
                    "created_at_us FROM entries WHERE currency = :code AND "
                    "(debit_account = 'insurance_fund' OR credit_account = 'insurance_fund') "
                    "ORDER BY id"
                ),
                {"code": code},
            ).all()
    finally:
        engine.dispose()
    points = []
    balance = 0
    for entry_id, kind, reference, debit, credit, amount, created_at_us in rows:
        signed = amount if credit == "insurance_fund" else -amount
        assert debit == "insurance_fund" or credit == "insurance_fund"
        balance += signed
        stamp = Timestamp()
        stamp.FromMicroseconds(created_at_us)
        points.append(
            {
                "entry_id": str(entry_id),
                "time": stamp.ToJsonString(),
                "kind": pb.EntryKind.Name(kind),
                "reference": reference,
                "amount": str(signed),
                "balance": str(balance),
            }
        )
    return points


def summary_dict(summary: pb.CycleSummary) -> dict[str, Any]:
    return json_format.MessageToDict(
        summary, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def get_cycle(client: Client, cycle_id: str, code: str = "USD") -> pb.CycleSummary:
    summary: pb.CycleSummary = client.query.GetCycle(
        pb.GetCycleRequest(cycle_id=cycle_id, currency=code)
    )
    return summary


def money(minor: int, scale: int) -> str:
    """Minor units as the page shows them: grouped, at the scale (computed with ints)."""
    sign = "-" if minor < 0 else ""
    whole, fraction = divmod(abs(minor), 10**scale)
    shown = f"{whole:,}"
    return f"{sign}{shown}.{fraction:0{scale}d}" if scale else f"{sign}{shown}"


# --- the JSON endpoints ------------------------------------------------------------------


def test_currencies_lists_every_currency_with_its_scale(seeded: Seeded) -> None:
    assert get_json(seeded.http, "/api/currencies") == {
        "currencies": [
            {"code": "BIG", "scale": 2},
            {"code": "EUR", "scale": 2},
            {"code": "USD", "scale": 2},
        ]
    }


def test_fund_history_is_one_point_per_fund_entry_with_its_balance(seeded: Seeded) -> None:
    reply = get_json(seeded.http, "/api/currencies/USD/fund-history")
    expected = fund_points_from_journal(seeded.database_url, "USD")
    assert reply == {
        "currency": "USD",
        "limit": FUND_HISTORY_POINTS_MAX,
        "entries_total": str(len(expected)),
        "truncated": False,
        "points": expected,
    }
    # The seed's own story, written out: the break-even (L5) and the losses (L2, L4, which
    # move the engine's account, not the fund) have no point.
    c1, c2 = get_cycle(seeded.client, "c1"), get_cycle(seeded.client, "c2")
    assert [(p["kind"], p["reference"], int(p["amount"])) for p in reply["points"]] == [
        ("ENTRY_KIND_FUND_DEPOSIT", "d1", 500_000),
        ("ENTRY_KIND_LIQUIDATION_PROFIT", "L1", 1_500),
        ("ENTRY_KIND_FUND_WITHDRAWAL", "w1", -100_000),
        ("ENTRY_KIND_INSURANCE_COVER", "c1", -c1.fund_paid),
        ("ENTRY_KIND_FUND_DEPOSIT", "d2", 250_000),
        ("ENTRY_KIND_LIQUIDATION_PROFIT", "L3", 700),
        ("ENTRY_KIND_INSURANCE_COVER", "c2", -c2.fund_paid),
        ("ENTRY_KIND_FUND_DEPOSIT", "d3", 12_345),
    ]
    assert c1.fund_paid == 8_000 and c2.fund_paid == 18_000  # 0.2 of each loss
    fund = seeded.client.query.GetFund(pb.GetFundRequest(currency="USD"))
    assert reply["points"][-1]["balance"] == str(fund.balance)
    # A currency without fund entries has no point.
    assert get_json(seeded.http, "/api/currencies/EUR/fund-history")["points"] == []


@pytest.mark.parametrize("limit", [1, 3, 7, 8, 9])
def test_fund_history_limit_keeps_the_newest_points_with_exact_balances(
    seeded: Seeded, limit: int
) -> None:
    expected = fund_points_from_journal(seeded.database_url, "USD")
    reply = get_json(seeded.http, f"/api/currencies/USD/fund-history?limit={limit}")
    assert reply["points"] == expected[-limit:]
    assert reply["truncated"] is (limit < len(expected))
    assert reply["entries_total"] == str(len(expected))
    assert reply["limit"] == limit


def test_fund_history_amounts_beyond_2_53_are_exact_strings(seeded: Seeded) -> None:
    reply = request(seeded.http, "/api/currencies/BIG/fund-history")
    points = reply.json()["points"]
    assert [(p["amount"], p["balance"]) for p in points] == [
        (str(BIG), str(BIG)),
        ("1", str(BIG + 1)),
    ]
    assert f'"balance":"{BIG + 1}"'.encode() in reply.body  # a string, never a float


def test_cycles_lists_the_closed_cycles_newest_first(seeded: Seeded) -> None:
    reply = get_json(seeded.http, "/api/currencies/USD/cycles")
    assert [c["cycle_id"] for c in reply["cycles"]] == ["c2", "c1"]
    assert reply["truncated"] is False
    for shown in reply["cycles"]:
        summary = get_cycle(seeded.client, shown["cycle_id"])
        assert shown == summary_dict(summary)
        assert shown["state"] == "CYCLE_STATE_CLOSED"
        assert shown["allocation_rate"] == published_rate(
            summary.allocated_total, summary.participant_profit
        )
        for field in ("loss_total", "fund_paid", "allocated_total", "profit_total"):
            assert shown[field] == str(getattr(summary, field))  # 64-bit: strings
    newest = get_json(seeded.http, "/api/currencies/USD/cycles?limit=1")
    assert [c["cycle_id"] for c in newest["cycles"]] == ["c2"]
    assert newest["truncated"] is True
    assert get_json(seeded.http, "/api/currencies/BIG/cycles")["cycles"] == []


def profitable_ranked(rows: cs.Positions) -> list[int]:
    return sorted((int(p) for p in rows.pnl if p > 0), reverse=True)


def assert_curve(reply: dict[str, Any], points_max: int, summary: pb.CycleSummary) -> None:
    """The shape every curve has: ≤ N points from (0, 0) to (1, 1), monotone, the cut one
    of them at the participants' share."""
    points = reply["points"]
    assert 2 <= len(points) <= points_max
    assert (points[0]["x"], points[0]["y"]) == (0, 0)
    assert (points[-1]["x"], points[-1]["y"]) == (1, 1)
    for before, after in itertools.pairwise(points):
        assert before["x"] < after["x"] and before["y"] <= after["y"], (before, after)
    cut = reply["cut"]
    assert points[cut["index"]] == {k: v for k, v in cut.items() if k != "index"}
    if summary.profitable_count:
        assert cut["positions"] == str(summary.participant_count)
        assert cut["profit"] == str(summary.participant_profit)
        assert cut["x"] == summary.participant_count / summary.profitable_count
        assert cut["y"] == summary.participant_profit / summary.profit_total


@pytest.mark.parametrize("cycle_id", ["c1", "c2", "e2"])
@pytest.mark.parametrize("points_max", [3, 4, 10, 400, 100_000])
def test_concentration_is_exact_at_every_point_it_keeps(
    seeded: Seeded, cycle_id: str, points_max: int
) -> None:
    code, generated = seeded.cycles[cycle_id]
    path = f"/api/currencies/{code}/cycles/{cycle_id}/concentration?points={points_max}"
    reply = get_json(seeded.http, path)
    summary = get_cycle(seeded.client, cycle_id, code)
    assert reply["summary"] == summary_dict(summary)
    assert (reply["currency"], reply["cycle_id"], reply["points_max"]) == (
        code,
        cycle_id,
        points_max,
    )
    assert_curve(reply, points_max, summary)

    streamed = cs.stream_allocations(seeded.client.query, cycle_id, code).rows
    ranked = profitable_ranked(generated)
    count, total = len(ranked), sum(ranked)
    participants, rows = summary.participant_count, len(streamed)
    assert (summary.profitable_count, summary.profit_total) == (count, total)
    # The seed: c1 covers every profitable position, c2 leaves positions below the cut,
    # e2 a participant allocated 0 (not an allocation row) and positions below the cut.
    assert (rows < participants, participants < count) == {
        "c1": (False, False),
        "c2": (False, True),
        "e2": (True, True),
    }[cycle_id]
    cumulative = [0]
    for pnl in ranked:
        cumulative.append(cumulative[-1] + pnl)
    points, last_row = reply["points"], reply["allocated_index"]
    extra = len(points) - 1 - last_row  # the cut and the end, where they are not rows
    # The last row is kept beside the first, the cut and the end when there is room.
    assert points[last_row]["positions"] == str(rows if points_max >= extra + 2 else 0)
    for point in points[: last_row + 1]:  # over the allocation rows: the top of the ranking
        k = int(point["positions"])
        assert point["profit"] == str(cumulative[k])
        assert (point["x"], point["y"]) == (k / count, cumulative[k] / total)
    assert reply["unallocated"] == {
        "positions": str(participants - rows),
        "profit": str(summary.participant_profit - cumulative[rows]),
        "interpolated": rows < participants,
    }
    assert reply["tail"] == {
        "positions": str(count - participants),
        "profit": str(total - summary.participant_profit),
        "interpolated": participants < count,
    }
    assert points[-1]["positions"] == str(count)
    if points_max >= rows + 1 + extra:  # room for every row: nothing dropped
        assert [int(p["positions"]) for p in points[: last_row + 1]] == list(range(rows + 1))
    else:
        assert len(points) == points_max

    largest = sorted(streamed, key=lambda r: (-r[3], r[0]))[:10]
    assert reply["allocations"] == {
        "count": str(rows),
        "total": str(summary.allocated_total),
        "largest": [
            {"position_id": str(p), "account_id": str(a), "pnl": str(v), "amount": str(m)}
            for p, a, v, m in largest
        ],
    }
    assert sum(r[3] for r in streamed) == summary.allocated_total


def test_concentration_of_cycles_without_allocation_rows(seeded: Seeded) -> None:
    """No profitable position: the two end points, the cut at (0, 0). No loss to share:
    every participant allocated 0, so the only exact points are the ends and the cut."""
    empty = get_json(seeded.http, "/api/currencies/EUR/cycles/e0/concentration?points=3")
    assert [(p["x"], p["y"]) for p in empty["points"]] == [(0, 0), (1, 1)]
    assert (empty["cut"]["index"], empty["cut"]["x"], empty["cut"]["y"]) == (0, 0, 0)
    assert empty["allocations"] == {"count": "0", "total": "0", "largest": []}

    no_loss = get_json(seeded.http, "/api/currencies/EUR/cycles/e1/concentration")
    summary = get_cycle(seeded.client, "e1", "EUR")
    assert (summary.profitable_count, summary.participant_count) == (2, 2)
    assert_curve(no_loss, 1000, summary)
    assert [(p["positions"], p["profit"]) for p in no_loss["points"]] == [("0", "0"), ("2", "150")]
    assert (no_loss["allocated_index"], no_loss["cut"]["index"]) == (0, 1)
    assert no_loss["unallocated"] == {"positions": "2", "profit": "150", "interpolated": True}


@pytest.mark.parametrize(
    ("path", "status", "code", "words"),
    [
        ("/api/currencies/XYZ/fund-history", 404, "NOT_FOUND", ("XYZ",)),
        ("/api/currencies/XYZ/cycles", 404, "NOT_FOUND", ("XYZ",)),
        ("/api/currencies/XYZ/cycles/c1/concentration", 404, "NOT_FOUND", ("XYZ",)),
        ("/api/currencies/USD/cycles/nope/concentration", 404, "NOT_FOUND", ("nope",)),
        ("/api/currencies/usd/cycles", 400, "INVALID_ARGUMENT", ("usd",)),
        ("/api/currencies/USD/cycles/c1/concentration?points=2", 400, "INVALID_ARGUMENT", ("2",)),
        (
            "/api/currencies/USD/cycles/c1/concentration?points=100001",
            400,
            "INVALID_ARGUMENT",
            ("points", "100001"),
        ),
        ("/api/currencies/USD/cycles/c1/concentration?points=abc", 400, "INVALID_ARGUMENT", ()),
        ("/api/currencies/USD/cycles/c1/concentration?points=", 400, "INVALID_ARGUMENT", ()),
        (
            "/api/currencies/USD/cycles/c1/concentration?points=5&points=6",
            400,
            "INVALID_ARGUMENT",
            ("points",),
        ),
        ("/api/currencies/USD/fund-history?limit=0", 400, "INVALID_ARGUMENT", ("limit",)),
        ("/api/currencies/USD/fund-history?limit=-1", 400, "INVALID_ARGUMENT", ("limit",)),
        ("/api/currencies/USD/fund-history?points=5", 400, "INVALID_ARGUMENT", ("points",)),
        ("/api/currencies/USD/cycles?limit=10001", 400, "INVALID_ARGUMENT", ("limit",)),
        ("/api/currencies/USD", 404, "NOT_FOUND", ("endpoint",)),
        ("/api/currencies//cycles", 404, "NOT_FOUND", ("endpoint",)),
        ("/api/nothing", 404, "NOT_FOUND", ("endpoint",)),
        ("/static/../dashboard.py", 404, "NOT_FOUND", ()),
        ("/api/currencies/%FF/cycles", 400, "INVALID_ARGUMENT", ("UTF-8",)),
    ],
)
def test_errors_are_json_with_their_status(
    seeded: Seeded, path: str, status: int, code: str, words: tuple[str, ...]
) -> None:
    reply = request(seeded.http, path)
    assert reply.status == status, reply.body
    error = reply.error()
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], error


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_the_dashboard_is_read_only(seeded: Seeded, method: str) -> None:
    reply = request(seeded.http, "/api/currencies", method=method)
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"
    assert reply.error()["code"] == "METHOD_NOT_ALLOWED"


def test_the_page_and_its_files(seeded: Seeded) -> None:
    page = request(seeded.http, "/")
    assert page.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert b'<script src="/static/dashboard.js"' in page.body
    for name, kind in [
        ("dashboard.js", "text/javascript; charset=utf-8"),
        ("dashboard.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ]:
        reply = request(seeded.http, f"/static/{name}")
        assert (reply.status, reply.headers["content-type"]) == (200, kind), name
        assert reply.body == (ROOT / "ledger/server/dashboard" / name).read_bytes()
    head = request(seeded.http, "/api/currencies", method="HEAD")
    assert (head.status, head.body) == (200, b"")


# --- auth ----------------------------------------------------------------------------------


@contextmanager
def auth_dashboard(database_url: str, directory: Path, **tls: str) -> Iterator[LedgerServer]:
    """A server with an auth file (a token of each role; the server's own certificate CN
    listed as admin, for the mutual TLS case), USD seeded with a closed cycle."""
    path = directory / "auth.toml"
    path.write_text(auth_toml(role_tokens(), {"ledger-server": "admin"}))
    server = LedgerServer(
        Settings(
            listen="127.0.0.1:0",
            database_url=database_url,
            auth_file=str(path),
            http_listen="127.0.0.1:0",
            **tls,
        )
    )
    server.start()
    try:
        yield server
    finally:
        server.stop(grace_seconds=5)


def seed_small(client: Client) -> None:
    currency(client.admin, "USD", 2)
    client.admin.UpsertContract(
        pb.UpsertContractRequest(
            symbol="XUSD", margin_currency="USD", kind=pb.CONTRACT_KIND_LINEAR, multiplier="0.01"
        )
    )
    transfer(client.admin, "d1", "USD", pb.TRANSFER_DIRECTION_DEPOSIT, 10_000)
    liquidate(client.clearing, "L1", "c2", -1_000)
    cs.close(client.channel, "c2", "USD", cs.Positions.of([(1, 1, 700), (2, 2, 300)]))


REFUSED = [
    ("no token", ()),
    ("an unknown token", (("Authorization", "Bearer not-a-token"),)),
    ("another scheme", (("Authorization", f"Basic {TOKENS['reader']}"),)),
    ("Bearer alone", (("Authorization", "Bearer"),)),
    (
        "two headers",
        (("Authorization", f"Bearer {TOKENS['reader']}"),) * 2,
    ),
    ("a non-ASCII token", (("Authorization", "Bearer caf\u00e9"),)),
]


def assert_auth_table(port: int) -> list[str]:
    """Every refused caller × every endpoint is 401; every role reads every endpoint (the
    currency list too: a reader's PERMISSION_DENIED on Admin.ListCurrencies proves its token,
    and the server's own list answers). Returns one line
    per case, each ending "ok" or "FAILED: why"."""
    lines = []
    for path in ENDPOINTS:
        for label, headers in REFUSED:
            encoded = [(k, v.encode("utf-8").decode("latin-1")) for k, v in headers]
            reply = request(port, path, headers=encoded)
            verdict = "ok"
            if reply.status != 401 or reply.error()["code"] != "UNAUTHENTICATED":
                verdict = f"FAILED: {reply.status} {reply.body!r}"
            elif reply.headers.get("www-authenticate") != 'Bearer realm="ledger"':
                verdict = "FAILED: no WWW-Authenticate"
            elif any(token.encode() in reply.body for token in TOKENS.values()):
                verdict = "FAILED: the reply shows a token"
            lines.append(f"{label:18} {path:55} {reply.status} {verdict}")
        for role, token in TOKENS.items():
            reply = request(port, path, token=token)
            verdict = "ok" if reply.status == 200 else f"FAILED: {reply.status} {reply.body!r}"
            lines.append(f"{role:18} {path:55} {reply.status} {verdict}")
    return lines


def test_with_an_auth_file_a_token_is_needed_and_a_reader_reads(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with auth_dashboard(database_url, tmp_path) as server:
        admin = plain_client(server.port, bearer(TOKENS["admin"]))
        clearing = plain_client(server.port, bearer(TOKENS["clearing"]))
        try:
            seed_small(Client(clearing.channel, admin.admin, clearing.clearing, admin.query))
        finally:
            admin.channel.close()
            clearing.channel.close()
        lines = assert_auth_table(server.http_port)
        assert not [line for line in lines if "FAILED" in line], "\n" + "\n".join(lines)
        reader = TOKENS["reader"]
        points = get_json(server.http_port, "/api/currencies/USD/fund-history", reader)["points"]
        assert [p["reference"] for p in points] == ["d1", "c2"]
        # The page and its files need no token (the page asks for one).
        for path in ("/", "/static/dashboard.js", "/?token=abc"):
            assert request(server.http_port, path).status == 200, path
    for token in (*TOKENS.values(), "abc"):
        assert f"token={token}" not in caplog.text and f"Bearer {token}" not in caplog.text


# --- TLS -----------------------------------------------------------------------------------


def issue_for_both_ends(authority: Authority, common_name: str) -> Issued:
    """A certificate for 127.0.0.1 that may serve and may also be a client's (some PKIs
    issue such): the one the dashboard presents to its own server under mutual TLS."""
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(authority._name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(authority._key, hashes.SHA256())
    )
    return Issued(_pem_key(key), cert.public_bytes(serialization.Encoding.PEM))


def write_pki(directory: Path, issued: Issued, authority: Authority) -> dict[str, str]:
    files = {"server.pem": issued.cert, "server.key": issued.key, "ca.pem": authority.pem}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return {name: str(directory / name) for name in files}


def test_the_dashboard_reaches_a_tls_server(database_url: str, tmp_path: Path) -> None:
    authority = Authority("dashboard test CA")
    files = write_pki(tmp_path, authority.issue("ledger-server", server=True), authority)
    server = LedgerServer(
        Settings(
            listen="127.0.0.1:0",
            database_url=database_url,
            tls_cert=files["server.pem"],
            tls_key=files["server.key"],
            http_listen="127.0.0.1:0",
        )
    )
    server.start()
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=authority.pem)
        client = client_on(grpc.secure_channel(f"127.0.0.1:{server.port}", credentials))
        try:
            currency(client.admin, "USD", 2)
        finally:
            client.channel.close()
        assert get_json(server.http_port, "/api/currencies") == {
            "currencies": [{"code": "USD", "scale": 2}]
        }
    finally:
        server.stop(grace_seconds=5)


def test_under_mutual_tls_the_dashboard_certificate_is_no_caller(
    database_url: str, tmp_path: Path
) -> None:
    """The dashboard presents the server's certificate, whose CN the auth file lists as
    admin; a request without a token must still be 401, and a reader stays a reader."""
    authority = Authority("dashboard test CA")
    issued = issue_for_both_ends(authority, "ledger-server")
    files = write_pki(tmp_path, issued, authority)
    tls = {
        "tls_cert": files["server.pem"],
        "tls_key": files["server.key"],
        "tls_client_ca": files["ca.pem"],
    }
    with auth_dashboard(database_url, tmp_path, **tls) as server:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=authority.pem, private_key=issued.key, certificate_chain=issued.cert
        )
        channel = grpc.secure_channel(f"127.0.0.1:{server.port}", credentials)
        client = client_on(channel)  # no token: judged by its certificate, listed as admin
        try:
            currency(client.admin, "USD", 2)
        finally:
            client.channel.close()
        port = server.http_port
        for path in ENDPOINTS[:3]:
            assert request(port, path).status == 401, path
        assert get_json(port, "/api/currencies/USD/cycles", TOKENS["reader"])["cycles"] == []
        for role in ("admin", "reader"):
            assert get_json(port, "/api/currencies", TOKENS[role]) == {
                "currencies": [{"code": "USD", "scale": 2}]
            }, role


# --- start and stop ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("http_listen", "insecure", "refused"),
    [
        ("127.0.0.1:0", False, False),
        ("[::1]:0", False, False),
        ("localhost:8080", False, False),
        ("0.0.0.0:8080", False, True),
        (":8080", False, True),
        ("10.1.2.3:8080", False, True),
        ("0.0.0.0:8080", True, False),
        ("nonsense", False, True),
        ("127.0.0.1:http", False, True),
    ],
)
def test_http_listen_beyond_loopback_needs_an_auth_file(
    http_listen: str, insecure: bool, refused: bool
) -> None:
    settings = Settings(listen="127.0.0.1:0", http_listen=http_listen, insecure=insecure)
    if refused:
        with pytest.raises(auth.StartupError) as caught:
            security_of(settings)
        assert http_listen in str(caught.value)
    else:
        security_of(settings)


def test_with_an_auth_file_the_dashboard_may_listen_anywhere(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(auth_toml(role_tokens()))
    security_of(Settings(listen="127.0.0.1:0", http_listen="0.0.0.0:0", auth_file=str(path)))


def dashboard_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "ledger-dashboard"}


def test_stop_closes_the_http_port(database_url: str) -> None:
    before = dashboard_threads()
    server = LedgerServer(
        Settings(listen="127.0.0.1:0", database_url=database_url, http_listen="127.0.0.1:0")
    )
    server.start()
    try:
        port = server.http_port
        assert port > 0
        assert get_json(port, "/api/currencies") == {"currencies": []}
    finally:
        server.stop(grace_seconds=5)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 5):
        pass
    assert dashboard_threads() == before


def test_a_server_that_cannot_be_reached_is_502() -> None:
    """Any status but the four mapped ones is the server's failure, not the caller's."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    dashboard = Dashboard(f"127.0.0.1:{closed}", None, require_token=False)
    try:
        port = dashboard.serve("127.0.0.1:0")
        reply = request(port, "/api/currencies/USD/cycles")
        assert reply.status == 502
        error = reply.error()
        assert error["code"] == "UNAVAILABLE" and "UNAVAILABLE" in error["message"], error
    finally:
        dashboard.close()


def test_workers_share_the_dashboard_port(database_url: str) -> None:
    """`ledger serve --workers N` starts N servers with reuse_port: each serves the
    dashboard on the same port (SO_REUSEPORT), each calling the shared gRPC port."""
    grpc_port, http_port = free_port(), free_port()
    settings = Settings(
        listen=f"127.0.0.1:{grpc_port}",
        database_url=database_url,
        http_listen=f"127.0.0.1:{http_port}",
    )
    servers: list[LedgerServer] = []
    try:
        for _ in range(2):
            servers.append(LedgerServer(settings, reuse_port=True))
            servers[-1].start()
        assert [s.http_port for s in servers] == [http_port, http_port]
        client = Client.connect(f"127.0.0.1:{grpc_port}")
        try:
            currency(client.admin, "USD", 2)
        finally:
            client.channel.close()
        for _ in range(10):
            assert get_json(http_port, "/api/currencies")["currencies"][0]["code"] == "USD"
        servers.pop().stop(grace_seconds=5)  # the other one still answers on the port
        assert get_json(http_port, "/api/currencies")["currencies"][0]["code"] == "USD"
    finally:
        for server in servers:
            server.stop(grace_seconds=5)


def test_no_http_listen_no_dashboard(database_url: str) -> None:
    before = dashboard_threads()
    server = LedgerServer(Settings(listen="127.0.0.1:0", database_url=database_url))
    server.start()
    try:
        assert server.http_port == 0
        assert dashboard_threads() == before
    finally:
        server.stop(grace_seconds=5)


# --- the page in a real browser --------------------------------------------------------------


@contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium through chromedriver, Debian's (never a download); the test fails,
    rather than skips, without them."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} missing: install Debian's chromium and chromium-driver "
            "(apt-get install chromium chromium-driver; scripts/dev.sh test installs them "
            "when it runs as root, and .ci/run does)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1900",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.set_script_timeout(BROWSER_SECONDS)
        yield driver
    finally:
        driver.quit()


def wait_for_currency(driver: Any, code: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    def loaded(d: Any) -> bool:
        state = d.execute_script("return document.body.dataset.state")
        shown = d.execute_script("return document.body.dataset.currency")
        return state == "error" or (state == "ready" and shown == code)

    WebDriverWait(driver, BROWSER_SECONDS).until(loaded)
    state = driver.execute_script("return document.body.dataset.state")
    assert state == "ready", driver.find_element("id", "status").text


def select_cycle(driver: Any, cycle_id: str) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.CSS_SELECTOR, f"button[data-select-cycle='{cycle_id}']").click()
    curve = f"polyline[data-concentration-curve='{cycle_id}']"
    WebDriverWait(driver, BROWSER_SECONDS).until(lambda d: d.find_elements(By.CSS_SELECTOR, curve))
    return driver.find_element(By.CSS_SELECTOR, curve)


def test_the_page_in_headless_chromium(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    expected = fund_points_from_journal(seeded.database_url, "USD")
    with chromium() as driver:
        driver.get(f"http://127.0.0.1:{seeded.http}/#USD")
        wait_for_currency(driver, "USD")

        # One point per fund entry, in order, each with its exact balance.
        dots = driver.find_elements(By.CSS_SELECTOR, "svg[data-fund-chart='USD'] [data-entry-id]")
        assert [
            (d.get_attribute("data-entry-id"), d.get_attribute("data-balance")) for d in dots
        ] == [(p["entry_id"], p["balance"]) for p in expected]
        balance = int(expected[-1]["balance"])
        assert driver.find_element(By.ID, "fund-balance").text == f"{money(balance, 2)} USD"
        totals = {
            t.get_attribute("data-kind"): t.get_attribute("data-total")
            for t in driver.find_elements(By.CSS_SELECTOR, "#fund-totals [data-kind]")
        }
        for kind in (
            "ENTRY_KIND_LIQUIDATION_PROFIT",
            "ENTRY_KIND_INSURANCE_COVER",
            "ENTRY_KIND_FUND_DEPOSIT",
            "ENTRY_KIND_FUND_WITHDRAWAL",
        ):
            assert totals[kind] == str(sum(int(p["amount"]) for p in expected if p["kind"] == kind))
        rows = driver.find_elements(By.CSS_SELECTOR, "#cycle-table tbody tr")
        assert [r.get_attribute("data-cycle-id") for r in rows] == ["c2", "c1"]

        # An amount beyond 2^53, shown exactly.
        Select(driver.find_element(By.ID, "currency")).select_by_value("BIG")
        wait_for_currency(driver, "BIG")
        assert driver.find_element(By.ID, "fund-balance").text == f"{money(BIG + 1, 2)} BIG"
        assert money(BIG + 1, 2) == "90,071,992,547,409.94"
        assert len(driver.find_elements(By.CSS_SELECTOR, "[data-entry-id]")) == 2

        # Back to USD: a cycle without a tail, then one with, each with its cut marked.
        Select(driver.find_element(By.ID, "currency")).select_by_value("USD")
        wait_for_currency(driver, "USD")
        for cycle_id in ("c1", "c2"):
            summary = get_cycle(seeded.client, cycle_id)
            reply = get_json(
                seeded.http, f"/api/currencies/USD/cycles/{cycle_id}/concentration?points=400"
            )
            curve = select_cycle(driver, cycle_id)
            assert curve.get_attribute("data-points") == str(len(reply["points"]))
            drawn = curve.get_attribute("points").split()
            assert len(drawn) == reply["allocated_index"] + 1
            tails = driver.find_elements(By.CSS_SELECTOR, "[data-tail]")
            assert len(tails) == (1 if summary.participant_count < summary.profitable_count else 0)
            assert reply["unallocated"]["interpolated"] is False
            cut = driver.find_element(By.CSS_SELECTOR, "circle[data-cut]")
            assert cut.get_attribute("data-cut") == (
                f"{summary.participant_count}/{summary.profitable_count}"
            )
            shown = driver.find_elements(By.CSS_SELECTOR, "#allocation-table tbody tr")
            assert [r.get_attribute("data-position-id") for r in shown] == [
                a["position_id"] for a in reply["allocations"]["largest"]
            ]
        assert "c2 (USD)" in driver.find_element(By.ID, "cycle-title").text

        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"dashboard-{seeded.backend}.png"
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, max(int(height) + 40, 900))
        assert driver.save_screenshot(str(path))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with capsys.disabled():
            print(f"\ndashboard screenshot: {path}")

        problems = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert not problems, problems


def test_the_page_with_a_reader_token_in_headless_chromium(
    database_url: str, tmp_path: Path
) -> None:
    """The token given once as ?token= is kept for the tab and dropped from the address;
    a reader's page lists the currencies and shows amounts at their scale, with no console
    error; without the token the page says it needs one."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    reader = TOKENS["reader"]
    with auth_dashboard(database_url, tmp_path) as server, chromium() as driver:
        admin = plain_client(server.port, bearer(TOKENS["admin"]))
        clearing = plain_client(server.port, bearer(TOKENS["clearing"]))
        try:
            seed_small(Client(clearing.channel, admin.admin, clearing.clearing, admin.query))
        finally:
            admin.channel.close()
            clearing.channel.close()
        base = f"http://127.0.0.1:{server.http_port}/"
        driver.get(f"{base}?token={reader}#USD")
        wait_for_currency(driver, "USD")
        assert driver.current_url == f"{base}#USD"
        assert (
            driver.execute_script("return sessionStorage.getItem('ledger.dashboard.token')")
            == reader
        )
        assert len(driver.find_elements(By.CSS_SELECTOR, "[data-entry-id]")) == 2
        assert driver.find_element(By.ID, "fund-balance").text == "98.00 USD"
        select_cycle(driver, "c2")
        problems = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not problems, problems

        driver.find_element(By.ID, "token-forget").click()
        driver.refresh()
        WebDriverWait(driver, BROWSER_SECONDS).until(
            lambda d: d.execute_script("return document.body.dataset.state") == "error"
        )
        assert "UNAUTHENTICATED" in driver.find_element(By.ID, "status").text
        assert "token" in driver.find_element(By.ID, "status").text
