"""An entry's chain hash is SHA-256 over the compact JSON of its fields (ledger.journal).

entry_hash writes that JSON out itself instead of calling json.dumps; the property here is
that its text is json.dumps's, byte for byte, for any content a transfer can hold (strings
with quotes, backslashes, control characters and non-ASCII text; integers to 64 bits), so
every hash stored before it still verifies. entry_chain (in Rust, for the liquidation path's
batches) must give each entry the same hash, each linking the one before it.
"""

from __future__ import annotations

import hashlib
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.journal import EntryKind, Transfer, entry_chain, entry_hash

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


NEW_ENTRY = st.tuples(UINT63, st.sampled_from(list(EntryKind)), TEXT, TEXT, TEXT, INT64)
AWKWARD = ['"', "\\", "\n", "\x00", "\x1f", "\x7f", "\u00e9", "\u2028", "\U0001f600", "/", ""]


def chain_reference(
    previous: str, first_seq: int, currency: str, created: int, entries: list[tuple]
) -> list[str]:
    hashes = []
    for seq, (entry_id, kind, ref, debit, credit, amount) in enumerate(entries, first_seq):
        t = Transfer(kind, currency, ref, debit, credit, amount)
        previous = reference(previous, seq, entry_id, t, created)
        hashes.append(previous)
    return hashes


@settings(max_examples=300, deadline=None)
@given(
    previous=TEXT,
    first_seq=st.integers(min_value=1, max_value=2**62),
    currency=TEXT,
    created=INT64,
    entries=st.lists(NEW_ENTRY, max_size=8),
)
def test_entry_chain_links_each_entry_as_entry_hash_does(
    previous: str, first_seq: int, currency: str, created: int, entries: list[tuple]
) -> None:
    assert entry_chain(previous, first_seq, currency, created, entries) == chain_reference(
        previous, first_seq, currency, created, entries
    )


def test_entry_chain_of_awkward_strings() -> None:
    """Every character JSON escapes, in every string; a lone surrogate (no UTF-8 for Rust)
    takes the Python way and gives the same hashes."""
    for s in [*AWKWARD, "\ud800", "a\udfffb"]:
        entries = [(7, EntryKind.LIQUIDATION_PROFIT, s, "d" + s, s + "c", 5), (8, 4, s, s, s, 1)]
        expected = chain_reference(s, 3, "USD" + s, 9, entries)
        assert entry_chain(s, 3, "USD" + s, 9, entries) == expected, repr(s)
