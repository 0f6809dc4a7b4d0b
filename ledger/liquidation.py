"""Liquidations reported through a cycle: the engine's result, and its flow into the ledger.

The liquidation engine took over the user's position and remaining margin at the takeover
price and closed it at the close price. A profit flows into the margin currency's insurance
fund at once; a loss accrues to the cycle's system loss, which the cycle close covers.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy.orm import Session

from ledger import journal, money
from ledger.alloc import validated_liquidations
from ledger.currency import ContractKind
from ledger.db import liquidations as stored
from ledger.db import store
from ledger.db.batch import BatchStatements
from ledger.db.session import WriterConnection
from ledger.db.store import StoredEntry
from ledger.db.u64 import to_signed, to_unsigned
from ledger.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ledger.idempotency import liquidation_hash
from ledger.journal import INSURANCE_FUND, LIQUIDATION_ENGINE, SYSTEM_LOSS, EntryKind
from ledger.limits import INT64_MAX, INT64_MIN, MEMO_LENGTH_MAX, UINT64_MAX


class Side(enum.IntEnum):
    """The liquidated user's side; numbers are those of insurance.v1.Side."""

    LONG = 1
    SHORT = 2


class Outcome(enum.IntEnum):
    """Numbers are those of insurance.v1.Outcome."""

    FUND_INFLOW = 1
    SYSTEM_LOSS = 2
    BREAK_EVEN = 3


Ratio = tuple[int, int]  # an exact decimal as numerator / denominator (> 0)


@dataclass(slots=True)
class LiquidationRequest:
    """A validated report; decimals are kept exact, and `digest` is its request hash.
    (Not frozen: the liquidation path makes thousands a second, and a frozen dataclass
    pays for each field it sets.)"""

    liquidation_id: str
    cycle_id: str
    symbol: str
    account_id: int
    position_id: int
    side: Side
    quantity: Ratio
    takeover_price: Ratio
    close_price: Ratio
    remaining_margin: int
    digest: str
    quantity_text: str  # the decimals in canonical form, as stored and hashed
    takeover_price_text: str
    close_price_text: str


@dataclass(slots=True)
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
    qn, qd, q_text = money.exact_positive("quantity", quantity)
    tn, td, takeover_text = money.exact_positive("takeover_price", takeover_price)
    cn, cd, close_text = money.exact_positive("close_price", close_price)
    digest = liquidation_hash(
        liquidation_id,
        cycle_id,
        symbol,
        account_id,
        position_id,
        side,
        q_text,
        takeover_text,
        close_text,
        remaining_margin,
    )
    return LiquidationRequest(
        liquidation_id,
        cycle_id,
        symbol,
        account_id,
        position_id,
        _SIDES[side],
        (qn, qd),
        (tn, td),
        (cn, cd),
        remaining_margin,
        digest,
        q_text,
        takeover_text,
        close_text,
    )


_SIDES = {int(s): s for s in Side}


def validate_encoded(message: bytes, *, batch: bool) -> list[LiquidationRequest] | None:
    """`validate` of each item of a request as received (a RecordLiquidationsRequest when
    `batch`, else one RecordLiquidationRequest), decoded and checked in Rust, where it costs a
    fraction of the Python validation (a third of the writer's time with batches).

    None unless every item is plainly valid: the caller then decodes and validates the
    request in Python, which names what is wrong. (The Rust path declines, never refuses.)
    """
    rows = validated_liquidations(message, batch)
    if rows is None:
        return None
    sides = _SIDES
    return [
        LiquidationRequest(lid, cid, sym, acc, pos, sides[side], q, t, c, m, digest, qt, tt, ct)
        for lid, cid, sym, acc, pos, side, q, t, c, m, digest, qt, tt, ct in rows
    ]


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
    return exact_engine_result(
        kind,
        side,
        quantity.as_integer_ratio(),
        takeover_price.as_integer_ratio(),
        close_price.as_integer_ratio(),
        multiplier.as_integer_ratio(),
        remaining_margin,
        scale,
    )


def exact_engine_result(
    kind: ContractKind,
    side: Side,
    quantity: Ratio,
    takeover_price: Ratio,
    close_price: Ratio,
    multiplier: Ratio,
    remaining_margin: int,
    scale: int,
) -> int:
    """engine_result over exact ratios of integers (denominators > 0).

    The pnl is one fraction num / den with den > 0 (prices are positive), and Python's
    floor division of the integers is the floor of the exact value: no Fraction
    normalisation on the hot path, no float anywhere.
    """
    qn, qd = quantity
    mn, md = multiplier
    tn, td = takeover_price
    cn, cd = close_price
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
    multiplier: Ratio
    scale: int


