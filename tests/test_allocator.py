"""ledger.alloc.allocate: the issue's worked example, one row per rule and per error, the
buffer boundary, and properties against the Fraction reference (tests/alloc_reference.py):
equal results, conservation, bounds, and independence from input order."""

from __future__ import annotations

import array
import random
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.alloc import (
    AllocationError,
    AllocationResult,
    ColumnLengthError,
    ColumnTypeError,
    DuplicatePositionError,
    NegativeAmountError,
    PositionLimitError,
    RatioError,
    allocate,
)
from tests.alloc_reference import Reference, allocate_reference

INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1

Row = tuple[int, int, int]  # position_id, account_id, pnl


def columns(rows: list[Row]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.array([r[0] for r in rows], dtype=np.uint64),
        np.array([r[1] for r in rows], dtype=np.uint64),
        np.array([r[2] for r in rows], dtype=np.int64),
    )


def run(loss: int, fund: int, q: str, c: str, rows: list[Row]) -> AllocationResult:
    return allocate(loss, fund, q, c, *columns(rows))


def summary(result: AllocationResult | Reference) -> tuple[object, ...]:
    return (
        result.fund_share,
        result.fund_paid,
        result.user_due,
        result.positions_total,
        result.profitable_count,
        result.profit_total,
        result.cutoff_pnl,
        result.participant_count,
        result.participant_profit,
        result.widened,
        result.allocated_total,
        result.uncovered,
    )


def result_rows(result: AllocationResult) -> list[tuple[int, int, int, int]]:
    return list(
        zip(
            result.position_id.tolist(),
            result.account_id.tolist(),
            result.pnl.tolist(),
            result.amount.tolist(),
            strict=True,
        )
    )


def check_invariants(result: AllocationResult, loss: int) -> None:
    amounts = result.amount.tolist()
    pnls = result.pnl.tolist()
    assert sum(amounts) == result.allocated_total
    assert all(0 < a <= p for a, p in zip(amounts, pnls, strict=True))
    assert result.fund_paid + result.allocated_total + result.uncovered == loss
    assert result.position_id.tolist() == sorted(set(result.position_id.tolist()))
    assert result.allocation_count <= result.participant_count <= result.profitable_count


# --- the worked example and one row per rule ------------------------------------------------


def test_worked_example() -> None:
    rows = [(1, 11, 500), (2, 12, 300), (3, 13, 150), (4, 14, 50), (5, 15, -80)]
    result = run(1000, 10_000, "0.2", "0.9", rows)
    assert summary(result) == (200, 200, 800, 5, 4, 1000, 150, 3, 950, False, 800, 0)
    assert result_rows(result) == [(1, 11, 500, 421), (2, 12, 300, 253), (3, 13, 150, 126)]
    assert result.position_id.dtype == np.uint64 and result.amount.dtype == np.int64


# fmt: off  (one row per rule reads better than one field per line)
RULES = [
    # (rule, loss, fund, q, c, (id, pnl) rows, expected summary, expected (id, amount) rows)
    (
        "fund share rounds half up",
        5,
        100,
        "0.5",
        "1",
        [],
        (3, 3, 2, 0, 0, 0, 0, 0, 0, False, 0, 2),
        [],
    ),
    (
        "fund pays at most its balance",
        1000,
        50,
        "0.2",
        "1",
        [(1, 10_000)],
        (200, 50, 950, 1, 1, 10_000, 10_000, 1, 10_000, False, 950, 0),
        [(1, 950)],
    ),
    (
        "ties with the cutoff are all in, capped at their profit",
        100,
        0,
        "0",
        "0.5",
        [(9, 10), (3, 10), (4, 10), (5, 10)],
        (0, 0, 100, 4, 4, 40, 10, 4, 40, False, 40, 60),
        [(3, 10), (4, 10), (5, 10), (9, 10)],
    ),
    (
        "widened when the participants cannot cover",
        1000,
        0,
        "0",
        "0.5",
        [(1, 600), (2, 300), (3, 100)],
        (0, 0, 1000, 3, 3, 1000, 600, 3, 1000, True, 1000, 0),
        [(1, 600), (2, 300), (3, 100)],
    ),
    (
        "not widened when they can",
        500,
        0,
        "0",
        "0.5",
        [(1, 600), (2, 300), (3, 100)],
        (0, 0, 500, 3, 3, 1000, 600, 1, 600, False, 500, 0),
        [(1, 500)],
    ),
    (
        "leftover units: equal remainders and pnl go to smaller ids",
        2,
        0,
        "0",
        "1",
        [(30, 5), (10, 5), (20, 5)],
        (0, 0, 2, 3, 3, 15, 5, 3, 15, False, 2, 0),
        [(10, 1), (20, 1)],
    ),
    (
        "leftover units: the larger remainder first",
        1,
        0,
        "0",
        "1",
        [(1, 1), (2, 2)],
        (0, 0, 1, 2, 2, 3, 1, 2, 3, False, 1, 0),
        [(2, 1)],
    ),
    (
        "nothing profitable: all uncovered",
        1000,
        0,
        "0.2",
        "0.9",
        [(1, -5), (2, 0)],
        (200, 0, 1000, 2, 0, 0, 0, 0, 0, False, 0, 1000),
        [],
    ),
    (
        "zero loss: nobody pays",
        0,
        10,
        "0.2",
        "0.9",
        [(1, 5)],
        (0, 0, 0, 1, 1, 5, 5, 1, 5, False, 0, 0),
        [],
    ),
]
# fmt: on


