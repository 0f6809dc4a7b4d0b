"""Typed stub of the native module built from rust_alloc/src/py.rs (import ledger.alloc)."""

import numpy as np
import numpy.typing as npt

__version__: str
POSITIONS_MAX: int

Summary = tuple[int, int, int, int, int, int, int, int, int, bool, int, int]
"""fund_share, fund_paid, user_due, positions_total, profitable_count, profit_total,
cutoff_pnl, participant_count, participant_profit, widened, allocated_total, uncovered."""

Columns = tuple[
    npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.int64], npt.NDArray[np.int64]
]

class AllocationError(ValueError): ...
class ColumnLengthError(AllocationError): ...
class ColumnTypeError(AllocationError): ...
class DuplicatePositionError(AllocationError): ...
class NegativeAmountError(AllocationError): ...
class RatioError(AllocationError): ...
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
) -> tuple[
    Summary,
    npt.NDArray[np.uint64],
    npt.NDArray[np.uint64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
]: ...
