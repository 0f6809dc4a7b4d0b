"""One table from domain exception to gRPC status."""

from __future__ import annotations

import logging

import grpc
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

STATUS_BY_ERROR: dict[type[Exception], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    AllocationError: grpc.StatusCode.INVALID_ARGUMENT,  # bad columns or ratios given to Rust
    PositionLimitError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    # The database went away or stayed locked: the transaction was rolled back.
    OperationalError: grpc.StatusCode.UNAVAILABLE,
}


def status_for(error: Exception) -> grpc.StatusCode | None:
    """The status of a domain error, or None for an unexpected one (INTERNAL, logged)."""
    for cls in type(error).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code
    if isinstance(error, LedgerError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return None


def internal_details(method: str, error: Exception) -> str:
    """An unexpected error of a call (INTERNAL): logged with its traceback; the caller is
    shown only its type."""
    log.error("%s failed unexpectedly", method, exc_info=error)
    return f"internal error: {type(error).__name__}"
