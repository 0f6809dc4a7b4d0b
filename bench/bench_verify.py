"""VerifyLedger over a ledger holding a large close, through the real server.

For each backend, a fresh database and a `ledger serve` process: a currency, a fund, the
cycle's loss, and a close of POSITIONS flat positions (nearly all allocated, so millions of
allocation rows); then VerifyLedger over every currency, timed from the client (median of
RUNS). Prints the allocation rows, the entries checked, the seconds, and whether it is under
the target (30 s).

    python bench/bench_verify.py [--positions 10000000] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_cycle import CHANNEL_OPTIONS, close_once, positions, serialized_chunks, setup
from bench.common import fresh_database, median, server_process
from ledger.api.v1 import insurance_pb2 as pb
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc

RUNS = 3
TARGET_SECONDS = 30.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--positions", type=int, default=10_000_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    chunks = serialized_chunks(*positions(args.positions, "flat"))
    print(
        f"{'backend':<11} {'positions':>10} {'allocations':>12} {'checked':>10} "
        f"{'verify s':>9} {'ok':>4} {'< 30 s':>7}"
    )
    for backend in args.backends.split(","):
        with fresh_database(backend) as url, server_process(url) as (target, _):
            setup(target, args.positions, ["bench"])
            _, summary = close_once(target, "bench", chunks)
            times = []
            report = pb.VerifyReport()
            with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
                query = pb_grpc.QueryStub(channel)
                for _ in range(RUNS):
                    started = time.perf_counter()
                    report = query.VerifyLedger(pb.VerifyLedgerRequest(), timeout=600)
                    times.append(time.perf_counter() - started)
            seconds = median(times)
            print(
                f"{backend:<11} {args.positions:>10} {summary.participant_count:>12} "
                f"{report.entries_checked:>10} {seconds:>9.2f} {report.ok!s:>4} "
                f"{'yes' if seconds < TARGET_SECONDS else 'NO':>7}",
                flush=True,
            )
            if not report.ok:
                print("\n".join(report.problems[:10]))


if __name__ == "__main__":
    main()
