"""VerifyLedger: recompute every currency's chain and check every invariant of the ledger.

It trusts no stored total. Per currency, in chain order: each link's hash is recomputed from
its content and the previous link's stored hash (so a changed row is named alone, and a
missing or inserted one breaks the sequence where it is); each entry moves a positive amount
between two different, valid accounts (its postings sum to zero); the fund never goes below
zero; every cached balance and running total equals what its postings add up to; every closed
cycle's system loss nets to zero (loss = fund paid + allocated + uncovered, each posted once),
its allocation rows match the digest its link carries, each is above zero and at most its
position's pnl, and they sum to its allocated total; every liquidation names its entry.
One readable problem per broken row, naming it.
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
    balances = _Balances()
    previous_hash, previous_seq, previous_name = journal.GENESIS_HASH, 0, "the chain's start"
    for seq, name, kind, row in _links(audit.entries(db, currency), cycles):
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
        expected = (
            journal.entry_hash(
                previous_hash, seq, row.entry_id, _transfer(currency, row), row.created_at_us
            )
            if kind == "entry"
            else journal.cycle_hash(previous_hash, seq, cycle_fields(row))
        )
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
    for cycle in cycles:
        report.entries_checked += _check_cycle(session, db, currency, cycle, report, balances)
    _check_cached(db, currency, balances, report)
    for liquidation_id, what in audit.broken_liquidations(db, currency):
        report.problem(f"liquidation {liquidation_id!r} of {currency}: {what}")
    for entry_id, reference in audit.orphan_liquidation_entries(db, currency):
        report.problem(
            f"entry {entry_id} of {currency} records liquidation {reference!r}, which is not "
            "there (removed?)"
        )


def _links(
    entries: Iterator[audit.EntryRow], cycles: list[dict[str, Any]]
) -> Iterator[tuple[int, str, str, Any]]:
    """Entries and cycle closes merged in chain order: (seq, name, kind, row)."""
    pending = sorted(cycles, key=lambda c: (int(c["chain_seq"]), int(c["id"])))
    index = 0
    for entry in entries:
        while index < len(pending) and int(pending[index]["chain_seq"]) < entry.chain_seq:
            cycle = pending[index]
            yield int(cycle["chain_seq"]), _cycle_name(cycle), "cycle", cycle
            index += 1
        yield entry.chain_seq, f"entry {entry.entry_id}", "entry", entry
    for cycle in pending[index:]:
        yield int(cycle["chain_seq"]), _cycle_name(cycle), "cycle", cycle


def _cycle_name(cycle: dict[str, Any]) -> str:
    return f"the close of cycle {cycle['cycle_id']!r}"


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
    report: Report,
    balances: _Balances,
) -> int:
    """Checks one closed cycle; returns the allocation rows checked."""
    name = f"{_cycle_name(cycle)} of {currency}"
    loss, paid, allocated, uncovered = (
        int(cycle[k]) for k in ("loss_total", "fund_paid", "allocated_total", "uncovered")
    )
    if loss != paid + allocated + uncovered:
        report.problem(
            f"{name}: fund paid {paid} + allocated {allocated} + uncovered {uncovered} is not "
            f"its loss {loss}: its system loss does not net to zero"
        )
    recorded = audit.cycle_loss(db, currency, str(cycle["cycle_id"]))
    if recorded != loss:
        report.problem(f"{name}: its liquidations lost {recorded}, its summary says {loss}")
    own = audit.cycle_entries(db, currency, str(cycle["cycle_id"]))
    for kind, amount in ((EntryKind.INSURANCE_COVER, paid), (EntryKind.UNCOVERED_LOSS, uncovered)):
        posted = [a for _, k, a in own if k == kind]
        if posted != ([amount] if amount else []):
            report.problem(
                f"{name}: its {kind.name} entries are {posted}, its summary says {amount}"
            )
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
    balances.credits[SYSTEM_LOSS] += total
    balances.balance[SYSTEM_LOSS] += total
    return count


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
