"""Load benchmark of the liquidation path: unary calls against an empty server, and batches.

For each backend (SQLite, PostgreSQL), a fresh database and a `ledger serve` process per row:

- unary   CLIENTS concurrent callers of RecordLiquidation, each on its own connection, each
          waiting for its reply (durable), for SECONDS. Right before, the same clients load an
          empty grpc.aio server (no database; see serve_empty): the most a server handling
          each call in Python could do on this machine at that moment, and the target's
          yardstick (ours / empty).
- batch   BATCH_CALLERS concurrent callers of RecordLiquidations, BATCH_SIZE items a call:
          durable liquidations per second, and each call's latency.

Each row runs ROUNDS times and the medians are printed: this host's speed drifts by a
quarter within minutes, and a single pair of runs moves the unary ratio by as much.

Two load generators, as the clients share the server's two cores: `rust` (bench/loadgen, a
tonic client built here with cargo, a few tens of microseconds of CPU per call) and `python`
(grpc.aio in LOAD_PROCESSES processes; building a batch of 1,000 requests costs it about
2.5 ms of CPU). Each runs the unary and the batch rows.

    python bench/bench_liquidations.py [--seconds 10] [--clients 16] [--batch-callers 4]
        [--batch-size 1000] [--workers 1] [--backends sqlite,postgresql] [--client rust,python]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, free_port, fresh_database, median, percentile, server_process
from ledger.api.v1 import insurance_pb2 as pb
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc

LOAD_PROCESSES = 2
WARMUP_S = 1.0
UNARY_TARGET = 0.6  # issue 10: unary calls at least 0.6x the empty server's rate
BATCH_TARGET = 25_000  # and batches of 1,000 at least 25,000 liquidations a second


def setup(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        admin = pb_grpc.AdminStub(channel)
        admin.CreateCurrency(pb.CreateCurrencyRequest(code="USDT", scale=6))
        admin.UpsertContract(
            pb.UpsertContractRequest(
                symbol="BTCUSDT", margin_currency="USDT", kind=1, multiplier="0.001"
            )
        )


def request(worker: int, n: int, prefix: str = "w") -> pb.RecordLiquidationRequest:
    # Alternate profits and losses so both flows (fund inflow, system loss) are exercised.
    close = "60010.5" if n % 2 else "59990.25"
    return pb.RecordLiquidationRequest(
        liquidation_id=f"{prefix}{worker}-{n}",
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


async def _batch_client(
    stub: pb_grpc.ClearingStub,
    worker: int,
    batch_size: int,
    stop_at: float,
    measure_from: float,
    latencies: list[float],
) -> int:
    n = 0
    while True:
        started = time.perf_counter()
        if started >= stop_at:
            return n
        batch = pb.RecordLiquidationsRequest(
            liquidations=[request(worker, n + k, "b") for k in range(batch_size)]
        )
        reply = await stub.RecordLiquidations(batch, timeout=60)
        if any(o.code for o in reply.outcomes):
            raise RuntimeError(f"a batch item failed: {reply.outcomes[0]}")
        done = time.perf_counter()
        if started >= measure_from:
            latencies.append(done - started)
        n += batch_size


async def _load(
    target: str, first_worker: int, clients: int, seconds: float, batch_size: int = 0
) -> list[float]:
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
        stop_at, measure_from = now + WARMUP_S + seconds, now + WARMUP_S
        await asyncio.gather(
            *(
                _batch_client(
                    pb_grpc.ClearingStub(channel),
                    first_worker + k,
                    batch_size,
                    stop_at,
                    measure_from,
                    latencies,
                )
                if batch_size
                else _client(
                    pb_grpc.ClearingStub(channel),
                    first_worker + k,
                    stop_at,
                    measure_from,
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
    target: str, first_worker: int, clients: int, seconds: float, batch_size: int, out: mp.Queue
) -> None:  # type: ignore[type-arg]
    out.put(asyncio.run(_load(target, first_worker, clients, seconds, batch_size)))


LOADGEN_DIR = ROOT / "bench" / "loadgen"
LOADGEN = LOADGEN_DIR / "target" / "release" / "loadgen"


def serve_empty(port: int, ready: Any) -> None:
    """A grpc.aio server whose RecordLiquidation answers at once, touching no database: the
    most a server handling each call in Python could do on this machine with these clients,
    measured in the same run (this host's speed drifts by a quarter within an hour)."""

    async def record(
        request: pb.RecordLiquidationRequest, _context: object
    ) -> pb.LiquidationResult:
        return pb.LiquidationResult(liquidation_id=request.liquidation_id, currency="USDT")

    async def run() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(
            record,
            request_deserializer=pb.RecordLiquidationRequest.FromString,
            response_serializer=pb.LiquidationResult.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "insurance.v1.Clearing", {"RecordLiquidation": handler}
                ),
            )
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(run())


