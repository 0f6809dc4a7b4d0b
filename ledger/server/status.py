"""The status table (codes.py) as grpc's StatusCode."""

from __future__ import annotations

import grpc

from ledger.server.codes import Code, code_for, internal_details

__all__ = ["grpc_status", "internal_details", "status_for"]

_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def grpc_status(code: int) -> grpc.StatusCode:
    return _BY_NUMBER[int(code)]


def status_for(error: Exception) -> grpc.StatusCode | None:
    """The status of a domain error, or None for an unexpected one (INTERNAL, logged)."""
    code: Code | None = code_for(error)
    return None if code is None else grpc_status(code)
