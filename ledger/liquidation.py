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
from fractions import Fraction
from typing import TypeVar

from sqlalchemy import func, insert, select, tuple_
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
    """A validated report; decimals are kept exact and in canonical text for the hash."""

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

    @property
    def digest(self) -> str:
        return request_hash(
            liquidation_id=self.liquidation_id,
            cycle_id=self.cycle_id,
            symbol=self.symbol,
            account_id=self.account_id,
            position_id=self.position_id,
            side=int(self.side),
            quantity=money.canonical(self.quantity),
            takeover_price=money.canonical(self.takeover_price),
            close_price=money.canonical(self.close_price),
            remaining_margin=self.remaining_margin,
        )


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
    """Check every field that needs no database; raises InvalidArgument naming the field."""
    money.identifier("liquidation_id", liquidation_id)
    money.identifier("cycle_id", cycle_id)
    money.identifier("symbol", symbol)
    for field, value in (("account_id", account_id), ("position_id", position_id)):
        if not 0 <= value <= UINT64_MAX:
            raise InvalidArgument(field, value, "must be an unsigned 64-bit integer")
    if side not in Side.__members__.values():
        raise InvalidArgument("side", side, "must be LONG (1) or SHORT (2)")
    money.minor_units("remaining_margin", remaining_margin)
    if remaining_margin < 0:
        raise InvalidArgument("remaining_margin", remaining_margin, "must not be negative")
    return LiquidationRequest(
        liquidation_id=liquidation_id,
        cycle_id=cycle_id,
        symbol=symbol,
        account_id=account_id,
        position_id=position_id,
        side=Side(side),
        quantity=money.positive_decimal("quantity", quantity),
        takeover_price=money.positive_decimal("takeover_price", takeover_price),
        close_price=money.positive_decimal("close_price", close_price),
        remaining_margin=remaining_margin,
    )


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
    """remaining_margin + the engine's pnl in minor units, exact, rounded toward −∞."""
    q, m = Fraction(quantity), Fraction(multiplier)
    takeover, close = Fraction(takeover_price), Fraction(close_price)
    if kind == ContractKind.LINEAR:
        move = close - takeover if side == Side.LONG else takeover - close
        pnl = move * q * m
    else:  # INVERSE: pnl in the coin, for a face value `multiplier` in the quote currency
        move = (1 / takeover - 1 / close) if side == Side.LONG else (1 / close - 1 / takeover)
        pnl = q * m * move
    units_per_major: int = 10**scale
    minor = pnl * units_per_major
    return remaining_margin + minor.numerator // minor.denominator  # floor, exact


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


def record_batch(
    session: Session, requests: Sequence[LiquidationRequest]
) -> list[LiquidationResult | Exception]:
    """Record a batch of liquidations in the caller's transaction, with a few statements in all.

    Each request gets its result or its own error (unknown symbol, result beyond int64, an id
    reused with other content, a closed cycle); the others are written regardless.
    """
    outcomes: list[LiquidationResult | Exception | None] = [None] * len(requests)
    contracts = _contracts(session, {r.symbol for r in requests})
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

    lock_system_loss(session, [currency for currency, _ in results.values()])
    previous = _previous(session, [requests[i].liquidation_id for i in results])
    closed = _closed_cycles(session, {(c, requests[i].cycle_id) for i, (c, _) in results.items()})

    first_in_batch: dict[str, int] = {}
    aliases: dict[int, int] = {}  # a repeat within the batch → the index it repeats
    to_write: list[int] = []
    for i, (currency, _value) in results.items():
        r = requests[i]
        stored = previous.get(r.liquidation_id)
        if stored is not None:
            outcomes[i] = _repeat_or_conflict(r, stored.request_hash, _stored_result(stored))
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

    written = _write(session, requests, results, to_write)
    outcomes_by_index: dict[int, LiquidationResult | Exception] = {
        i: o for i, o in enumerate(outcomes) if o is not None
    }
    outcomes_by_index.update(written)
    for i, j in aliases.items():
        outcomes_by_index[i] = outcomes_by_index[j]
    return [outcomes_by_index[i] for i in range(len(requests))]


