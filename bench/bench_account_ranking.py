"""Benchmark: account ranking beside position ranking in the Rust allocator, one run.

Usage: python bench/bench_account_ranking.py [--quick] [--sizes N ...] [--accounts N ...]

Issue 13's target: a 10M-position cycle with 1M accounts under account ranking within 2× of
the position ranking's time over the same columns. Both distributions of bench_allocator.py
(heavy-tailed and flat), ids in order and shuffled; the accounts are drawn uniformly from
1..accounts, so an account holds about positions / accounts of them. Prints the medians of
each ranking and their ratio (account / position), and the participants of each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_allocator import COVERAGE_RATIO, INSURANCE_SHARE, median_seconds, positions

from ledger.alloc import Ranking, allocate

TARGET_RATIO = 2.0


def row(n: int, accounts: int, shape: str, ids: str, runs: int) -> tuple[str, float]:
    position_id, _, pnl, loss, fund = positions(n, shape, ids)
    account_id = np.random.default_rng(11).integers(1, accounts + 1, n, dtype=np.uint64)

    def run(ranking: Ranking) -> object:
        return allocate(
            loss, fund, INSURANCE_SHARE, COVERAGE_RATIO, position_id, account_id, pnl, ranking
        )

    by_position = allocate(
        loss, fund, INSURANCE_SHARE, COVERAGE_RATIO, position_id, account_id, pnl
    )
    by_account = run(Ranking.ACCOUNT)
    assert by_account.allocated_total == by_position.allocated_total or by_account.widened
    position_s = median_seconds(lambda: run(Ranking.POSITION), runs)
    account_s = median_seconds(lambda: run(Ranking.ACCOUNT), runs)
    ratio = account_s / position_s
    text = (
        f"| {n:>11,} | {accounts:>9,} | {shape:5} | {ids:8} | "
        f"{by_position.participant_count:>10,} | {by_account.participant_count:>9,} | "
        f"{position_s * 1000:>9.1f} | {account_s * 1000:>9.1f} | {ratio:5.2f}× |"
    )
    return text, ratio


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="1M positions, fewer runs")
    parser.add_argument("--sizes", type=int, nargs="*", help="position counts")
    parser.add_argument("--accounts", type=int, nargs="*", help="account counts (one per size)")
    args = parser.parse_args()
    sizes = args.sizes or ([1_000_000] if args.quick else [1_000_000, 10_000_000])
    accounts = args.accounts or [max(1, n // 10) for n in sizes]
    runs = 3 if args.quick else 5
    print(
        "| positions | accounts | pnl | ids | participants (by position) | participant "
        "accounts | position ms | account ms | account / position |"
    )
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|")
    worst = 0.0
    for n, a in zip(sizes, accounts, strict=True):
        for shape in ("heavy", "flat"):
            for ids in ("ordered", "shuffled"):
                text, ratio = row(n, a, shape, ids, runs)
                worst = max(worst, ratio)
                print(text, flush=True)
    verdict = "met" if worst <= TARGET_RATIO else "NOT met"
    print(f"\nworst ratio {worst:.2f}× (target ≤ {TARGET_RATIO}×): {verdict}")


if __name__ == "__main__":
    main()