@dataclass(frozen=True, slots=True)
class _Stored:
    request_hash: str
    result: LiquidationResult


Outcomes = list[LiquidationResult | Exception]
# After the batch's locks are taken: which requests are still wanted (a request whose caller's
# deadline passed or who went away while it waited is dropped, unwritten).
Admit = Callable[[], Sequence[bool]]


def record_batch(
    connection: WriterConnection, requests: Sequence[LiquidationRequest], admit: Admit
) -> list[LiquidationResult | Exception | None]:
    """Record a batch of liquidations as one transaction on the writer's connection, durable
    when this returns.

    Each admitted request gets its result or its own error (unknown symbol, a result beyond
    int64, an id reused with other content, a closed cycle), and the others are written
    regardless; a request not admitted gets None and is not written. Requests apply in
    order: each result's fund_balance counts the requests before it.
    """
    db = connection.begin()
    rows = stored.read(
        db,
        {r.symbol for r in requests},
        {r.liquidation_id for r in requests},
        {r.cycle_id for r in requests},
        len(requests),
    )
    wanted = admit()
    slots = [k for k, keep in enumerate(wanted) if keep]
    outcomes, entry_rows, liquidation_rows = decide([requests[k] for k in slots], rows, slots)
    connection.commit(stored.writes(rows, entry_rows, liquidation_rows))
    decided = iter(outcomes)
    return [next(decided) if keep else None for keep in wanted]


def decide(
    requests: Sequence[LiquidationRequest], rows: stored.BatchRows, slots: Sequence[int]
) -> tuple[Outcomes, list[tuple[object, ...]], list[tuple[object, ...]]]:
    """Each request's outcome, and the entry and liquidation rows that record the batch.
    `slots[i]` is the batch index of request i, whose entry id it takes (see EntryIds)."""
    contracts = {
        symbol: _Contract(
            currency, ContractKind(kind), Decimal(multiplier).as_integer_ratio(), scale
        )
        for symbol, currency, kind, multiplier, scale in rows.contracts
    }
    accounts = rows.accounts
    previous = {
        lid: _Stored(digest, LiquidationResult(lid, cur, value, Outcome(out), fund, entry or 0))
        for lid, digest, cur, value, out, fund, entry in rows.previous
    }
    outcomes: list[LiquidationResult | Exception | None] = [None] * len(requests)
    first_in_batch: dict[str, int] = {}
    aliases: dict[int, int] = {}  # a repeat within the batch → the index it repeats
    entries: list[store.NewEntry] = []
    liquidation_rows: list[tuple[object, ...]] = []
    created = store.now_us()
    for i, r in enumerate(requests):
        contract = contracts.get(r.symbol)
        if contract is None:
            outcomes[i] = NotFound(f"symbol: unknown contract {r.symbol!r}")
            continue
        currency = contract.currency
        value = exact_engine_result(
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
        earlier = previous.get(r.liquidation_id)
        if earlier is not None:
            outcomes[i] = earlier.result if earlier.request_hash == r.digest else _conflict(r)
            continue
        if r.liquidation_id in first_in_batch:
            j = first_in_batch[r.liquidation_id]
            if requests[j].digest == r.digest:
                aliases[i] = j
            else:
                outcomes[i] = _conflict(r)
            continue
        if (currency, r.cycle_id) in rows.closed:
            outcomes[i] = FailedPrecondition(
                f"cycle {r.cycle_id!r} of {currency} is closed; report liquidations in an "
                "open cycle",
                type="CYCLE_CLOSED",
                subject=f"cycle {r.cycle_id} of {currency}",
            )
            continue
        entry_id: int | None = None
        if value != 0:
            kind, debit, credit, amount = _flow(value)
            refused = store.move_amount(accounts, currency, debit, credit, amount, "engine_result")
            if refused is not None:
                outcomes[i] = refused
                continue
            entry_id = rows.entry_ids.take(slots[i])
            entries.append((currency, entry_id, kind, r.liquidation_id, debit, credit, amount))
        first_in_batch[r.liquidation_id] = i
        outcome = outcome_of(value)
        fund_balance = accounts[(currency, INSURANCE_FUND)].balance
        outcomes[i] = LiquidationResult(
            r.liquidation_id, currency, value, outcome, fund_balance, entry_id or 0
        )
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
                fund_balance,
                entry_id,
                created,
                None,  # reversal_entry_id
            )
        )
    for i, j in aliases.items():
        outcomes[i] = outcomes[j]
    done = [o for o in outcomes if o is not None]
    assert len(done) == len(outcomes), "a request of the batch was left without an outcome"
    return done, rows.heads.link_new_entries(entries, created), liquidation_rows