@pytest.mark.parametrize(
    ("loss", "fund", "q", "c", "rows", "expected", "allocations"),
    [pytest.param(*rule[1:], id=rule[0]) for rule in RULES],
)
def test_rule(
    loss: int,
    fund: int,
    q: str,
    c: str,
    rows: list[tuple[int, int]],
    expected: tuple[object, ...],
    allocations: list[tuple[int, int]],
) -> None:
    result = run(loss, fund, q, c, [(i, i + 1000, pnl) for i, pnl in rows])
    assert summary(result) == expected
    assert list(zip(result.position_id.tolist(), result.amount.tolist(), strict=True)) == (
        allocations
    )
    check_invariants(result, loss)


def test_int64_limits_and_profit_totals_beyond_int64() -> None:
    rows = [(UINT64_MAX - i, i, INT64_MAX) for i in range(4)]
    result = run(INT64_MAX, INT64_MAX, "0.000000000000000001", "1", rows)
    assert result.fund_share == 9  # 9.223372036854775807 rounds to 9
    assert result.profit_total == 4 * INT64_MAX  # a Python int beyond int64
    check_invariants(result, INT64_MAX)


def test_decimal_ratios_are_accepted_exactly() -> None:
    rows = [(1, 1, 500), (2, 2, 300), (3, 3, 150), (4, 4, 50)]
    by_text = run(1000, 10_000, "0.2", "0.9", rows)
    by_decimal = allocate(1000, 10_000, Decimal("0.20"), Decimal("0.9"), *columns(rows))
    assert summary(by_text) == summary(by_decimal)


# --- the buffer boundary ---------------------------------------------------------------------


def test_accepts_any_buffer_of_the_right_type() -> None:
    ids, accounts, pnl = [1, 2, 3], [7, 8, 9], [500, 300, -1]
    expected = result_rows(run(100, 0, "0", "1", list(zip(ids, accounts, pnl, strict=True))))
    as_arrays = allocate(
        100, 0, "0", "1", array.array("Q", ids), array.array("Q", accounts), array.array("q", pnl)
    )
    as_bytes = allocate(
        100,
        0,
        "0",
        "1",
        memoryview(np.array(ids, dtype="<u8").tobytes()).cast("Q"),
        memoryview(np.array(accounts, dtype="<u8").tobytes()).cast("Q"),
        memoryview(np.array(pnl, dtype="<i8").tobytes()).cast("q"),
    )
    assert result_rows(as_arrays) == result_rows(as_bytes) == expected


