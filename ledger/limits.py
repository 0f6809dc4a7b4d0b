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

LIQUIDATIONS_PER_CALL_MAX = 10_000  # items of one RecordLiquidations call
PENDING_LIQUIDATIONS_MAX_DEFAULT = 10_000  # items waiting for the writer, per process
BATCH_ITEMS_MAX_DEFAULT = 1_000  # items one writer transaction takes (a larger call: alone)

CYCLE_STREAMS_MAX_DEFAULT = 4  # CloseCycle/PreviewCycle streams open at once, per process
STREAM_IDLE_SECONDS_DEFAULT = 60.0  # a cycle stream without a message this long is ended

# Connections: clients are moved on (GOAWAY) after this age, so that they spread over the
# --workers processes and the hosts behind a load balancer; streams open then may finish
# within the grace (a 10M-position close takes about 15 s).
CONNECTION_AGE_SECONDS_DEFAULT = 1800.0
CONNECTION_AGE_GRACE_SECONDS = 300.0
CONNECTION_IDLE_SECONDS = 900.0
KEEPALIVE_SECONDS_DEFAULT = 60.0  # the server pings an idle connection this often
KEEPALIVE_TIMEOUT_SECONDS = 20.0
CLIENT_PING_INTERVAL_SECONDS_MIN = 10.0  # clients that ping more often are told to stop
