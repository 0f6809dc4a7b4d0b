"""Load benchmark of RecordLiquidation: group commit against one transaction per call.

For each backend (SQLite, PostgreSQL), client and mode, a fresh database and a `ledger serve`
process; then CLIENTS concurrent clients, each on its own connection, send durable
liquidations on loopback for SECONDS, each waiting for its reply. Prints calls per second,
p50 and p99 latency, and the group-commit / per-call ratio from the same run. The modes are
the server's settings (MODES): group commit (the default: the front end queues the calls and
each batch is one transaction), and one transaction per call both through the same front end
(`--batch-max=1`) and on grpc.aio (`--no-group-commit`: each call's transaction on a thread
of the handler pool).

Two load generators, as the clients share the server's two cores: `rust` (bench/loadgen, a
tonic client built here with cargo, a few tens of microseconds of CPU per call) and `python`
(grpc.aio in LOAD_PROCESSES processes, whose own CPU per call is about half the server's).
Each client first loads an empty grpc.aio server (no database; see serve_empty): a yardstick
of the host's speed in that run, since it drifts, and the most a server that handled each
call in Python could do.

    python bench/bench_liquidations.py [--seconds 10] [--clients 16] [--workers 1]
        [--backends sqlite,postgresql] [--client rust,python]
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

from bench.common import ROOT, free_port, fresh_database, percentile, server_process
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


# The server's settings per mode. One transaction per call two ways: through the same front end
# with batches of one (the writer runs them one after the other), and on grpc.aio with each
# call's transaction on a thread of the pool (concurrent transactions); the gain is group
# commit over the faster of the two.
MODES = {
    "group commit": ["--group-commit"],
    "txn per call": ["--group-commit", "--batch-max=1"],
    "txn/call aio": ["--no-group-commit"],
}

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


def run_loadgen(target: str, clients: int, seconds: float) -> tuple[float, float, float]:
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
    parser.add_argument("--client", default="rust,python", help="load generators, in order")
    parser.add_argument("--workers", type=int, default=1, help="server processes (both modes)")
    args = parser.parse_args()
    loads = {"rust": run_loadgen, "python": run_load}
    clients = args.client.split(",")
    if "rust" in clients:
        build_loadgen()
    print(
        f"RecordLiquidation, {args.clients} clients on loopback, {args.seconds:.0f} s each,"
        f" durable commits, {args.workers} server process(es)"
    )
    print(f"{'backend':<11} {'client':<7} {'mode':<13} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for client in clients:
        with empty_server() as target:
            rate, p50, p99 = loads[client](target, args.clients, args.seconds)
        print(
            f"{'(none)':<11} {client:<7} {'empty server':<13} {rate:>9.0f} {p50:>8.2f} {p99:>8.2f}",
            flush=True,
        )
    for backend in args.backends.split(","):
        for client in clients:
            rates = {}
            for mode, flags in MODES.items():
                with (
                    fresh_database(backend) as url,
                    server_process(url, *flags, f"--workers={args.workers}") as (target, _),
                ):
                    setup(target)
                    rate, p50, p99 = loads[client](target, args.clients, args.seconds)
                rates[mode] = rate
                print(
                    f"{backend:<11} {client:<7} {mode:<13} {rate:>9.0f} {p50:>8.2f} {p99:>8.2f}",
                    flush=True,
                )
            per_call = max(rate for mode, rate in rates.items() if mode != "group commit")
            ratio = rates["group commit"] / per_call
            print(f"{backend:<11} {client:<7} {'gain':<13} {ratio:>8.1f}x", flush=True)


if __name__ == "__main__":
    main()