@pytest.mark.parametrize(
    ("position_id", "account_id", "pnl", "named"),
    [
        pytest.param(
            [1, 2], np.zeros(2, np.uint64), np.zeros(2, np.int64), "position_id", id="list"
        ),
        pytest.param(
            np.array([1, 2]),
            np.zeros(2, np.uint64),
            np.zeros(2, np.int64),
            "position_id",
            id="int64 ids",
        ),
        pytest.param(
            np.arange(2, dtype=np.uint64),
            np.zeros(2, np.uint64),
            np.zeros(2, np.float64),
            "pnl",
            id="float pnl",
        ),
        pytest.param(
            np.arange(2, dtype=np.uint64),
            np.zeros(4, np.uint64)[::2],
            np.zeros(2, np.int64),
            "account_id",
            id="strided",
        ),
        pytest.param(
            np.arange(4, dtype=np.uint64).reshape(2, 2),
            np.zeros(4, np.uint64),
            np.zeros(4, np.int64),
            "position_id",
            id="2-d",
        ),
    ],
)
def test_rejects_columns_of_the_wrong_type(
    position_id: object, account_id: object, pnl: object, named: str
) -> None:
    with pytest.raises(ColumnTypeError, match=named):
        allocate(0, 0, "0.2", "0.9", position_id, account_id, pnl)


def test_results_are_read_only_arrays() -> None:
    result = run(10, 0, "0", "1", [(1, 1, 10)])
    with pytest.raises(ValueError, match="read-only"):
        result.amount[0] = 0


# --- errors, each naming its problem ---------------------------------------------------------

# fmt: off
ERRORS = [
    ("unequal lengths", ColumnLengthError, "unequal lengths: position_id 2, account_id 1, pnl 2",
     dict(ids=[1, 2], accounts=[1], pnl=[1, 2])),
    ("duplicate id", DuplicatePositionError, "duplicate position_id 7",
     dict(ids=[7, 3, 7], accounts=[0, 0, 0], pnl=[1, 2, 3])),
    ("duplicate sparse id", DuplicatePositionError, f"duplicate position_id {UINT64_MAX}",
     dict(ids=[UINT64_MAX, 0, UINT64_MAX], accounts=[0, 0, 0], pnl=[1, 2, 3])),
    ("negative loss", NegativeAmountError, "loss must be >= 0, got -1", dict(loss=-1)),
    ("negative fund", NegativeAmountError, "fund_balance must be >= 0, got -5", dict(fund=-5)),
    ("loss beyond int64", AllocationError, "does not fit int64", dict(loss=2**63)),
    ("float loss", AllocationError, "loss must be an int", dict(loss=1.0)),
    ("share above one", RatioError, "insurance_share 1.5 is out of range", dict(q="1.5")),
    ("zero coverage", RatioError, r"coverage_ratio 0\.0 is out of range \(0, 1\]", dict(c="0.0")),
    ("coverage above one", RatioError, "coverage_ratio 1.000000000000000001 is out of range",
     dict(c="1.000000000000000001")),
    ("exponent", RatioError, '"9e-1" is not a decimal', dict(c="9e-1")),
    ("negative ratio", RatioError, 'insurance_share "-0.1" is not a decimal', dict(q="-0.1")),
    ("too many places", RatioError, "at most 18 decimal places",
     dict(q="0.0000000000000000001")),
    ("float ratio", RatioError, "must be a decimal string or Decimal", dict(q=0.2)),
    ("nan ratio", RatioError, "not a finite decimal", dict(q=Decimal("NaN"))),
]
# fmt: on


@pytest.mark.parametrize(
    ("error", "message", "changes"),
    [pytest.param(*case[1:], id=case[0]) for case in ERRORS],
)
def test_error(error: type[Exception], message: str, changes: dict[str, object]) -> None:
    args: dict[str, object] = dict(
        loss=100, fund=0, q="0.2", c="0.9", ids=[1, 2], accounts=[1, 2], pnl=[5, 6]
    )
    args.update(changes)
    ids = np.array(args["ids"], dtype=np.uint64)
    accounts = np.array(args["accounts"], dtype=np.uint64)
    pnl = np.array(args["pnl"], dtype=np.int64)
    with pytest.raises(error, match=message):
        allocate(args["loss"], args["fund"], args["q"], args["c"], ids, accounts, pnl)  # type: ignore[arg-type]


def test_exception_tree() -> None:
    assert issubclass(AllocationError, ValueError)
    for error in (ColumnLengthError, ColumnTypeError, DuplicatePositionError, RatioError):
        assert issubclass(error, AllocationError)
    assert not issubclass(PositionLimitError, AllocationError)


# --- properties against the reference ----------------------------------------------------------


