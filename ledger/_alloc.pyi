"""Typed stub of the native module built from rust_alloc/src/py.rs (import ledger.alloc)."""

from collections.abc import Sequence
from typing import final

import numpy as np
import numpy.typing as npt

__version__: str
POSITIONS_MAX: int

_Summary = tuple[int, int, int, int, int, int, int, int, int, bool, int, int]
"""fund_share, fund_paid, user_due, positions_total, profitable_count, profit_total,
cutoff_pnl, participant_count, participant_profit, widened, allocated_total, uncovered.

``ranking``: 1 ranks positions (the default), 2 ranks accounts; anything else is an
AllocationError."""

class AllocationError(ValueError): ...
class ColumnLengthError(AllocationError): ...
class ColumnTypeError(AllocationError): ...
class DuplicatePositionError(AllocationError): ...
class NegativeAmountError(AllocationError): ...
class RatioError(AllocationError): ...
class AccountProfitError(AllocationError): ...
class MalformedMessageError(AllocationError): ...
class PositionLimitError(Exception): ...
class AllocationInvariantError(RuntimeError): ...

def allocate(
    loss: int,
    fund_balance: int,
    insurance_share: str,
    coverage_ratio: str,
    position_id: object,
    account_id: object,
    pnl: object,
    ranking: int = 1,
) -> tuple[
    _Summary,
    npt.NDArray[np.uint64],
    npt.NDArray[np.uint64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
]: ...

@final
class CycleInputDecoder:
    def __new__(cls, positions_max: int) -> CycleInputDecoder: ...
    def feed(self, message: bytes) -> tuple[str, str, str] | tuple[str, int] | tuple[str]: ...
    @property
    def positions_total(self) -> int: ...
    def __len__(self) -> int: ...
    def input_digest(self) -> str: ...
    def columns(
        self,
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.int64]]: ...
    def allocate(
        self,
        loss: int,
        fund_balance: int,
        insurance_share: str,
        coverage_ratio: str,
        ranking: int = 1,
    ) -> tuple[
        _Summary,
        npt.NDArray[np.uint64],
        npt.NDArray[np.uint64],
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
    ]: ...

def encode_allocation_chunks(
    position_id: object, account_id: object, pnl: object, amount: object, rows_per_chunk: int
) -> list[bytes]: ...
def table_order(
    position_id: object, account_id: object, pnl: object, amount: object
) -> tuple[
    npt.NDArray[np.uint64],
    npt.NDArray[np.uint64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
]: ...
def allocations_digest(
    position_id: object, account_id: object, pnl: object, amount: object
) -> str: ...

# ledger.liquidation.LiquidationRequest's fields, side as its number.
LiquidationFields = tuple[
    str,
    str,
    str,
    int,
    int,
    int,
    tuple[int, int],
    tuple[int, int],
    tuple[int, int],
    int,
    str,
    str,
    str,
    str,
]

def validated_liquidations(message: bytes, batch: bool) -> list[LiquidationFields] | None: ...
def entry_chain(
    previous: str,
    first_seq: int,
    currency: str,
    created_at_us: int,
    entries: Sequence[tuple[int, int, str, str, str, int]],
) -> list[str]: ...
