"""ledger.money.rate: the published allocation rate's text, against Decimal at 80 digits."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, localcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger import money


@pytest.mark.parametrize(
    ("numerator", "denominator", "text"),
    [
        (1, 2, "0.500000000000"),
        (2, 3, "0.666666666667"),
        (1, 3, "0.333333333333"),
        (0, 5, "0.000000000000"),  # participants, nothing allocated
        (5, 5, "1.000000000000"),
        (1, 2 * 10**12, "0.000000000001"),  # exactly half a unit of the 12th place: up
        (1, 2 * 10**12 + 1, "0.000000000000"),  # just under half: down
        (800, 950, "0.842105263158"),  # README's worked example
        (0, 0, "0"),  # no participants
    ],
)
def test_rate_is_rounded_half_up_with_all_twelve_places(
    numerator: int, denominator: int, text: str
) -> None:
    assert money.rate(numerator, denominator) == text


@given(st.integers(0, 2**64), st.integers(1, 2**64))
def test_rate_matches_decimal(numerator: int, denominator: int) -> None:
    with localcontext() as context:
        context.prec = 80
        want = (Decimal(numerator) / Decimal(denominator)).quantize(
            Decimal(1).scaleb(-12), rounding=ROUND_HALF_UP
        )
    assert money.rate(numerator, denominator) == format(want, "f")
