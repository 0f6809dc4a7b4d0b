"""Benchmark: the Rust allocator beside a vectorised numpy version of the same rules and the
pure-Python Fraction reference, printed from one run.

Usage: python bench/bench_allocator.py [--quick]   (build first: maturin develop --release)

The numpy version is what a data team would write (argsort + cumsum + float64 shares +
largest remainder); it is not exact (float shares, int64 totals) and is here only for time.
Peak memory is the resident-set high-water mark of the Rust call above its inputs, measured in
a fresh subprocess (the peak is reset through /proc/self/clear_refs just before the call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ledger.alloc import allocate
from tests.alloc_reference import allocate_reference

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
INSURANCE_SHARE, COVERAGE_RATIO = "0.2", "0.9"


def positions(n: int, shape: str, ids: str, seed: int = 7) -> tuple[U64, U64, I64, int, int]:
    """Columns plus a loss (a third of the profit) and a fund balance (a tenth of the loss)."""
    rng = np.random.default_rng(seed)
    if shape == "heavy":  # half profitable, Pareto(1.2) magnitudes in cents
        magnitude = ((rng.pareto(1.2, n) + 1.0) * 100).astype(np.int64)
        pnl = np.where(rng.random(n) < 0.5, magnitude, -magnitude)
    else:  # flat: every position profitable, similar pnl
        pnl = rng.integers(9_000, 11_000, n, dtype=np.int64)
    position_id = np.arange(1, n + 1, dtype=np.uint64)
    if ids == "shuffled":
        position_id = rng.permutation(position_id)
    account_id = rng.integers(1, 2**40, n, dtype=np.uint64)
    loss = min(int(pnl[pnl > 0].sum()) // 3, 2**63 - 1)
    return position_id, account_id, pnl, loss, loss // 10


def allocate_numpy(
    loss: int, fund: int, q: float, c: float, position_id: U64, account_id: U64, pnl: I64
) -> tuple[U64, U64, I64, I64]:
    order = np.argsort(position_id)  # ids are unique: stability would only cost time
    ids_sorted = position_id[order]
    if np.any(ids_sorted[1:] == ids_sorted[:-1]):
        raise ValueError("duplicate position_id")
    fund_paid = min(int(np.floor(q * loss + 0.5)), fund)
    user_due = loss - fund_paid
    profitable = pnl > 0
    profits = pnl[profitable]
    if profits.size == 0:
        empty = np.empty(0, np.int64)
        return empty.astype(np.uint64), empty.astype(np.uint64), empty, empty
    ranked = np.sort(profits)[::-1]
    running = np.cumsum(ranked)
    cutoff = ranked[min(np.searchsorted(running, c * running[-1]), ranked.size - 1)]
    participant = profitable & (pnl >= cutoff)
    participant_profit = int(pnl[participant].sum())
    if user_due > participant_profit and participant.sum() < profits.size:
        participant, participant_profit = profitable, int(profits.sum())
    allocated = min(user_due, participant_profit)
    # Participants in position_id order, float shares, largest remainders.
    rows = order[participant[order]]
    shares = allocated * (pnl[rows] / participant_profit)
    amount = np.floor(shares)
    leftover = int(allocated - amount.sum())
    if leftover > 0:
        amount[np.argsort(-(shares - amount), kind="stable")[:leftover]] += 1
    amount = amount.astype(np.int64)
    keep = amount > 0
    rows = rows[keep]
    return position_id[rows], account_id[rows], pnl[rows], amount[keep]


def median_seconds(call: Callable[[], object], runs: int) -> float:
    """The median wall time of the call itself: its result is released after the clock stops,
    so freeing the previous run's output is not charged to the next run."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
        del result
    return statistics.median(times)


def peak_extra_bytes(n: int, shape: str, ids: str) -> int:
    """RSS high-water mark of one Rust call above the RSS just before it, in a fresh process."""
    code = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from bench_allocator import positions, status_kib
from ledger.alloc import allocate
position_id, account_id, pnl, loss, fund = positions({n}, {shape!r}, {ids!r})
allocate(loss, fund, "0.2", "0.9", position_id[:1000], account_id[:1000], pnl[:1000])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kib("VmRSS")
result = allocate(loss, fund, "0.2", "0.9", position_id, account_id, pnl)
print(json.dumps((status_kib("VmHWM") - before) * 1024))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout))


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="1M only, fewer runs")
    parser.add_argument("--sizes", type=int, nargs="*", help="position counts to run")
    args = parser.parse_args()
    sizes = [1_000_000] if args.quick else [100_000, 1_000_000, 10_000_000]
    if args.sizes:
        sizes = args.sizes
    header = (
        f"{'positions':>10} {'pnl':>5} {'ids':>8} {'participants':>12} {'rust ms':>8} "
        f"{'numpy ms':>9} {'numpy/rust':>10} {'python ms':>10} {'peak MB':>8} {'B/pos':>6}"
    )
    print(header)
    print("-" * len(header))
    for n in sizes:
        runs = 3 if n >= 10_000_000 else 7
        cases = [("heavy", "ordered"), ("flat", "ordered"), ("heavy", "shuffled")]
        for shape, ids in cases:
            print(row(n, shape, ids, runs), flush=True)


def row(n: int, shape: str, ids: str, runs: int) -> str:
    position_id, account_id, pnl, loss, fund = positions(n, shape, ids)
    columns = (position_id, account_id, pnl)
    rust = partial(allocate, loss, fund, INSURANCE_SHARE, COVERAGE_RATIO, *columns)
    vectorised = partial(allocate_numpy, loss, fund, 0.2, 0.9, *columns)
    result = rust()
    rust_s = median_seconds(rust, runs)
    numpy_s = median_seconds(vectorised, max(3, runs // 2))
    python_ms = "-"
    if n == 100_000 and ids == "ordered":
        rows = list(zip(position_id.tolist(), account_id.tolist(), pnl.tolist(), strict=True))
        reference = partial(allocate_reference, loss, fund, INSURANCE_SHARE, COVERAGE_RATIO, rows)
        python_ms = f"{median_seconds(reference, 1) * 1000:.0f}"
    peak = peak_extra_bytes(n, shape, ids)
    return (
        f"{n:>10} {shape:>5} {ids:>8} {result.participant_count:>12} "
        f"{rust_s * 1000:>8.1f} {numpy_s * 1000:>9.1f} {numpy_s / rust_s:>10.1f} "
        f"{python_ms:>10} {peak / 2**20:>8.1f} {peak / n:>6.1f}"
    )


if __name__ == "__main__":
    main()
