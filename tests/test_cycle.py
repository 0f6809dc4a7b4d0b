"""The cycle close through a real server, on SQLite and PostgreSQL: CloseCycle, PreviewCycle,
GetCycle and StreamAllocations (issue 5).

Proves that issue 3's worked example comes out exactly, end to end from liquidations and a
deposit to every summary field and the users' journal; that random cycles (ties, losses, a
short fund, a loss beyond all profit, other policies, ids from 2**63 up) agree with the slow
Fraction reference in tests/alloc_reference.py on every summary field and every allocation,
and leave the ledger balanced (each entry sums to zero, the fund equals deposits + inflows −
withdrawals − covers, the closed cycle's system loss nets to zero, cached = journal); that the
input digest is issue 5's SHA-256 whatever the chunking and order; that a repeat returns the
stored summary and writes nothing, a conflicting repeat is ALREADY_EXISTS naming both digests,
and concurrent closes write one set of flows; that a preview writes nothing; that
allocations stream in chunks of at most 65,536 rows in unsigned position_id order, filtered
by account; that a closed cycle takes no more liquidations; and that every bad stream, a
close cancelled mid-stream and one cancelled in its write phase write nothing.
"""

from __future__ import annotations

import hashlib
import random
import sqlite3
import struct
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction
from pathlib import Path

import grpc
import numpy as np
import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from ledger.api.v1 import insurance_pb2 as pb
from ledger.server.app import LedgerServer, Settings
from tests import cycle_streams as cs
from tests.alloc_reference import Reference, allocate_reference
from tests.conftest import Client
from tests.cycle_streams import Positions
from tests.ledger_db import balances_from_journal, cached_balances, snapshot

JPY = "JPY"  # scale 0: a loss of N yen is N minor units
KRW = "KRW"  # scale 0 too: a second currency whose cycles are its own
SYSTEM_ACCOUNTS = ("insurance_fund", "system_loss", "uncovered_loss", "liquidation_engine")
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
U63 = 2**63


# --- the market and its money ------------------------------------------------------------


def market(client: Client) -> None:
    """JPY and KRW (scale 0), each with a LINEAR contract of multiplier 1."""
    client.admin.CreateCurrency(pb.CreateCurrencyRequest(code=JPY, scale=0))
    client.admin.CreateCurrency(pb.CreateCurrencyRequest(code=KRW, scale=0))
    for symbol, currency in (("XJPY", JPY), ("XKRW", KRW)):
        client.admin.UpsertContract(
            pb.UpsertContractRequest(
                symbol=symbol,
                margin_currency=currency,
                kind=pb.CONTRACT_KIND_LINEAR,
                multiplier="1",
            )
        )


def liquidate(client: Client, lid: str, cycle_id: str, result: int, symbol: str = "XJPY") -> None:
    """A liquidation whose engine result is `result` yen: a LONG of `|result|` taken over at 2
    and closed at 1 (a loss of 1 × qty) or at 3 (a profit), no margin left."""
    close = "1" if result < 0 else "3"
    reply = client.clearing.RecordLiquidation(
        pb.RecordLiquidationRequest(
            liquidation_id=lid,
            cycle_id=cycle_id,
            symbol=symbol,
            account_id=1,
            position_id=1,
            side=pb.SIDE_LONG,
            quantity=str(abs(result)),
            takeover_price="2",
            close_price=close,
            remaining_margin=0,
        )
    )
    assert reply.engine_result == result


def transfer(
    client: Client,
    tid: str,
    direction: pb.TransferDirection,
    amount: int,
    currency: str = JPY,
) -> None:
    client.admin.TransferFund(
        pb.TransferFundRequest(
            transfer_id=tid, currency=currency, direction=direction, amount=amount
        )
    )


def deposit(client: Client, tid: str, amount: int, currency: str = JPY) -> None:
    transfer(client, tid, pb.TRANSFER_DIRECTION_DEPOSIT, amount, currency)


def fund_balance(client: Client, currency: str = JPY) -> int:
    return int(client.query.GetFund(pb.GetFundRequest(currency=currency)).balance)


# --- summaries -----------------------------------------------------------------------------


def fields(summary: pb.CycleSummary) -> dict[str, object]:
    """Every field of a summary but closed_at, by name (for readable diffs)."""
    return {
        f.name: getattr(summary, f.name)
        for f in pb.CycleSummary.DESCRIPTOR.fields
        if f.name != "closed_at"
    }


def published_rate(allocated: int, participant_profit: int) -> str:
    """The published allocation rate, computed here: allocated / participant_profit, rounded
    half up to 12 places (Decimal at 80 digits decides the 12th place exactly), all written."""
    if not participant_profit:
        return "0"
    with localcontext() as context:
        context.prec = 80
        value = (Decimal(allocated) / Decimal(participant_profit)).quantize(
            Decimal(1).scaleb(-12), rounding=ROUND_HALF_UP
        )
    return format(value, "f")


def published(allocated: int, participant_profit: int, version: int = 1) -> dict[str, object]:
    """The fields a summary publishes beside its numbers: its close version (0 for a
    preview) and the allocation rate."""
    return {
        "version": version,
        "allocation_rate": published_rate(allocated, participant_profit),
        "ranking": pb.RANKING_POSITION,  # the policy's default
    }


