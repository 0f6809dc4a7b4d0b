"""Liquidation latency while a cycle closes: the close must not stall the liquidation path.

For each backend, a fresh database and a `ledger serve` process; CALLERS callers (processes
of their own, so that the measuring clients do not wait on one another), half posting
liquidations to the currency being closed (its next cycle) and half to another currency,
each one call at a time, durable. After BEFORE_S seconds a CloseCycle of POSITIONS flat
positions starts; the callers go on until AFTER_S seconds after it ends. Prints, per
currency, p50 / p99 / max latency of the calls sent before the close and of those sent
while it ran, and the close's own time.

    python bench/bench_close_liquidations.py [--positions 1000000] [--callers 8]
        [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_cycle import close_once, positions, serialized_chunks
from bench.bench_cycle import setup as setup_cycle
from bench.common import fresh_database, percentile, server_process
from ledger.api.v1 import insurance_pb2 as pb
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc

BEFORE_S = 3.0
AFTER_S = 1.0


def setup_other(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        admin = pb_grpc.AdminStub(channel)
        admin.CreateCurrency(pb.CreateCurrencyRequest(code="KRW", scale=0))
        admin.UpsertContract(
            pb.UpsertContractRequest(symbol="Y", margin_currency="KRW", kind=1, multiplier="1")
        )


def caller(target: str, name: str, symbol: str, stop_at: Any, out: Any) -> None:
    """One caller: liquidations one at a time until stop_at (a shared monotonic time) is set
    and passed; sends back (sent_at, latency) of each."""
    samples: list[tuple[float, float]] = []
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        stub = pb_grpc.ClearingStub(ch)
        n = 0
        while stop_at.value == 0 or time.monotonic() < stop_at.value:
            request = pb.RecordLiquidationRequest(
                liquidation_id=f"{name}-{n}",
                cycle_id="next",
                symbol=symbol,
                account_id=n,
                position_id=n,
                side=pb.SIDE_LONG,
                quantity="3",
                takeover_price="2",
                close_price="1" if n % 2 else "3",
            )
            sent = time.monotonic()
            stub.RecordLiquidation(request, timeout=60)
            samples.append((sent, time.monotonic() - sent))
            n += 1
    out.put((name, samples))


def stats(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    if not ordered:
        return f"{'-':>8} {'-':>8} {'-':>8} {0:>6}"
    p50, p99 = percentile(ordered, 50) * 1000, percentile(ordered, 99) * 1000
    return f"{p50:>8.2f} {p99:>8.2f} {ordered[-1] * 1000:>8.2f} {len(ordered):>6}"


def run(backend: str, n: int, callers: int) -> None:
    chunks = serialized_chunks(*positions(n, "flat"))
    ctx = mp.get_context("spawn")
    with fresh_database(backend) as url, server_process(url) as (target, _):
        setup_cycle(target, n, ["bench"])
        setup_other(target)
        stop_at = ctx.Value("d", 0.0)
        out = ctx.Queue()
        procs = [
            ctx.Process(
                target=caller,
                args=(target, f"{'same' if k % 2 == 0 else 'other'}{k}", "XY"[k % 2], stop_at, out),
            )
            for k in range(callers)
        ]
        for proc in procs:
            proc.start()
        time.sleep(BEFORE_S)
        window: list[float] = []

        def close() -> None:
            window.append(time.monotonic())
            close_once(target, "bench", chunks)
            window.append(time.monotonic())

        closing = threading.Thread(target=close)
        closing.start()
        closing.join()
        stop_at.value = time.monotonic() + AFTER_S
        results = [out.get() for _ in procs]
        for proc in procs:
            proc.join()
    started, ended = window
    print(f"{backend}: CloseCycle of {n} positions took {ended - started:.2f} s", flush=True)
    for group, currency in (("same", "USDT (closing)"), ("other", "KRW (another)")):
        samples = [s for name, got in results if name.startswith(group) for s in got]
        before = [lat for sent, lat in samples if sent < started]
        during = [lat for sent, lat in samples if started <= sent < ended]
        print(f"{backend:<11} {currency:<15} {'before':<7} {stats(before)}", flush=True)
        print(f"{backend:<11} {currency:<15} {'during':<7} {stats(during)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--positions", type=int, default=1_000_000)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    print(
        f"Liquidations from {args.callers} callers (half on the closing currency's next cycle, "
        f"half on another currency) before and during a close of {args.positions} positions"
    )
    print(
        f"{'backend':<11} {'currency':<15} {'window':<7} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'calls':>6}"
    )
    for backend in args.backends.split(","):
        run(backend, args.positions, args.callers)


if __name__ == "__main__":
    main()
