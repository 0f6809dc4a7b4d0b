"""Per-position statements (ExplainAllocation): why a position was charged what it was.

A close keeps its input columns beside the cycle (`keep`, after the close has committed, so
that the close itself writes no more than before): the statement of a position the cycle
never saw is NOT_FOUND, and the rank of one it did counts every profitable position (or
account) above it, which the allocation rows alone cannot tell. Every number is exact: the
share is a reduced fraction of Python ints, the account profits int64 sums (an account's
profit beyond int64 was refused at the close).

A close that crashed after committing and before keeping its input leaves the statement
FAILED_PRECONDITION until the same close is sent again (a repeat keeps what is missing).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from sqlalchemy import Engine, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from ledger import cycle
from ledger.alloc import Ranking
from ledger.currency import get_currency
from ledger.db import models, u64
from ledger.db.session import Database
from ledger.errors import FailedPrecondition, InvalidArgument, NotFound

PART_ROWS = 1 << 20  # positions a part: 24 MiB before compression
CODEC = "lz4"
CACHED_CYCLES = 2  # inputs kept in memory: a statement run asks for many positions of one
KEEP_WAIT_SECONDS = 300  # a statement waits this long for its cycle's input being kept
KEEP_ATTEMPTS = 5
KEEP_RETRY_SECONDS = 0.5

log = logging.getLogger(__name__)

Columns = tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.int64]]


@dataclass(frozen=True, slots=True)
class Explanation:
    position_id: int
    account_id: int
    pnl: int
    rank: int
    profitable_count: int
    cutoff_pnl: int
    participant: bool
    participant_profit: int
    allocated_total: int
    share_numerator: int
    share_denominator: int
    amount: int
    remainder_unit: bool


def keep(database: Database, close: Close, columns: Columns) -> None:
    """Keep the input of one close of a cycle, unless it is kept whole already (a repeated
    close). The close is named by its version and input digest: kept after the reply, the
    cycle may have been reversed and closed again meanwhile, and this input is not the new
    close's.

    The parts are cut from the positions in position_id order, so every repeat of the close
    (its input digest is the same, whatever order the positions came in) writes the same
    parts, and concurrent or repeated keeps only add the parts still missing."""
    with database.read() as session:
        pk = _close_pk(session, close)
        if pk is None or _is_whole(session, pk):
            return
    ids, accounts, pnl = columns
    if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
        order = np.argsort(ids, kind="stable")
        ids, accounts, pnl = ids[order], accounts[order], pnl[order]
    parts = max(1, -(-len(ids) // PART_ROWS))
    for part in range(parts):
        rows = slice(part * PART_ROWS, (part + 1) * PART_ROWS)
        raw = b"".join(np.ascontiguousarray(c[rows]).tobytes() for c in (ids, accounts, pnl))
        values = {
            "cycle_pk": pk,
            "part": part,
            "parts": parts,
            "rows": len(ids[rows]),
            "data": pa.compress(raw, codec=CODEC, asbytes=True),
        }
        with database.write() as session:
            insert = postgresql_insert if database.backend == "postgresql" else sqlite_insert
            session.execute(insert(models.CycleInputPart).values(**values).on_conflict_do_nothing())


class Keeper:
    """Keeps closed cycles' inputs on a thread of its own, after the close has replied, so
    that keeping them adds nothing to a close's time. A statement asked of this process for
    a cycle whose input is still being kept waits for it (`wait`); `close` finishes every
    keep queued (a server stopping gracefully keeps what it closed)."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ledger-cycle-input")
        self._pending: dict[tuple[str, str], Future[None]] = {}
        self._lock = threading.Lock()

    def submit(self, close: Close, columns: Columns) -> None:
        name = (close.key.currency, close.key.cycle_id)
        future = self._executor.submit(self._keep, close, columns)
        with self._lock:
            self._pending[name] = future

        def done(finished: Future[None]) -> None:
            with self._lock:
                if self._pending.get(name) is finished:
                    del self._pending[name]

        future.add_done_callback(done)

    def _keep(self, close: Close, columns: Columns) -> None:
        """Retried a few times (a busy database: lock timeouts), since nothing waits on it
        but statements; each attempt adds only the parts still missing."""
        for attempt in range(1, KEEP_ATTEMPTS + 1):
            try:
                keep(self._database, close, columns)
                return
            except Exception:  # the statement says so (FAILED_PRECONDITION); a repeat retries
                log.exception(
                    "keeping the input of cycle %r of %s failed (attempt %d of %d)",
                    close.key.cycle_id,
                    close.key.currency,
                    attempt,
                    KEEP_ATTEMPTS,
                )
                time.sleep(KEEP_RETRY_SECONDS * attempt)

    def wait(self, currency: str, cycle_id: str) -> None:
        with self._lock:
            future = self._pending.get((currency, cycle_id))
        if future is not None:
            future.result(timeout=KEEP_WAIT_SECONDS)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


