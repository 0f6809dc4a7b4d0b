"""VerifyLedger: recompute every currency's chain and check every invariant of the ledger.

It trusts no stored total. Per currency, in chain order: each link's hash is recomputed from
its content and the previous link's stored hash (so a changed row is named alone, and a
missing or inserted one breaks the sequence where it is); each entry moves a positive amount
between two different, valid accounts (its postings sum to zero); the fund never goes below
zero; every cached balance and running total equals what its postings add up to; every closed
cycle's system loss nets to zero (loss = fund paid + allocated + uncovered, each posted once),
its allocation rows match the digest its link carries, each is above zero and at most its
position's pnl, and they sum to its allocated total; every liquidation names its entry. Over
the whole ledger, every entry and liquidation names a known currency. One readable problem
per broken row, naming it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from ledger import journal, money
from ledger.alloc import allocations_digest
from ledger.db import audit
from ledger.db.batch import BatchStatements
from ledger.db.closes import cycle_fields
from ledger.db.reversals import reversal_fields
from ledger.errors import InvalidArgument, NotFound
from ledger.journal import (
    INSURANCE_FUND,
    SYSTEM_ACCOUNTS,
    SYSTEM_LOSS,
    EntryKind,
    Transfer,
    parse_account,
)

PROBLEMS_MAX = 1000  # problems listed in one report (the count says how many more)


@dataclass
class Report:
    ok: bool = True
    entries_checked: int = 0
    problems: list[str] = field(default_factory=list)
    _more: int = 0

    def problem(self, text: str) -> None:
        self.ok = False
        if len(self.problems) < PROBLEMS_MAX:
            self.problems.append(text)
        else:
            self._more += 1

    def finish(self) -> Report:
        if self._more:
            self.problems.append(f"… and {self._more} more problems")
        return self


def verify(session: Session, currency: str) -> Report:
    """The report over one currency (`currency` non-empty) or every currency ("")."""
    if currency:
        money.currency_code("currency", currency)
    db = BatchStatements.of_session(session)
    codes = audit.currencies(db, currency or None)
    if currency and not codes:
        raise NotFound(f"currency: unknown currency {currency!r}")
    report = Report()
    if not currency:
        for kind, key, code in audit.unknown_currencies(db, PROBLEMS_MAX):
            report.problem(f"{kind} {key} names currency {code!r}, which is not a currency")
    for code in codes:
        _verify_currency(session, db, code, report)
    return report.finish()


@dataclass
class _Balances:
    """Running totals per account, from the postings (system accounts only)."""

    balance: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    credits: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    debits: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))

    def post(self, debit: str, credit: str, amount: int) -> None:
        self.balance[debit] -= amount
        self.debits[debit] += amount
        self.balance[credit] += amount
        self.credits[credit] += amount


def _verify_currency(session: Session, db: BatchStatements, currency: str, report: Report) -> None:
    cycles = audit.cycles(db, currency)
    reversals = audit.reversals(db, currency)
    balances = _Balances()
    previous_hash, previous_seq, previous_name = journal.GENESIS_HASH, 0, "the chain's start"
    for seq, name, kind, row in _links(audit.entries(db, currency), cycles, reversals):
        if kind == "entry":
            report.entries_checked += 1
            _check_entry(currency, row, report, balances)
        if seq == 0:
            report.problem(f"{name} of {currency} is not in the chain (no link): inserted?")
            continue
        if seq <= previous_seq:
            report.problem(f"{name} of {currency} repeats chain link {seq}")
            continue
        if seq != previous_seq + 1:
            missing = seq - previous_seq - 1
            report.problem(
                f"{missing} link(s) of {currency}'s chain missing between {previous_name} "
                f"and {name} (links {previous_seq + 1} to {seq - 1}): removed?"
            )
        if kind == "entry":
            expected = journal.entry_hash(
                previous_hash, seq, row.entry_id, _transfer(currency, row), row.created_at_us
            )
        elif kind == "cycle":
            expected = journal.cycle_hash(previous_hash, seq, cycle_fields(row))
        else:
            expected = journal.cycle_hash(previous_hash, seq, reversal_fields(row))
        stored = row.hash if kind == "entry" else row["hash"]
        if stored != expected:
            report.problem(
                f"{name} of {currency}: its content does not match its hash (changed after "
                "it was written?)"
            )
        previous_hash, previous_seq, previous_name = str(stored), seq, name
    head = audit.head(db, currency)
    if head is None:
        report.problem(f"currency {currency} has no chain head")
    elif head[0] != previous_seq:
        report.problem(
            f"the chain of {currency} ends at link {previous_seq} ({previous_name}), but its "
            f"head is at link {head[0]}: the last links were removed?"
        )
    elif head[1] != previous_hash:
        report.problem(
            f"the head of {currency}'s chain does not hold the hash of its last link "
            f"{previous_seq} ({previous_name}): the head or that link was changed"
        )
    reversal_of = {int(r["cycle_pk"]): r for r in reversals}
    for cycle in cycles:
        reversal = reversal_of.pop(int(cycle["id"]), None)
        report.entries_checked += _check_cycle(
            session, db, currency, cycle, reversal, report, balances
        )
    for reversal in reversal_of.values():
        report.problem(
            f"{_reversal_name(reversal)} of {currency}: the close it reverses (cycle row "
            f"{reversal['cycle_pk']}) is not there (removed?)"
        )
    by_cycle = _closes_by_cycle(cycles)
    reversed_pks = {int(r["cycle_pk"]) for r in reversals}
    _check_versions(currency, by_cycle, reversed_pks, report)
    _check_close_entries(db, currency, by_cycle, reversed_pks, report)
    _check_cached(db, currency, balances, report)
    for liquidation_id, what in audit.broken_liquidations(db, currency):
        report.problem(f"liquidation {liquidation_id!r} of {currency}: {what}")
    for entry_id, reference in audit.orphan_liquidation_entries(db, currency):
        report.problem(
            f"entry {entry_id} of {currency} records liquidation {reference!r}, which is not "
            "there (removed?)"
        )


def _links(
    entries: Iterator[audit.EntryRow],
    cycles: list[dict[str, Any]],
    reversals: list[dict[str, Any]],
) -> Iterator[tuple[int, str, str, Any]]:
    """Entries, cycle closes and their reversals merged in chain order: (seq, name, kind,
    row)."""
    pending = sorted(
        [(int(c["chain_seq"]), 0, int(c["id"]), _cycle_name(c), "cycle", c) for c in cycles]
        + [
            (int(r["chain_seq"]), 1, int(r["cycle_pk"]), _reversal_name(r), "reversal", r)
            for r in reversals
        ],
        key=lambda link: link[:3],
    )
    index = 0
    for entry in entries:
        while index < len(pending) and pending[index][0] < entry.chain_seq:
            seq, _, _, name, kind, row = pending[index]
            yield seq, name, kind, row
            index += 1
        yield entry.chain_seq, f"entry {entry.entry_id}", "entry", entry
    for seq, _, _, name, kind, row in pending[index:]:
        yield seq, name, kind, row


def _cycle_name(cycle: dict[str, Any]) -> str:
    version = int(cycle.get("version", 1))
    return f"the close of cycle {cycle['cycle_id']!r}" + (
        f" (version {version})" if version != 1 else ""
    )


def _reversal_name(reversal: dict[str, Any]) -> str:
    version = int(reversal["version"])
    return f"the reversal of cycle {reversal['cycle_id']!r}" + (
        f" (close version {version})" if version != 1 else ""
    )


def _transfer(currency: str, row: audit.EntryRow) -> Transfer:
    return Transfer(
        EntryKind(row.kind) if row.kind in _KINDS else EntryKind.FUND_DEPOSIT,
        currency,
        row.reference,
        row.debit,
        row.credit,
        row.amount,
        row.memo,
        row.reverses,
    )


_KINDS = {int(k) for k in EntryKind}


def _check_entry(currency: str, row: audit.EntryRow, report: Report, balances: _Balances) -> None:
    name = f"entry {row.entry_id} of {currency}"
    if row.kind not in _KINDS:
        report.problem(f"{name}: unknown kind {row.kind}")
    if row.amount <= 0:
        report.problem(
            f"{name}: amount {row.amount} is not positive (its postings do not balance as a flow)"
        )
    if row.debit == row.credit:
        report.problem(f"{name}: moves {row.amount} from {row.debit} to itself")
    for account in (row.debit, row.credit):
        try:
            parse_account("account", account)
        except InvalidArgument:
            report.problem(f"{name}: unknown account {account!r}")
    fund = balances.balance[INSURANCE_FUND]
    if row.debit == INSURANCE_FUND and fund >= 0 and fund - row.amount < 0:  # once per dip
        report.problem(
            f"{name} takes insurance_fund of {currency} below zero "
            f"({balances.balance[INSURANCE_FUND]} − {row.amount})"
        )
    balances.post(row.debit, row.credit, row.amount)


def _check_cycle(
    session: Session,
    db: BatchStatements,
    currency: str,
    cycle: dict[str, Any],
    reversal: dict[str, Any] | None,
    report: Report,
    balances: _Balances,
) -> int:
    """Checks one close of a cycle, and its reversal if it has one; returns the allocation
    rows checked."""
    name = f"{_cycle_name(cycle)} of {currency}"
    loss, paid, allocated, uncovered = (
        int(cycle[k]) for k in ("loss_total", "fund_paid", "allocated_total", "uncovered")
    )
    if loss != paid + allocated + uncovered:
        report.problem(
            f"{name}: fund paid {paid} + allocated {allocated} + uncovered {uncovered} is not "
            f"its loss {loss}: its system loss does not net to zero"
        )
    if reversal is None:  # a reversed close's loss was given back to the open cycle
        recorded = audit.cycle_loss(db, currency, str(cycle["cycle_id"]))
        if recorded != loss:
            report.problem(f"{name}: its liquidations lost {recorded}, its summary says {loss}")
    rows = audit.allocations(session, int(cycle["id"]))
    count = len(rows.amount)
    first = int(cycle["allocation_first_entry_id"])
    digest = allocations_digest(rows.position_id, rows.account_id, rows.pnl, rows.amount)
    if digest != cycle["allocations_digest"]:
        report.problem(
            f"{name}: its allocation rows do not match the digest of its link "
            "(changed, removed or added rows)"
        )
    bad = np.flatnonzero((rows.amount <= 0) | (rows.amount > rows.pnl))
    for index in bad[:20].tolist():
        report.problem(
            f"{name}: the allocation of position {int(rows.position_id[index])} is "
            f"{int(rows.amount[index])}, outside (0, its pnl {int(rows.pnl[index])}]"
        )
    if len(bad) > 20:
        report.problem(f"{name}: {len(bad) - 20} more allocations outside (0, pnl]")
    total = int(rows.amount.sum(dtype=np.int64)) if count else 0
    if total != allocated:
        report.problem(f"{name}: its allocations sum to {total}, its summary says {allocated}")
    wrong_ids = np.flatnonzero(rows.entry_id != np.arange(first, first + count, dtype=np.int64))
    if len(wrong_ids):
        report.problem(f"{name}: {len(wrong_ids)} allocation rows have the wrong entry id")
    kept = cycle.get("allocation_count")
    if kept is not None and int(kept) != count:
        report.problem(f"{name}: it has {count} allocation rows, its close wrote {kept}")
    balances.credits[SYSTEM_LOSS] += total
    balances.balance[SYSTEM_LOSS] += total
    if reversal is not None:
        count += _check_reversal(session, currency, cycle, reversal, report, balances)
    return count


def _check_reversal(
    session: Session,
    currency: str,
    cycle: dict[str, Any],
    reversal: dict[str, Any],
    report: Report,
    balances: _Balances,
) -> int:
    """A reversal's rows give back exactly the close's allocations: the same rows (their
    digest is the close's), each its own entry id at the same rank of its block."""
    name = f"{_reversal_name(reversal)} of {currency}"
    for column in ("cycle_id", "version", "allocations_digest"):
        if reversal[column] != cycle[column]:
            report.problem(
                f"{name}: its {column} {reversal[column]!r} is not that of the close it "
                f"reverses ({cycle[column]!r})"
            )
    rows = audit.allocation_reversals(session, int(reversal["cycle_pk"]))
    count = len(rows.amount)
    digest = allocations_digest(rows.position_id, rows.account_id, rows.pnl, rows.amount)
    if digest != reversal["allocations_digest"] or count != int(reversal["allocation_count"]):
        report.problem(
            f"{name}: its {count} reversal rows do not give back the close's allocations "
            "(changed, removed or added rows)"
        )
    first = int(reversal["first_entry_id"])
    wrong_ids = np.flatnonzero(rows.entry_id != np.arange(first, first + count, dtype=np.int64))
    if len(wrong_ids):
        report.problem(f"{name}: {len(wrong_ids)} reversal rows have the wrong entry id")
    bad = np.flatnonzero(rows.amount <= 0)
    if len(bad):
        report.problem(f"{name}: {len(bad)} reversal rows have an amount not above zero")
    total = int(rows.amount.sum(dtype=np.int64)) if count else 0
    balances.debits[SYSTEM_LOSS] += total
    balances.balance[SYSTEM_LOSS] -= total
    return count


def _closes_by_cycle(cycles: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The closes of each cycle id, in version order."""
    by_cycle: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
    for cycle in cycles:
        by_cycle[str(cycle["cycle_id"])].append(cycle)
    return {
        cycle_id: sorted(closes, key=lambda c: int(c["version"]))
        for cycle_id, closes in by_cycle.items()
    }


def _check_versions(
    currency: str,
    by_cycle: dict[str, list[dict[str, Any]]],
    reversed_pks: set[int],
    report: Report,
) -> None:
    """A cycle's closes are versions 1, 2, … and every one but the latest is reversed."""
    for cycle_id, closes in by_cycle.items():
        versions = [int(c["version"]) for c in closes]
        if versions != list(range(1, len(closes) + 1)):
            report.problem(f"cycle {cycle_id!r} of {currency} has close versions {versions}")
        for close in closes[:-1]:
            if int(close["id"]) not in reversed_pks:
                report.problem(
                    f"{_cycle_name(close)} of {currency} is not reversed, yet the cycle was "
                    "closed again after it"
                )


def _check_close_entries(
    db: BatchStatements,
    currency: str,
    by_cycle: dict[str, list[dict[str, Any]]],
    reversed_pks: set[int],
    report: Report,
) -> None:
    """Each close posted its cover and its uncovered rest once, as its summary says (the
    cycle's entries that reverse nothing, in id order, are those of its closes in version
    order); a reversed close's are each reversed once, and a close in force's are not."""
    for cycle_id, closes in by_cycle.items():
        own = audit.cycle_entries(db, currency, cycle_id)
        originals = [e for e in own if e.reverses == 0]
        reversed_by: defaultdict[int, list[audit.CloseEntry]] = defaultdict(list)
        for entry in own:
            if entry.reverses:
                reversed_by[entry.reverses].append(entry)
        for close in closes:
            name = f"{_cycle_name(close)} of {currency}"
            for kind, column in (
                (EntryKind.INSURANCE_COVER, "fund_paid"),
                (EntryKind.UNCOVERED_LOSS, "uncovered"),
            ):
                amount = int(close[column])
                taken = []
                if amount and originals and originals[0].kind == kind:
                    taken = [originals.pop(0)]
                posted = [e.amount for e in taken]
                if posted != ([amount] if amount else []):
                    report.problem(
                        f"{name}: its {kind.name} entries are {posted}, its summary says {amount}"
                    )
                for entry in taken:
                    _check_reversed(
                        name,
                        entry,
                        reversed_by.pop(entry.entry_id, []),
                        int(close["id"]) in reversed_pks,
                        report,
                    )
        for entry in originals:
            report.problem(
                f"entry {entry.entry_id} of {currency} ({EntryKind(entry.kind).name} of cycle "
                f"{cycle_id!r}) belongs to no close of the cycle"
            )
        for entry_id, entries in reversed_by.items():
            for entry in entries:
                report.problem(
                    f"entry {entry.entry_id} of {currency} reverses entry {entry_id}, which is "
                    f"no close's entry of cycle {cycle_id!r}"
                )


def _check_reversed(
    name: str,
    entry: audit.CloseEntry,
    reversals: list[audit.CloseEntry],
    close_reversed: bool,
    report: Report,
) -> None:
    if not close_reversed:
        if reversals:
            report.problem(
                f"{name}: its entry {entry.entry_id} is reversed by entry "
                f"{reversals[0].entry_id}, yet the close is in force"
            )
        return
    if len(reversals) != 1:
        report.problem(
            f"{name}: its entry {entry.entry_id} is reversed {len(reversals)} times, not once"
        )
        return
    (reversal,) = reversals
    if (reversal.kind, reversal.amount, reversal.debit, reversal.credit) != (
        entry.kind,
        entry.amount,
        entry.credit,
        entry.debit,
    ):
        report.problem(
            f"{name}: entry {reversal.entry_id} does not reverse its entry {entry.entry_id} "
            f"({reversal.amount} from {reversal.debit} to {reversal.credit})"
        )


def _check_cached(db: BatchStatements, currency: str, balances: _Balances, report: Report) -> None:
    cached = {name: (b, c, d) for name, b, c, d in audit.cached_accounts(db, currency)}
    for account in SYSTEM_ACCOUNTS:
        if account not in cached:
            report.problem(f"account {account} of {currency} is missing")
            continue
        balance, credits, debits = cached[account]
        expected = (balances.balance[account], balances.credits[account], balances.debits[account])
        if (balance, credits, debits) != expected:
            report.problem(
                f"account {account} of {currency}: cached balance {balance} (credits "
                f"{credits}, debits {debits}), its postings sum to {expected[0]} (credits "
                f"{expected[1]}, debits {expected[2]})"
            )
