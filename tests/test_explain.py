"""ExplainAllocation (issue 13, item 4) through a real server on both backends.

Every position of random closed cycles is explained and checked against numbers computed
here from the cycle's input and the Fraction references (tests/alloc_reference.py): its rank
(1 + the profitable positions, or accounts, with a larger pnl or profit), whether it
participates, its exact share as a reduced fraction, its amount (equal to the stored
allocation as StreamAllocations gives it) and whether the largest-remainder step gave it a
unit. The worked example by hand; then the refusals (NOT_FOUND for a cycle not closed or a
position it never saw, INVALID_ARGUMENT naming the field) and a cycle whose kept input was
removed behind the server's back (FAILED_PRECONDITION, until the same close is sent again).
"""

from __future__ import annotations

import math
import random
import time
from fractions import Fraction

import grpc
import pytest
from sqlalchemy import Engine, create_engine, text

from ledger.api.v1 import insurance_pb2 as pb
from tests import cycle_streams as cs
from tests import test_cycle as tc
from tests.alloc_reference import Reference, allocate_by_account_reference, allocate_reference
from tests.conftest import Client

Row = tuple[int, int, int]


def explain(client: Client, cycle_id: str, position_id: int) -> pb.AllocationExplanation:
    return client.query.ExplainAllocation(
        pb.ExplainAllocationRequest(cycle_id=cycle_id, currency=tc.JPY, position_id=position_id)
    )


def expected(rows: list[Row], ref: Reference, position: Row, *, by_account: bool) -> dict:
    """The statement of `position`, from the input and the reference alone."""
    position_id, account_id, pnl = position
    profitable = [r for r in rows if r[2] > 0]
    if by_account:
        profits: dict[int, int] = {}
        for _, account, value in profitable:
            profits[account] = profits.get(account, 0) + value
        standing = profits.get(account_id, 0)
        rank = 1 + sum(1 for p in profits.values() if p > standing)
    else:
        standing = pnl
        rank = 1 + sum(1 for r in profitable if r[2] > pnl)
    low = 1 if ref.widened else max(ref.cutoff_pnl, 1)
    # Under account ranking `participant` speaks of the position's account, as rank does.
    participant = ref.participant_count > 0 and standing >= low
    charged = participant and pnl > 0
    share = Fraction(ref.allocated_total * pnl, ref.participant_profit) if charged else Fraction(0)
    amounts = {r[0]: r[3] for r in ref.rows}
    amount = amounts.get(position_id, 0)
    if by_account and charged:
        charge = sum(a for _, acc, _, a in ref.rows if acc == account_id)
        base = charge * pnl // standing
    else:
        base = math.floor(share)
    return {
        "position_id": position_id,
        "account_id": account_id,
        "pnl": pnl,
        "rank": rank,
        "profitable_count": ref.profitable_count,
        "cutoff_pnl": ref.cutoff_pnl,
        "participant": participant,
        "participant_profit": ref.participant_profit,
        "allocated_total": ref.allocated_total,
        "share_numerator": str(share.numerator),
        "share_denominator": str(share.denominator),
        "amount": amount,
        "remainder_unit": charged and amount == base + 1,
    }


def as_dict(message: pb.AllocationExplanation) -> dict:
    return {f.name: getattr(message, f.name) for f in pb.AllocationExplanation.DESCRIPTOR.fields}


def test_the_worked_example(client: Client) -> None:
    tc.market(client)
    tc.deposit(client, "d1", 10_000)
    tc.liquidate(client, "L1", "c1", -1_000)
    rows = [(1, 1001, 500), (2, 1002, 300), (3, 1003, 150), (4, 1004, 50), (5, 1005, -80)]
    cs.close(client.channel, "c1", tc.JPY, cs.Positions.of(rows))
    two = explain(client, "c1", 2)
    assert (two.rank, two.participant, two.amount, two.remainder_unit) == (2, True, 253, True)
    assert (two.share_numerator, two.share_denominator) == ("4800", "19")  # 800 × 300 / 950
    assert (two.profitable_count, two.cutoff_pnl, two.participant_profit) == (4, 150, 950)
    assert two.allocated_total == 800 and two.account_id == 1002 and two.pnl == 300
    one = explain(client, "c1", 1)
    assert (one.rank, one.amount, one.remainder_unit) == (1, 421, False)
    assert (one.share_numerator, one.share_denominator) == ("8000", "19")
    four = explain(client, "c1", 4)
    assert (four.rank, four.participant, four.amount) == (4, False, 0)
    assert (four.share_numerator, four.share_denominator) == ("0", "1")
    five = explain(client, "c1", 5)
    assert (five.rank, five.participant, five.amount, five.pnl) == (5, False, 0, -80)