@dataclass(frozen=True, slots=True)
class Close:
    """One close of a cycle, as its reply named it."""

    key: cycle.CycleKey
    version: int
    input_digest: str


def _close_pk(session: Session, close: Close) -> int | None:
    return session.scalar(
        select(models.Cycle.id).where(
            models.Cycle.currency == close.key.currency,
            models.Cycle.cycle_id == close.key.cycle_id,
            models.Cycle.version == close.version,
            models.Cycle.input_digest == close.input_digest,
        )
    )


def _is_whole(session: Session, pk: int) -> bool:
    count, parts = session.execute(
        select(func.count(), func.max(models.CycleInputPart.parts)).where(
            models.CycleInputPart.cycle_pk == pk
        )
    ).one()
    return bool(count) and count == parts


@dataclass(frozen=True, slots=True)
class _Standings:
    """A closed cycle's input, with what every statement of it ranks against, computed once:
    `ranked` holds the profits of the profitable positions (or of the profitable accounts,
    `account_ids` beside `account_profit`), ascending, so that a rank is a binary search."""

    ids: npt.NDArray[np.uint64]
    accounts: npt.NDArray[np.uint64]
    pnls: npt.NDArray[np.int64]
    ranked: npt.NDArray[np.int64]
    account_ids: npt.NDArray[np.uint64]
    account_profit: npt.NDArray[np.int64]

    @classmethod
    def of(cls, columns: Columns, ranking: Ranking) -> _Standings:
        ids, accounts, pnls = columns
        profitable = pnls > 0
        if ranking == Ranking.ACCOUNT:
            account_ids, account_profit = _account_profits(accounts[profitable], pnls[profitable])
            ranked = np.sort(account_profit)
        else:
            account_ids = np.zeros(0, dtype=np.uint64)
            account_profit = np.zeros(0, dtype=np.int64)
            ranked = np.sort(pnls[profitable])
        return cls(ids, accounts, pnls, ranked, account_ids, account_profit)

    def above(self, value: int) -> int:
        """How many ranked profits exceed `value`."""
        return len(self.ranked) - int(np.searchsorted(self.ranked, value, side="right"))

    def profit_of(self, account: int) -> int:
        """The account's profit: the sum of its profitable positions' pnl (0 for none)."""
        at = int(np.searchsorted(self.account_ids, np.uint64(account)))
        found = at < len(self.account_ids) and int(self.account_ids[at]) == account
        return int(self.account_profit[at]) if found else 0


class _Inputs:
    """The last few cycles' standings in memory, read once per cycle (they never change)."""

    def __init__(self) -> None:
        self._cached: OrderedDict[tuple[str, int, str], _Standings] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session: Session, row: models.Cycle, name: str) -> _Standings:
        # The database's address and the close's digest with the key: one process may serve
        # (or test) several databases, whose cycle keys repeat.
        bind = session.get_bind()
        engine = bind if isinstance(bind, Engine) else bind.engine
        key = (str(engine.url), row.id, row.input_digest)
        with self._lock:
            if key in self._cached:
                self._cached.move_to_end(key)
                return self._cached[key]
        standings = _Standings.of(_read(session, row.id, name), Ranking(row.ranking))
        with self._lock:
            self._cached[key] = standings
            while len(self._cached) > CACHED_CYCLES:
                self._cached.popitem(last=False)
        return standings


_INPUTS = _Inputs()