def ratio_text(rng: random.Random, low_units: int) -> str:
    """A decimal in [low_units/10^places, 1] with 0 to 18 places."""
    places = rng.randint(0, 18)
    den = 10**places
    units = rng.randint(min(low_units, den), den)
    if places == 0:
        return str(units)
    return f"{units // den}.{units % den:0{places}d}"


PNL_SHAPES = ["ties", "mixed", "all_negative", "heavy_tail", "int64_edges", "wide"]


def make_pnl(rng: random.Random, shape: str, n: int) -> list[int]:
    if shape == "ties":
        values = [rng.randint(-3, 3) * rng.choice([1, 10, 1000]) for _ in range(8)]
        return [rng.choice(values) for _ in range(n)]
    if shape == "mixed":
        return [rng.randint(-1000, 1000) for _ in range(n)]
    if shape == "all_negative":
        return [rng.randint(-(10**6), 0) for _ in range(n)]
    if shape == "heavy_tail":
        return [int(100 * rng.paretovariate(1.2)) * rng.choice([1, 1, -1]) for _ in range(n)]
    if shape == "int64_edges":
        return [rng.choice([INT64_MAX, INT64_MAX - 1, -INT64_MAX - 1, 1, 0]) for _ in range(n)]
    return [rng.randint(-INT64_MAX - 1, INT64_MAX) for _ in range(n)]


def make_ids(rng: random.Random, n: int) -> list[int]:
    kind = rng.choice(["ascending", "dense", "sparse", "top"])
    if kind == "ascending":
        return list(range(1, n + 1))
    if kind == "dense":
        ids = rng.sample(range(3 * n + 1), n)
    elif kind == "sparse":
        ids = list({rng.getrandbits(64) for _ in range(n)})
    else:
        ids = [UINT64_MAX - i for i in range(n)]
    rng.shuffle(ids)
    return ids


def make_loss(rng: random.Random, pnl: list[int]) -> int:
    profit = sum(p for p in pnl if p > 0)
    kind = rng.choice(["zero", "small", "fraction", "beyond_profit", "int64_max"])
    if kind == "zero":
        return 0
    if kind == "small":
        return rng.randint(1, 1000)
    if kind == "fraction":
        return min(INT64_MAX, rng.randint(0, max(profit, 1)))
    if kind == "beyond_profit":
        return min(INT64_MAX, profit + rng.randint(1, 10**6))
    return INT64_MAX - rng.randint(0, 5)


@st.composite
def cases(draw: st.DrawFn, sizes: st.SearchStrategy[int]) -> tuple[int, int, str, str, list[Row]]:
    seed = draw(st.integers(0, 2**64))
    n = draw(sizes)
    shape = draw(st.sampled_from(PNL_SHAPES))
    rng = random.Random(seed)
    pnl = make_pnl(rng, shape, n)
    ids = make_ids(rng, len(pnl))
    rows = [(i, rng.getrandbits(64), p) for i, p in zip(ids, pnl, strict=False)]
    loss = make_loss(rng, pnl)
    fund = rng.choice([0, rng.randint(0, 10**4), INT64_MAX])
    q = rng.choice(["0", "1", "0.2", ratio_text(rng, 0)])
    c = rng.choice(["1", "0.9", "0.000000000000000001", ratio_text(rng, 1)])
    return loss, fund, q, c, rows


def check_against_reference(case: tuple[int, int, str, str, list[Row]]) -> None:
    loss, fund, q, c, rows = case
    result = run(loss, fund, q, c, rows)
    want = allocate_reference(loss, fund, q, c, rows)
    assert summary(result) == summary(want)
    assert result_rows(result) == want.rows
    check_invariants(result, loss)
    shuffled = rows[:]
    random.Random(len(rows)).shuffle(shuffled)
    again = run(loss, fund, q, c, shuffled)
    assert summary(again) == summary(result)
    assert result_rows(again) == result_rows(result)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(st.integers(0, 60)))
def test_small_cases_match_the_reference(case: tuple[int, int, str, str, list[Row]]) -> None:
    check_against_reference(case)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(st.one_of(st.integers(60, 3000), st.integers(10_000, 40_000))))
def test_large_cases_match_the_reference(case: tuple[int, int, str, str, list[Row]]) -> None:
    check_against_reference(case)
