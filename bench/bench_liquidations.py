"""Load benchmark of RecordLiquidation: group commit against one transaction per call.

For each backend (SQLite, PostgreSQL) and each mode, a fresh database and a `ledger serve`
process; then CLIENTS concurrent clients (spread over LOAD_PROCESSES processes, grpc.aio)
send durable liquidations on loopback for SECONDS, each waiting for its reply. Prints calls
per second, p50 and p99 latency, and the group-commit / per-call ratio from the same run.

    python bench/bench_liquidations.py [--seconds 10] [--clients 16] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fresh_database, percentile, server_process
from ledger.api.v1 import insurance_pb2 as pb
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc

LOAD_PROCESSES = 2
WARMUP_S = 1.0


def setup(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        admin = pb_grpc.AdminStub(channel)
        admin.CreateCurrency(pb.CreateCurrencyRequest(code="USDT", scale=6))
        admin.UpsertContract(
            pb.UpsertContractRequest(
                symbol="BTCUSDT", margin_currency="USDT", kind=1, multiplier="0.001"
            )
        )


def request(worker: int, n: int) -> pb.RecordLiquidationRequest:
    # Alternate profits and losses so both flows (fund inflow, system loss) are exercised.
    close = "60010.5" if n % 2 else "59990.25"
    return pb.RecordLiquidationRequest(
        liquidation_id=f"w{worker}-{n}",
        cycle_id="bench",
        symbol="BTCUSDT",
        account_id=n,
        position_id=n,
        side=pb.SIDE_LONG,
        quantity="1.5",
        takeover_price="60000",
        close_price=close,
        remaining_margin=1000,
    )


async def _client(
    stub: pb_grpc.ClearingStub,
    worker: int,
    stop_at: float,
    measure_from: float,
    latencies: list[float],
) -> int:
    n = 0
    while True:
        started = time.perf_counter()
        if started >= stop_at:
            return n
        await stub.RecordLiquidation(request(worker, n), timeout=30)
        done = time.perf_counter()
        if started >= measure_from:
            latencies.append(done - started)
        n += 1


async def _load(target: str, first_worker: int, clients: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    # One channel, and so one connection, per client, as separate clients would have (the
    # local subchannel pool stops grpc from sharing one connection between the channels).
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(clients)
    ]
    try:
        for channel in channels:
            await channel.channel_ready()
        now = time.perf_counter()
        await asyncio.gather(
            *(
                _client(
                    pb_grpc.ClearingStub(channel),
                    first_worker + k,
                    now + WARMUP_S + seconds,
                    now + WARMUP_S,
                    latencies,
                )
                for k, channel in enumerate(channels)
            )
        )
    finally:
        for channel in channels:
            await channel.close()
    return latencies


def load_process(
    target: str, first_worker: int, clients: int, seconds: float, out: mp.Queue
) -> None:  # type: ignore[type-arg]
    out.put(asyncio.run(_load(target, first_worker, clients, seconds)))


def run_load(target: str, clients: int, seconds: float) -> tuple[float, float, float]:
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    per_process = [
        clients // LOAD_PROCESSES + (k < clients % LOAD_PROCESSES) for k in range(LOAD_PROCESSES)
    ]
    procs = []
    first = 0
    for count in per_process:
        p = ctx.Process(target=load_process, args=(target, first, count, seconds, out))
        p.start()
        procs.append(p)
        first += count
    latencies = sorted(x for _ in procs for x in out.get())
    for p in procs:
        p.join()
    rate = len(latencies) / seconds
    return rate, percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--workers", type=int, default=2, help="server processes (both modes)")
    args = parser.parse_args()
    print(
        f"RecordLiquidation, {args.clients} clients on loopback, {args.seconds:.0f} s each,"
        f" durable commits, {args.workers} server process(es)"
    )
    print(f"{'backend':<11} {'mode':<16} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for backend in args.backends.split(","):
        rates = {}
        for mode, flag in (
            ("group commit", "--group-commit"),
            ("txn per call", "--no-group-commit"),
        ):
            with (
                fresh_database(backend) as url,
                server_process(url, flag, f"--workers={args.workers}") as (target, _),
            ):
                setup(target)
                rate, p50, p99 = run_load(target, args.clients, args.seconds)
            rates[mode] = rate
            print(f"{backend:<11} {mode:<16} {rate:>9.0f} {p50:>8.2f} {p99:>8.2f}", flush=True)
        ratio = rates["group commit"] / rates["txn per call"]
        print(f"{backend:<11} {'gain':<16} {ratio:>8.1f}x")


if __name__ == "__main__":
    main()
