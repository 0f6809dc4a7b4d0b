"""The loss allocation: the only importer of the native ``ledger._alloc`` module.

``allocate`` hands the three position columns to the Rust core as buffers (numpy arrays,
``array.array('Q'/'q')``, ``memoryview(...).cast('Q')``: anything exporting the buffer protocol
with the right dtype, C-contiguous), so millions of positions cross without a copy, and the
core runs with the GIL released. The columns must not be mutated while a call runs.

Money is integer minor units; the ratios are exact decimals (``str`` or ``Decimal``), never
floats. ``profit_total`` and ``participant_profit`` are Python ints that can exceed int64 (a
sum of many int64 profits); every other amount fits int64.

``ranking`` chooses what the cut ranks (issue 13, item 5): ``Ranking.POSITION``, the default and
the seed's rule, or ``Ranking.ACCOUNT``: each account by the sum of its profitable positions'
pnl, each charged account's charge then split over those positions pro rata by pnl. The result
is per position either way; under account ranking ``profitable_count``, ``participant_count``,
``participant_profit`` and ``cutoff_pnl`` speak of accounts. The values are the contract's
``Ranking`` numbers, so a policy's stored value converts with ``Ranking(value)``.

Errors: ``AllocationError`` (a ``ValueError``) and its subclasses for invalid input, which the
server answers with INVALID_ARGUMENT (``AccountProfitError`` when, under account ranking, an
account's profit exceeds int64); ``PositionLimitError`` for too many positions
(RESOURCE_EXHAUSTED); ``AllocationInvariantError`` (a ``RuntimeError``) if a result check fails,
which is a bug (INTERNAL).

``validated_liquidations`` and ``entry_chain`` are the liquidation path's, not the allocation's:
they are here because this is where the native module is imported (see
``ledger.liquidation.validate_encoded`` and ``ledger.journal.entry_chain``).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from ledger import _alloc
from ledger._alloc import (
    POSITIONS_MAX,
    AccountProfitError,
    AllocationError,
    AllocationInvariantError,
    ColumnLengthError,
    ColumnTypeError,
    DuplicatePositionError,
    MalformedMessageError,
    NegativeAmountError,
    PositionLimitError,
    RatioError,
)

__all__ = [
    "POSITIONS_MAX",
    "AccountProfitError",
    "AllocationError",
    "AllocationInvariantError",
    "AllocationResult",
    "ColumnLengthError",
    "ColumnTypeError",
    "CycleHeader",
    "CycleInputDecoder",
    "DuplicatePositionError",
    "MalformedMessageError",
    "NegativeAmountError",
    "PositionLimitError",
    "Ranking",
    "RatioError",
    "allocate",
    "allocations_digest",
    "encode_allocation_chunks",
    "encode_allocation_columns",
    "entry_chain",
    "table_order",
    "validated_liquidations",
]

Ratio = str | Decimal

validated_liquidations = _alloc.validated_liquidations
entry_chain = _alloc.entry_chain


class Ranking(IntEnum):
    """What the cut ranks: the contract's ``Ranking`` values (0, unspecified, is resolved by the
    policy before any allocation, so it is not one)."""

    POSITION = 1
    ACCOUNT = 2


@dataclass(frozen=True, slots=True, eq=False)
class AllocationResult:
    """A cycle's allocation: the totals, then the allocations (participants with amount > 0)
    as columns in ascending position_id order."""

    fund_share: int
    fund_paid: int
    user_due: int
    positions_total: int
    profitable_count: int
    profit_total: int
    cutoff_pnl: int
    participant_count: int
    participant_profit: int
    widened: bool
    allocated_total: int
    uncovered: int
    position_id: npt.NDArray[np.uint64]
    account_id: npt.NDArray[np.uint64]
    pnl: npt.NDArray[np.int64]
    amount: npt.NDArray[np.int64]

    @property
    def allocation_count(self) -> int:
        return len(self.amount)


def _ratio_text(name: str, ratio: Ratio) -> str:
    """The exact decimal text of a ratio; Decimal is accepted as long as it is finite."""
    if isinstance(ratio, Decimal):
        if not ratio.is_finite():
            raise RatioError(f"{name} {ratio} is not a finite decimal")
        return format(ratio, "f")
    if isinstance(ratio, str):
        return ratio
    raise RatioError(f"{name} must be a decimal string or Decimal, got {type(ratio).__name__}")


INT64_MAX = 2**63 - 1


def _ranking(ranking: Ranking) -> int:
    """The ranking's number (a plain int 1 or 2 is accepted too), as the core takes it."""
    if isinstance(ranking, bool) or not isinstance(ranking, int):
        raise AllocationError(f"ranking must be a Ranking, got {type(ranking).__name__}")
    if ranking not in (Ranking.POSITION, Ranking.ACCOUNT):
        raise AllocationError(f"ranking must be 1 (position) or 2 (account), got {ranking}")
    return int(ranking)