def _flow(value: int) -> tuple[EntryKind, str, str, int]:
    """The entry of an engine result (kind, debit, credit, amount): a profit into the fund, a
    loss to the system loss."""
    if value > 0:
        return EntryKind.LIQUIDATION_PROFIT, LIQUIDATION_ENGINE, INSURANCE_FUND, value
    return EntryKind.LIQUIDATION_LOSS, SYSTEM_LOSS, LIQUIDATION_ENGINE, -value


def _conflict(request: LiquidationRequest) -> AlreadyExists:
    return AlreadyExists(
        f"liquidation_id {request.liquidation_id!r} was already used for a different liquidation"
    )


@dataclass(frozen=True, slots=True)
class LiquidationRecord:
    """A recorded liquidation: the report as stored (decimals canonical) and its result."""

    liquidation_id: str
    cycle_id: str
    symbol: str
    account_id: int
    position_id: int
    side: Side
    quantity: str
    takeover_price: str
    close_price: str
    remaining_margin: int
    result: LiquidationResult
    recorded_at_us: int
    reversed: bool


def get(session: Session, liquidation_id: str) -> LiquidationRecord:
    money.identifier("liquidation_id", liquidation_id)
    row = stored.liquidation_row(BatchStatements.of_session(session), liquidation_id)
    if row is None:
        raise NotFound(f"liquidation_id: no liquidation {liquidation_id!r} was recorded")
    (lid, cycle_id, symbol, account, position, side, quantity, takeover, close, margin) = row[:10]
    currency, value, outcome, fund_balance, entry_id, created, reversal = row[10:]
    return LiquidationRecord(
        lid,
        cycle_id,
        symbol,
        to_unsigned(int(account)),
        to_unsigned(int(position)),
        Side(side),
        quantity,
        takeover,
        close,
        int(margin),
        LiquidationResult(
            lid, currency, int(value), Outcome(outcome), int(fund_balance), int(entry_id or 0)
        ),
        int(created),
        reversal is not None,
    )


def reverse(session: Session, liquidation_id: str, reason: str) -> StoredEntry:
    """Post the opposite of a liquidation's entry, in an open cycle only; the id stays taken
    (recording it again returns its result), the cycle's loss no longer counts it, and a
    repeat returns the same reversal entry.

    Locks the currency's accounts first (the store's lock order), so the cycle cannot close
    meanwhile and two reversals of one liquidation make one entry.
    """
    money.identifier("liquidation_id", liquidation_id)
    if len(reason) > MEMO_LENGTH_MAX:
        raise InvalidArgument("reason", reason[:32] + "…", f"longer than {MEMO_LENGTH_MAX}")
    db = BatchStatements.of_session(session)
    found = stored.liquidation_row(db, liquidation_id)
    if found is None:
        raise NotFound(f"liquidation_id: no liquidation {liquidation_id!r} was recorded")
    currency = str(found[10])
    accounts = store.lock_accounts(db, stored.ACCOUNT_NAMES, store.currency_keys([currency]))
    row = stored.liquidation_row(db, liquidation_id)  # again, under the locks
    assert row is not None
    cycle_id, entry_id, reversal = str(row[1]), row[14], row[16]
    if reversal is not None:
        return store.load_entry(session, int(reversal))
    if stored.is_closed(db, currency, cycle_id):
        raise FailedPrecondition(
            f"cycle {cycle_id!r} of {currency} is closed; a liquidation of a closed cycle "
            "cannot be reversed (reverse the cycle first)",
            type="CYCLE_CLOSED",
            subject=f"cycle {cycle_id} of {currency}",
        )
    if entry_id is None:
        raise FailedPrecondition(
            f"liquidation {liquidation_id!r} broke even: it posted no entry to reverse",
            type="NOTHING_TO_REVERSE",
            subject=f"liquidation {liquidation_id}",
        )
    original = store.load_entry(session, int(entry_id))
    correction = journal.reversal(original.transfer(), original.entry_id, reason)
    refused = store.move(accounts, correction, field="liquidation_id")
    if refused is not None:
        raise refused
    heads = store.read_heads(db, [currency])
    (reversal_id,) = store.append(db, accounts, heads, [correction], store.now_us())
    db.write_together(heads.writes())
    stored.set_reversed(db, liquidation_id, reversal_id)
    return store.load_entry(session, reversal_id)
