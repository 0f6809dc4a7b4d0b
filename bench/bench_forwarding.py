"""What the front end's forwarding costs a call that it does not answer itself.

Every call but RecordLiquidation passes through the front end (rust_alloc/src/front.rs) to
grpc.aio on loopback. This sends CALLS sequential GetFund calls (the cheapest read) to a
server with the front end (`--group-commit`, the default) and, in the same run, to one where
grpc.aio listens on the port itself (`--no-group-commit`), and prints the latency of each.

    python bench/bench_forwarding.py [--calls 2000] [--backend sqlite]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fresh_database, median, percentile, server_process
from ledger.api.v1 import insurance_pb2 as pb
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc

WARMUP_CALLS = 200
MODES = {"front end": "--group-commit", "grpc.aio only": "--no-group-commit"}


def latencies(target: str, calls: int) -> list[float]:
    with grpc.insecure_channel(target) as channel:
        pb_grpc.AdminStub(channel).CreateCurrency(pb.CreateCurrencyRequest(code="USDT", scale=6))
        get_fund = pb_grpc.QueryStub(channel).GetFund
        request = pb.GetFundRequest(currency="USDT")
        for _ in range(WARMUP_CALLS):
            get_fund(request)
        out = []
        for _ in range(calls):
            started = time.perf_counter()
            get_fund(request)
            out.append(time.perf_counter() - started)
    return sorted(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--backend", default="sqlite")
    args = parser.parse_args()
    print(f"GetFund, {args.calls} sequential calls on loopback, {args.backend}")
    print(f"{'server':<14} {'p50 ms':>8} {'p99 ms':>8}")
    p50s = {}
    for mode, flag in MODES.items():
        with fresh_database(args.backend) as url, server_process(url, flag) as (target, _):
            taken = latencies(target, args.calls)
        p50s[mode] = median(taken)
        print(
            f"{mode:<14} {p50s[mode] * 1000:>8.3f} {percentile(taken, 99) * 1000:>8.3f}",
            flush=True,
        )
    extra_us = (p50s["front end"] - p50s["grpc.aio only"]) * 1e6
    print(f"forwarding adds {extra_us:.0f} µs a call (p50)")


if __name__ == "__main__":
    main()