def expected_fields(
    ref: Reference,
    *,
    cycle_id: str,
    loss: int,
    fund_before: int,
    policy: tuple[str, str],
    digest: str,
    state: int = pb.CYCLE_STATE_CLOSED,
    currency: str = JPY,
) -> dict[str, object]:
    return {
        "cycle_id": cycle_id,
        "currency": currency,
        "state": state,
        "loss_total": loss,
        "fund_balance_before": fund_before,
        "fund_share": ref.fund_share,
        "fund_paid": ref.fund_paid,
        "user_due": ref.user_due,
        "allocated_total": ref.allocated_total,
        "uncovered": ref.uncovered,
        "positions_total": ref.positions_total,
        "profitable_count": ref.profitable_count,
        "profit_total": ref.profit_total,
        "participant_count": ref.participant_count,
        "participant_profit": ref.participant_profit,
        "cutoff_pnl": ref.cutoff_pnl,
        "widened": ref.widened,
        "input_digest": digest,
        "insurance_share": policy[0],
        "coverage_ratio": policy[1],
        **published(
            ref.allocated_total,
            ref.participant_profit,
            0 if state == pb.CYCLE_STATE_PREVIEW else 1,
        ),
    }


def get_cycle(client: Client, cycle_id: str, currency: str = JPY) -> pb.CycleSummary:
    summary: pb.CycleSummary = client.query.GetCycle(
        pb.GetCycleRequest(cycle_id=cycle_id, currency=currency)
    )
    return summary