def _read(session: Session, pk: int, name: str) -> Columns:
    stored = session.execute(
        select(
            models.CycleInputPart.part,
            models.CycleInputPart.parts,
            models.CycleInputPart.rows,
            models.CycleInputPart.data,
        )
        .where(models.CycleInputPart.cycle_pk == pk)
        .order_by(models.CycleInputPart.part)
    ).all()
    if not stored or len(stored) != stored[0].parts:
        reversed_ = session.get(models.CycleReversal, pk) is not None
        remedy = (
            "its close was reversed, so they can no longer be kept"
            if reversed_
            else "send the same close again to keep them"
        )
        raise FailedPrecondition(
            f"{name}: its positions are not kept (closed before statements existed, or the "
            "server stopped right after the close; or another server process is still "
            f"writing them: retry shortly); {remedy}",
            type="CYCLE_INPUT_NOT_KEPT",
            subject=name,
        )
    ids, accounts, pnls = [], [], []
    for part in stored:
        raw = pa.decompress(part.data, part.rows * 24, codec=CODEC, asbytes=True)
        view = np.frombuffer(raw, dtype="<u8").reshape(3, part.rows)
        ids.append(view[0])
        accounts.append(view[1])
        pnls.append(view[2].view("<i8"))
    return (
        np.concatenate(ids).astype(np.uint64, copy=False),
        np.concatenate(accounts).astype(np.uint64, copy=False),
        np.concatenate(pnls).astype(np.int64, copy=False),
    )


def explain(session: Session, cycle_id: str, currency: str, position_id: int) -> Explanation:
    """The statement of one position of a closed cycle."""
    key = cycle.check_header(cycle_id, currency)
    if position_id < 0 or position_id >= 2**64:
        raise InvalidArgument("position_id", position_id, "must be a uint64")
    get_currency(session, key.currency)
    row = cycle.latest_row(session, key)  # reversed or not: the statement is the same
    name = f"cycle {key.cycle_id!r} of {key.currency}"
    if row is None:
        raise NotFound(f"{name} has not been closed")
    standings = _INPUTS.get(session, row, name)
    ids = standings.ids
    at = int(np.searchsorted(ids, np.uint64(position_id)))  # the parts are in id order
    if at == len(ids) or int(ids[at]) != position_id:
        raise NotFound(f"position {position_id} was not among the positions of {name}")
    account, pnl = int(standings.accounts[at]), int(standings.pnls[at])
    amount = _amount(session, row.id, account, position_id)
    by_account = Ranking(row.ranking) == Ranking.ACCOUNT
    standing = standings.profit_of(account) if by_account else pnl
    rank = 1 + standings.above(standing)
    floor_pnl = 1 if row.widened else max(row.cutoff_pnl, 1)
    # Under account ranking, whether its account participates (a losing position of a
    # participating account is charged nothing, but its account is in).
    participant = row.participant_count > 0 and standing >= floor_pnl
    charged = participant and pnl > 0
    share = (
        Fraction(row.allocated_total * pnl, row.participant_profit)
        if charged and row.participant_profit
        else Fraction(0)
    )
    if by_account and charged:
        # The unit step that gave this position one more is the split of its account's
        # charge over its profitable positions.
        charge = _account_charge(session, row.id, account)
        base = charge * pnl // standing
    else:
        base = share.numerator // share.denominator
    return Explanation(
        position_id=position_id,
        account_id=account,
        pnl=pnl,
        rank=rank,
        profitable_count=row.profitable_count,
        cutoff_pnl=row.cutoff_pnl,
        participant=participant,
        participant_profit=row.participant_profit,
        allocated_total=row.allocated_total,
        share_numerator=share.numerator,
        share_denominator=share.denominator,
        amount=amount,
        remainder_unit=charged and amount == base + 1,
    )


def _account_profits(
    accounts: npt.NDArray[np.uint64], pnls: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """The profitable positions' accounts, ascending, and each one's profit (an int64 sum:
    an account's profit beyond int64 was refused at the close)."""
    if not len(accounts):
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    order = np.argsort(accounts, kind="stable")
    sorted_accounts = accounts[order]
    starts = np.flatnonzero(np.r_[True, sorted_accounts[1:] != sorted_accounts[:-1]])
    profits = np.add.reduceat(pnls[order], starts).astype(np.int64, copy=False)
    return sorted_accounts[starts], profits


def _amount(session: Session, pk: int, account: int, position_id: int) -> int:
    value = session.scalar(
        select(models.Allocation.amount).where(
            models.Allocation.cycle_pk == pk,
            models.Allocation.account_id == u64.to_signed(account),
            models.Allocation.position_id == u64.to_signed(position_id),
        )
    )
    return int(value or 0)


def _account_charge(session: Session, pk: int, account: int) -> int:
    value = session.scalar(
        select(func.coalesce(func.sum(models.Allocation.amount), 0)).where(
            models.Allocation.cycle_pk == pk,
            models.Allocation.account_id == u64.to_signed(account),
        )
    )
    return int(value or 0)
