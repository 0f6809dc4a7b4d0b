"""The operators' CLI (issue 12, item 1): the `ledger` console script against a real server.

Every command runs as a subprocess against the `server` fixture (SQLite and PostgreSQL), and
its output and exit code are checked:
- a table of commands in sequence, each with its exit code and snippets of stdout and stderr:
  successes, INVALID_ARGUMENT (exit 2, the status and message on stderr), NOT_FOUND,
  ALREADY_EXISTS and FAILED_PRECONDITION (exit 1), usage errors (exit 2), amounts read and
  shown at the currency's scale (`12.34` at scale 2 is 1,234 minor units, `12.345` is refused
  and nothing is written); then the ledger is read back by RPC;
- `--json` output, parsed back, equals the RPC's reply as protobuf JSON (64-bit integers as
  strings), for every kind of command;
- `liquidation record-file` from CSV and from Parquet: outcomes by status, exit codes (1 with
  a failure, 2 when every failure is INVALID_ARGUMENT, 0 when none), the replies, the ledger
  after, and files refused before anything is sent;
- `cycle preview` and `cycle close` from CSV and Parquet files of 3,000 positions: the
  summary matches GetCycle (and the digest computed here), a preview writes nothing; `cycle
  allocations --out` (CSV and Parquet, one account or all) round-trips to StreamAllocations;
- `verify` ok, then after a row is tampered with by SQL exit 1 with every problem printed;
- the token from LEDGER_TOKEN against a server with an auth file (each role, no token, a
  wrong one), and TLS and mutual TLS with the client's certificate;
- `ledger serve` maps every flag and environment variable to its setting with the defaults
  and refusals it had (in process, with the server's `serve` replaced).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from sqlalchemy import create_engine, text

from ledger.api.v1 import insurance_pb2 as pb
from ledger.server.app import LedgerServer, Settings
from tests import cycle_streams as cs
from tests.conftest import Client
from tests.test_auth import TOKENS, auth_toml, role_tokens
from tests.test_tls import Authority

LEDGER = str(Path(sys.executable).with_name("ledger"))
CALL_SECONDS = 120


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


def ledger(port: int, *args: str, env: dict[str, str] | None = None, target: bool = True) -> Ran:
    """The console script, as an operator runs it; no LEDGER_* variable leaks in from here."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    command = [LEDGER, *(["--target", f"127.0.0.1:{port}"] if target else []), *args]
    done = subprocess.run(
        command,
        env={**clean, "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=CALL_SECONDS,
    )
    return Ran(done.returncode, done.stdout, done.stderr)


def as_json(message: Message) -> dict[str, Any]:
    """What `--json` must print for a reply: written here, not imported from the CLI."""
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def connect(server: LedgerServer) -> Client:
    return Client.connect(f"127.0.0.1:{server.port}")


@pytest.fixture
def rpc(server: LedgerServer) -> Iterator[Client]:
    client = connect(server)
    try:
        yield client
    finally:
        client.channel.close()


# --- a table of commands -----------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    args: tuple[str, ...]
    code: int
    out: tuple[str, ...] = ()
    err: tuple[str, ...] = ()
    not_out: tuple[str, ...] = ()


def step(*args: str, code: int = 0, out: Sequence[str] = (), err: Sequence[str] = ()) -> Step:
    return Step(tuple(args), code, tuple(out), tuple(err))


RECORD_L1 = (
    *("liquidation", "record", "--id", "L1", "--cycle", "c1", "--symbol", "XUSD"),
    *("--account", "7", "--position", "11", "--side", "long", "--quantity", "2"),
    *("--takeover", "100", "--close", "99.5", "--margin", "25"),
)


def _with(args: tuple[str, ...], flag: str, value: str) -> tuple[str, ...]:
    at = args.index(flag)
    return (*args[: at + 1], value, *args[at + 2 :])


STEPS = [
    step("currency", "create", "USD", "--scale", "2", out=["currency USD: scale 2"]),
    step("currency", "create", "USD", "--scale", "2", out=["currency USD: scale 2"]),
    step("currency", "create", "USD", "--scale", "3", code=1, err=["ledger: ALREADY_EXISTS: "]),
    step(
        *("currency", "create", "usd", "--scale", "2"),
        code=2,
        err=["ledger: INVALID_ARGUMENT: code: must be 1 to 16 characters of A-Z0-9 (got 'usd')"],
    ),
    step("currency", "create", "JPY", "--scale", "0"),
    step("currency", "list", out=["USD", "JPY"]),
    step(
        *("contract", "upsert", "XUSD", "--currency", "USD", "--kind", "linear"),
        *("--multiplier", "1"),
        out=["XUSD", "linear"],
    ),
    step(
        *("contract", "upsert", "XEUR", "--currency", "EUR", "--kind", "inverse"),
        *("--multiplier", "1"),
        code=1,
        err=["ledger: NOT_FOUND: "],
    ),
    step(
        *("contract", "upsert", "XUSD", "--currency", "USD", "--kind", "quadratic"),
        *("--multiplier", "1"),
        code=2,
    ),
    step(
        *("policy", "set", "USD", "--insurance-share", "0.25", "--coverage-ratio", "0.8"),
        out=["0.25", "0.8"],
    ),
    step(
        *("policy", "set", "USD", "--insurance-share", "1.5", "--coverage-ratio", "0.8"),
        code=2,
        err=["ledger: INVALID_ARGUMENT: insurance_share"],
    ),
    step(
        *("fund", "deposit", "USD", "12.34", "--id", "d1", "--memo", "seed [1]"),
        out=["FUND_DEPOSIT", "insurance_fund 12.34", "external -12.34", "seed [1]"],
    ),
    step(
        *("fund", "deposit", "USD", "12.345", "--id", "d2"),
        code=2,
        err=["AMOUNT '12.345' has 3 decimal places, but USD has scale 2"],
    ),
    step(
        *("fund", "deposit", "USD", "1e3", "--id", "d3"),
        code=2,
        err=["AMOUNT '1e3' is not a plain decimal"],
    ),
    step(
        *("fund", "deposit", "EUR", "1", "--id", "d4"),
        code=1,
        err=["ledger: NOT_FOUND: currency: unknown currency 'EUR'"],
    ),
    step("fund", "withdraw", "USD", "100", "--id", "w1", code=1, err=["FAILED_PRECONDITION: "]),
    step("fund", "withdraw", "USD", "2.3", "--id", "w2", out=["insurance_fund -2.30"]),
    step("fund", "show", "USD", out=["10.04", "12.34", "2.30"]),
    step("fund", "show", "EUR", code=1, err=["ledger: NOT_FOUND: "]),
    # (99.5 − 100) × 2 × 1 = −1 USD = −100 cents; + 25 of margin: a loss of 0.75.
    step(*RECORD_L1, out=["SYSTEM_LOSS", "-0.75", "10.04"]),
    step(*RECORD_L1, out=["SYSTEM_LOSS", "-0.75"]),  # a replay: the stored result
    step(*_with(RECORD_L1, "--side", "short"), code=1, err=["ledger: ALREADY_EXISTS: "]),
    step(
        *_with(_with(RECORD_L1, "--id", "L2"), "--quantity", "1e2"),
        code=2,
        err=["ledger: INVALID_ARGUMENT: quantity"],
    ),
    step(*_with(_with(RECORD_L1, "--id", "L3"), "--symbol", "NOPE"), code=1, err=["NOT_FOUND"]),
    step(
        *("cycle", "show", "c1", "--currency", "USD"),
        code=1,
        err=["ledger: NOT_FOUND: cycle 'c1' of USD has not been closed"],
    ),
    step(
        *("entries", "list", "--currency", "USD", "--account", "insurance_fund"),
        out=["d1", "w2", "FUND_WITHDRAWAL", "FUND_DEPOSIT", "seed [1]"],
    ),
    Step(
        (
            "entries",
            "list",
            "--currency",
            "USD",
            "--account",
            "insurance_fund",
            "--kind",
            "fund_deposit",
        ),
        0,
        out=("d1", "FUND_DEPOSIT"),
        not_out=("w2", "FUND_WITHDRAWAL"),
    ),
    Step(
        ("entries", "list", "--currency", "USD", "--account", "insurance_fund", "--limit", "1"),
        0,
        out=("w2",),
        not_out=("d1",),
    ),
    step(
        *("entries", "list", "--currency", "USD", "--account", "insurance_fund"),
        *("--kind", "bogus"),
        code=2,
    ),
    step(
        *("entries", "list", "--currency", "USD", "--account", "nobody"),
        code=2,
        err=["ledger: INVALID_ARGUMENT: account"],
    ),
    step("verify", out=["ok: ", "entries checked, no problem"]),
    step("verify", "--currency", "EUR", code=1, err=["ledger: NOT_FOUND: "]),
    step("nonsense", code=2),
]


def check_step(port: int, s: Step) -> list[str]:
    """What is wrong with a step's run (nothing: [])."""
    ran = ledger(port, *s.args)
    wrong = []
    if ran.code != s.code:
        wrong.append(f"exit {ran.code}, expected {s.code}")
    wrong += [f"stdout lacks {w!r}" for w in s.out if w not in ran.out]
    wrong += [f"stdout has {w!r}" for w in s.not_out if w in ran.out]
    wrong += [f"stderr lacks {w!r}" for w in s.err if w not in ran.err]
    if s.code == 0 and ran.err:
        wrong.append("stderr is not empty")
    if s.code != 0 and ran.out.strip() and s.args[0] != "verify":
        wrong.append("stdout is not empty on a failure")
    if wrong:
        return [f"ledger {' '.join(s.args)}: {'; '.join(wrong)}\n{ran.out}{ran.err}"]
    return []


def test_commands_table(server: LedgerServer, rpc: Client) -> None:
    problems = [p for s in STEPS for p in check_step(server.port, s)]
    assert not problems, "\n".join(problems)

    # What was written, read back by RPC: 12.34 − 2.30, the refused calls wrote nothing.
    assert rpc.query.GetFund(pb.GetFundRequest(currency="USD")).balance == 1234 - 230
    listed = rpc.query.ListEntries(
        pb.ListEntriesRequest(currency="USD", account="insurance_fund", page_size=100)
    )
    assert [(e.reference, e.memo) for e in listed.entries] == [("w2", ""), ("d1", "seed [1]")]
    assert [p.amount for p in listed.entries[1].postings if p.account == "insurance_fund"] == [1234]
    recorded = rpc.query.GetLiquidation(pb.GetLiquidationRequest(liquidation_id="L1"))
    assert recorded.result.engine_result == -75
    assert recorded.request.side == pb.SIDE_LONG and recorded.request.remaining_margin == 25
    for absent in ("L2", "L3"):
        with pytest.raises(grpc.RpcError) as error:
            rpc.query.GetLiquidation(pb.GetLiquidationRequest(liquidation_id=absent))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    policy = rpc.query.GetPolicy(pb.GetPolicyRequest(currency="USD"))
    assert (policy.insurance_share, policy.coverage_ratio) == ("0.25", "0.8")


def test_help_lists_every_command() -> None:
    ran = ledger(0, "--help", target=False)
    assert ran.code == 0, ran
    for command in (
        *("serve", "currency", "contract", "policy", "fund", "liquidation", "cycle"),
        *("entries", "verify", "loadtest"),
    ):
        assert re.search(rf"│ {command}\b", ran.out), (command, ran.out)


# --- --json ----------------------------------------------------------------------------------


def single(port: int, *args: str) -> dict[str, Any]:
    ran = ledger(port, *args, "--json")
    assert ran.code == 0, ran
    lines = ran.json_lines()
    assert len(lines) == 1, ran.out
    return lines[0]


def test_json_is_the_replies(server: LedgerServer, rpc: Client) -> None:
    port = server.port
    created = single(port, "currency", "create", "USD", "--scale", "2")
    assert created == as_json(
        rpc.admin.CreateCurrency(pb.CreateCurrencyRequest(code="USD", scale=2))
    )
    contract = pb.UpsertContractRequest(
        symbol="XUSD", margin_currency="USD", kind=pb.CONTRACT_KIND_INVERSE, multiplier="100"
    )
    upserted = single(
        port, "contract", "upsert", "XUSD", "--currency", "USD", "--kind", "inverse",
        "--multiplier", "100",
    )  # fmt: skip
    assert upserted == as_json(rpc.admin.UpsertContract(contract))
    assert upserted["kind"] == "CONTRACT_KIND_INVERSE"
    policy = single(
        port, "policy", "set", "USD", "--insurance-share", "0.3", "--coverage-ratio", "1"
    )
    assert policy == as_json(rpc.query.GetPolicy(pb.GetPolicyRequest(currency="USD")))

    deposit = single(port, "fund", "deposit", "USD", "12.34", "--id", "d1")
    replayed = rpc.admin.TransferFund(
        pb.TransferFundRequest(
            transfer_id="d1", currency="USD", direction=pb.TRANSFER_DIRECTION_DEPOSIT, amount=1234
        )
    )
    assert deposit == as_json(replayed)  # the same transfer: 12.34 was sent as 1234
    assert {"account": "insurance_fund", "amount": "1234"} in deposit["postings"]
    assert isinstance(deposit["entry_id"], str) and deposit["entry_id"] == str(replayed.entry_id)

    assert single(port, "currency", "list") == as_json(
        rpc.admin.ListCurrencies(pb.ListCurrenciesRequest())
    )
    fund = single(port, "fund", "show", "USD")
    assert fund == as_json(rpc.query.GetFund(pb.GetFundRequest(currency="USD")))
    assert fund["balance"] == "1234"

    # Inverse, long: 1 × 100 × (1/50 − 1/40) = −0.5 USD = −50 cents, + 7 of margin.
    request = pb.RecordLiquidationRequest(
        liquidation_id="L1", cycle_id="c1", symbol="XUSD", account_id=3, position_id=4,
        side=pb.SIDE_LONG, quantity="1", takeover_price="50", close_price="40",
        remaining_margin=7,
    )  # fmt: skip
    recorded = single(
        port, "liquidation", "record", "--id", "L1", "--cycle", "c1", "--symbol", "XUSD",
        "--account", "3", "--position", "4", "--side", "long", "--quantity", "1",
        "--takeover", "50", "--close", "40", "--margin", "7",
    )  # fmt: skip
    assert recorded == as_json(rpc.clearing.RecordLiquidation(request))
    assert recorded["engine_result"] == "-43" and recorded["outcome"] == "OUTCOME_SYSTEM_LOSS"

    entries = single(port, "entries", "list", "--currency", "USD", "--account", "insurance_fund")
    assert entries == as_json(
        rpc.query.ListEntries(
            pb.ListEntriesRequest(currency="USD", account="insurance_fund", page_size=100)
        )
    )
    report = single(port, "verify")
    assert report == as_json(rpc.query.VerifyLedger(pb.VerifyLedgerRequest()))
    assert report["ok"] is True and isinstance(report["entries_checked"], str)


# --- liquidation record-file ---------------------------------------------------------------


def jpy_market(rpc: Client) -> None:
    """JPY (scale 0) with XJPY, linear, multiplier 1: a LONG of q taken over at 2 and closed
    at 1 loses q yen, closed at 3 gains q."""
    rpc.admin.CreateCurrency(pb.CreateCurrencyRequest(code="JPY", scale=0))
    rpc.admin.UpsertContract(
        pb.UpsertContractRequest(
            symbol="XJPY", margin_currency="JPY", kind=pb.CONTRACT_KIND_LINEAR, multiplier="1"
        )
    )


@dataclass
class Rows:
    """Liquidation rows as columns, and what each must give."""

    columns: dict[str, list[Any]] = field(default_factory=dict)
    expected: list[tuple[str, int]] = field(default_factory=list)  # (status, engine result)

    def add(self, lid: str, cycle: str, symbol: str, qty: int, profit: bool, status: str) -> None:
        row = {
            "liquidation_id": lid,
            "cycle_id": cycle,
            "symbol": symbol,
            "account_id": 1 + len(self.expected) % 17,
            "position_id": 1 + len(self.expected),
            "side": "long" if len(self.expected) % 2 else "LONG",
            "quantity": str(qty),
            "takeover_price": "2",
            "close_price": "3" if profit else "1",
            "remaining_margin": 0,
        }
        for name, value in row.items():
            self.columns.setdefault(name, []).append(value)
        self.expected.append((status, qty if profit else -qty))

    def csv(self, path: Path) -> Path:
        pacsv.write_csv(pa.table(self.columns), path)
        return path

    def parquet(self, path: Path) -> Path:
        """Types as a data tool writes them: int64 ids, a decimal column, margin left out."""
        columns: dict[str, Any] = {k: v for k, v in self.columns.items() if k != "remaining_margin"}
        columns["account_id"] = pa.array(columns["account_id"], pa.int64())
        columns["takeover_price"] = pa.array(
            [Decimal(v) for v in columns["takeover_price"]], pa.decimal128(12, 4)
        )
        pq.write_table(pa.table(columns), path)
        return path


def make_rows(prefix: str, count: int, seed: int, bad_every: int = 0) -> Rows:
    rng = random.Random(seed)
    rows = Rows()
    for n in range(count):
        if bad_every and n % bad_every == bad_every - 1:
            rows.add(f"{prefix}-{n}", "c1", "NOPE", 1, True, "NOT_FOUND")
        else:
            rows.add(f"{prefix}-{n}", "c1", "XJPY", rng.randint(1, 999), rng.random() < 0.4, "OK")
    return rows


def summary_counts(out: str) -> dict[str, int]:
    """The status table of record-file: `│ OK, FUND_INFLOW │ 600 │` → {…: 600}."""
    found = re.findall(r"│ ([A-Z_]+(?:, [A-Z_]+)?) +│ +(\d+) +│", out)
    return {name: int(count) for name, count in found}


def expected_counts(rows: Rows) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status, result in rows.expected:
        counts[status] = counts.get(status, 0) + 1
        if status == "OK":
            key = "OK, FUND_INFLOW" if result > 0 else "OK, SYSTEM_LOSS"
            counts[key] = counts.get(key, 0) + 1
    return counts


def open_cycle(rpc: Client, cycle_id: str = "c1") -> tuple[int, int]:
    """(loss total, liquidations recorded in it) of JPY's open cycle."""
    cycles = rpc.query.ListOpenCycles(pb.ListOpenCyclesRequest(currency="JPY")).cycles
    found = [(c.loss_total, c.liquidations_count) for c in cycles if c.cycle_id == cycle_id]
    return found[0] if found else (0, 0)


def test_record_file_from_csv_and_parquet(
    server: LedgerServer, rpc: Client, tmp_path: Path
) -> None:
    jpy_market(rpc)
    port = server.port

    # CSV: 1,200 rows, every 100th naming an unknown contract, in batches of 500.
    csv_rows = make_rows("csv", 1200, seed=1, bad_every=100)
    ran = ledger(port, "liquidation", "record-file", str(csv_rows.csv(tmp_path / "l.csv")),
                 "--batch-size", "500")  # fmt: skip
    assert ran.code == 1, ran
    assert summary_counts(ran.out) == expected_counts(csv_rows), ran.out
    assert "ledger: row 100 (csv-99): NOT_FOUND: symbol: unknown contract 'NOPE'" in ran.err
    assert "ledger: … and 2 more failed items" not in ran.err  # 12 failures: all listed
    assert ran.err.count("NOT_FOUND") == 12

    # Parquet, with --json: one reply per batch, each the RPC's (a replay gives the same).
    pq_rows = make_rows("pq", 1300, seed=2)
    path = pq_rows.parquet(tmp_path / "l.parquet")
    ran = ledger(port, "liquidation", "record-file", str(path), "--batch-size", "500", "--json")
    assert ran.code == 0, ran
    replies = ran.json_lines()
    assert len(replies) == 3
    batches = [pq_rows.columns["liquidation_id"][k : k + 500] for k in (0, 500, 1000)]
    for reply, ids in zip(replies, batches, strict=True):
        assert [o["result"]["liquidation_id"] for o in reply["outcomes"]] == ids
    again = pb.RecordLiquidationsRequest(
        liquidations=[
            pb.RecordLiquidationRequest(
                liquidation_id=pq_rows.columns["liquidation_id"][n],
                cycle_id="c1",
                symbol="XJPY",
                account_id=pq_rows.columns["account_id"][n],
                position_id=pq_rows.columns["position_id"][n],
                side=pb.SIDE_LONG,
                quantity=pq_rows.columns["quantity"][n],
                takeover_price="2.0000",  # as the decimal column was sent
                close_price=pq_rows.columns["close_price"][n],
            )
            for n in range(500)
        ]
    )
    assert replies[0] == as_json(rpc.clearing.RecordLiquidations(again))

    # The ledger: every OK row recorded once, with its engine result.
    everything = [r for r in (*csv_rows.expected, *pq_rows.expected) if r[0] == "OK"]
    profits = sum(result for _, result in everything if result > 0)
    losses = -sum(result for _, result in everything if result < 0)
    assert rpc.query.GetFund(pb.GetFundRequest(currency="JPY")).balance == profits
    assert open_cycle(rpc) == (losses, len(everything))

    # The CSV again: every recorded id gives its stored result; nothing more is written.
    ran = ledger(port, "liquidation", "record-file", str(tmp_path / "l.csv"))
    assert ran.code == 1 and summary_counts(ran.out) == expected_counts(csv_rows), ran
    assert rpc.query.GetFund(pb.GetFundRequest(currency="JPY")).balance == profits


def test_record_file_exit_codes_and_refused_files(
    server: LedgerServer, rpc: Client, tmp_path: Path
) -> None:
    jpy_market(rpc)
    port = server.port

    invalid = make_rows("inv", 3, seed=3)
    invalid.columns["quantity"][1] = "1e5"  # the only failure: INVALID_ARGUMENT
    ran = ledger(port, "liquidation", "record-file", str(invalid.csv(tmp_path / "inv.csv")))
    assert ran.code == 2, ran
    assert "ledger: row 2 (inv-1): INVALID_ARGUMENT: quantity" in ran.err
    assert summary_counts(ran.out)["INVALID_ARGUMENT"] == 1
    assert open_cycle(rpc)[1] == 2, "the neighbours of a refused row were not recorded"
    before = open_cycle(rpc)

    refused: list[tuple[str, Any, str]] = [
        ("side.csv", lambda r: r.columns["side"].__setitem__(1, "sideways"),
         "row 2: side 'sideways' is not long or short"),
        ("nocol.csv", lambda r: r.columns.pop("close_price"), "no column close_price"),
        ("neg.csv", lambda r: r.columns["account_id"].__setitem__(0, -1),
         "column account_id: "),
        ("empty.csv", lambda r: r.columns["position_id"].__setitem__(2, None), "empty cells"),
        ("float.parquet", lambda r: r.columns.__setitem__("quantity", [1.5, 2.0, 3.0]),
         "column quantity is floating point"),
        ("l.txt", lambda r: None, "name a .csv or .parquet file"),
    ]  # fmt: skip
    for name, spoil, message in refused:
        rows = make_rows(name, 3, seed=4)
        spoil(rows)
        path = tmp_path / name
        if name.endswith(".parquet"):
            pq.write_table(pa.table(rows.columns), path)
        else:
            pacsv.write_csv(pa.table(rows.columns), path)
        ran = ledger(port, "liquidation", "record-file", str(path))
        assert ran.code == 2, (name, ran)
        assert message in ran.err, (name, ran.err)
    ran = ledger(port, "liquidation", "record-file", str(tmp_path / "missing.csv"))
    assert ran.code == 2 and "no such file" in ran.err, ran
    assert open_cycle(rpc) == before, "a refused file sent something"


# --- cycles from files -----------------------------------------------------------------------


def usd_market(rpc: Client) -> None:
    """USD at scale 2, so that amounts show with cents; a fund of 5,000.00."""
    rpc.admin.CreateCurrency(pb.CreateCurrencyRequest(code="USD", scale=2))
    rpc.admin.UpsertContract(
        pb.UpsertContractRequest(
            symbol="XUSD", margin_currency="USD", kind=pb.CONTRACT_KIND_LINEAR, multiplier="1"
        )
    )
    rpc.admin.TransferFund(
        pb.TransferFundRequest(
            transfer_id="seed", currency="USD", direction=pb.TRANSFER_DIRECTION_DEPOSIT,
            amount=500_000,
        )
    )  # fmt: skip


def lose(rpc: Client, cycle_id: str, dollars: int) -> None:
    """A loss of `dollars` USD in the cycle (a LONG of that many taken over at 2, closed at 1)."""
    rpc.clearing.RecordLiquidation(
        pb.RecordLiquidationRequest(
            liquidation_id=f"loss-{cycle_id}", cycle_id=cycle_id, symbol="XUSD", account_id=1,
            position_id=1, side=pb.SIDE_LONG, quantity=str(dollars), takeover_price="2",
            close_price="1",
        )
    )  # fmt: skip


def positions(count: int, seed: int) -> cs.Positions:
    rng = np.random.default_rng(seed)
    return cs.Positions(
        rng.permutation(np.arange(1, count + 1, dtype=np.uint64) * 3),
        rng.integers(1, 400, size=count, dtype=np.uint64),
        rng.integers(-20_000, 60_000, size=count, dtype=np.int64),
    )


def positions_table(p: cs.Positions, signed_ids: bool = False) -> pa.Table:
    ids = pa.int64() if signed_ids else pa.uint64()
    return pa.table(
        {
            "position_id": pa.array(
                p.position_id.astype(np.int64) if signed_ids else p.position_id, ids
            ),
            "account_id": pa.array(p.account_id, pa.uint64()),
            "pnl": pa.array(p.pnl, pa.int64()),
        }
    )


def cents(minor: int) -> str:
    """Minor units at scale 2, written here independently of the CLI."""
    return str((Decimal(minor) / 100).quantize(Decimal("0.01")))


def assert_summary_table(out: str, summary: pb.CycleSummary) -> None:
    """Every line of the summary table shows the value GetCycle has, amounts in dollars."""
    shown = {
        "loss total": cents(summary.loss_total),
        "fund balance before": cents(summary.fund_balance_before),
        "fund paid": cents(summary.fund_paid),
        "user due": cents(summary.user_due),
        "allocated total": cents(summary.allocated_total),
        "uncovered": cents(summary.uncovered),
        "participant profit": cents(summary.participant_profit),
        "positions": str(summary.positions_total),
        "profitable": str(summary.profitable_count),
        "participants": str(summary.participant_count),
        "allocation rate": summary.allocation_rate,
        "input digest": summary.input_digest,
        "state": pb.CycleState.Name(summary.state).removeprefix("CYCLE_STATE_"),
    }
    for label, value in shown.items():
        assert re.search(rf"│ {label} +│ {re.escape(value)} +│", out), (label, value, out)


def allocation_rows(path: Path) -> list[tuple[int, int, int, int]]:
    table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    assert table.column_names == ["position_id", "account_id", "pnl", "amount"]
    columns = [table.column(name).to_pylist() for name in table.column_names]
    return list(zip(*columns, strict=True))


def test_cycle_close_and_allocations_from_csv_and_parquet(
    server: LedgerServer, rpc: Client, tmp_path: Path
) -> None:
    usd_market(rpc)
    port = server.port
    lose(rpc, "c-csv", 900)
    lose(rpc, "c-pq", 1_300)
    from_csv, from_pq = positions(3000, seed=5), positions(3000, seed=6)
    csv_file = tmp_path / "positions.csv"
    pacsv.write_csv(positions_table(from_csv), csv_file)
    pq_file = tmp_path / "positions.parquet"
    pq.write_table(positions_table(from_pq, signed_ids=True), pq_file)

    # A preview shows the summary and writes nothing.
    ran = ledger(
        port,
        "cycle",
        "preview",
        "c-csv",
        "--currency",
        "USD",
        "--positions",
        str(csv_file),
        "--json",
    )
    assert ran.code == 0, ran
    (preview,) = ran.json_lines()
    assert preview["state"] == "CYCLE_STATE_PREVIEW"
    assert preview["input_digest"] == cs.input_digest(from_csv)
    assert preview["loss_total"] == "90000"
    with pytest.raises(grpc.RpcError) as error:
        rpc.query.GetCycle(pb.GetCycleRequest(cycle_id="c-csv", currency="USD"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND

    ran = ledger(port, "cycle", "close", "c-csv", "--currency", "USD", "--positions", str(csv_file))
    assert ran.code == 0, ran
    closed = rpc.query.GetCycle(pb.GetCycleRequest(cycle_id="c-csv", currency="USD"))
    assert closed.state == pb.CYCLE_STATE_CLOSED and closed.positions_total == 3000
    assert closed.input_digest == cs.input_digest(from_csv)
    assert closed.allocated_total > 0 and closed.participant_count > 100
    assert_summary_table(ran.out, closed)
    for key in ("fund_paid", "allocated_total", "participant_count"):
        assert preview[key] == str(getattr(closed, key)), key  # the preview said so

    ran = ledger(
        port, "cycle", "close", "c-pq", "--currency", "USD", "--positions", str(pq_file), "--json"
    )
    assert ran.code == 0, ran
    closed_pq = rpc.query.GetCycle(pb.GetCycleRequest(cycle_id="c-pq", currency="USD"))
    assert ran.json_lines() == [as_json(closed_pq)]
    assert closed_pq.input_digest == cs.input_digest(from_pq)

    # The same file again is the same close; another file is refused with the status.
    ran = ledger(
        port, "cycle", "close", "c-csv", "--currency", "USD", "--positions", str(csv_file), "--json"
    )
    assert ran.code == 0 and ran.json_lines() == [as_json(closed)], ran
    ran = ledger(port, "cycle", "close", "c-csv", "--currency", "USD", "--positions", str(pq_file))
    assert ran.code == 1 and "ledger: ALREADY_EXISTS: " in ran.err, ran

    ran = ledger(port, "cycle", "show", "c-pq", "--currency", "USD")
    assert ran.code == 0, ran
    assert_summary_table(ran.out, closed_pq)
    assert single(port, "cycle", "show", "c-csv", "--currency", "USD") == as_json(closed)

    # Allocations, to Parquet and CSV, whole and for one account: StreamAllocations' rows.
    streamed = cs.stream_allocations(rpc.query, "c-csv", "USD")
    assert len(streamed.rows) > 100
    account = streamed.rows[len(streamed.rows) // 2][1]
    of_account = cs.stream_allocations(rpc.query, "c-csv", "USD", account_id=account)
    for out, extra, expected in [
        (tmp_path / "a.parquet", (), streamed.rows),
        (tmp_path / "a.csv", (), streamed.rows),
        (tmp_path / "one.parquet", ("--account", str(account)), of_account.rows),
        (tmp_path / "one.csv", ("--account", str(account)), of_account.rows),
    ]:
        ran = ledger(
            port, "cycle", "allocations", "c-csv", "--currency", "USD", "--out", str(out), *extra
        )
        assert ran.code == 0, ran
        assert allocation_rows(out) == expected, out
        total = sum(row[3] for row in expected)
        assert (
            f"wrote {len(expected)} allocation rows to {out} (allocated {cents(total)} USD)"
            in ran.out
        )
    assert sum(row[3] for row in streamed.rows) == closed.allocated_total
    assert [row[0] for row in streamed.rows] == sorted(row[0] for row in streamed.rows)

    ran = ledger(
        port,
        "cycle",
        "allocations",
        "c-csv",
        "--currency",
        "USD",
        "--out",
        str(tmp_path / "a.json"),
    )
    assert ran.code == 2 and "name a .csv or .parquet file" in ran.err, ran
    ran = ledger(
        port,
        "cycle",
        "allocations",
        "c-none",
        "--currency",
        "USD",
        "--out",
        str(tmp_path / "n.csv"),
    )
    assert ran.code == 1 and "ledger: NOT_FOUND: " in ran.err, ran
    assert not (tmp_path / "n.csv").exists()


def test_cycle_files_are_checked_before_anything_is_streamed(
    server: LedgerServer, rpc: Client, tmp_path: Path
) -> None:
    usd_market(rpc)
    lose(rpc, "c1", 10)
    good = positions_table(positions(50, seed=7))
    spoilt = {
        "nopnl.csv": good.drop_columns(["pnl"]),
        "negative.csv": good.set_column(0, "position_id", pa.array(range(-1, 49), pa.int64())),
        "float.parquet": good.set_column(2, "pnl", pa.array([0.5] * 50, pa.float64())),
        "positions.tsv": good,
    }
    messages = {
        "nopnl.csv": "no column pnl",
        "negative.csv": "uint64",
        "float.parquet": "column pnl is floating point",
        "positions.tsv": "name a .csv or .parquet file",
    }
    for name, table in spoilt.items():
        path = tmp_path / name
        if name.endswith(".parquet"):
            pq.write_table(table, path)
        else:
            pacsv.write_csv(table, path)
        ran = ledger(
            server.port, "cycle", "close", "c1", "--currency", "USD", "--positions", str(path)
        )
        assert ran.code == 2, (name, ran)
        assert messages[name] in ran.err, (name, ran.err)
    pacsv.write_csv(good, tmp_path / "good.csv")
    ran = ledger(
        server.port, "cycle", "close", "c1", "--currency", "EUR", "--positions",
        str(tmp_path / "good.csv"),
    )  # fmt: skip
    assert ran.code == 1 and "NOT_FOUND: currency: unknown currency 'EUR'" in ran.err, ran
    with pytest.raises(grpc.RpcError) as error:
        rpc.query.GetCycle(pb.GetCycleRequest(cycle_id="c1", currency="USD"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


# --- verify ----------------------------------------------------------------------------------


def test_verify_prints_the_problems_of_a_tampered_ledger(
    server: LedgerServer, rpc: Client, database_url: str
) -> None:
    usd_market(rpc)
    ran = ledger(server.port, "fund", "deposit", "USD", "1.00", "--id", "d2")
    assert ran.code == 0, ran
    ran = ledger(server.port, "verify")
    assert ran.code == 0 and ran.out.startswith("ok: "), ran

    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            entry_id = conn.execute(
                text("SELECT id FROM entries WHERE reference = 'd2'")
            ).scalar_one()
            conn.execute(
                text("UPDATE entries SET amount = amount + 1 WHERE id = :i"), {"i": entry_id}
            )
    finally:
        engine.dispose()

    report = rpc.query.VerifyLedger(pb.VerifyLedgerRequest(currency="USD"))
    assert not report.ok and report.problems
    ran = ledger(server.port, "verify", "--currency", "USD")
    assert ran.code == 1, ran
    assert f"NOT OK: {len(report.problems)} problems in {report.entries_checked} entries" in ran.out
    for problem in report.problems:
        assert f"  {problem}\n" in ran.out
    assert any(re.search(rf"entry {entry_id}(?![0-9])", p) for p in report.problems)
    ran = ledger(server.port, "verify", "--json")
    assert ran.code == 1, ran
    (printed,) = ran.json_lines()
    assert printed == as_json(rpc.query.VerifyLedger(pb.VerifyLedgerRequest()))
    assert printed["ok"] is False


# --- the token, TLS ------------------------------------------------------------------------


def test_the_token_comes_from_ledger_token(database_url: str, tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(auth_toml(role_tokens()))
    server = LedgerServer(
        Settings(listen="127.0.0.1:0", database_url=database_url, auth_file=str(path))
    )
    server.start()
    try:
        port = server.port

        def as_role(role: str | None, *args: str) -> Ran:
            token = {} if role is None else {"LEDGER_TOKEN": TOKENS.get(role, role)}
            return ledger(port, *args, env=token)

        ran = as_role(None, "currency", "list")
        assert ran.code == 1 and "ledger: UNAUTHENTICATED: " in ran.err, ran
        ran = as_role("not-a-token", "currency", "list")
        assert ran.code == 1 and "ledger: UNAUTHENTICATED: " in ran.err, ran
        ran = as_role("admin", "currency", "create", "USD", "--scale", "2")
        assert ran.code == 0, ran
        ran = as_role("admin", "fund", "deposit", "USD", "1.25", "--id", "t1")
        assert ran.code == 0, ran
        ran = as_role("reader", "currency", "create", "EUR", "--scale", "2")
        assert ran.code == 1 and "ledger: PERMISSION_DENIED: " in ran.err, ran
        # A reader may read the fund but not ListCurrencies (Admin): minor units, said so.
        ran = as_role("reader", "fund", "show", "USD")
        assert ran.code == 0, ran
        assert re.search(r"│ balance +│ 125 +│", ran.out), ran.out
        assert "amounts in minor units of USD" in ran.err
        assert TOKENS["reader"] not in ran.out + ran.err
    finally:
        server.stop(grace_seconds=5)


def test_tls_and_mutual_tls(database_url: str, tmp_path: Path) -> None:
    ca, other = Authority("cli test CA"), Authority("another CA")
    files = {
        "ca.pem": ca.pem,
        "other.pem": other.pem,
    }
    server_cert = ca.issue("ledger-server", server=True)
    client_cert = ca.issue("ops-1")
    files |= {"server.pem": server_cert.cert, "server.key": server_cert.key}
    files |= {"ops.pem": client_cert.cert, "ops.key": client_cert.key}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    auth = tmp_path / "auth.toml"
    auth.write_text(auth_toml({}, {"ops-1": "admin"}))
    server = LedgerServer(
        Settings(
            listen="127.0.0.1:0",
            database_url=database_url,
            tls_cert=str(tmp_path / "server.pem"),
            tls_key=str(tmp_path / "server.key"),
            tls_client_ca=str(tmp_path / "ca.pem"),
            auth_file=str(auth),
        )
    )
    server.start()
    try:
        port = server.port
        mutual = ["--tls-ca", str(tmp_path / "ca.pem")]
        mutual += ["--tls-cert", str(tmp_path / "ops.pem"), "--tls-key", str(tmp_path / "ops.key")]
        ran = ledger(port, *mutual, "currency", "create", "USD", "--scale", "2")
        assert ran.code == 0, ran
        # The same from the environment, by the name in the certificate.
        env = {
            "LEDGER_TARGET": f"localhost:{port}",
            "LEDGER_TLS_CA": str(tmp_path / "ca.pem"),
            "LEDGER_TLS_CLIENT_CERT": str(tmp_path / "ops.pem"),
            "LEDGER_TLS_CLIENT_KEY": str(tmp_path / "ops.key"),
        }
        ran = ledger(port, "currency", "list", env=env, target=False)
        assert ran.code == 0 and "USD" in ran.out, ran
        for args in (
            ["--tls-ca", str(tmp_path / "ca.pem")],  # no client certificate
            ["--tls-ca", str(tmp_path / "other.pem"), *mutual[2:]],  # another CA
            [],  # plaintext
        ):
            ran = ledger(port, *args, "currency", "list")
            assert ran.code == 1 and "ledger: UNAVAILABLE: " in ran.err, (args, ran)
        ran = ledger(port, *mutual[:4], "currency", "list")
        assert ran.code == 2, ran
        assert "--tls-cert and --tls-key go together" in ran.err
        ran = ledger(port, "--tls-ca", str(tmp_path / "none.pem"), "currency", "list")
        assert ran.code == 2 and "--tls-ca: cannot read" in ran.err, ran
    finally:
        server.stop(grace_seconds=5)


# --- ledger serve: flags, environment, defaults, refusals -------------------------------------

SERVE_ENV = [
    *("LEDGER_LISTEN", "LEDGER_DATABASE_URL", "LEDGER_THREADS", "LEDGER_CYCLE_POSITIONS_MAX"),
    *("LEDGER_BATCH_MAX", "LEDGER_PENDING_MAX", "LEDGER_STREAMS_MAX"),
    *("LEDGER_STREAM_IDLE_SECONDS", "LEDGER_LOCK_TIMEOUT_SECONDS"),
    *("LEDGER_STATEMENT_TIMEOUT_SECONDS", "LEDGER_MAX_CONNECTION_AGE_SECONDS"),
    *("LEDGER_KEEPALIVE_SECONDS", "LEDGER_WORKERS", "LEDGER_AUTH_FILE", "LEDGER_TLS_CERT"),
    *("LEDGER_TLS_KEY", "LEDGER_TLS_CLIENT_CA", "LEDGER_METRICS_LISTEN", "LEDGER_HTTP_LISTEN"),
]

# flag, the value given, the Settings field, the value it must get. Written here: the
# argparse version's names and defaults, not read from the CLI's code.
SERVE_FLAGS: list[tuple[str, str | None, str, object, object]] = [
    # flag, value (None: a switch), field, value it gives, default
    ("--listen", "127.0.0.1:7001", "listen", "127.0.0.1:7001", "127.0.0.1:50051"),
    ("--database-url", "sqlite:///x.db", "database_url", "sqlite:///x.db", None),
    ("--threads", "3", "threads", 3, 32),
    ("--cycle-positions-max", "77", "cycle_positions_max", 77, 50_000_000),
    ("--batch-max", "5", "batch_max", 5, 1_000),
    ("--pending-max", "6", "pending_max", 6, 10_000),
    ("--streams-max", "2", "streams_max", 2, 4),
    ("--stream-idle-seconds", "1.5", "stream_idle_s", 1.5, 60.0),
    ("--lock-timeout-seconds", "2.5", "lock_timeout_s", 2.5, 5.0),
    ("--statement-timeout-seconds", "3.5", "statement_timeout_s", 3.5, 30.0),
    ("--max-connection-age-seconds", "4.5", "max_connection_age_s", 4.5, 1_800.0),
    ("--keepalive-seconds", "5.5", "keepalive_s", 5.5, 60.0),
    ("--workers", "2", "workers", 2, 1),
    ("--auth-file", "/etc/auth.toml", "auth_file", "/etc/auth.toml", ""),
    ("--insecure", None, "insecure", True, False),
    ("--tls-cert", "s.pem", "tls_cert", "s.pem", ""),
    ("--tls-key", "s.key", "tls_key", "s.key", ""),
    ("--tls-client-ca", "ca.pem", "tls_client_ca", "ca.pem", ""),
    ("--metrics-listen", "127.0.0.1:9100", "metrics_listen", "127.0.0.1:9100", ""),
    ("--http-listen", "127.0.0.1:8080", "http_listen", "127.0.0.1:8080", ""),
]


@pytest.fixture
def serve_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Settings]:
    """`ledger serve` in this process, with the server's serve() recording its settings."""
    import ledger.server.app

    for name in SERVE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    calls: list[Settings] = []

    def record(settings: Settings) -> int:
        calls.append(settings)
        return 0

    monkeypatch.setattr(ledger.server.app, "serve", record)
    return calls


def run_main(*args: str) -> int:
    from ledger.cli import main

    return main(["serve", *args])


def test_serve_defaults(serve_calls: list[Settings], tmp_path: Path) -> None:
    assert run_main() == 0
    (settings,) = serve_calls
    for _, _, name, _, default in SERVE_FLAGS:
        if name != "database_url":
            assert getattr(settings, name) == default, name
    assert settings.database_url == f"sqlite:///{tmp_path / 'ledger.db'}"
    assert {f.name for f in fields(Settings)} == {row[2] for row in SERVE_FLAGS}


@pytest.mark.parametrize(("flag", "value", "name", "expected", "_default"), SERVE_FLAGS)
def test_serve_flag_and_environment(
    serve_calls: list[Settings],
    monkeypatch: pytest.MonkeyPatch,
    flag: str,
    value: str | None,
    name: str,
    expected: object,
    _default: object,
) -> None:
    assert run_main(flag, *([] if value is None else [value])) == 0
    assert getattr(serve_calls[-1], name) == expected
    if value is None:
        return  # --insecure has no environment variable, as before
    variable = "LEDGER_" + flag.removeprefix("--").replace("-", "_").upper()
    assert variable in SERVE_ENV
    monkeypatch.setenv(variable, value)
    assert run_main() == 0
    assert getattr(serve_calls[-1], name) == expected
    assert len(serve_calls) == 2


REFUSED_LIMITS = [
    *[
        ([flag, value], f"{flag} must be at least 1 (got {value})")
        for flag, value in [
            *[("--batch-max", "0"), ("--pending-max", "-1"), ("--streams-max", "0")],
            *[("--workers", "0"), ("--threads", "0")],
        ]
    ],
    *[
        ([flag, value], f"{flag} must be greater than 0 (got {float(value)})")
        for flag, value in [
            *[("--stream-idle-seconds", "0"), ("--lock-timeout-seconds", "-1")],
            *[("--statement-timeout-seconds", "0"), ("--max-connection-age-seconds", "0")],
            ("--keepalive-seconds", "0"),
        ]
    ],
    (["--threads", "many"], "many"),
]


@pytest.mark.parametrize(("args", "message"), REFUSED_LIMITS)
def test_serve_refuses_bad_limits(
    serve_calls: list[Settings], capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert run_main(*args) == 2
    assert message in capsys.readouterr().err
    assert serve_calls == []
