"""An entry's chain hash is SHA-256 over the compact JSON of its fields (ledger.journal).

entry_hash writes that JSON out itself instead of calling json.dumps; the property here is
that its text is json.dumps's, byte for byte, for any content a transfer can hold (strings
with quotes, backslashes, control characters and non-ASCII text; integers to 64 bits), so
every hash stored before it still verifies.
"""

from __future__ import annotations

import hashlib
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.journal import EntryKind, Transfer, entry_hash

TEXT = st.text(max_size=40)
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
UINT63 = st.integers(min_value=0, max_value=2**63 - 1)


def reference(previous: str, seq: int, entry_id: int, t: Transfer, created_at_us: int) -> str:
    parts = [
        "entry",
        previous,
        t.currency,
        seq,
        entry_id,
        int(t.kind),
        t.reference,
        [[t.debit, -t.amount], [t.credit, t.amount]],
        t.memo,
        created_at_us,
        t.reverses,
    ]
    text = json.dumps(parts, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


@settings(max_examples=400, deadline=None)
@given(
    previous=TEXT,
    seq=UINT63,
    entry_id=UINT63,
    kind=st.sampled_from(list(EntryKind)),
    currency=TEXT,
    ref=TEXT,
    debit=TEXT,
    credit=TEXT,
    amount=INT64,
    memo=TEXT,
    created=INT64,
    reverses=UINT63,
)
def test_entry_hash_is_the_hash_of_its_json(
    previous: str,
    seq: int,
    entry_id: int,
    kind: EntryKind,
    currency: str,
    ref: str,
    debit: str,
    credit: str,
    amount: int,
    memo: str,
    created: int,
    reverses: int,
) -> None:
    t = Transfer(kind, currency, ref, debit, credit, amount, memo, reverses)
    assert entry_hash(previous, seq, entry_id, t, created) == reference(
        previous, seq, entry_id, t, created
    )


def test_entry_hash_of_awkward_strings() -> None:
    """The characters JSON escapes, one by one."""
    for s in ['"', "\\", "\n", "\x00", "\x1f", "\u00e9", "\u2028", "\U0001f600", "/"]:
        t = Transfer(EntryKind.FUND_DEPOSIT, "USD" + s, s, s, "b" + s, 1, s, 0)
        assert entry_hash(s, 1, 2, t, 3) == reference(s, 1, 2, t, 3), repr(s)
