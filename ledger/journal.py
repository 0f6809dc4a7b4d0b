"""Double-entry rules: entry kinds, account names, postings that sum to zero.

Every flow in this ledger moves one amount from one account to another, so an entry is stored
as a transfer (debit account, credit account, amount > 0) and read back as two signed postings:
the debit account −amount, the credit account +amount. Entries are append-only: corrections are
new entries, and no code path updates or deletes one.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _quoted  # json's own, in C

from ledger import alloc
from ledger.errors import InvalidArgument
from ledger.limits import INT64_MAX, INT64_MIN, UINT64_MAX


class EntryKind(enum.IntEnum):
    """Numbers are those of insurance.v1.EntryKind."""

    FUND_DEPOSIT = 1
    FUND_WITHDRAWAL = 2
    LIQUIDATION_PROFIT = 3
    LIQUIDATION_LOSS = 4
    INSURANCE_COVER = 5
    ALLOCATION = 6
    UNCOVERED_LOSS = 7


INSURANCE_FUND = "insurance_fund"
LIQUIDATION_ENGINE = "liquidation_engine"
SYSTEM_LOSS = "system_loss"
UNCOVERED_LOSS = "uncovered_loss"
EXTERNAL = "external"
SYSTEM_ACCOUNTS = (INSURANCE_FUND, LIQUIDATION_ENGINE, SYSTEM_LOSS, UNCOVERED_LOSS, EXTERNAL)
# Accounts whose balance may never go below zero.
NON_NEGATIVE_ACCOUNTS = frozenset({INSURANCE_FUND})

_USER_ACCOUNT = re.compile(r"user:(0|[1-9][0-9]{0,19})")


def user_account(account_id: int) -> str:
    return f"user:{account_id}"


def parse_account(field: str, name: str) -> str:
    """Accept a system account name or `user:<account_id>` with a u64 id."""
    if name in SYSTEM_ACCOUNTS:
        return name
    match = _USER_ACCOUNT.fullmatch(name)
    if match is None or int(match.group(1)) > UINT64_MAX:
        raise InvalidArgument(
            field, name, f"must be one of {', '.join(SYSTEM_ACCOUNTS)} or user:<account_id>"
        )
    return name


def user_account_id(name: str) -> int | None:
    match = _USER_ACCOUNT.fullmatch(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True, slots=True)
class Posting:
    account: str
    amount: int


@dataclass(frozen=True, slots=True)
class Transfer:
    """One journal entry in its stored form: `amount` moves from `debit` to `credit`."""

    kind: EntryKind
    currency: str
    reference: str
    debit: str
    credit: str
    amount: int
    memo: str = ""
    reverses: int = 0  # the entry this one reverses (a correction), 0 for none

    def postings(self) -> tuple[Posting, Posting]:
        return Posting(self.debit, -self.amount), Posting(self.credit, self.amount)


def transfer(
    kind: EntryKind,
    currency: str,
    reference: str,
    debit: str,
    credit: str,
    amount: int,
    memo: str = "",
    *,
    reverses: int = 0,
) -> Transfer:
    """Build an entry and check it before anything is written."""
    entry = Transfer(kind, currency, reference, debit, credit, amount, memo, reverses)
    check_postings(entry.postings())
    if debit == credit:
        raise AssertionError(f"entry {kind.name} moves {amount} from {debit} to itself")
    return entry


def reversal(entry: Transfer, entry_id: int, reason: str) -> Transfer:
    """The correction of an entry: the same amount back, from its credit to its debit."""
    return transfer(
        entry.kind,
        entry.currency,
        entry.reference,
        entry.credit,
        entry.debit,
        entry.amount,
        reason,
        reverses=entry_id,
    )


def check_postings(postings: Sequence[Posting]) -> None:
    """The double-entry invariant: at least two postings, each a non-zero int64, sum zero."""
    if len(postings) < 2:
        raise AssertionError(f"an entry needs at least two postings, got {len(postings)}")
    for posting in postings:
        if posting.amount == 0:
            raise AssertionError(f"zero posting to {posting.account}")
        if not INT64_MIN <= posting.amount <= INT64_MAX:
            raise InvalidArgument("amount", posting.amount, "does not fit a signed 64-bit integer")
    total = sum(p.amount for p in postings)
    if total != 0:
        raise AssertionError(f"postings sum to {total}, not zero: {postings}")


# --- the tamper-evident chain ------------------------------------------------------------
#
# Every entry of a currency, and every cycle close, is a link of the currency's chain: its
# `chain_seq` is 1 + the link before it, and its hash is SHA-256 over a canonical encoding of
# its content and the hash of the link before it (GENESIS_HASH before the first). A changed,
# deleted or inserted row breaks the chain at that row; VerifyLedger recomputes it.

GENESIS_HASH = "0" * 64


def entry_hash(
    previous: str,
    seq: int,
    entry_id: int,
    transfer: Transfer,
    created_at_us: int,
) -> str:
    """The hash of an entry: its fields and its postings, in a fixed order, as JSON.

    The text is what _link_hash makes of the list ["entry", previous, currency, seq,
    entry_id, kind, reference, [[debit, -amount], [credit, amount]], memo, created_at_us,
    reverses], written out: json.dumps builds an encoder at each call, which was a sixth of
    a liquidation batch's time in the writer. tests/test_journal.py checks that the two
    texts are the same."""
    t = transfer
    text = (
        f'["entry",{_quoted(previous)},{_quoted(t.currency)},{int(seq)},{int(entry_id)},'
        f"{int(t.kind)},{_quoted(t.reference)},[[{_quoted(t.debit)},{-int(t.amount)}],"
        f"[{_quoted(t.credit)},{int(t.amount)}]],{_quoted(t.memo)},{int(created_at_us)},"
        f"{int(t.reverses)}]"
    )
    return hashlib.sha256(text.encode()).hexdigest()


def entry_chain(
    previous: str,
    first_seq: int,
    currency: str,
    created_at_us: int,
    entries: Sequence[tuple[int, EntryKind, str, str, str, int]],
) -> list[str]:
    """entry_hash of each of a currency's new entries (entry_id, kind, reference, debit,
    credit, amount), without memo and reversing nothing, linked in order after `previous`, the
    first at `first_seq`. In Rust: the liquidation path links a thousand entries a batch. A
    string Rust cannot take (a lone surrogate) sends the batch the Python way."""
    try:
        return alloc.entry_chain(previous, first_seq, currency, created_at_us, entries)
    except UnicodeEncodeError:
        hashes = []
        for seq, (entry_id, kind, reference, debit, credit, amount) in enumerate(
            entries, first_seq
        ):
            transfer = Transfer(kind, currency, reference, debit, credit, amount)
            previous = entry_hash(previous, seq, entry_id, transfer, created_at_us)
            hashes.append(previous)
        return hashes


def cycle_hash(previous: str, seq: int, fields: Sequence[object]) -> str:
    """The hash of a cycle close: its summary's stored fields (which carry the digest of its
    allocation rows), in a fixed order."""
    return _link_hash(["cycle", previous, seq, *fields])


def _link_hash(parts: list[object]) -> str:
    text = json.dumps(parts, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()
