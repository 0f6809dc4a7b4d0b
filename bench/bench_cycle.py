"""Benchmark of the cycle close through the real server, with its two floors from the same run.

For each backend (SQLite, PostgreSQL), size (1M, 10M) and pnl distribution (flat: every
position profitable with similar pnl, so nearly all participate; heavy: Pareto-tailed, shape
1.2, a quarter of positions losing), a fresh database and a `ledger serve` process; then:

- close   CloseCycle wall time, client side, from the first chunk sent to the summary
          (median over RUNS distinct cycles of the same positions; one run at 10M)
- stream  StreamAllocations of the closed cycle, every chunk received
- rss     the server's peak resident set size (VmHWM) at the end
- floor a the same chunks streamed to a server method that only counts bytes (same grpcio)
- floor b the same number of allocation rows bulk-inserted into the allocations table by
          the backend's fastest path (binary COPY / executemany) with nothing else, one commit
- ratio   close / (floor a + floor b)

    python bench/bench_cycle.py [--sizes 1000000,10000000] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    free_port,
    fresh_database,
    median,
    peak_rss_bytes,
    server_process,
    wait_serving,
)
from ledger.api.v1 import insurance_pb2 as pb
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc

CHUNK_ROWS = 65_536
RUNS_1M = 3
SCALE = 2
LOSS_PER_POSITION_MINOR = 600  # flat pnl is 1,000..2,000: nearly everyone pays something
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def positions(
    n: int, distribution: str, seed: int = 7
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    position_id = np.arange(1, n + 1, dtype=np.uint64)
    account_id = rng.integers(1, max(2, n // 3), size=n, dtype=np.uint64)
    if distribution == "flat":
        pnl = rng.integers(1_000, 2_000, size=n, dtype=np.int64)
    else:
        pnl = (rng.pareto(1.2, size=n) * 1_000).astype(np.int64) + 1
        pnl[rng.random(n) < 0.25] *= -1
    return position_id, account_id, pnl


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _packed(field: int, column: npt.NDArray[np.uint64] | npt.NDArray[np.int64]) -> bytes:
    data = column.astype(column.dtype.newbyteorder("<"), copy=False).tobytes()
    return bytes([field << 3 | 2]) + _varint(len(data)) + data


def serialized_chunks(
    position_id: npt.NDArray[np.uint64],
    account_id: npt.NDArray[np.uint64],
    pnl: npt.NDArray[np.int64],
) -> list[bytes]:
    """CycleInput{positions} messages, serialized with numpy (the wire format is packed
    fixed64/sfixed64, so a column is its little-endian bytes)."""
    chunks = []
    for start in range(0, len(pnl), CHUNK_ROWS):
        stop = start + CHUNK_ROWS
        body = (
            _packed(1, position_id[start:stop])
            + _packed(2, account_id[start:stop])
            + _packed(3, pnl[start:stop])
        )
        chunks.append(b"\x12" + _varint(len(body)) + body)
    return chunks


def header(cycle_id: str) -> bytes:
    return pb.CycleInput(
        header=pb.CycleHeader(cycle_id=cycle_id, currency="USDT")
    ).SerializeToString()


def setup(target: str, n: int, cycles: list[str]) -> None:
    """The currency, a fund smaller than its share, and each cycle's system loss."""
    with grpc.insecure_channel(target) as channel:
        admin, clearing = pb_grpc.AdminStub(channel), pb_grpc.ClearingStub(channel)
        admin.CreateCurrency(pb.CreateCurrencyRequest(code="USDT", scale=SCALE))
        admin.UpsertContract(
            pb.UpsertContractRequest(symbol="X", margin_currency="USDT", kind=1, multiplier="1")
        )
        admin.TransferFund(
            pb.TransferFundRequest(transfer_id="seed", currency="USDT", direction=1, amount=10**6)
        )
        loss_major = n * LOSS_PER_POSITION_MINOR // 10**SCALE
        for cycle_id in cycles:
            clearing.RecordLiquidation(
                pb.RecordLiquidationRequest(
                    liquidation_id=f"loss-{cycle_id}",
                    cycle_id=cycle_id,
                    symbol="X",
                    side=pb.SIDE_LONG,
                    quantity=str(loss_major),
                    takeover_price="2",
                    close_price="1",
                )
            )


def close_once(target: str, cycle_id: str, chunks: list[bytes]) -> tuple[float, pb.CycleSummary]:
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        call = channel.stream_unary(
            "/insurance.v1.Clearing/CloseCycle",
            request_serializer=None,
            response_deserializer=pb.CycleSummary.FromString,
        )

        def stream() -> Iterator[bytes]:
            yield header(cycle_id)
            yield from chunks

        started = time.perf_counter()
        summary = call(stream(), timeout=600)
        return time.perf_counter() - started, summary


def stream_allocations(target: str, cycle_id: str) -> tuple[float, int]:
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_stream(
            "/insurance.v1.Query/StreamAllocations",
            request_serializer=pb.StreamAllocationsRequest.SerializeToString,
            response_deserializer=None,
        )
        started = time.perf_counter()
        received = 0
        for chunk in call(
            pb.StreamAllocationsRequest(cycle_id=cycle_id, currency="USDT"), timeout=600
        ):
            received += len(chunk)
        return time.perf_counter() - started, received


