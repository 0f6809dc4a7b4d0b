"""u64 ids in BIGINT columns: stored as the signed integer with the same 64 bits."""

from __future__ import annotations

_TWO_64 = 1 << 64
_TWO_63 = 1 << 63


def to_signed(value: int) -> int:
    return value - _TWO_64 if value >= _TWO_63 else value


def to_unsigned(value: int) -> int:
    return value + _TWO_64 if value < 0 else value
