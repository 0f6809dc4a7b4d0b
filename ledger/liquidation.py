"""Liquidations reported through a cycle: the engine's result, and its flow into the ledger.

The liquidation engine took over the user's position and remaining margin at the takeover
price and closed it at the close price. A profit flows into the margin currency's insurance
fund at once; a loss accrues to the cycle's system loss, which the cycle close covers.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ledger import journal, money
from ledger.currency import ContractKind
from ledger.db import models
from ledger.db.store import (
    account_deltas,
    apply_deltas,
    lock_system_loss,
    now_us,
    reserve_entry_ids,
)
from ledger.db.u64 import to_signed
from ledger.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ledger.idempotency import request_hash
from ledger.journal import INSURANCE_FUND, LIQUIDATION_ENGINE, SYSTEM_LOSS, EntryKind
from ledger.limits import INT64_MAX, INT64_MIN, UINT64_MAX

_T = TypeVar("_T")
_IN_CLAUSE_MAX = 500  # ids per IN (...) list, well under every backend's parameter limit


class Side(enum.IntEnum):
    """The liquidated user's side; numbers are those of insurance.v1.Side."""

    LONG = 1
    SHORT = 2


class Outcome(enum.IntEnum):
    """Numbers are those of insurance.v1.Outcome."""

    FUND_INFLOW = 1
    SYSTEM_LOSS = 2
    BREAK_EVEN = 3


@dataclass(frozen=True, slots=True)
class LiquidationRequest:
    """A validated report; decimals are kept exact, and `digest` is its request hash."""

    liquidation_id: str
    cycle_id: str
    symbol: str
    account_id: int
    position_id: int
    side: Side
    quantity: Decimal
    takeover_price: Decimal
    close_price: Decimal
    remaining_margin: int
    digest: str


@dataclass(frozen=True, slots=True)
class LiquidationResult:
    liquidation_id: str
    currency: str
    engine_result: int
    outcome: Outcome
    fund_balance: int
    entry_id: int  # 0 when nothing was posted (BREAK_EVEN)


def validate(
    liquidation_id: str,
    cycle_id: str,
    symbol: str,
    account_id: int,
    position_id: int,
    side: int,
    quantity: str,
    takeover_price: str,
    close_price: str,
    remaining_margin: int,
) -> LiquidationRequest:
    """Check every field that needs no database; raises InvalidArgument naming the field.

    The request hash is taken here, in the caller's thread, so that the single writer of a
    group commit does no per-request hashing.
    """
    money.identifier("liquidation_id", liquidation_id)
    money.identifier("cycle_id", cycle_id)
    money.identifier("symbol", symbol)
    for field, value in (("account_id", account_id), ("position_id", position_id)):
        if not 0 <= value <= UINT64_MAX:
            raise InvalidArgument(field, value, "must be an unsigned 64-bit integer")
    if side not in _SIDES:
        raise InvalidArgument("side", side, "must be LONG (1) or SHORT (2)")
    money.minor_units("remaining_margin", remaining_margin)
    if remaining_margin < 0:
        raise InvalidArgument("remaining_margin", remaining_margin, "must not be negative")
    q = money.positive_decimal("quantity", quantity)
    takeover = money.positive_decimal("takeover_price", takeover_price)
    close = money.positive_decimal("close_price", close_price)
    digest = request_hash(
        liquidation_id=liquidation_id,
        cycle_id=cycle_id,
        symbol=symbol,
        account_id=account_id,
        position_id=position_id,
        side=side,
        quantity=money.canonical(q),
        takeover_price=money.canonical(takeover),
        close_price=money.canonical(close),
        remaining_margin=remaining_margin,
    )
    return LiquidationRequest(
        liquidation_id,
        cycle_id,
        symbol,
        account_id,
        position_id,
        _SIDES[side],
        q,
        takeover,
        close,
        remaining_margin,
        digest,
    )


_SIDES = {int(s): s for s in Side}