def _amount(name: str, value: int) -> int:
    """An amount as the core takes it: an int (not bool) in int64; negatives are left to the
    core, which names them."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise AllocationError(f"{name} must be an int of minor units, got {type(value).__name__}")
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise AllocationError(f"{name} {value} does not fit int64")
    return value


def allocate(
    loss: int,
    fund_balance: int,
    insurance_share: Ratio,
    coverage_ratio: Ratio,
    position_id: object,
    account_id: object,
    pnl: object,
    ranking: Ranking = Ranking.POSITION,
) -> AllocationResult:
    """Allocates a cycle's loss between the insurance fund and the profitable positions.

    ``position_id`` and ``account_id`` are uint64 buffers, ``pnl`` an int64 buffer, of equal
    length. See issue 3 for the rules, issue 13 for ``ranking``; the Rust core checks its
    outputs before returning.
    """
    summary, ids, accounts, pnls, amounts = _alloc.allocate(
        _amount("loss", loss),
        _amount("fund_balance", fund_balance),
        _ratio_text("insurance_share", insurance_share),
        _ratio_text("coverage_ratio", coverage_ratio),
        position_id,
        account_id,
        pnl,
        _ranking(ranking),
    )
    return _result(summary, ids, accounts, pnls, amounts)


@dataclass(frozen=True, slots=True)
class CycleHeader:
    cycle_id: str
    currency: str


class CycleInputDecoder:
    """A cycle's positions, decoded in Rust from serialized ``insurance.v1.CycleInput``
    messages (the raw bytes of the stream) and kept there: they never become Python objects.

    ``feed`` returns the header of a header message and None for a position chunk (or an
    empty message); enforcing header-first is the caller's. A chunk is appended whole or not
    at all. Raises ``MalformedMessageError`` or ``ColumnLengthError`` for a bad message, and
    ``PositionLimitError`` when the total would pass ``positions_max``.
    """

    def __init__(self, positions_max: int) -> None:
        self._native = _alloc.CycleInputDecoder(positions_max)

    def feed(self, message: bytes) -> CycleHeader | None:
        item = self._native.feed(message)
        if item[0] == "header":
            _, cycle_id, currency = item  # type: ignore[misc]
            return CycleHeader(cycle_id=str(cycle_id), currency=str(currency))
        return None

    @property
    def positions_total(self) -> int:
        return self._native.positions_total

    def __len__(self) -> int:
        return len(self._native)

    def input_digest(self) -> str:
        """Lowercase hex SHA-256 over the positions in position_id order, each 24 bytes:
        position_id u64, account_id u64, pnl i64, little-endian. Raises
        ``DuplicatePositionError`` on a repeated id."""
        return self._native.input_digest()

    def columns(
        self,
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
        """Copies of the columns as received: position_id, account_id, pnl."""
        return self._native.columns()

    def allocate(
        self,
        loss: int,
        fund_balance: int,
        insurance_share: Ratio,
        coverage_ratio: Ratio,
        ranking: Ranking = Ranking.POSITION,
    ) -> AllocationResult:
        """``allocate`` over the accumulated positions, without copying them out of Rust."""
        summary, ids, accounts, pnls, amounts = self._native.allocate(
            _amount("loss", loss),
            _amount("fund_balance", fund_balance),
            _ratio_text("insurance_share", insurance_share),
            _ratio_text("coverage_ratio", coverage_ratio),
            _ranking(ranking),
        )
        return _result(summary, ids, accounts, pnls, amounts)


def encode_allocation_chunks(result: AllocationResult, rows_per_chunk: int) -> list[bytes]:
    """The allocations as serialized ``insurance.v1.AllocationChunk`` messages of at most
    ``rows_per_chunk`` rows each, in position_id order."""
    return _alloc.encode_allocation_chunks(
        result.position_id, result.account_id, result.pnl, result.amount, rows_per_chunk
    )


def _result(
    summary: _alloc._Summary,
    position_id: npt.NDArray[np.uint64],
    account_id: npt.NDArray[np.uint64],
    pnl: npt.NDArray[np.int64],
    amount: npt.NDArray[np.int64],
) -> AllocationResult:
    (
        fund_share,
        fund_paid,
        user_due,
        positions_total,
        profitable_count,
        profit_total,
        cutoff_pnl,
        participant_count,
        participant_profit,
        widened,
        allocated_total,
        uncovered,
    ) = summary
    for column in (position_id, account_id, pnl, amount):
        column.flags.writeable = False
    return AllocationResult(
        fund_share=fund_share,
        fund_paid=fund_paid,
        user_due=user_due,
        positions_total=positions_total,
        profitable_count=profitable_count,
        profit_total=profit_total,
        cutoff_pnl=cutoff_pnl,
        participant_count=participant_count,
        participant_profit=participant_profit,
        widened=widened,
        allocated_total=allocated_total,
        uncovered=uncovered,
        position_id=position_id,
        account_id=account_id,
        pnl=pnl,
        amount=amount,
    )


def encode_allocation_columns(
    position_id: npt.NDArray[np.uint64],
    account_id: npt.NDArray[np.uint64],
    pnl: npt.NDArray[np.int64],
    amount: npt.NDArray[np.int64],
    rows_per_chunk: int,
) -> list[bytes]:
    """``encode_allocation_chunks`` over plain columns (allocations read back from the ledger)."""
    return _alloc.encode_allocation_chunks(position_id, account_id, pnl, amount, rows_per_chunk)


def table_order(
    position_id: npt.NDArray[np.uint64],
    account_id: npt.NDArray[np.uint64],
    pnl: npt.NDArray[np.int64],
    amount: npt.NDArray[np.int64],
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
]:
    """Allocations given in position order, reordered by account (and, within an account,
    still by position), as the ledger's table keeps them: (account_id, position_id, pnl,
    amount, rank) as int64 columns, rank being each row's index in the input. A radix sort
    in Rust with the GIL released (a stable numpy argsort of 10M rows took seconds)."""
    accounts, ids, pnls, amounts, rank = _alloc.table_order(position_id, account_id, pnl, amount)
    return accounts.view(np.int64), ids.view(np.int64), pnls, amounts, rank


def allocations_digest(
    position_id: npt.NDArray[np.uint64],
    account_id: npt.NDArray[np.uint64],
    pnl: npt.NDArray[np.int64],
    amount: npt.NDArray[np.int64],
) -> str:
    """The digest of a cycle's allocation rows, given in position order, that the cycle's
    chain link carries: SHA-256 over each row's 32 bytes (position_id, account_id, pnl,
    amount, little-endian), with the GIL released."""
    return _alloc.allocations_digest(position_id, account_id, pnl, amount)
