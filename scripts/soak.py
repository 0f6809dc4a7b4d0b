"""Soak: mixed load on a `ledger serve` that this script starts, for a fixed time.

Why: the tests run each path for a moment on a fresh server. A server at an exchange runs
for weeks: memory that grows a little with every call, a lock that a close holds a little
too long, a cache that drifts from the journal, show only under hours of mixed load. This
runs such load for --seconds (default 600) and then says what it saw:

- unary RecordLiquidation calls and RecordLiquidations batches, from several client
  threads, each with its own channel, into the currency's open cycle;
- every --close-every seconds, the open cycle is switched for a new one (the liquidation
  threads move to it first, so that none reports into a closed cycle) and closed with
  --positions positions (100,000 by default) streamed as raw CycleInput chunks;
- readers: GetFund, ListEntries (two pages), GetCycle and StreamAllocations of the last
  closed cycle;
- VerifyLedger (every currency) every --verify-every seconds, and once at the end.

It prints the calls served by method and status, the errors by status code, latencies, the
server's RSS (VmRSS of /proc/<pid>/status, and of its liquidation writer process) at the
start, its peak and at the end, and the last VerifyLedger report. It exits 1 if any call
ended with a status other than OK (no error is expected of this load), if a VerifyLedger
was not ok, or if the server did not stop cleanly on SIGTERM.

The server listens on a free loopback port; the database is a SQLite file in a temporary
folder unless --database-url names another (a PostgreSQL one must exist; the ids used are
new for each run, so a database may be reused).

    python scripts/soak.py --seconds 20
    python scripts/soak.py --database-url postgresql+psycopg://ledger:ledger@127.0.0.1:54329/x
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ledger.api.v1 import insurance_pb2 as pb  # noqa: E402
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc  # noqa: E402

CURRENCY = "SOAK"
SYMBOL = "SOAK-PERP"
CHUNK_ROWS = 65_536  # the contract's rows per PositionChunk
CALL_TIMEOUT_SECONDS = 60.0
CLOSE_TIMEOUT_SECONDS = 600.0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


# --- the server ------------------------------------------------------------------------------


class Server:
    """A `ledger serve` child process on a free port, its output in a log file."""

    def __init__(self, database_url: str, log_path: Path) -> None:
        self.log_path = log_path
        env = dict(os.environ, LEDGER_LOG_LEVEL=os.environ.get("LEDGER_LOG_LEVEL", "WARNING"))
        self._log = log_path.open("w")
        command = [sys.executable, "-m", "ledger.cli", "serve", "--listen", "127.0.0.1:0"]
        command += ["--database-url", database_url]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True
        )
        self.port = self._wait_listening()

    def _wait_listening(self, timeout_s: float = 120) -> int:
        """The port from the start line, read on a thread (a silent server must not block)."""
        found: list[int] = []

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                match = re.search(r"listening on port (\d+)", line)
                if match and not found:
                    found.append(int(match.group(1)))

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not found:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"ledger serve did not start; see {self.log_path}")
            time.sleep(0.05)
        return found[0]

    def rss_kib(self) -> dict[str, int]:
        """VmRSS of the server process and of the processes under it: multiprocessing's
        resource tracker and fork server, and the liquidation writer that the latter forks
        (with the fork server's command line)."""
        sizes = {"server": vm_rss(self.process.pid)}
        for pid, depth in descendants(self.process.pid):
            command = cmdline(pid)
            if "resource_tracker" in command:
                name = "resource tracker"
            elif "forkserver" in command and depth == 1:
                name = "forkserver"
            else:
                name = "writer"
            sizes[f"{name} (pid {pid})"] = vm_rss(pid)
        return sizes

    def stop(self, timeout_s: float = 120) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = -9
        self._log.close()
        return code


def vm_rss(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else 0


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def descendants(pid: int, depth: int = 1) -> list[tuple[int, int]]:
    found: list[tuple[int, int]] = []
    for child in children(pid):
        found += [(child, depth), *descendants(child, depth + 1)]
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# --- what was seen ---------------------------------------------------------------------------


@dataclass
class Stats:
    """Every call's method, status and time, from every thread."""

    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    items: Counter[str] = field(default_factory=Counter)  # RecordLiquidations items by code
    seconds: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    details: dict[str, str] = field(default_factory=dict)  # the first message of each error
    verifies: list[tuple[bool, int, list[str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, method: str, code: grpc.StatusCode, seconds: float, details: str) -> None:
        with self.lock:
            self.calls[(method, code.name)] += 1
            self.seconds[method].append(seconds)
            if code != grpc.StatusCode.OK:
                self.details.setdefault(f"{method} {code.name}", details)

    @contextmanager
    def call(self, method: str) -> Iterator[None]:
        """Times the block and records its status: OK, or the RpcError it raised."""
        started = time.monotonic()
        try:
            yield
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
            self.record(method, code, time.monotonic() - started, details)
        else:
            self.record(method, grpc.StatusCode.OK, time.monotonic() - started, "")

    def errors(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for (_, code), n in self.calls.items():
            if code != "OK":
                out[code] += n
        for code, n in self.items.items():
            if code != "OK":
                out[f"item {code}"] += n
        return out


# --- the load --------------------------------------------------------------------------------


class CycleGate:
    """The open cycle: liquidation calls hold it shared while they run; a switch waits for
    them to finish and holds new ones back, so that no call reports into a closed cycle."""

    def __init__(self, cycle_id: str) -> None:
        self.cycle_id = cycle_id
        self._active = 0
        self._switching = False
        self._cond = threading.Condition()

    @contextmanager
    def open_cycle(self) -> Iterator[str]:
        with self._cond:
            while self._switching:
                self._cond.wait()
            self._active += 1
            cycle_id = self.cycle_id
        try:
            yield cycle_id
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def switch(self, new_cycle_id: str) -> str:
        with self._cond:
            self._switching = True
            while self._active:
                self._cond.wait()
            old, self.cycle_id = self.cycle_id, new_cycle_id
            self._switching = False
            self._cond.notify_all()
        return old


@dataclass
class Load:
    target: str
    tag: str  # makes every id of this run new
    stats: Stats
    gate: CycleGate
    stop: threading.Event
    positions: int
    batch_size: int
    last_closed: list[str] = field(default_factory=list)
    numbers: Iterator[int] = field(default_factory=lambda: iter(range(1, 1 << 62)))
    numbers_lock: threading.Lock = field(default_factory=threading.Lock)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)

    def number(self) -> int:
        with self.numbers_lock:
            return next(self.numbers)


def liquidation(load: Load, cycle_id: str, rng: np.random.Generator) -> pb.RecordLiquidationRequest:
    """A LONG taken over at 100 and closed between 90 and 110: mostly losses (which the
    cycle's close allocates), some profits, some break-even."""
    n = load.number()
    return pb.RecordLiquidationRequest(
        liquidation_id=f"{load.tag}-l{n}",
        cycle_id=cycle_id,
        symbol=SYMBOL,
        account_id=int(rng.integers(1, 5000)),
        position_id=n,
        side=pb.SIDE_LONG,
        quantity=str(int(rng.integers(1, 50))),
        takeover_price="100",
        close_price=str(int(rng.integers(90, 103))),
        remaining_margin=0,
    )


def unary_liquidations(load: Load, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with load.channel() as channel:
        stub = pb_grpc.ClearingStub(channel)
        while not load.stop.is_set():
            with load.gate.open_cycle() as cycle_id, load.stats.call("RecordLiquidation"):
                stub.RecordLiquidation(
                    liquidation(load, cycle_id, rng), timeout=CALL_TIMEOUT_SECONDS
                )


def batched_liquidations(load: Load, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with load.channel() as channel:
        stub = pb_grpc.ClearingStub(channel)
        while not load.stop.is_set():
            with load.gate.open_cycle() as cycle_id, load.stats.call("RecordLiquidations"):
                reply = stub.RecordLiquidations(
                    pb.RecordLiquidationsRequest(
                        liquidations=[
                            liquidation(load, cycle_id, rng) for _ in range(load.batch_size)
                        ]
                    ),
                    timeout=CALL_TIMEOUT_SECONDS,
                )
                with load.stats.lock:
                    for outcome in reply.outcomes:
                        name = status_name(outcome.code)
                        load.stats.items[name] += 1
                        if outcome.code:
                            load.stats.details.setdefault(f"item {name}", outcome.message)


def status_name(number: int) -> str:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return str(code.name)
    return str(number)


def readers(load: Load) -> None:
    with load.channel() as channel:
        query = pb_grpc.QueryStub(channel)
        while not load.stop.is_set():
            with load.stats.call("GetFund"):
                query.GetFund(pb.GetFundRequest(currency=CURRENCY), timeout=CALL_TIMEOUT_SECONDS)
            with load.stats.call("ListEntries"):
                page = query.ListEntries(
                    pb.ListEntriesRequest(currency=CURRENCY, account="insurance_fund"),
                    timeout=CALL_TIMEOUT_SECONDS,
                )
                if page.next_page_token:
                    query.ListEntries(
                        pb.ListEntriesRequest(
                            currency=CURRENCY,
                            account="insurance_fund",
                            page_token=page.next_page_token,
                        ),
                        timeout=CALL_TIMEOUT_SECONDS,
                    )
            if not load.last_closed:
                time.sleep(0.05)
                continue
            cycle_id = load.last_closed[-1]
            with load.stats.call("GetCycle"):
                query.GetCycle(
                    pb.GetCycleRequest(cycle_id=cycle_id, currency=CURRENCY),
                    timeout=CALL_TIMEOUT_SECONDS,
                )
            with load.stats.call("StreamAllocations"):
                for _ in query.StreamAllocations(
                    pb.StreamAllocationsRequest(cycle_id=cycle_id, currency=CURRENCY),
                    timeout=CLOSE_TIMEOUT_SECONDS,
                ):
                    pass


def cycle_stream(cycle_id: str, count: int, seed: int) -> Iterator[bytes]:
    """The header, then the positions in chunks of the contract's size, encoded from numpy
    columns by hand (a packed fixed64 field: tag, length, little-endian values)."""
    yield pb.CycleInput(
        header=pb.CycleHeader(cycle_id=cycle_id, currency=CURRENCY)
    ).SerializeToString()
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1, count + 1, dtype=np.uint64))
    accounts = rng.integers(1, 5000, size=count, dtype=np.uint64)
    pnl = rng.integers(-20_000, 30_000, size=count, dtype=np.int64)
    for start in range(0, count, CHUNK_ROWS):
        part = slice(start, start + CHUNK_ROWS)
        inner = b"".join(
            packed(number, column[part].astype(dtype).tobytes())
            for number, column, dtype in ((1, ids, "<u8"), (2, accounts, "<u8"), (3, pnl, "<i8"))
        )
        yield varint(2 << 3 | 2) + varint(len(inner)) + inner


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def packed(number: int, data: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(data)) + data if data else b""


def closer(load: Load, every_s: float) -> None:
    """Every `every_s`: move the liquidations to a new cycle, then close the old one."""
    k = 0
    with load.channel() as channel:
        close = channel.stream_unary(
            "/insurance.v1.Clearing/CloseCycle",
            request_serializer=None,
            response_deserializer=pb.CycleSummary.FromString,
        )
        while not load.stop.wait(every_s):
            k += 1
            old = load.gate.switch(f"{load.tag}-cycle-{k}")
            with load.stats.call("CloseCycle"):
                summary = close(
                    cycle_stream(old, load.positions, seed=k), timeout=CLOSE_TIMEOUT_SECONDS
                )
                load.last_closed.append(old)
                print(
                    f"  closed {old}: {summary.positions_total} positions, loss "
                    f"{summary.loss_total}, fund paid {summary.fund_paid}, allocated "
                    f"{summary.allocated_total} over {summary.participant_count}",
                    flush=True,
                )


def verifier(load: Load, every_s: float) -> None:
    with load.channel() as channel:
        query = pb_grpc.QueryStub(channel)
        while not load.stop.wait(every_s):
            verify(load.stats, query)


def verify(stats: Stats, query: Any) -> pb.VerifyReport | None:
    report: pb.VerifyReport | None = None
    with stats.call("VerifyLedger"):
        report = query.VerifyLedger(pb.VerifyLedgerRequest(), timeout=CLOSE_TIMEOUT_SECONDS)
    if report is not None:
        with stats.lock:
            stats.verifies.append((report.ok, report.entries_checked, list(report.problems)))
    return report


def setup(target: str, tag: str) -> None:
    """The currency, its contract and policy (kept if they exist), and a deposit large
    enough for every close's share."""
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        admin = pb_grpc.AdminStub(channel)
        try:
            admin.CreateCurrency(pb.CreateCurrencyRequest(code=CURRENCY, scale=2), timeout=30)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        admin.UpsertContract(
            pb.UpsertContractRequest(
                symbol=SYMBOL,
                margin_currency=CURRENCY,
                kind=pb.CONTRACT_KIND_LINEAR,
                multiplier="1",
            ),
            timeout=30,
        )
        admin.SetPolicy(
            pb.SetPolicyRequest(currency=CURRENCY, insurance_share="0.3", coverage_ratio="0.8"),
            timeout=30,
        )
        admin.TransferFund(
            pb.TransferFundRequest(
                transfer_id=f"{tag}-deposit",
                currency=CURRENCY,
                direction=pb.TRANSFER_DIRECTION_DEPOSIT,
                amount=10**15,
                memo="soak",
            ),
            timeout=30,
        )


# --- the run ---------------------------------------------------------------------------------


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long (default 600)")
    parser.add_argument("--database-url", help="default: a SQLite file in a temporary folder")
    parser.add_argument("--unary-threads", type=int, default=3)
    parser.add_argument("--batch-threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--reader-threads", type=int, default=2)
    parser.add_argument("--positions", type=int, default=100_000, help="per cycle close")
    parser.add_argument(
        "--close-every", type=float, help="seconds (default 60, or a third of a short run)"
    )
    parser.add_argument(
        "--verify-every", type=float, help="seconds (default 30, or a quarter of a short run)"
    )
    args = parser.parse_args(argv)
    close_every = args.close_every or min(60.0, args.seconds / 3)
    verify_every = args.verify_every or min(30.0, args.seconds / 4)

    scratch = Path(tempfile.mkdtemp(prefix="ledger-soak-"))
    database_url = args.database_url or f"sqlite:///{scratch / 'ledger.db'}"
    server = Server(database_url, scratch / "server.log")
    target = f"127.0.0.1:{server.port}"
    tag = uuid.uuid4().hex[:8]
    backend = database_url.split(":", 1)[0].split("+")[0]
    print(f"soak: ledger serve pid {server.process.pid} on {target}, {backend}, run {tag}")
    setup(target, tag)
    rss_start = server.rss_kib()
    peak = dict(rss_start)
    stats = Stats()
    load = Load(
        target=target,
        tag=tag,
        stats=stats,
        gate=CycleGate(f"{tag}-cycle-0"),
        stop=threading.Event(),
        positions=args.positions,
        batch_size=args.batch_size,
    )
    workers: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
    workers += [(unary_liquidations, (load, n)) for n in range(args.unary_threads)]
    workers += [(batched_liquidations, (load, 100 + n)) for n in range(args.batch_threads)]
    workers += [(readers, (load,)) for _ in range(args.reader_threads)]
    workers += [(closer, (load, close_every)), (verifier, (load, verify_every))]
    threads = [threading.Thread(target=f, args=a, daemon=True) for f, a in workers]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    report_every = min(30.0, max(args.seconds / 4, 1.0))
    while (left := args.seconds - (time.monotonic() - started)) > 0:
        time.sleep(min(left, report_every))
        rss = server.rss_kib()
        for name, kib in rss.items():
            peak[name] = max(peak.get(name, 0), kib)
        with stats.lock:
            calls = sum(stats.calls.values())
        print(
            f"  {time.monotonic() - started:6.0f} s: {calls} calls, server RSS "
            f"{mib(rss['server'])}",
            flush=True,
        )
    load.stop.set()
    for thread in threads:
        thread.join(CLOSE_TIMEOUT_SECONDS)
    elapsed = time.monotonic() - started
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        final = verify(stats, pb_grpc.QueryStub(channel))
    rss_end = server.rss_kib()
    exit_code = server.stop()

    print(f"\nsoak: {elapsed:.0f} s on {backend}")
    total = sum(stats.calls.values())
    print(f"calls served: {total} ({total / elapsed:.0f}/s)")
    for method in sorted({m for m, _ in stats.calls}):
        codes = {c: n for (m, c), n in stats.calls.items() if m == method}
        seconds = stats.seconds[method]
        print(
            f"  {method:18} {sum(codes.values()):8}  "
            + ", ".join(f"{c} {n}" for c, n in sorted(codes.items()))
            + f"  p50 {percentile(seconds, 0.5) * 1000:.1f} ms,"
            f" p99 {percentile(seconds, 0.99) * 1000:.1f} ms"
        )
    items = sum(stats.items.values())
    print(
        f"  batch items        {items:8}  " + ", ".join(f"{c} {n}" for c, n in stats.items.items())
    )
    errors = stats.errors()
    print(f"errors by status code: {dict(errors) if errors else 'none'}")
    for what, details in stats.details.items():
        print(f"  first {what}: {details[:300]}")
    for name in rss_start:
        print(
            f"{name} RSS: start {mib(rss_start[name])}, peak {mib(peak.get(name, 0))}, "
            f"end {mib(rss_end.get(name, 0))}"
        )
    bad_verifies = [v for v in stats.verifies if not v[0]]
    print(f"VerifyLedger: {len(stats.verifies)} runs, {len(bad_verifies)} not ok")
    if final is not None:
        print(
            f"final VerifyLedger: ok={final.ok}, entries_checked={final.entries_checked}, "
            f"problems={list(final.problems)[:10]}"
        )
    print(f"server exit code on SIGTERM: {exit_code}")
    failed = bool(errors) or bad_verifies or final is None or not final.ok or exit_code != 0
    if failed:
        print(f"soak: FAILED (the server's log and database are kept in {scratch})")
        return 1
    shutil.rmtree(scratch, ignore_errors=True)
    print("soak: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
