"""Every limit of the service in one home, with its unit in its name."""

from __future__ import annotations

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1

DECIMAL_PLACES_MAX = 18
DECIMAL_DIGITS_MAX = 40  # integer + fraction digits of a price, quantity or multiplier
SCALE_MAX = 18
CURRENCY_CODE_LENGTH_MAX = 16
ID_LENGTH_MAX = 128  # transfer, liquidation, cycle ids and contract symbols
MEMO_LENGTH_MAX = 1024

CHUNK_ROWS_MAX = 65_536  # rows of a PositionChunk / AllocationChunk
# A full chunk of positions is 3 × 8 bytes a row plus framing; allocations 4 × 8 bytes a row.
MESSAGE_BYTES_MAX = 8 * 1024 * 1024
CYCLE_POSITIONS_MAX_DEFAULT = 50_000_000

PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000

SERVER_THREADS_DEFAULT = 32
SHUTDOWN_GRACE_SECONDS = 30.0