@contextmanager
def empty_server() -> Iterator[str]:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    port = free_port()
    process = ctx.Process(target=serve_empty, args=(port, ready), daemon=True)
    process.start()
    try:
        if not ready.wait(60):
            raise TimeoutError("the empty server did not start")
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.join(30)


def build_loadgen() -> None:
    subprocess.run(
        [
            "cargo",
            "build",
            "--release",
            "--quiet",
            "--manifest-path",
            str(LOADGEN_DIR / "Cargo.toml"),
        ],
        check=True,
    )


def run_loadgen(
    target: str, clients: int, seconds: float, batch_size: int = 0
) -> tuple[float, float, float]:
    """Calls per second, p50 and p99 ms (for batches: calls, not items)."""
    out = subprocess.run(
        [
            str(LOADGEN),
            "--target",
            target,
            "--clients",
            str(clients),
            "--seconds",
            str(seconds),
            "--warmup",
            str(WARMUP_S),
            "--batch-size",
            str(batch_size),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    fields = dict(re.findall(r"(\w+)=(\d+)", out))
    if int(fields["errors"]):
        raise RuntimeError(f"the load saw {fields['errors']} failed calls")
    rate = int(fields["calls"]) / seconds
    return rate, int(fields["p50_us"]) / 1000, int(fields["p99_us"]) / 1000


def run_load(
    target: str, clients: int, seconds: float, batch_size: int = 0
) -> tuple[float, float, float]:
    """Calls per second, p50 and p99 ms (for batches: calls, not items)."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    processes = min(LOAD_PROCESSES, clients)
    per_process = [clients // processes + (k < clients % processes) for k in range(processes)]
    procs = []
    first = 0
    for count in per_process:
        p = ctx.Process(target=load_process, args=(target, first, count, seconds, batch_size, out))
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
    parser.add_argument("--batch-callers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--client", default="rust,python", help="load generators, in order")
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each row (medians)")
    args = parser.parse_args()
    loads = {"rust": run_loadgen, "python": run_load}
    clients = args.client.split(",")
    if "rust" in clients:
        build_loadgen()
    print(
        f"Liquidations on loopback, {args.seconds:.0f} s a row, durable commits, "
        f"{args.workers} server process(es); unary: {args.clients} callers; batch: "
        f"{args.batch_callers} callers of {args.batch_size} items"
    )
    print(
        f"{'backend':<11} {'client':<7} {'mode':<14} {'calls/s':>9} {'items/s':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'vs empty':>8}"
    )

    def row(
        backend: str,
        client: str,
        mode: str,
        rate: float,
        items: float,
        p50: float,
        p99: float,
        ratio: str = "",
    ) -> None:
        print(
            f"{backend:<11} {client:<7} {mode:<14} {rate:>9.0f} {items:>9.0f} {p50:>8.2f} "
            f"{p99:>8.2f} {ratio:>8}",
            flush=True,
        )

    def serve(backend: str) -> Any:
        return server_process_on(backend, args.workers)

    for backend in args.backends.split(","):
        for client in clients:
            ratios = []
            for _ in range(args.rounds):  # each round: the empty server, then ours, at once
                with empty_server() as target:
                    empty, p50, p99 = loads[client](target, args.clients, args.seconds)
                row("(none)", client, "empty server", empty, empty, p50, p99)
                with serve(backend) as target:
                    rate, p50, p99 = loads[client](target, args.clients, args.seconds)
                ratios.append(rate / empty)
                row(backend, client, "unary", rate, rate, p50, p99, f"{rate / empty:.2f}x")
            print(
                f"{backend:<11} {client:<7} unary / empty, median of {args.rounds} rounds: "
                f"{median(ratios):.2f}x (target ≥ {UNARY_TARGET}x)",
                flush=True,
            )
        for client in clients:
            rates = []
            for _ in range(args.rounds):
                with serve(backend) as target:
                    rate, p50, p99 = loads[client](
                        target, args.batch_callers, args.seconds, args.batch_size
                    )
                rates.append(rate * args.batch_size)
                row(
                    backend,
                    client,
                    f"batch of {args.batch_size}",
                    rate,
                    rate * args.batch_size,
                    p50,
                    p99,
                )
            print(
                f"{backend:<11} {client:<7} batch items/s, median of {args.rounds} rounds: "
                f"{median(rates):.0f} (target ≥ {BATCH_TARGET})",
                flush=True,
            )


@contextmanager
def server_process_on(backend: str, workers: int) -> Iterator[str]:
    """`ledger serve` on a fresh database of the backend, its market set up."""
    with fresh_database(backend) as url, server_process(url, f"--workers={workers}") as (target, _):
        setup(target)
        yield target


if __name__ == "__main__":
    main()