def _write(
    session: Session,
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
    apply_deltas(session, account_deltas(list(transfers.values())))
    entry_ids: dict[int, int] = {}
    if transfers:
        first = reserve_entry_ids(session, len(transfers))
        entry_ids = {i: first + n for n, i in enumerate(transfers)}
        session.execute(
            insert(models.Entry),
            [
                {
                    "id": entry_ids[i],
                    "currency": t.currency,
                    "kind": int(t.kind),
                    "reference": t.reference,
                    "debit_account": t.debit,
                    "credit_account": t.credit,
                    "amount": t.amount,
                    "memo": "",
                    "created_at_us": created,
                }
                for i, t in transfers.items()
            ],
        )
    # The fund's balance right after each liquidation, in batch order.
    currencies = {results[i][0] for i in to_write}
    final = _fund_balances(session, currencies)
    running = {
        c: final[c]
        - sum(
            t.amount for t in transfers.values() if t.currency == c and t.credit == INSURANCE_FUND
        )
        for c in currencies
    }
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
            {
                "liquidation_id": r.liquidation_id,
                "request_hash": r.digest,
                "currency": currency,
                "cycle_id": r.cycle_id,
                "symbol": r.symbol,
                "account_id": to_signed(r.account_id),
                "position_id": to_signed(r.position_id),
                "side": int(r.side),
                "quantity": money.canonical(r.quantity),
                "takeover_price": money.canonical(r.takeover_price),
                "close_price": money.canonical(r.close_price),
                "remaining_margin": r.remaining_margin,
                "engine_result": value,
                "outcome": int(result.outcome),
                "fund_balance_after": result.fund_balance,
                "entry_id": entry_ids.get(i),
                "created_at_us": created,
            }
        )
    session.execute(insert(models.Liquidation), rows)
    return written


def _contracts(session: Session, symbols: set[str]) -> dict[str, _Contract]:
    found: dict[str, _Contract] = {}
    for chunk in _chunks(sorted(symbols)):
        query = (
            select(models.Contract, models.Currency.scale)
            .join(models.Currency, models.Currency.code == models.Contract.margin_currency)
            .where(models.Contract.symbol.in_(chunk))
        )
        for contract, scale in session.execute(query):
            found[contract.symbol] = _Contract(
                contract.margin_currency,
                ContractKind(contract.kind),
                Decimal(contract.multiplier),
                scale,
            )
    return found


def _previous(session: Session, ids: list[str]) -> dict[str, models.Liquidation]:
    found: dict[str, models.Liquidation] = {}
    for chunk in _chunks(sorted(set(ids))):
        query = select(models.Liquidation).where(models.Liquidation.liquidation_id.in_(chunk))
        found.update((row.liquidation_id, row) for row in session.scalars(query))
    return found


def _closed_cycles(session: Session, keys: set[tuple[str, str]]) -> set[tuple[str, str]]:
    closed: set[tuple[str, str]] = set()
    for chunk in _chunks(sorted(keys)):
        query = select(models.Cycle.currency, models.Cycle.cycle_id).where(
            tuple_(models.Cycle.currency, models.Cycle.cycle_id).in_(chunk)
        )
        closed.update((c, k) for c, k in session.execute(query))
    return closed


def _fund_balances(session: Session, currencies: set[str]) -> dict[str, int]:
    query = select(models.Account.currency, models.Account.balance).where(
        models.Account.currency.in_(sorted(currencies)), models.Account.name == INSURANCE_FUND
    )
    return {c: int(b) for c, b in session.execute(query)}


def _stored_result(row: models.Liquidation) -> LiquidationResult:
    return LiquidationResult(
        row.liquidation_id,
        row.currency,
        row.engine_result,
        Outcome(row.outcome),
        row.fund_balance_after,
        row.entry_id or 0,
    )


def _repeat_or_conflict(
    request: LiquidationRequest, stored_hash: str, stored: LiquidationResult
) -> LiquidationResult | Exception:
    return stored if stored_hash == request.digest else _conflict(request)


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
