"""A slow, obviously right allocation, written from issue 3's rules with ``Fraction``.

Shared by the property tests and the benchmark. Plain lists, full sorts, exact rationals:
nothing here is clever, so disagreement with the Rust core points at the core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class Reference:
    fund_share: int
    fund_paid: int
    user_due: int
    positions_total: int
    profitable_count: int
    profit_total: int
    cutoff_pnl: int
    participant_count: int
    participant_profit: int
    widened: bool
    allocated_total: int
    uncovered: int
    rows: list[tuple[int, int, int, int]]  # (position_id, account_id, pnl, amount) by id


def allocate_reference(
    loss: int,
    fund_balance: int,
    insurance_share: str,
    coverage_ratio: str,
    positions: list[tuple[int, int, int]],
) -> Reference:
    """``positions`` are (position_id, account_id, pnl) rows in any order."""
    q, c = Fraction(insurance_share), Fraction(coverage_ratio)
    # Rule 1: nearest integer, halves up.
    fund_share = math.floor(q * loss + Fraction(1, 2))
    fund_paid = min(fund_share, fund_balance)
    user_due = loss - fund_paid
    # Rule 2.
    profitable = [p for p in positions if p[2] > 0]
    profit_total = sum(p[2] for p in profitable)
    # Rule 3: walk down the ranking until the running total reaches c × profit_total.
    cutoff_pnl = 0
    running = 0
    for pnl in sorted((p[2] for p in profitable), reverse=True):
        running += pnl
        if running >= c * profit_total:
            cutoff_pnl = pnl
            break
    participants = [p for p in profitable if p[2] >= cutoff_pnl]
    participant_profit = sum(p[2] for p in participants)
    # Rule 4.
    widened = user_due > participant_profit and len(participants) < len(profitable)
    if widened:
        participants, participant_profit = profitable, profit_total
    # Rule 5.
    allocated_total = min(user_due, participant_profit)
    # Rule 6: floors, then one unit each by largest remainder, larger pnl, smaller id.
    amounts = split(allocated_total, [(p[0], p[2]) for p in participants])
    # Rule 7.
    rows = sorted(
        (position_id, account_id, pnl, amounts[position_id])
        for position_id, account_id, pnl in participants
        if amounts[position_id] > 0
    )
    return Reference(
        fund_share=fund_share,
        fund_paid=fund_paid,
        user_due=user_due,
        positions_total=len(positions),
        profitable_count=len(profitable),
        profit_total=profit_total,
        cutoff_pnl=cutoff_pnl,
        participant_count=len(participants),
        participant_profit=participant_profit,
        widened=widened,
        allocated_total=allocated_total,
        uncovered=user_due - allocated_total,
        rows=rows,
    )


def allocate_by_account_reference(
    loss: int,
    fund_balance: int,
    insurance_share: str,
    coverage_ratio: str,
    positions: list[tuple[int, int, int]],
) -> Reference:
    """Issue 13's account ranking, written from its text: an account's profit is the sum of
    its profitable positions' pnl; the accounts are ranked, cut, widened and charged as
    positions are (remainder units by larger remainder, larger profit, smaller account id);
    each account's charge is split over its profitable positions pro rata by pnl (remainder
    units by larger remainder, larger pnl, smaller position id). The counts, the cut and the
    participants' profit speak of accounts."""
    q, c = Fraction(insurance_share), Fraction(coverage_ratio)
    fund_share = math.floor(q * loss + Fraction(1, 2))
    fund_paid = min(fund_share, fund_balance)
    user_due = loss - fund_paid
    profitable = [p for p in positions if p[2] > 0]
    profit_total = sum(p[2] for p in profitable)
    by_account: dict[int, list[tuple[int, int, int]]] = {}
    for row in profitable:
        by_account.setdefault(row[1], []).append(row)
    account_profit = {a: sum(r[2] for r in rows) for a, rows in by_account.items()}
    cutoff = 0
    running = 0
    for profit in sorted(account_profit.values(), reverse=True):
        running += profit
        if running >= c * profit_total:
            cutoff = profit
            break
    participants = [a for a, p in account_profit.items() if p >= cutoff]
    participant_profit = sum(account_profit[a] for a in participants)
    widened = user_due > participant_profit and len(participants) < len(account_profit)
    if widened:
        participants, participant_profit = list(account_profit), profit_total
    allocated_total = min(user_due, participant_profit)
    charges = split(allocated_total, [(a, account_profit[a]) for a in participants])
    amounts: dict[int, int] = {}
    for account in participants:
        amounts.update(split(charges[account], [(r[0], r[2]) for r in by_account[account]]))
    rows_out = sorted(
        (position_id, account_id, pnl, amounts[position_id])
        for position_id, account_id, pnl in profitable
        if amounts.get(position_id, 0) > 0
    )
    return Reference(
        fund_share=fund_share,
        fund_paid=fund_paid,
        user_due=user_due,
        positions_total=len(positions),
        profitable_count=len(account_profit),
        profit_total=profit_total,
        cutoff_pnl=cutoff,
        participant_count=len(participants),
        participant_profit=participant_profit,
        widened=widened,
        allocated_total=allocated_total,
        uncovered=user_due - allocated_total,
        rows=rows_out,
    )


def split(total: int, weights: list[tuple[int, int]]) -> dict[int, int]:
    """`total` over (id, weight) pro rata, exactly: floors, then one unit each to the largest
    remainders (ties: larger weight, then smaller id)."""
    weight_total = sum(w for _, w in weights)
    amounts: dict[int, int] = {}
    remainders = []
    for key, weight in weights:
        share = Fraction(total * weight, weight_total)
        amounts[key] = math.floor(share)
        remainders.append((share - math.floor(share), weight, -key))
    leftover = total - sum(amounts.values())
    for _, _, negative_key in sorted(remainders, reverse=True)[:leftover]:
        amounts[-negative_key] += 1
    return amounts
