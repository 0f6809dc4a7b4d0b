"""Amounts as operators write and read them: decimals at the currency's scale.

The wire carries integer minor units; a person types and reads `12.34` for 1,234 cents. Both
ways are integer arithmetic on the digits (no float anywhere): an amount with more decimals
than the scale is refused, not rounded, since a rounded deposit is a different deposit.
"""

from __future__ import annotations

import re

from ledger.client.connection import UsageProblem

_AMOUNT = re.compile(r"([0-9]+)(?:\.([0-9]*))?|\.([0-9]+)")


def to_minor(text: str, scale: int, *, what: str = "AMOUNT", currency: str = "") -> int:
    """`12.34` at scale 2 → 1234; `12.345` at scale 2 is a UsageProblem."""
    match = _AMOUNT.fullmatch(text.strip().replace("_", ""))
    if match is None:
        raise UsageProblem(
            f"{what} {text!r} is not a plain decimal such as 12.34 (no sign or exponent)"
        )
    whole: str = match.group(1) or "0"
    fraction: str = (match.group(2) if match.group(1) is not None else match.group(3)) or ""
    if len(fraction) > scale:
        of = f"{currency} has" if currency else "the currency has"
        raise UsageProblem(
            f"{what} {text!r} has {len(fraction)} decimal places, but {of} scale {scale} "
            f"(at most {scale}): nothing was sent"
        )
    unit: int = 10**scale
    return int(whole) * unit + int(fraction.ljust(scale, "0") or "0")


def show(minor: int, scale: int) -> str:
    """1234 at scale 2 → `12.34`; −5 at scale 3 → `-0.005`: exact, every place shown."""
    sign = "-" if minor < 0 else ""
    unit: int = 10**scale
    whole, fraction = divmod(abs(minor), unit)
    if scale == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{fraction:0{scale}d}"