def assert_rejected(
    call: Callable[[], object], code: grpc.StatusCode, *words: str
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == code, error.details()
    for word in words:
        assert word.lower() in (error.details() or "").lower(), error.details()
    return error


def assert_not_closed(client: Client, database_url: str, cycle_id: str) -> None:
    assert_rejected(lambda: get_cycle(client, cycle_id), NOT_FOUND, cycle_id)
    assert_rejected(lambda: cs.stream_allocations(client.query, cycle_id, JPY), NOT_FOUND, cycle_id)
    assert allocation_rows(database_url) == 0


def _is_closed(client: Client, cycle_id: str) -> bool:
    try:
        get_cycle(client, cycle_id)
    except grpc.RpcError as error:
        assert error.code() == NOT_FOUND, error.details()
        return False
    return True


def allocation_rows(database_url: str) -> int:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM allocations")).scalar_one())
    finally:
        engine.dispose()


def list_entries(
    client: Client,
    account: str,
    kind: pb.EntryKind = pb.ENTRY_KIND_UNSPECIFIED,
    currency: str = JPY,
) -> list[pb.Entry]:
    """Every page of an account's journal."""
    out: list[pb.Entry] = []
    token = ""
    while True:
        page = client.query.ListEntries(
            pb.ListEntriesRequest(
                currency=currency, account=account, kind=kind, page_size=1000, page_token=token
            )
        )
        out.extend(page.entries)
        token = page.next_page_token
        if not token:
            return out


def postings(entry: pb.Entry) -> dict[str, int]:
    return {p.account: p.amount for p in entry.postings}


# --- the worked example of issue 3 ----------------------------------------------------------

WORKED = [(1, 101, 500), (2, 102, 300), (3, 103, 150), (4, 104, 50), (5, 105, -80)]


def test_worked_example_end_to_end(client: Client, database_url: str) -> None:
    market(client)
    deposit(client, "d1", 10_000)
    liquidate(client, "L1", "c1", -600)
    liquidate(client, "L2", "c1", -400)
    requests = [
        pb.CycleInput(header=pb.CycleHeader(cycle_id="c1", currency=JPY)),
        pb.CycleInput(
            positions=pb.PositionChunk(
                position_id=[p for p, _, _ in WORKED[:2]],
                account_id=[a for _, a, _ in WORKED[:2]],
                pnl=[v for _, _, v in WORKED[:2]],
            )
        ),
        pb.CycleInput(
            positions=pb.PositionChunk(
                position_id=[p for p, _, _ in WORKED[2:]],
                account_id=[a for _, a, _ in WORKED[2:]],
                pnl=[v for _, _, v in WORKED[2:]],
            )
        ),
    ]
    digest = hashlib.sha256(b"".join(struct.pack("<QQq", *row) for row in WORKED)).hexdigest()
    started = time.time()
    summary = client.clearing.CloseCycle(iter(requests))  # the generated stub, as a client would
    finished = time.time()

    assert fields(summary) == {
        "cycle_id": "c1",
        "currency": JPY,
        "state": pb.CYCLE_STATE_CLOSED,
        "loss_total": 1000,
        "fund_balance_before": 10_000,
        "fund_share": 200,
        "fund_paid": 200,
        "user_due": 800,
        "allocated_total": 800,
        "uncovered": 0,
        "positions_total": 5,
        "profitable_count": 4,
        "profit_total": 1000,
        "participant_count": 3,
        "participant_profit": 950,
        "cutoff_pnl": 150,
        "widened": False,
        "input_digest": digest,
        "insurance_share": "0.2",
        "coverage_ratio": "0.9",
        "version": 1,
        "allocation_rate": "0.842105263158",  # 800 / 950
        "ranking": pb.RANKING_POSITION,
    }
    assert published_rate(800, 950) == "0.842105263158"
    assert summary.HasField("closed_at")
    assert started - 1 <= summary.closed_at.ToMicroseconds() / 1e6 <= finished + 1
    assert get_cycle(client, "c1") == summary

    allocations = [(1, 101, 500, 421), (2, 102, 300, 253), (3, 103, 150, 126)]
    assert cs.stream_allocations(client.query, "c1", JPY).rows == allocations
    for position_id, account_id, pnl, amount in allocations:
        (entry,) = list_entries(client, f"user:{account_id}", pb.ENTRY_KIND_ALLOCATION)
        assert entry.kind == pb.ENTRY_KIND_ALLOCATION
        assert entry.currency == JPY
        assert entry.reference == "c1"
        assert postings(entry) == {f"user:{account_id}": -amount, "system_loss": amount}
        assert (entry.position_id, entry.pnl) == (position_id, pnl)
        assert entry.created_at == summary.closed_at
    assert list_entries(client, "user:104") == []  # profitable, below the cutoff

    (cover,) = list_entries(client, "insurance_fund", pb.ENTRY_KIND_INSURANCE_COVER)
    assert cover.reference == "c1"
    assert postings(cover) == {"insurance_fund": -200, "system_loss": 200}
    assert list_entries(client, "uncovered_loss") == []
    assert fund_balance(client) == 9_800
    journal = balances_from_journal(database_url)
    assert journal[(JPY, "system_loss")] == 0
    assert journal[(JPY, "insurance_fund")] == 9_800
    assert cached_balances(database_url)[(JPY, "system_loss")] == 0


# --- random cycles against the reference -----------------------------------------------------


def random_positions(
    rng: random.Random, count: int, pnl: Callable[[random.Random], int]
) -> Positions:
    """Unique u64 ids (about half from 2**63 up), accounts shared by a few positions each
    (some from 2**63 up too), pnl from the given distribution."""
    ids: set[int] = set()
    while len(ids) < count:
        ids.add(rng.getrandbits(64) if rng.random() < 0.8 else rng.randint(0, 3 * count))
    accounts = [rng.getrandbits(64) for _ in range(max(1, count // 4))] + list(range(1, 20))
    return Positions.of((i, rng.choice(accounts), pnl(rng)) for i in ids)


def mixed(rng: random.Random) -> int:
    return rng.randint(-1_000_000, 1_000_000)


def ties(rng: random.Random) -> int:
    return rng.choice([-300, -1, 0, 0, 1, 5, 100, 100, 100, 250, 250, 1000, 1000])


def heavy(rng: random.Random) -> int:
    return int(1000 / (1 - rng.random()) ** 1.2) - 500


def flat(rng: random.Random) -> int:
    return rng.randint(900, 1100) if rng.random() < 0.97 else -rng.randint(1, 1000)


def losing(rng: random.Random) -> int:
    return -rng.randint(0, 5000)


@dataclass(frozen=True)
class Case:
    name: str
    count: int
    pnl: Callable[[random.Random], int]
    # The cycle's loss: fixed yen, or a fraction of the positions' profit_total.
    loss: int | Fraction
    deposit: int  # the fund also takes a liquidation profit of 777 before the close
    policy: tuple[str, str] | None = None  # None: the default 0.2 / 0.9
    # What makes the case the case (checked on the reference, so it cannot silently drift).
    shows: Callable[[Reference], bool] = lambda ref: True

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("mixed", 3000, mixed, 1_250_000, 10**9, shows=lambda r: r.fund_paid == r.fund_share),
    Case("ties", 2000, ties, 7_777, 100, shows=lambda r: r.fund_paid == 877 < r.fund_share),
    Case("loss_beyond_profit", 500, ties, 10**9, 5_000, shows=lambda r: r.uncovered > 0),
    Case("widened", 1500, flat, Fraction(97, 100), 0, shows=lambda r: r.widened),
    Case("heavy_0.35_0.5", 2500, heavy, Fraction(1, 3), 10**6, ("0.35", "0.5")),
    Case(
        "all_from_fund_1_1",
        1000,
        flat,
        400_000,
        150_000,
        ("1", "1"),
        shows=lambda r: r.fund_paid == 150_777 and r.participant_count == r.profitable_count,
    ),
    Case("all_losing", 300, losing, 90_000, 1_000, shows=lambda r: r.profitable_count == 0),
    Case("no_positions", 0, mixed, 500, 50, shows=lambda r: r.uncovered == r.user_due > 0),
    Case("no_loss", 1000, mixed, 0, 1_000, shows=lambda r: r.allocated_total == 0),
]


def _loss_of(case: Case, positions: Positions) -> int:
    if isinstance(case.loss, int):
        return case.loss
    profit = int(positions.pnl[positions.pnl > 0].sum())
    return int(case.loss * profit)


def _split(total: int, parts: int) -> list[int]:
    """`total` as up to `parts` positive liquidation losses."""
    if total == 0:
        return []
    base = [total // parts] * parts
    base[0] += total - sum(base)
    return [b for b in base if b > 0]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_random_cycle_matches_reference(client: Client, database_url: str, case: Case) -> None:
    rng = random.Random(case.name)
    positions = random_positions(rng, case.count, case.pnl)
    loss = _loss_of(case, positions)
    market(client)
    policy = ("0.2", "0.9")
    if case.policy is not None:
        set_to = client.admin.SetPolicy(
            pb.SetPolicyRequest(
                currency=JPY, insurance_share=case.policy[0], coverage_ratio=case.policy[1]
            )
        )
        policy = (set_to.insurance_share, set_to.coverage_ratio)
        assert policy == case.policy
    # The fund: a deposit, a withdrawal, and a liquidation profit flowing in.
    inflow, withdrawal = 777, 111
    deposit(client, "d1", case.deposit + withdrawal)
    transfer(client, "w1", pb.TRANSFER_DIRECTION_WITHDRAW, withdrawal)
    liquidate(client, "P1", "c1", inflow)
    # The cycle's loss; a loss of another, open cycle and of another currency stay apart.
    for n, part in enumerate(_split(loss, 3)):
        liquidate(client, f"L{n}", "c1", -part)
    open_loss = 12_345
    liquidate(client, "Lopen", "c-open", -open_loss)
    liquidate(client, "Lkrw", "c1", -999, symbol="XKRW")
    fund_before = case.deposit + inflow
    assert fund_balance(client) == fund_before

    ref = allocate_reference(loss, fund_before, *policy, positions.rows())
    assert case.shows(ref), ref
    summary = cs.close(client.channel, "c1", JPY, positions.shuffled(1), sizes=None, seed=2)

    expected = expected_fields(
        ref,
        cycle_id="c1",
        loss=loss,
        fund_before=fund_before,
        policy=policy,
        digest=cs.input_digest(positions),
    )
    assert fields(summary) == expected
    assert summary.HasField("closed_at")
    assert get_cycle(client, "c1") == summary
    streamed = cs.stream_allocations(client.query, "c1", JPY)
    assert streamed.rows == ref.rows  # the reference sorts by id: unsigned order
    assert all(size <= cs.CHUNK_ROWS_MAX for size in streamed.chunk_sizes)

    by_account: defaultdict[int, list[tuple[int, int, int, int]]] = defaultdict(list)
    for row in ref.rows:
        by_account[row[1]].append(row)
    if by_account:
        for account in (max(by_account, key=lambda a: len(by_account[a])), max(by_account)):
            assert (
                cs.stream_allocations(client.query, "c1", JPY, account).rows
                == (by_account[account])
            )
            entries = list_entries(client, f"user:{account}", pb.ENTRY_KIND_ALLOCATION)
            assert sorted((e.position_id, -postings(e)[f"user:{account}"]) for e in entries) == [
                (r[0], r[3]) for r in by_account[account]
            ]
            assert {e.reference for e in entries} == {"c1"}

    assert_cycle_entries(client, ref)
    assert_ledger_balanced(
        client,
        database_url,
        fund=fund_before - ref.fund_paid,
        inflow_total=case.deposit + withdrawal + inflow,
        outflow_total=withdrawal + ref.fund_paid,
        open_loss=open_loss,
        user_balances={a: -sum(r[3] for r in rows) for a, rows in by_account.items()},
    )


def assert_cycle_entries(client: Client, ref: Reference) -> None:
    """The cover and the uncovered rest, each once, naming the cycle, only when non-zero."""
    covers = list_entries(client, "insurance_fund", pb.ENTRY_KIND_INSURANCE_COVER)
    if ref.fund_paid:
        (cover,) = covers
        assert cover.reference == "c1"
        assert postings(cover) == {"insurance_fund": -ref.fund_paid, "system_loss": ref.fund_paid}
    else:
        assert covers == []
    rests = list_entries(client, "uncovered_loss", pb.ENTRY_KIND_UNCOVERED_LOSS)
    if ref.uncovered:
        (rest,) = rests
        assert rest.reference == "c1"
        assert postings(rest) == {"uncovered_loss": -ref.uncovered, "system_loss": ref.uncovered}
    else:
        assert rests == []


def assert_ledger_balanced(
    client: Client,
    database_url: str,
    *,
    fund: int,
    inflow_total: int,
    outflow_total: int,
    open_loss: int,
    user_balances: dict[int, int],
) -> None:
    """The ledger's invariants after a close, from the RPCs and from the raw rows."""
    for account in SYSTEM_ACCOUNTS:
        for entry in list_entries(client, account):
            assert sum(p.amount for p in entry.postings) == 0, entry
            assert all(p.amount != 0 for p in entry.postings), entry
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            bad = conn.execute(
                text(
                    "SELECT count(*) FROM entries "
                    "WHERE amount <= 0 OR debit_account = credit_account"
                )
            ).scalar_one()
            bad += conn.execute(
                text("SELECT count(*) FROM allocations WHERE amount <= 0")
            ).scalar_one()
    finally:
        engine.dispose()
    assert bad == 0
    view = client.query.GetFund(pb.GetFundRequest(currency=JPY))
    assert (view.balance, view.inflow_total, view.outflow_total) == (
        fund,
        inflow_total,
        outflow_total,
    )
    journal = balances_from_journal(database_url)
    assert journal[(JPY, "insurance_fund")] == fund
    assert journal[(JPY, "system_loss")] == -open_loss  # the closed cycle's part nets to zero
    assert journal[(KRW, "system_loss")] == -999  # KRW's c1 is still open
    users = {
        int(name.removeprefix("user:")): balance
        for (currency, name), balance in journal.items()
        if currency == JPY and name.startswith("user:") and balance
    }
    assert users == {a: b for a, b in user_balances.items() if b}
    cached = cached_balances(database_url)
    for key in {k for k in journal if not k[1].startswith("user:")} | set(cached):
        assert cached.get(key, 0) == journal.get(key, 0), key


def test_cycles_in_sequence_draw_on_the_fund_left(client: Client, database_url: str) -> None:
    """A second cycle starts from the fund the first left; each nets its own system loss."""
    market(client)
    deposit(client, "d1", 1_000)
    rng = random.Random(5)
    first, second = (random_positions(rng, 400, ties) for _ in range(2))
    liquidate(client, "L1", "c1", -4_000)
    liquidate(client, "L2", "c2", -3_000)
    s1 = cs.close(client.channel, "c1", JPY, first)
    ref1 = allocate_reference(4_000, 1_000, "0.2", "0.9", first.rows())
    assert fields(s1) == expected_fields(
        ref1,
        cycle_id="c1",
        loss=4_000,
        fund_before=1_000,
        policy=("0.2", "0.9"),
        digest=cs.input_digest(first),
    )
    left = 1_000 - ref1.fund_paid
    assert balances_from_journal(database_url)[(JPY, "system_loss")] == -3_000
    s2 = cs.close(client.channel, "c2", JPY, second)
    ref2 = allocate_reference(3_000, left, "0.2", "0.9", second.rows())
    assert fields(s2) == expected_fields(
        ref2,
        cycle_id="c2",
        loss=3_000,
        fund_before=left,
        policy=("0.2", "0.9"),
        digest=cs.input_digest(second),
    )
    assert cs.stream_allocations(client.query, "c1", JPY).rows == ref1.rows
    assert cs.stream_allocations(client.query, "c2", JPY).rows == ref2.rows
    journal = balances_from_journal(database_url)
    assert journal[(JPY, "system_loss")] == 0
    assert journal[(JPY, "insurance_fund")] == left - ref2.fund_paid == fund_balance(client)
    assert cached_balances(database_url)[(JPY, "system_loss")] == 0


# --- the digest, repeats and conflicts ------------------------------------------------------


def test_hand_encoded_chunks_are_the_contract() -> None:
    """cycle_streams' encoder writes what the generated classes write."""
    positions = Positions.of([(U63 + 5, 2**64 - 1, -(2**63)), (0, 0, 0), (7, 300, 2**63 - 1)])
    chunk = pb.PositionChunk(
        position_id=positions.position_id.tolist(),
        account_id=positions.account_id.tolist(),
        pnl=positions.pnl.tolist(),
    )
    assert cs.chunk(positions.position_id, positions.account_id, positions.pnl) == (
        pb.CycleInput(positions=chunk).SerializeToString()
    )
    empty = np.array([], dtype=np.uint64)
    assert (
        cs.chunk(empty, empty, empty)
        == pb.CycleInput(positions=pb.PositionChunk()).SerializeToString()
    )


def test_digest_independent_of_chunking_and_order(client: Client, database_url: str) -> None:
    market(client)
    liquidate(client, "L1", "c1", -5_000)
    positions = random_positions(random.Random(7), 1200, ties)
    expected = cs.input_digest(positions)
    # ... and the helper is issue 5's definition, spelled out once more.
    rows = sorted(positions.rows())
    assert expected == hashlib.sha256(b"".join(struct.pack("<QQq", *r) for r in rows)).hexdigest()
    before = snapshot(database_url)
    previews = [
        cs.preview(client.channel, "c1", JPY, positions),
        cs.preview(client.channel, "c1", JPY, positions, sizes=[1]),
        cs.preview(client.channel, "c1", JPY, positions.shuffled(3), sizes=[1000, 0, 7]),
        cs.preview(client.channel, "c1", JPY, positions.shuffled(4), sizes=None, seed=5),
    ]
    assert {p.input_digest for p in previews} == {expected}
    assert all(p == previews[0] for p in previews)
    assert snapshot(database_url) == before


def test_repeat_returns_stored_summary_and_conflict_names_digests(
    client: Client, database_url: str
) -> None:
    market(client)
    deposit(client, "d1", 100_000)
    liquidate(client, "L1", "c1", -50_000)
    positions = random_positions(random.Random(8), 1500, mixed)
    first = cs.close(client.channel, "c1", JPY, positions)
    before = snapshot(database_url)
    for order_seed, chunk_seed in ((11, 12), (13, 14)):
        again = cs.close(
            client.channel, "c1", JPY, positions.shuffled(order_seed), sizes=None, seed=chunk_seed
        )
        assert again == first  # closed_at included: the stored summary
    assert snapshot(database_url) == before

    pnl = positions.pnl.copy()
    pnl[len(pnl) // 2] += 1
    changed = Positions(positions.position_id, positions.account_id, pnl)
    other = cs.input_digest(changed)
    assert other != first.input_digest
    assert_rejected(
        lambda: cs.close(client.channel, "c1", JPY, changed),
        grpc.StatusCode.ALREADY_EXISTS,
        first.input_digest,
        other,
    )
    assert snapshot(database_url) == before
    assert get_cycle(client, "c1") == first


def test_concurrent_closes_write_one_set_of_flows(client: Client, database_url: str) -> None:
    market(client)
    deposit(client, "d1", 1_000_000)
    liquidate(client, "L1", "c1", -2_000_000)
    positions = random_positions(random.Random(9), 4000, flat)
    ref = allocate_reference(2_000_000, 1_000_000, "0.2", "0.9", positions.rows())
    replies: list[pb.CycleSummary | grpc.RpcError] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def close(k: int) -> None:
        own = Client.connect(client.target)
        try:
            start.wait()
            reply: pb.CycleSummary | grpc.RpcError = cs.close(
                own.channel, "c1", JPY, positions.shuffled(k), sizes=None, seed=k
            )
        except grpc.RpcError as error:
            reply = error
        finally:
            own.channel.close()
        with lock:
            replies.append(reply)

    threads = [threading.Thread(target=close, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    stored = get_cycle(client, "c1")
    assert fields(stored) == expected_fields(
        ref,
        cycle_id="c1",
        loss=2_000_000,
        fund_before=1_000_000,
        policy=("0.2", "0.9"),
        digest=cs.input_digest(positions),
    )
    for reply in replies:
        if isinstance(reply, grpc.RpcError):
            assert reply.code() == grpc.StatusCode.ALREADY_EXISTS, reply.details()
        else:
            assert reply == stored
    assert len(replies) == 4
    assert allocation_rows(database_url) == len(ref.rows)
    engine = create_engine(database_url)
    with engine.connect() as conn:
        kinds = Counter(
            k for (k,) in conn.execute(text("SELECT kind FROM entries WHERE reference = 'c1'"))
        )
        cycles = conn.execute(text("SELECT count(*) FROM cycles")).scalar_one()
    engine.dispose()
    assert cycles == 1
    assert ref.uncovered == 0
    assert kinds == Counter({pb.ENTRY_KIND_INSURANCE_COVER: 1})
    assert balances_from_journal(database_url)[(JPY, "system_loss")] == 0


# --- preview, lookups, streaming ----------------------------------------------------------


def test_preview_computes_and_writes_nothing(client: Client, database_url: str) -> None:
    market(client)
    deposit(client, "d1", 3_000)
    liquidate(client, "L1", "c1", -40_000)
    positions = random_positions(random.Random(10), 800, heavy)
    ref = allocate_reference(40_000, 3_000, "0.2", "0.9", positions.rows())
    before = snapshot(database_url)
    preview = cs.preview(client.channel, "c1", JPY, positions, sizes=[100])
    expected = expected_fields(
        ref,
        cycle_id="c1",
        loss=40_000,
        fund_before=3_000,
        policy=("0.2", "0.9"),
        digest=cs.input_digest(positions),
        state=pb.CYCLE_STATE_PREVIEW,
    )
    assert fields(preview) == expected
    assert not preview.HasField("closed_at")
    assert snapshot(database_url) == before
    assert_not_closed(client, database_url, "c1")  # GetCycle of a never-closed cycle

    closed = cs.close(client.channel, "c1", JPY, positions)
    assert fields(closed) == {**expected, "state": pb.CYCLE_STATE_CLOSED, "version": 1}
    # A preview of a closed cycle still only computes: over the fund as it is now.
    after = snapshot(database_url)
    again = cs.preview(client.channel, "c1", JPY, positions)
    assert again.state == pb.CYCLE_STATE_PREVIEW
    assert again.fund_balance_before == 3_000 - ref.fund_paid
    assert snapshot(database_url) == after


def test_lookups_of_unknown_cycles_and_currencies(client: Client) -> None:
    market(client)
    assert_rejected(lambda: get_cycle(client, "never"), NOT_FOUND, "never")
    assert_rejected(lambda: get_cycle(client, "c1", "EUR"), NOT_FOUND, "EUR")
    assert_rejected(lambda: get_cycle(client, "", JPY), INVALID, "cycle_id")
    assert_rejected(lambda: cs.stream_allocations(client.query, "never", JPY), NOT_FOUND, "never")


def test_stream_allocations_in_chunks_of_at_most_65536(client: Client) -> None:
    """150,000 flat positions under coverage 1: every profitable one is allocated, so the
    reply needs three chunks; ids from 2**63 up come after the smaller ones."""
    count = 150_000
    rng = np.random.default_rng(12)
    ids = rng.choice(2**40, size=count, replace=False).astype(np.uint64)
    ids[: count // 3] += np.uint64(U63)  # a third of them from 2**63 up
    positions = Positions(
        ids,
        rng.integers(0, 2**64 - 1, size=count, dtype=np.uint64, endpoint=True),
        rng.integers(1_000, 2_000, size=count, dtype=np.int64),
    )
    market(client)
    client.admin.SetPolicy(
        pb.SetPolicyRequest(currency=JPY, insurance_share="0.2", coverage_ratio="1")
    )
    loss = 10**9
    liquidate(client, "L1", "c1", -loss)
    summary = cs.close(client.channel, "c1", JPY, positions)
    assert summary.participant_count == count
    streamed = cs.stream_allocations(client.query, "c1", JPY)
    assert streamed.chunk_sizes == [65_536, 65_536, count - 2 * 65_536]
    ids_back = [r[0] for r in streamed.rows]
    assert ids_back == sorted(positions.position_id.tolist())
    assert ids_back[-1] >= U63 > ids_back[0]
    ref = allocate_reference(loss, 0, "0.2", "1", positions.rows())
    assert streamed.rows == ref.rows
    assert fields(summary) == expected_fields(
        ref,
        cycle_id="c1",
        loss=loss,
        fund_before=0,
        policy=("0.2", "1"),
        digest=cs.input_digest(positions),
    )
    account = int(positions.account_id[0])
    assert cs.stream_allocations(client.query, "c1", JPY, account).rows == [
        r for r in ref.rows if r[1] == account
    ]


def test_closed_cycle_takes_no_more_liquidations(client: Client, database_url: str) -> None:
    market(client)
    liquidate(client, "L1", "c1", -100)
    cs.close(client.channel, "c1", JPY, Positions.of(WORKED))
    before = snapshot(database_url)
    assert_rejected(
        lambda: liquidate(client, "L2", "c1", -100), grpc.StatusCode.FAILED_PRECONDITION, "c1"
    )
    assert snapshot(database_url) == before
    liquidate(client, "L3", "c2", -100)  # the next cycle is open
    liquidate(client, "L4", "c1", -100, symbol="XKRW")  # and so is KRW's c1


# --- bad streams ---------------------------------------------------------------------------


def _chunk(rows: list[tuple[int, int, int]]) -> bytes:
    return cs.chunk(
        *(
            np.array(col, dtype=dt)
            for col, dt in zip(zip(*rows, strict=True), ("u8", "u8", "i8"), strict=True)
        )
    )


H = cs.header("c1", JPY)
GOOD = _chunk([(1, 10, 500), (2, 20, 300)])


def bad(
    name: str,
    messages: list[bytes],
    code: grpc.StatusCode,
    *words: str,
    marks: pytest.MarkDecorator | tuple[()] = (),
) -> object:
    """A row: the stream, its status, and words its message must name."""
    return pytest.param(messages, code, words, id=name, marks=marks)


BAD_STREAMS = [
    bad("empty stream", [], INVALID, "header"),
    bad("empty message", [H, b""], INVALID, "neither header nor positions"),
    bad("second header", [H, GOOD, H], INVALID, "second header"),
    bad("positions before header", [GOOD, H], INVALID, "before the header"),
    bad(
        "unequal columns",
        [
            H,
            pb.CycleInput(
                positions=pb.PositionChunk(position_id=[1, 2], account_id=[1, 2], pnl=[5])
            ).SerializeToString(),
        ],
        INVALID,
        "length",
    ),
    bad(
        "duplicate within a chunk",
        [H, _chunk([(1, 10, 5), (987_654_321, 20, 6), (987_654_321, 30, 7)])],
        INVALID,
        "duplicate",
        "987654321",
    ),
    bad(
        "duplicate across chunks",
        [H, _chunk([(424_242, 10, 5)]), _chunk([(3, 10, 5), (424_242, 20, 6)])],
        INVALID,
        "duplicate",
        "424242",
    ),
    bad("empty cycle_id", [cs.header("", JPY), GOOD], INVALID, "cycle_id"),
    bad("empty currency", [cs.header("c1", ""), GOOD], INVALID, "currency"),
    bad("malformed currency", [cs.header("c1", "jp-y"), GOOD], INVALID, "currency", "jp-y"),
    bad("malformed bytes", [H, b"\x12\x05\x0a\x09"], INVALID),
    bad("unknown currency", [cs.header("c1", "EUR"), GOOD], NOT_FOUND, "EUR"),
]


@pytest.mark.parametrize(("messages", "code", "words"), BAD_STREAMS)
@pytest.mark.parametrize("method", [cs.CLOSE_METHOD, cs.PREVIEW_METHOD], ids=["close", "preview"])
def test_bad_stream_is_rejected_and_writes_nothing(
    client: Client,
    database_url: str,
    method: str,
    messages: list[bytes],
    code: grpc.StatusCode,
    words: tuple[str, ...],
) -> None:
    market(client)
    deposit(client, "d1", 1_000)
    liquidate(client, "L1", "c1", -100)  # a good close of c1 would write
    before = snapshot(database_url)
    call = cs.raw_call(client.channel, method)
    assert_rejected(lambda: call(iter(messages), timeout=30), code, *words)
    assert snapshot(database_url) == before
    assert_not_closed(client, database_url, "c1")
    cs.close(client.channel, "c1", JPY, Positions.of(WORKED))  # the server is still fine


def test_positions_above_the_configured_maximum(database_url: str) -> None:
    server = LedgerServer(
        Settings(listen="127.0.0.1:0", database_url=database_url, cycle_positions_max=10)
    )
    server.start()
    client = Client.connect(f"127.0.0.1:{server.port}")
    try:
        market(client)
        liquidate(client, "L1", "c1", -100)
        eleven = Positions.of((n, n, 10 * n) for n in range(1, 12))
        before = snapshot(database_url)
        for sizes in ([11], [6, 5], [10, 0, 1]):

            def close(sizes: list[int] = sizes) -> object:
                return cs.close(client.channel, "c1", JPY, eleven, sizes=sizes)

            assert_rejected(
                close,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "10",
                "positions",
            )
            assert snapshot(database_url) == before
        assert_not_closed(client, database_url, "c1")
        ten = eleven.take(np.arange(10))
        assert cs.close(client.channel, "c1", JPY, ten, sizes=[3]).positions_total == 10
    finally:
        client.channel.close()
        server.stop(grace_seconds=5)


CANCEL_ATTEMPTS = 6  # the server's view of a cancel races with its end of stream: try a few


def test_close_cancelled_mid_stream_writes_nothing(client: Client, database_url: str) -> None:
    market(client)
    deposit(client, "d1", 10_000)
    for k in range(CANCEL_ATTEMPTS):
        liquidate(client, f"L{k}", f"c{k}", -5_000)
    positions = random_positions(random.Random(13), 3000, mixed)
    before = snapshot(database_url)
    for k in range(CANCEL_ATTEMPTS):
        sent_some = threading.Event()
        release = threading.Event()

        def stalled(cycle_id: str, sent: threading.Event, go: threading.Event) -> Iterator[bytes]:
            for n, message in enumerate(cs.messages(cycle_id, JPY, positions, sizes=[500])):
                if n == 4:
                    sent.set()
                    go.wait(30)
                    return  # the call is cancelled before this
                yield message

        future = cs.raw_call(client.channel, cs.CLOSE_METHOD).future(
            stalled(f"c{k}", sent_some, release), timeout=60
        )
        assert sent_some.wait(30)
        time.sleep(0.2)  # the server now waits for the next message
        assert future.cancel()
        release.set()
        with pytest.raises(grpc.FutureCancelledError):
            future.result()
    time.sleep(0.5)  # a wrongly completed close lands by now
    closed = [c for c in (f"c{k}" for k in range(CANCEL_ATTEMPTS)) if _is_closed(client, c)]
    assert closed == [], f"cancelled closes that closed their cycle: {closed}"
    assert snapshot(database_url) == before
    assert_not_closed(client, database_url, "c0")

    summary = cs.close(client.channel, "c0", JPY, positions)
    ref = allocate_reference(5_000, 10_000, "0.2", "0.9", positions.rows())
    assert summary.allocated_total == ref.allocated_total
    assert allocation_rows(database_url) == len(ref.rows)


WAL_GROWTH_BYTES = 16 * 1024 * 1024  # well into the allocation rows (≈ 50 bytes a row)


class WriteWatch:
    """Polls the database until the allocation rows are being written."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self.sqlite = make_url(database_url).get_backend_name() == "sqlite"
        if self.sqlite:
            self.wal = Path(str(make_url(database_url).database) + "-wal")
            self.wal_start = self.wal.stat().st_size if self.wal.exists() else 0

    def in_write_phase(self) -> bool:
        if self.sqlite:
            size = self.wal.stat().st_size if self.wal.exists() else 0
            return size > self.wal_start + WAL_GROWTH_BYTES
        libpq = make_url(self.url).set(drivername="postgresql").render_as_string(False)
        with psycopg.connect(libpq, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'active' AND query ILIKE 'COPY allocations%'"
            ).fetchone()
        return bool(row and row[0])

    def wait_writer_done(self) -> None:
        """Block until the close's transaction has ended, committed or rolled back: take
        what it holds (SQLite: the write lock; PostgreSQL: the system_loss rows)."""
        if self.sqlite:
            lite = sqlite3.connect(str(make_url(self.url).database), timeout=60)
            try:
                lite.isolation_level = None
                lite.execute("BEGIN IMMEDIATE")
                lite.execute("ROLLBACK")
            finally:
                lite.close()
            return
        libpq = make_url(self.url).set(drivername="postgresql").render_as_string(False)
        with psycopg.connect(libpq) as conn:
            conn.execute("SELECT 1 FROM accounts WHERE name = 'system_loss' FOR UPDATE")
            conn.rollback()


def test_close_cancelled_in_write_phase_writes_nothing(client: Client, database_url: str) -> None:
    count = 1_000_000
    ids = np.arange(1, count + 1, dtype=np.uint64)
    positions = Positions(ids, ids % np.uint64(1000), np.full(count, 1_000, dtype=np.int64))
    market(client)
    liquidate(client, "L1", "c1", -5 * count)
    before = snapshot(database_url)
    watch = WriteWatch(database_url)
    future = cs.raw_call(client.channel, cs.CLOSE_METHOD).future(
        cs.messages("c1", JPY, positions), timeout=120
    )
    deadline = time.monotonic() + 60
    while not watch.in_write_phase():
        assert not future.done(), "the close ended before its write phase was seen"
        assert time.monotonic() < deadline, "the write phase was never seen"
        time.sleep(0.01)
    assert future.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    watch.wait_writer_done()
    assert not _is_closed(client, "c1"), "the cancelled close was committed"
    assert snapshot(database_url) == before
    summary = cs.close(client.channel, "c1", JPY, positions)
    assert summary.participant_count == count
