"""Currencies, decimal strings and integer minor units: the only place text becomes a number."""

from __future__ import annotations

import re
from decimal import Decimal

from ledger.errors import InvalidArgument
from ledger.limits import (
    CURRENCY_CODE_LENGTH_MAX,
    DECIMAL_DIGITS_MAX,
    DECIMAL_PLACES_MAX,
    ID_LENGTH_MAX,
    INT64_MAX,
    INT64_MIN,
    SCALE_MAX,
)

_CURRENCY_CODE = re.compile(rf"[A-Z0-9]{{1,{CURRENCY_CODE_LENGTH_MAX}}}")
# Plain decimal: ASCII digits (\d would admit other scripts' digits), optionally a point and
# 1..18 digits. No sign, no exponent, no spaces.
_DECIMAL = re.compile(rf"([0-9]+)(?:\.([0-9]{{1,{DECIMAL_PLACES_MAX}}}))?")
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def currency_code(field: str, code: str) -> str:
    """A currency code is 1 to 16 characters of A-Z0-9, exactly as given (no case folding)."""
    if not _CURRENCY_CODE.fullmatch(code):
        raise InvalidArgument(field, code, "must be 1 to 16 characters of A-Z0-9")
    return code


def scale(field: str, value: int) -> int:
    if not 0 <= value <= SCALE_MAX:
        raise InvalidArgument(field, value, f"must be 0 to {SCALE_MAX}")
    return value


def identifier(field: str, value: str) -> str:
    """Ids are opaque non-empty strings of bounded length without control characters."""
    if not value:
        raise InvalidArgument(field, value, "must not be empty")
    if len(value) > ID_LENGTH_MAX:
        raise InvalidArgument(field, value, f"must be at most {ID_LENGTH_MAX} characters")
    if _CONTROL_CHARACTER.search(value):
        raise InvalidArgument(field, value, "must not contain control characters")
    return value


def parse_decimal(field: str, text: str) -> Decimal:
    """Parse a non-negative decimal string exactly; reject signs, exponents, > 18 places."""
    match = _DECIMAL.fullmatch(text)
    if match is None:
        if "." in text and re.fullmatch(r"[0-9]+\.[0-9]+", text):
            raise InvalidArgument(field, text, f"more than {DECIMAL_PLACES_MAX} decimal places")
        raise InvalidArgument(
            field, text, "must be a plain decimal such as 0.2 or 64123.5 (no sign or exponent)"
        )
    digits = len(match.group(1)) + len(match.group(2) or "")
    if digits > DECIMAL_DIGITS_MAX:
        raise InvalidArgument(field, text, f"more than {DECIMAL_DIGITS_MAX} digits")
    return Decimal(text)


def positive_decimal(field: str, text: str) -> Decimal:
    value = parse_decimal(field, text)
    if value <= 0:
        raise InvalidArgument(field, text, "must be greater than 0")
    return value


def ratio(field: str, text: str, *, zero_allowed: bool) -> Decimal:
    """A ratio in [0, 1] (or (0, 1] when zero is not allowed), kept as the caller wrote it."""
    value = parse_decimal(field, text)
    low = "0 ≤" if zero_allowed else "0 <"
    if value > 1 or (value == 0 and not zero_allowed):
        raise InvalidArgument(field, text, f"must satisfy {low} {field} ≤ 1")
    return value


def exact_positive(field: str, text: str) -> tuple[int, int, str]:
    """A decimal string > 0 as an exact ratio (numerator, 10^places) and its canonical text:
    positive_decimal and canonical in one pass over the text, with no Decimal (the
    liquidation path validates thousands of these a second)."""
    match = _DECIMAL.fullmatch(text)
    if match is None:
        parse_decimal(field, text)  # raises, naming what is wrong
        raise AssertionError("unreachable")
    whole, fraction = match.group(1), match.group(2) or ""
    if len(whole) + len(fraction) > DECIMAL_DIGITS_MAX:
        raise InvalidArgument(field, text, f"more than {DECIMAL_DIGITS_MAX} digits")
    numerator = int(whole + fraction)
    if numerator == 0:
        raise InvalidArgument(field, text, "must be greater than 0")
    fraction = fraction.rstrip("0")
    whole = whole.lstrip("0") or "0"
    canonical_text = f"{whole}.{fraction}" if fraction else whole
    return numerator, 10 ** len(match.group(2) or ""), canonical_text


def canonical(value: Decimal) -> str:
    """The shortest plain form of a decimal: 0.20 → "0.2", 1.000 → "1"; never an exponent."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def minor_units(field: str, value: int) -> int:
    """An amount of minor units must fit a signed 64-bit integer."""
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidArgument(field, value, "does not fit a signed 64-bit integer")
    return value


def positive_amount(field: str, value: int) -> int:
    minor_units(field, value)
    if value <= 0:
        raise InvalidArgument(field, value, "must be greater than 0")
    return value


RATE_PLACES = 12


def rate(numerator: int, denominator: int, places: int = RATE_PLACES) -> str:
    """numerator / denominator as a decimal string rounded half up to `places` decimals, all of
    them written ("0.500000000000": a published rate reads the same whatever its value); "0"
    for a zero denominator. Integers only: no float, no Decimal context."""
    if denominator == 0:
        return "0"
    assert numerator >= 0 and denominator > 0, (numerator, denominator)
    scaled = (2 * numerator * 10**places + denominator) // (2 * denominator)  # half up
    whole, fraction = divmod(scaled, 10**places)
    return f"{whole}.{fraction:0{places}d}"


_TOKEN_NUMBER = re.compile(r"[0-9]{1,19}")  # ASCII digits: str.isdigit() takes "²" too


def page_token_number(token: str, part: str) -> int:
    """A number of a page token (non-negative, int64), or InvalidArgument naming the token."""
    if _TOKEN_NUMBER.fullmatch(part) is None or int(part) > INT64_MAX:
        raise InvalidArgument("page_token", token, "is not a token from a previous page")
    return int(part)