def test_the_account_ranking_example(client: Client) -> None:
    """README's example of account ranking, with a losing position in a participating
    account: rank, cutoff and participant speak of its account; it is charged nothing."""
    tc.market(client)
    tc.deposit(client, "d1", 10_000)
    client.admin.SetPolicy(
        pb.SetPolicyRequest(
            currency=tc.JPY, insurance_share="0.2", coverage_ratio="0.9", ranking=pb.RANKING_ACCOUNT
        )
    )
    tc.liquidate(client, "L1", "c1", -1_000)
    rows = [(1, 1, 500), (2, 2, 300), (3, 3, 150), (4, 3, 40), (5, 3, 40), (6, 3, 40)]
    rows += [(7, 4, 10), (8, 4, -30), (9, 3, -25)]
    cs.close(client.channel, "c1", tc.JPY, cs.Positions.of(rows))
    forty = explain(client, "c1", 4)
    assert (forty.rank, forty.cutoff_pnl, forty.participant) == (3, 270, True)
    assert (forty.share_numerator, forty.share_denominator) == ("3200", "107")  # 800×40/1070
    assert (forty.amount, forty.remainder_unit) == (30, True)  # 29.9 of 202, and a unit
    losing = explain(client, "c1", 9)
    assert (losing.rank, losing.participant, losing.amount, losing.remainder_unit) == (
        3,
        True,
        0,
        False,
    )
    assert (losing.share_numerator, losing.share_denominator) == ("0", "1")
    outside = explain(client, "c1", 8)
    assert (outside.rank, outside.participant, outside.amount) == (4, False, 0)
    amounts = [explain(client, "c1", k).amount for k in range(1, 10)]
    assert amounts == [374, 224, 112, 30, 30, 30, 0, 0, 0]


@pytest.mark.parametrize("by_account", [False, True], ids=["positions", "accounts"])
def test_every_position_of_random_cycles(client: Client, by_account: bool) -> None:
    tc.market(client)
    tc.deposit(client, "d1", 1_000)
    if by_account:
        client.admin.SetPolicy(
            pb.SetPolicyRequest(
                currency=tc.JPY,
                insurance_share="0.2",
                coverage_ratio="0.9",
                ranking=pb.RANKING_ACCOUNT,
            )
        )
    rng = random.Random(41 + by_account)
    fund = 1_000
    for number in range(3):
        cycle_id = f"c{number}"
        loss = rng.choice([5_000, 40_000, 10**6])
        tc.liquidate(client, f"L{number}", cycle_id, -loss)
        count = rng.randint(50, 250)
        rows = [
            (rng.getrandbits(64), rng.randint(1, 25), rng.choice([rng.randint(-900, 900), 77]))
            for _ in range(count)
        ]
        rows = list({r[0]: r for r in rows}.values())
        summary = cs.close(client.channel, cycle_id, tc.JPY, cs.Positions.of(rows).shuffled(3))
        reference_of = allocate_by_account_reference if by_account else allocate_reference
        ref = reference_of(loss, fund, "0.2", "0.9", rows)
        assert summary.allocated_total == ref.allocated_total
        stored = {r[0]: r[3] for r in cs.stream_allocations(client.query, cycle_id, tc.JPY).rows}
        for position in rows:
            got = as_dict(explain(client, cycle_id, position[0]))
            assert got == expected(rows, ref, position, by_account=by_account), position
            assert got["amount"] == stored.get(position[0], 0)
        fund -= summary.fund_paid


def test_refusals_name_what_is_wrong(client: Client) -> None:
    tc.market(client)
    tc.liquidate(client, "L1", "c1", -100)
    cs.close(client.channel, "c1", tc.JPY, cs.Positions.of([(7, 1, 500)]))
    cases = [
        ("c1", tc.JPY, 8, grpc.StatusCode.NOT_FOUND, "position 8"),
        ("c2", tc.JPY, 7, grpc.StatusCode.NOT_FOUND, "'c2'"),
        ("c1", "usd", 7, grpc.StatusCode.INVALID_ARGUMENT, "currency"),
        ("", tc.JPY, 7, grpc.StatusCode.INVALID_ARGUMENT, "cycle_id"),
        ("c1", "EUR", 7, grpc.StatusCode.NOT_FOUND, "EUR"),
    ]
    for cycle_id, currency, position_id, code, named in cases:
        with pytest.raises(grpc.RpcError) as error:
            client.query.ExplainAllocation(
                pb.ExplainAllocationRequest(
                    cycle_id=cycle_id, currency=currency, position_id=position_id
                )
            )
        assert error.value.code() == code, (cycle_id, currency, position_id)
        assert named in error.value.details(), error.value.details()
    assert explain(client, "c1", 7).amount == 100  # an empty fund: the users pay it all


def kept_parts(engine: Engine, want: int) -> list[tuple[int, int, int]]:
    """The kept parts (part, parts, rows), once there are `want` of them (within seconds)."""
    deadline = time.monotonic() + 30
    while True:
        with engine.connect() as connection:
            parts = [
                (int(a), int(b), int(c))
                for a, b, c in connection.execute(
                    text("SELECT part, parts, rows FROM cycle_input_parts ORDER BY part")
                )
            ]
        if len(parts) >= want or time.monotonic() > deadline:
            return parts
        time.sleep(0.02)