def engine_result(
    kind: ContractKind,
    side: Side,
    quantity: Decimal,
    takeover_price: Decimal,
    close_price: Decimal,
    multiplier: Decimal,
    remaining_margin: int,
    scale: int,
) -> int:
    """remaining_margin + the engine's pnl in minor units, exact, rounded toward −∞.

    Every decimal is an exact ratio of integers, so the pnl is one fraction num / den with
    den > 0 (prices are positive), and Python's floor division of the integers is the floor
    of the exact value: no Fraction normalisation on the hot path, no float anywhere.
    """
    qn, qd = quantity.as_integer_ratio()
    mn, md = multiplier.as_integer_ratio()
    tn, td = takeover_price.as_integer_ratio()
    cn, cd = close_price.as_integer_ratio()
    if kind == ContractKind.LINEAR:  # close − takeover = (cn·td − tn·cd) / (cd·td)
        num, den = cn * td - tn * cd, cd * td
    else:  # INVERSE, face value `multiplier`: 1/takeover − 1/close = (td·cn − cd·tn) / (tn·cn)
        num, den = td * cn - cd * tn, tn * cn
    if side == Side.SHORT:
        num = -num
    units_per_major: int = 10**scale
    return remaining_margin + (num * qn * mn * units_per_major) // (den * qd * md)


def outcome_of(result: int) -> Outcome:
    if result > 0:
        return Outcome.FUND_INFLOW
    if result < 0:
        return Outcome.SYSTEM_LOSS
    return Outcome.BREAK_EVEN


@dataclass(frozen=True, slots=True)
class _Contract:
    currency: str
    kind: ContractKind
    multiplier: Decimal
    scale: int


@dataclass(frozen=True, slots=True)
class _Stored:
    request_hash: str
    result: LiquidationResult


class _Driver:
    """The batch's own statements, sent straight through the DBAPI cursor of the session's
    connection (so inside its transaction).

    The single writer of a group commit runs these for every batch while every RPC thread
    waits for it, under one GIL: SQLAlchemy's execution path costs tens of microseconds a
    statement, the driver's a few. The statements are plain enough to read as SQL; the
    inserts take their column lists from the models so that they cannot drift from them.
    """

    def __init__(self, session: Session) -> None:
        connection = session.connection()
        self.is_sqlite = connection.dialect.name == "sqlite"
        self._mark = "?" if self.is_sqlite else "%s"  # sqlite3: qmark; psycopg: format
        self._cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]

    def rows(self, sql: str, keys: set[str]) -> list[tuple[Any, ...]]:
        """Run `sql` with its one `IN ({})` list filled with `keys`, in chunks."""
        found: list[tuple[Any, ...]] = []
        for chunk in _chunks(sorted(keys)):
            self._cursor.execute(sql.format(", ".join([self._mark] * len(chunk))), chunk)
            found.extend(self._cursor.fetchall())
        return found

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """Insert rows of `columns`: one executemany on SQLite (a loop in C), one multi-row
        VALUES statement a chunk on PostgreSQL (one round trip)."""
        values = "(" + ", ".join([self._mark] * len(columns)) + ")"
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
        if self.is_sqlite:
            self._cursor.executemany(sql + values, rows)
            return
        for chunk in _chunks(list(rows)):
            flat = [value for row in chunk for value in row]
            self._cursor.execute(sql + ", ".join([values] * len(chunk)), flat)


_ENTRY_COLUMNS = (
    "id",
    "currency",
    "kind",
    "reference",
    "debit_account",
    "credit_account",
    "amount",
    "memo",
    "created_at_us",
)
_LIQUIDATION_COLUMNS = (
    "liquidation_id",
    "request_hash",
    "currency",
    "cycle_id",
    "symbol",
    "account_id",
    "position_id",
    "side",
    "quantity",
    "takeover_price",
    "close_price",
    "remaining_margin",
    "engine_result",
    "outcome",
    "fund_balance_after",
    "entry_id",
    "created_at_us",
)
# Every column of the models, so that a new column cannot be silently left out.
assert set(_ENTRY_COLUMNS) == set(models.Entry.__table__.columns.keys())
assert set(_LIQUIDATION_COLUMNS) == set(models.Liquidation.__table__.columns.keys())

