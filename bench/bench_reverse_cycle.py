"""Benchmark: ReverseCycle beside the close it reverses, through the real server.

Issue 13's target: a 1M-position reversal within 1.3× of the close's own time. For each
backend, a fresh database and a `ledger serve` process; the same cycle is then closed and
reversed RUNS times in turn (each close after the first is the next version of the cycle,
with the same positions), each call timed at the client: CloseCycle from the first chunk
sent to the summary, ReverseCycle from the request to the summary. Prints each pair, the
medians and their ratio (reverse / close), and checks that each reversal gave everything
back (the fund's balance is the one before the close).

    python bench/bench_reverse_cycle.py [--size 1000000] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_cycle import close_once, positions, serialized_chunks, setup
from bench.common import fresh_database, median, server_process, wait_serving
from ledger.api.v1 import insurance_pb2 as pb
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc

RUNS = 3
TARGET_RATIO = 1.3


def reverse_once(target: str, cycle_id: str) -> tuple[float, pb.CycleSummary]:
    with grpc.insecure_channel(target) as channel:
        admin = pb_grpc.AdminStub(channel)
        started = time.perf_counter()
        summary = admin.ReverseCycle(
            pb.ReverseCycleRequest(cycle_id=cycle_id, currency="USDT", reason="bench"),
            timeout=600,
        )
        return time.perf_counter() - started, summary


def fund_balance(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return int(pb_grpc.QueryStub(channel).GetFund(pb.GetFundRequest(currency="USDT")).balance)


def run_backend(backend: str, n: int, distribution: str) -> tuple[float, float, int]:
    chunks = serialized_chunks(*positions(n, distribution))
    closes, reversals = [], []
    participants = 0
    with fresh_database(backend) as url, server_process(url) as (target, _):
        wait_serving(target)
        setup(target, n, ["bench"])
        for run in range(1, RUNS + 1):
            fund = fund_balance(target)
            close_s, closed = close_once(target, "bench", chunks)
            reverse_s, reversed_ = reverse_once(target, "bench")
            assert closed.version == run and reversed_.state == pb.CYCLE_STATE_REVERSED
            assert fund_balance(target) == fund, "the reversal did not give the cover back"
            participants = closed.participant_count
            closes.append(close_s)
            reversals.append(reverse_s)
            print(
                f"  {backend:<10} run {run}: close {close_s:6.2f} s (version {closed.version}),"
                f" reverse {reverse_s:6.2f} s, {participants} allocation rows",
                flush=True,
            )
    return median(closes), median(reversals), participants


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--distribution", default="flat", choices=("flat", "heavy"))
    args = parser.parse_args()
    results = [(b, *run_backend(b, args.size, args.distribution)) for b in args.backends.split(",")]
    print(
        f"\n{'backend':<10} {'positions':>10} {'rows':>9} {'close s':>8} {'reverse s':>9} "
        f"{'reverse/close':>13}  target ≤ {TARGET_RATIO}"
    )
    for backend, close_s, reverse_s, rows in results:
        print(
            f"{backend:<10} {args.size:>10} {rows:>9} {close_s:>8.2f} {reverse_s:>9.2f} "
            f"{reverse_s / close_s:>13.2f}"
        )


if __name__ == "__main__":
    main()