def test_a_removed_input_is_kept_again_by_the_same_close(client: Client, database_url: str) -> None:
    tc.market(client)
    tc.liquidate(client, "L1", "c1", -100)
    positions = cs.Positions.of([(7, 1, 500), (8, 2, 100)])
    first = cs.close(client.channel, "c1", tc.JPY, positions)
    engine = create_engine(database_url)
    try:
        kept_parts(engine, 1)  # the keep runs beside the reply: let it finish first
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM cycle_input_parts"))
    finally:
        engine.dispose()
    with pytest.raises(grpc.RpcError) as error:
        explain(client, "c1", 9)  # not cached: this cycle's input was never read
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "send the same close again" in error.value.details()
    again = cs.close(client.channel, "c1", tc.JPY, positions)
    assert again == first
    assert explain(client, "c1", 8).rank == 2


def test_an_input_in_many_parts(
    client: Client, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts of 1,000 positions (the server runs in this process): cut in position_id order
    from a shuffled stream, read back whole; a second, differently shuffled close of the same
    input adds nothing."""
    from ledger import statement

    monkeypatch.setattr(statement, "PART_ROWS", 1_000)
    tc.market(client)
    tc.liquidate(client, "L1", "c1", -50_000)
    rng = random.Random(5)
    rows = [(k * 3 + 1, rng.randint(1, 99), rng.randint(-400, 400)) for k in range(5_500)]
    positions = cs.Positions.of(rows)
    cs.close(client.channel, "c1", tc.JPY, positions.shuffled(1))
    engine = create_engine(database_url)
    try:
        kept_parts(engine, 6)
        cs.close(client.channel, "c1", tc.JPY, positions.shuffled(2))
        explain(client, "c1", rows[0][0])  # waits for the second close's keep, if any
        parts = kept_parts(engine, 6)
    finally:
        engine.dispose()
    assert parts == [(k, 6, 1_000) for k in range(5)] + [(5, 6, 500)]
    ref = allocate_reference(50_000, 0, "0.2", "0.9", rows)
    for position in [rows[0], rows[999], rows[1_000], rows[2_718], rows[-1]]:
        got = as_dict(explain(client, "c1", position[0]))
        assert got == expected(rows, ref, position, by_account=False), position
    with pytest.raises(grpc.RpcError) as error:
        explain(client, "c1", 2)  # between two ids of the input
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_failed_keep_is_tried_again(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server runs in this process: the first two keeps fail (as a busy database
    would), the third keeps the input, and the statement waits for it."""
    from ledger import statement

    real = statement.keep
    calls: list[int] = []

    def flaky(*args: object) -> None:
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("database is locked")
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(statement, "keep", flaky)
    monkeypatch.setattr(statement, "KEEP_RETRY_SECONDS", 0.01)
    tc.market(client)
    tc.liquidate(client, "L1", "c1", -100)
    cs.close(client.channel, "c1", tc.JPY, cs.Positions.of([(7, 1, 500), (8, 2, 100)]))
    assert explain(client, "c1", 8).rank == 2
    assert len(calls) == 3


def test_a_late_keep_of_a_reversed_close_keeps_it_as_that_close(
    client: Client, database_url: str
) -> None:
    """A keep runs after its close has replied: by then the cycle may have been reversed and
    closed again. The first close's input is kept as the first close's, never as the second
    close's (whose positions its statements must explain)."""
    from ledger import cycle
    from ledger.db.session import Database
    from ledger.statement import Close, keep

    tc.market(client)
    tc.liquidate(client, "L1", "c1", -100)
    first_rows = cs.Positions.of([(7, 1, 500), (8, 2, 100)])
    first = cs.close(client.channel, "c1", tc.JPY, first_rows)
    client.admin.ReverseCycle(pb.ReverseCycleRequest(cycle_id="c1", currency=tc.JPY))
    second_rows = cs.Positions.of([(20, 3, 900), (21, 4, 50)])
    second = cs.close(client.channel, "c1", tc.JPY, second_rows)
    engine = create_engine(database_url)
    try:
        kept_parts(engine, 2)  # both keeps have run
        with engine.begin() as connection:  # as if the keeps had not run yet
            connection.execute(text("DELETE FROM cycle_input_parts"))
    finally:
        engine.dispose()
    database = Database(database_url)
    try:
        late = Close(cycle.CycleKey("c1", tc.JPY), first.version, first.input_digest)
        columns = (first_rows.position_id, first_rows.account_id, first_rows.pnl)
        keep(database, late, columns)  # the first close's keep, run late
    finally:
        database.dispose()
    with pytest.raises(grpc.RpcError) as error:
        explain(client, "c1", 20)  # the second close's input is still not kept
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "send the same close again" in error.value.details()
    assert cs.close(client.channel, "c1", tc.JPY, second_rows) == second  # keeps it
    assert explain(client, "c1", 20).amount == second.allocated_total
    with pytest.raises(grpc.RpcError) as error:
        explain(client, "c1", 7)  # a position of the first close only
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