_SELECT_CONTRACTS = (
    "SELECT contracts.symbol, contracts.margin_currency, contracts.kind, contracts.multiplier,"
    " currencies.scale FROM contracts"
    " JOIN currencies ON currencies.code = contracts.margin_currency"
    " WHERE contracts.symbol IN ({})"
)
_SELECT_PREVIOUS = (
    "SELECT liquidation_id, request_hash, currency, engine_result, outcome, fund_balance_after,"
    " entry_id FROM liquidations WHERE liquidation_id IN ({})"
)
_SELECT_CLOSED = "SELECT currency, cycle_id FROM cycles WHERE cycle_id IN ({})"
_SELECT_FUNDS = (
    f"SELECT currency, balance FROM accounts WHERE name = '{INSURANCE_FUND}' AND currency IN ({{}})"
)


def record_batch(
    session: Session, requests: Sequence[LiquidationRequest]
) -> list[LiquidationResult | Exception]:
    """Record a batch of liquidations in the caller's transaction, with a few statements in all.

    Each request gets its result or its own error (unknown symbol, result beyond int64, an id
    reused with other content, a closed cycle); the others are written regardless.
    """
    driver = _Driver(session)
    outcomes: list[LiquidationResult | Exception | None] = [None] * len(requests)
    contracts = _contracts(driver, {r.symbol for r in requests})
    results: dict[int, tuple[str, int]] = {}  # index → (currency, engine_result)
    for i, r in enumerate(requests):
        contract = contracts.get(r.symbol)
        if contract is None:
            outcomes[i] = NotFound(f"symbol: unknown contract {r.symbol!r}")
            continue
        value = engine_result(
            contract.kind,
            r.side,
            r.quantity,
            r.takeover_price,
            r.close_price,
            contract.multiplier,
            r.remaining_margin,
            contract.scale,
        )
        if not INT64_MIN <= value <= INT64_MAX:
            outcomes[i] = InvalidArgument(
                "engine_result", value, "does not fit a signed 64-bit integer of minor units"
            )
            continue
        results[i] = (contract.currency, value)
    if not results:
        return _complete(outcomes)

    lock_system_loss(session, [currency for currency, _ in results.values()])
    previous = _previous(driver, {requests[i].liquidation_id for i in results})
    closed = _closed_cycles(driver, {requests[i].cycle_id for i in results})

    first_in_batch: dict[str, int] = {}
    aliases: dict[int, int] = {}  # a repeat within the batch → the index it repeats
    to_write: list[int] = []
    for i, (currency, _value) in results.items():
        r = requests[i]
        stored = previous.get(r.liquidation_id)
        if stored is not None:
            outcomes[i] = stored.result if stored.request_hash == r.digest else _conflict(r)
        elif r.liquidation_id in first_in_batch:
            j = first_in_batch[r.liquidation_id]
            if requests[j].digest != r.digest:
                outcomes[i] = _conflict(r)
            else:
                aliases[i] = j
        elif (currency, r.cycle_id) in closed:
            outcomes[i] = FailedPrecondition(
                f"cycle {r.cycle_id!r} of {currency} is closed; report liquidations in an "
                "open cycle"
            )
        else:
            first_in_batch[r.liquidation_id] = i
            to_write.append(i)

    for i, result in _write(session, driver, requests, results, to_write).items():
        outcomes[i] = result
    for i, j in aliases.items():
        outcomes[i] = outcomes[j]
    return _complete(outcomes)


def _complete(
    outcomes: list[LiquidationResult | Exception | None],
) -> list[LiquidationResult | Exception]:
    done = [o for o in outcomes if o is not None]
    assert len(done) == len(outcomes), "a request of the batch was left without an outcome"
    return done