# --- floor (a): a server that only counts the bytes it is sent ---------------------------

SINK = """
import sys, grpc
from concurrent import futures
def count(messages, context):
    total = 0
    for m in messages:
        total += len(m)
    return total.to_bytes(8, "little")
server = grpc.server(futures.ThreadPoolExecutor(4), options=[
    ("grpc.max_receive_message_length", 8 * 1024 * 1024)])
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Sink", {
    "Count": grpc.stream_unary_rpc_method_handler(count)})])
server.add_insecure_port(sys.argv[1])
server.start()
print("ready", flush=True)
server.wait_for_termination()
"""


def floor_stream(chunks: list[bytes], cycle_id: str) -> float:
    port = free_port()
    sink = subprocess.Popen(
        [sys.executable, "-c", SINK, f"127.0.0.1:{port}"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            call = channel.stream_unary("/bench.Sink/Count")

            def stream() -> Iterator[bytes]:
                yield header(cycle_id)
                yield from chunks

            started = time.perf_counter()
            call(stream(), timeout=600)
            return time.perf_counter() - started
    finally:
        sink.terminate()
        sink.wait()


# --- floor (b): the allocation rows alone, through the backend's bulk path ------------------


def floor_insert(backend: str, rows: int) -> float:
    from sqlalchemy import text

    from ledger.db import bulk
    from ledger.db.migrate import upgrade
    from ledger.db.session import Database

    rng = np.random.default_rng(3)
    # Already in the table's key order (account, position): nothing to do but write.
    account_id = np.sort(rng.integers(1, max(2, rows // 3), size=rows, dtype=np.uint64))
    position_id = np.arange(1, rows + 1, dtype=np.uint64)
    pnl = rng.integers(1_000, 2_000, size=rows, dtype=np.int64)
    amount = pnl // 3
    with fresh_database(backend) as url:
        database = Database(url, pool_size=1)
        upgrade(database)
        with database.write() as session:
            session.execute(text("INSERT INTO currencies VALUES ('USDT', 2, 0)"))
            session.execute(
                text(
                    "INSERT INTO cycles (id, currency, cycle_id, loss_total, fund_balance_before,"
                    " fund_share, fund_paid, user_due, allocated_total, uncovered,"
                    " positions_total, profitable_count, profit_total, participant_count,"
                    " participant_profit, cutoff_pnl, widened, input_digest, insurance_share,"
                    " coverage_ratio, policy_version, allocation_first_entry_id, closed_at_us)"
                    " VALUES (1, 'USDT', 'floor', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,"
                    " false, '', '0.2', '0.9', 1, 1, 0)"
                )
            )
        allocations = bulk.AllocationRows(
            account_id.view(np.int64),
            position_id.view(np.int64),
            pnl,
            amount,
            np.arange(rows, dtype=np.int64),
        ).placed(1, 1)
        started = time.perf_counter()
        with database.write() as session:
            bulk.write_allocations(session, allocations)
        elapsed = time.perf_counter() - started
        database.dispose()
    return elapsed


def run_case(backend: str, n: int, distribution: str) -> dict[str, float | int]:
    """Each run closes the cycle on a fresh database and server, as floor (b) writes into an
    empty table; the stream and the RSS are those of the last run."""
    columns = positions(n, distribution)
    chunks = serialized_chunks(*columns)
    runs = RUNS_1M if n <= 1_000_000 else 1
    times = []
    summary = pb.CycleSummary()
    stream_s, rss = 0.0, 0
    for _ in range(runs):
        with fresh_database(backend) as url, server_process(url) as (target, proc):
            wait_serving(target)
            setup(target, n, ["bench"])
            elapsed, summary = close_once(target, "bench", chunks)
            times.append(elapsed)
            stream_s, _ = stream_allocations(target, "bench")
            rss = peak_rss_bytes(proc.pid)
    floor_a = median([floor_stream(chunks, "floor") for _ in range(runs)])
    floor_b = median([floor_insert(backend, summary.participant_count) for _ in range(runs)])
    close_s = median(times)
    return {
        "participants": summary.participant_count,
        "close": close_s,
        "stream": stream_s,
        "rss": rss,
        "floor_a": floor_a,
        "floor_b": floor_b,
        "ratio": close_s / (floor_a + floor_b),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--distributions", default="flat,heavy")
    args = parser.parse_args()
    print(
        f"{'backend':<10} {'positions':>10} {'pnl':<5} {'participants':>12} {'close s':>8} "
        f"{'stream s':>8} {'rss MB':>7} {'floor a':>8} {'floor b':>8} {'close/(a+b)':>11}"
    )
    for backend in args.backends.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            for distribution in args.distributions.split(","):
                r = run_case(backend, n, distribution)
                print(
                    f"{backend:<10} {n:>10} {distribution:<5} {r['participants']:>12} "
                    f"{r['close']:>8.2f} {r['stream']:>8.2f} {r['rss'] / 2**20:>7.0f} "
                    f"{r['floor_a']:>8.2f} {r['floor_b']:>8.2f} {r['ratio']:>11.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
