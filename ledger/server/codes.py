"""One table from domain exception to gRPC status code, as the numbers of the gRPC spec.

Numbers, not grpc's StatusCode, so that the liquidation writer's process (which has no
gRPC of its own) answers from the same table as the server (status.py).
"""

from __future__ import annotations

import enum
import logging

from sqlalchemy.exc import OperationalError

from ledger.alloc import AllocationError, PositionLimitError
from ledger.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LedgerError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger("ledger.calls")


class Code(enum.IntEnum):
    """gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


CODE_BY_ERROR: dict[type[Exception], Code] = {
    InvalidArgument: Code.INVALID_ARGUMENT,
    AllocationError: Code.INVALID_ARGUMENT,  # bad columns or ratios given to Rust
    PositionLimitError: Code.RESOURCE_EXHAUSTED,
    NotFound: Code.NOT_FOUND,
    AlreadyExists: Code.ALREADY_EXISTS,
    FailedPrecondition: Code.FAILED_PRECONDITION,
    ResourceExhausted: Code.RESOURCE_EXHAUSTED,
    Unavailable: Code.UNAVAILABLE,
    DeadlineExceeded: Code.DEADLINE_EXCEEDED,
    Cancelled: Code.CANCELLED,
    # The database went away or stayed locked: the transaction was rolled back.
    OperationalError: Code.UNAVAILABLE,
}


def code_for(error: Exception) -> Code | None:
    """The status of a domain error, or None for an unexpected one (INTERNAL, logged)."""
    for cls in type(error).__mro__:
        code = CODE_BY_ERROR.get(cls)
        if code is not None:
            return code
    if isinstance(error, LedgerError):
        return Code.FAILED_PRECONDITION
    return None


def internal_details(method: str, error: Exception) -> str:
    """An unexpected error of a call (INTERNAL): logged with its traceback; the caller is
    shown only its type."""
    log.error("%s failed unexpectedly", method, exc_info=error)
    return f"internal error: {type(error).__name__}"


def reply_status(method: str, error: Exception) -> tuple[int, str]:
    """The (code, message) a call failing with `error` ends with."""
    code = code_for(error)
    if code is None:
        return Code.INTERNAL, internal_details(method, error)
    return code, str(error)
