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
from typing import Any

import psycopg
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ledger import money
from ledger.currency import ContractKind
from ledger.db import models
from ledger.db.batch import BatchStatements, Insert, Query, Statement
from ledger.db.session import SqliteWriter
from ledger.db.store import now_us
from ledger.db.u64 import to_signed
from ledger.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ledger.idempotency import request_hash
from ledger.journal import INSURANCE_FUND, LIQUIDATION_ENGINE, SYSTEM_LOSS, EntryKind
from ledger.limits import INT64_MAX, INT64_MIN, UINT64_MAX


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
    quantity_text: str  # the decimals in canonical form, as stored and hashed
    takeover_price_text: str
    close_price_text: str


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
    texts = money.canonical(q), money.canonical(takeover), money.canonical(close)
    digest = request_hash(
        liquidation_id=liquidation_id,
        cycle_id=cycle_id,
        symbol=symbol,
        account_id=account_id,
        position_id=position_id,
        side=side,
        quantity=texts[0],
        takeover_price=texts[1],
        close_price=texts[2],
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
        *texts,
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


@dataclass(slots=True)
class _Account:
    """A system account row as locked by the batch, moved in memory as the batch goes."""

    balance: int
    credit_total: int
    debit_total: int
    moved: bool = False

    def move(self, credits: int, debits: int) -> bool:
        """Apply the amounts if every bound holds (int64 for the balance and both totals;
        the fund's floor is never at stake here, a liquidation only pays into it)."""
        balance = self.balance + credits - debits
        credit_total = self.credit_total + credits
        debit_total = self.debit_total + debits
        if not (
            INT64_MIN <= balance <= INT64_MAX
            and credit_total <= INT64_MAX
            and debit_total <= INT64_MAX
        ):
            return False
        self.balance, self.credit_total, self.debit_total = balance, credit_total, debit_total
        self.moved = True
        return True


_ENTRIES = models.Base.metadata.tables["entries"]
_LIQUIDATIONS = models.Base.metadata.tables["liquidations"]
_ACCOUNT_NAMES = (SYSTEM_LOSS, INSURANCE_FUND, LIQUIDATION_ENGINE)

_SELECT_CONTRACTS = (
    "SELECT contracts.symbol, contracts.margin_currency, contracts.kind, contracts.multiplier,"
    " currencies.scale FROM contracts"
    " JOIN currencies ON currencies.code = contracts.margin_currency"
    " WHERE contracts.symbol {}"
)
# The lock order of every writer (see ledger.db.store): system_loss rows first, then the other
# accounts by (currency, name); the entry id counter last.
_LOCK_ACCOUNTS = (
    "SELECT currency, name, balance, credit_total, debit_total FROM accounts"
    f" WHERE name IN ('{SYSTEM_LOSS}', '{INSURANCE_FUND}', '{LIQUIDATION_ENGINE}')"
    " AND currency IN (SELECT margin_currency FROM contracts WHERE symbol {})"
    f" ORDER BY CASE WHEN name = '{SYSTEM_LOSS}' THEN 0 ELSE 1 END, currency, name"
)
_SELECT_PREVIOUS = (
    "SELECT liquidation_id, request_hash, currency, engine_result, outcome, fund_balance_after,"
    " entry_id FROM liquidations WHERE liquidation_id {}"
)
_SELECT_CLOSED = "SELECT currency, cycle_id FROM cycles WHERE cycle_id {}"
_LOCK_ENTRY_IDS = "SELECT next_value FROM counters WHERE name = 'entry_id'"
_SET_ENTRY_IDS = "UPDATE counters SET next_value = ? WHERE name = 'entry_id'"
_SET_ACCOUNT = (
    "UPDATE accounts SET balance = ?, credit_total = ?, debit_total = ?"
    " WHERE currency = ? AND name = ?"
)


Outcomes = list[LiquidationResult | Exception]


def record_batch(session: Session, requests: Sequence[LiquidationRequest]) -> Outcomes:
    """Record a batch of liquidations in the caller's transaction.

    Two round trips to the database whatever the batch size: one reads and locks what the
    batch depends on (the accounts it moves and the entry id counter, then contracts, earlier
    uses of its ids, closed cycles), one writes (accounts, counter, entries, liquidations).
    Every decision in between is made in memory against the locked rows. Each request gets
    its result or its own error (unknown symbol, a result beyond int64, an id reused with
    other content, a closed cycle); the others are written regardless.
    """
    db = BatchStatements.of_session(session)
    outcomes, writes = _decide_locked(db, requests)
    db.write_together(writes)
    return outcomes


def record_batch_postgres(
    connection: psycopg.Connection[Any], requests: Sequence[LiquidationRequest]
) -> Outcomes:
    """record_batch on the group commit writer's own PostgreSQL connection, as one transaction
    that it commits: the writes and the COMMIT share a round trip."""
    db = BatchStatements(connection, is_sqlite=False)
    outcomes, writes = _decide_locked(db, requests)
    db.write_and_commit(writes)
    return outcomes


def record_batch_sqlite(writer: SqliteWriter, requests: Sequence[LiquidationRequest]) -> Outcomes:
    """record_batch as one SQLite transaction that it commits, on the writer's connection."""
    writer.begin()
    db = BatchStatements(writer.dbapi_connection, is_sqlite=True)
    outcomes, writes = _decide_locked(db, requests)
    db.write_together(writes)
    writer.commit()
    return outcomes


def _decide_locked(
    db: BatchStatements, requests: Sequence[LiquidationRequest]
) -> tuple[Outcomes, list[Statement | Insert]]:
    """Read and lock what the batch depends on (one round trip), then decide it in memory."""
    return _decide(requests, db.select_together(*_reads(requests, db.for_update)))


def _reads(requests: Sequence[LiquidationRequest], lock: str) -> list[list[Query]]:
    symbols = {r.symbol for r in requests}
    return [
        [(_LOCK_ACCOUNTS + lock, symbols), (_LOCK_ENTRY_IDS + lock, None)],
        [
            (_SELECT_CONTRACTS, symbols),
            (_SELECT_PREVIOUS, {r.liquidation_id for r in requests}),
            (_SELECT_CLOSED, {r.cycle_id for r in requests}),
        ],
    ]


def _decide(
    requests: Sequence[LiquidationRequest], rows: list[list[tuple[Any, ...]]]
) -> tuple[Outcomes, list[Statement | Insert]]:
    """Each request's outcome, and the writes that record the batch (none if nothing is new)."""
    account_rows, counter_rows, contract_rows, previous_rows, closed_rows = rows
    contracts = {
        symbol: _Contract(currency, ContractKind(kind), Decimal(multiplier), scale)
        for symbol, currency, kind, multiplier, scale in contract_rows
    }
    accounts = {
        (currency, name): _Account(int(balance), int(credits), int(debits))
        for currency, name, balance, credits, debits in account_rows
    }
    previous = {
        lid: _Stored(digest, LiquidationResult(lid, cur, value, Outcome(out), fund, entry or 0))
        for lid, digest, cur, value, out, fund, entry in previous_rows
    }
    closed = {(currency, cycle_id) for currency, cycle_id in closed_rows}
    ((next_entry_id,),) = counter_rows

    outcomes: list[LiquidationResult | Exception | None] = [None] * len(requests)
    first_in_batch: dict[str, int] = {}
    aliases: dict[int, int] = {}  # a repeat within the batch → the index it repeats
    entry_rows: list[tuple[object, ...]] = []
    liquidation_rows: list[tuple[object, ...]] = []
    created = now_us()
    for i, r in enumerate(requests):
        contract = contracts.get(r.symbol)
        if contract is None:
            outcomes[i] = NotFound(f"symbol: unknown contract {r.symbol!r}")
            continue
        currency = contract.currency
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
        stored = previous.get(r.liquidation_id)
        if stored is not None:
            outcomes[i] = stored.result if stored.request_hash == r.digest else _conflict(r)
            continue
        if r.liquidation_id in first_in_batch:
            j = first_in_batch[r.liquidation_id]
            if requests[j].digest == r.digest:
                aliases[i] = j
            else:
                outcomes[i] = _conflict(r)
            continue
        if (currency, r.cycle_id) in closed:
            outcomes[i] = FailedPrecondition(
                f"cycle {r.cycle_id!r} of {currency} is closed; report liquidations in an "
                "open cycle"
            )
            continue
        fund = accounts[(currency, INSURANCE_FUND)]
        entry_id: int | None = None
        if value != 0:
            if value > 0:
                kind, debit, credit, amount = (
                    EntryKind.LIQUIDATION_PROFIT,
                    LIQUIDATION_ENGINE,
                    INSURANCE_FUND,
                    value,
                )
            else:
                kind, debit, credit, amount = (
                    EntryKind.LIQUIDATION_LOSS,
                    SYSTEM_LOSS,
                    LIQUIDATION_ENGINE,
                    -value,
                )
            refused = _move(accounts, currency, debit, credit, amount)
            if refused is not None:
                outcomes[i] = refused
                continue
            entry_id = next_entry_id
            next_entry_id += 1
            entry_rows.append(
                (
                    entry_id,
                    currency,
                    int(kind),
                    r.liquidation_id,
                    debit,
                    credit,
                    amount,
                    "",
                    created,
                )
            )
        first_in_batch[r.liquidation_id] = i
        outcome = outcome_of(value)
        result = LiquidationResult(
            r.liquidation_id, currency, value, outcome, fund.balance, entry_id or 0
        )
        outcomes[i] = result
        liquidation_rows.append(
            (
                r.liquidation_id,
                r.digest,
                currency,
                r.cycle_id,
                r.symbol,
                to_signed(r.account_id),
                to_signed(r.position_id),
                int(r.side),
                r.quantity_text,
                r.takeover_price_text,
                r.close_price_text,
                r.remaining_margin,
                value,
                int(outcome),
                fund.balance,
                entry_id,
                created,
            )
        )
    for i, j in aliases.items():
        outcomes[i] = outcomes[j]

    done = [o for o in outcomes if o is not None]
    assert len(done) == len(outcomes), "a request of the batch was left without an outcome"
    if not liquidation_rows:
        return done, []
    writes: list[Statement | Insert] = [
        (_SET_ACCOUNT, (a.balance, a.credit_total, a.debit_total, currency, name))
        for (currency, name), a in sorted(accounts.items())
        if a.moved
    ]
    if entry_rows:
        writes += [(_SET_ENTRY_IDS, (next_entry_id,)), Insert(_ENTRIES, entry_rows)]
    return done, [*writes, Insert(_LIQUIDATIONS, liquidation_rows)]


def _move(
    accounts: dict[tuple[str, str], _Account],
    currency: str,
    debit: str,
    credit: str,
    amount: int,
) -> InvalidArgument | None:
    """Move `amount` from `debit` to `credit` in memory, or say why it cannot be."""
    debited, credited = accounts[(currency, debit)], accounts[(currency, credit)]
    before = (debited.balance, debited.credit_total, debited.debit_total, debited.moved)
    if debited.move(0, amount):
        if credited.move(amount, 0):
            return None
        debited.balance, debited.credit_total, debited.debit_total, debited.moved = before
        name = credit
    else:
        name = debit
    return InvalidArgument(
        "engine_result",
        amount,
        f"would take {name} of {currency} beyond a signed 64-bit integer",
    )


def _conflict(request: LiquidationRequest) -> AlreadyExists:
    return AlreadyExists(
        f"liquidation_id {request.liquidation_id!r} was already used for a different liquidation"
    )


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