def _write(
    session: Session,
    driver: _Driver,
    requests: Sequence[LiquidationRequest],
    results: dict[int, tuple[str, int]],
    to_write: list[int],
) -> dict[int, LiquidationResult]:
    if not to_write:
        return {}
    created = now_us()
    transfers: dict[int, journal.Transfer] = {}
    for i in to_write:
        currency, value = results[i]
        r = requests[i]
        if value > 0:
            transfers[i] = journal.transfer(
                EntryKind.LIQUIDATION_PROFIT,
                currency,
                r.liquidation_id,
                LIQUIDATION_ENGINE,
                INSURANCE_FUND,
                value,
            )
        elif value < 0:
            transfers[i] = journal.transfer(
                EntryKind.LIQUIDATION_LOSS,
                currency,
                r.liquidation_id,
                SYSTEM_LOSS,
                LIQUIDATION_ENGINE,
                -value,
            )
    balances = apply_deltas(session, account_deltas(list(transfers.values())))
    entry_ids: dict[int, int] = {}
    if transfers:
        first = reserve_entry_ids(session, len(transfers))
        entry_rows = []
        for n, (i, t) in enumerate(transfers.items()):
            entry_ids[i] = first + n
            entry_rows.append(
                (
                    first + n,
                    t.currency,
                    int(t.kind),
                    t.reference,
                    t.debit,
                    t.credit,
                    t.amount,
                    t.memo,
                    created,
                )
            )
        driver.insert("entries", _ENTRY_COLUMNS, entry_rows)
    # The fund's balance right after each liquidation, in batch order: walk back from the
    # balance after the batch by the batch's inflows, then forward one liquidation at a time.
    currencies = {results[i][0] for i in to_write}
    running = {
        c: balances[(c, INSURANCE_FUND)] for c in currencies if (c, INSURANCE_FUND) in balances
    }
    if len(running) < len(currencies):  # no inflow to these funds in this batch
        running.update(_fund_balances(driver, currencies - running.keys()))
    for t in transfers.values():
        if t.credit == INSURANCE_FUND:
            running[t.currency] -= t.amount
    written: dict[int, LiquidationResult] = {}
    rows = []
    for i in to_write:
        currency, value = results[i]
        if value > 0:
            running[currency] += value
        r = requests[i]
        result = LiquidationResult(
            r.liquidation_id,
            currency,
            value,
            outcome_of(value),
            running[currency],
            entry_ids.get(i, 0),
        )
        written[i] = result
        rows.append(
            (
                r.liquidation_id,
                r.digest,
                currency,
                r.cycle_id,
                r.symbol,
                to_signed(r.account_id),
                to_signed(r.position_id),
                int(r.side),
                money.canonical(r.quantity),
                money.canonical(r.takeover_price),
                money.canonical(r.close_price),
                r.remaining_margin,
                value,
                int(result.outcome),
                result.fund_balance,
                entry_ids.get(i),
                created,
            )
        )
    driver.insert("liquidations", _LIQUIDATION_COLUMNS, rows)
    return written


def _contracts(driver: _Driver, symbols: set[str]) -> dict[str, _Contract]:
    return {
        symbol: _Contract(currency, ContractKind(kind), Decimal(multiplier), scale)
        for symbol, currency, kind, multiplier, scale in driver.rows(_SELECT_CONTRACTS, symbols)
    }


def _previous(driver: _Driver, ids: set[str]) -> dict[str, _Stored]:
    found: dict[str, _Stored] = {}
    for lid, digest, currency, value, outcome, fund, entry_id in driver.rows(_SELECT_PREVIOUS, ids):
        result = LiquidationResult(lid, currency, value, Outcome(outcome), fund, entry_id or 0)
        found[lid] = _Stored(digest, result)
    return found


def _closed_cycles(driver: _Driver, cycle_ids: set[str]) -> set[tuple[str, str]]:
    """(currency, cycle_id) of the closed cycles among these ids, of any currency."""
    return {(currency, cycle_id) for currency, cycle_id in driver.rows(_SELECT_CLOSED, cycle_ids)}


def _fund_balances(driver: _Driver, currencies: set[str]) -> dict[str, int]:
    return {c: int(b) for c, b in driver.rows(_SELECT_FUNDS, currencies)}


def _conflict(request: LiquidationRequest) -> AlreadyExists:
    return AlreadyExists(
        f"liquidation_id {request.liquidation_id!r} was already used for a different liquidation"
    )


def _chunks(items: list[_T]) -> list[list[_T]]:
    return [items[k : k + _IN_CLAUSE_MAX] for k in range(0, len(items), _IN_CLAUSE_MAX)]


def loss_total(session: Session, currency: str, cycle_id: str) -> int:
    """The cycle's system loss so far: the sum of its SYSTEM_LOSS liquidations, positive."""
    total = session.scalar(
        select(func.coalesce(func.sum(models.Liquidation.engine_result), 0)).where(
            models.Liquidation.currency == currency,
            models.Liquidation.cycle_id == cycle_id,
            models.Liquidation.outcome == int(Outcome.SYSTEM_LOSS),
        )
    )
    return -int(total or 0)
