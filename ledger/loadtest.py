"""`ledger loadtest SCENARIO`: load a running server from this machine and measure it.

Scenarios:
- `liquidations`: N callers each sending RecordLiquidation one after another;
- `batch`: N callers sending RecordLiquidations of B items;
- `close`: N callers each recording a loss in a fresh cycle and closing it with a cycle of P
  positions (flat or heavy-tailed pnl, generated as numpy columns and encoded once);
- `mixed`: the unary callers, with one batch caller, one closer and one reader beside them.

The callers are grpc.aio coroutines on one event loop per process; one Python process can
keep only one core busy, so `--processes P` spreads them over P processes (multiprocessing's
spawn context, as the server's workers), which is how one machine can push the server to its
limits. Requests are encoded from bytes prepared once (only the ids change), so a caller
spends its time waiting for the server rather than building messages. Every loop ends at the
deadline; calls in flight then finish and are counted.

What it sets up (a currency, a contract, a seed deposit in the fund) has names of its own
(`--currency LT`, contract `LT-PERP`, transfer `loadtest-seed-LT`) and is idempotent: a rerun
finds them as they are. Liquidation and cycle ids carry the run's id, so runs never collide.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import queue
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import numpy as np

from ledger.api.v1 import insurance_pb2 as pb
from ledger.client.connection import Client, Endpoint, UsageProblem, method_path, status_name
from ledger.client.streams import Positions, cycle_input, varint

SCENARIOS = ("liquidations", "batch", "close", "mixed")
DISTRIBUTIONS = ("flat", "heavy")
SCALE = 6  # of the load's currency, when the load creates it
MULTIPLIER = "0.001"
SEED_DEPOSIT = 10**15  # minor units in the fund, so that closes always find it funded
PROGRESS_SECONDS = 0.25
START_SECONDS = 60.0  # for the client processes to start and connect
CALL_SECONDS = 60.0
CLOSE_SECONDS = 600.0
ERROR_PAUSE_SECONDS = 0.01  # after a failed call, so that a failing server is not spun on

RECORD = "RecordLiquidation"
RECORD_BATCH = "RecordLiquidations"
CLOSE = "CloseCycle"
GET_FUND = "GetFund"
LIST_ENTRIES = "ListEntries"
RPC_ORDER = (RECORD, RECORD_BATCH, CLOSE, GET_FUND, LIST_ENTRIES)


@dataclass(frozen=True, slots=True)
class Plan:
    scenario: str
    seconds: float = 10.0
    callers: int = 8
    batch_size: int = 1000
    positions: int = 100_000
    distribution: str = "heavy"
    processes: int = 1
    currency: str = "LT"
    seed: int = 0

    def check(self) -> None:
        if self.scenario not in SCENARIOS:
            raise UsageProblem(f"SCENARIO {self.scenario!r} is not one of {', '.join(SCENARIOS)}")
        if self.distribution not in DISTRIBUTIONS:
            raise UsageProblem(
                f"--distribution {self.distribution!r} is not one of {', '.join(DISTRIBUTIONS)}"
            )

    @property
    def symbol(self) -> str:
        return f"{self.currency}-PERP"

    def roles(self) -> list[str]:
        """Every caller's role, in all processes."""
        if self.scenario == "liquidations":
            return ["unary"] * self.callers
        if self.scenario == "batch":
            return ["batch"] * self.callers
        if self.scenario == "close":
            return ["close"] * self.callers
        return ["unary"] * self.callers + ["batch", "close", "reader"]

    def shares(self) -> list[list[tuple[int, str]]]:
        """The callers of each process: (the caller's number, its role), dealt in turn."""
        roles = list(enumerate(self.roles()))
        count = min(self.processes, len(roles))
        return [roles[k::count] for k in range(count)]


# --- what the callers send ------------------------------------------------------------------


def _text(number: int, value: str) -> bytes:
    data = value.encode()
    return varint(number << 3 | 2) + varint(len(data)) + data


def _uint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def _sint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint((value << 1) ^ (value >> 63))


# (side, quantity, takeover, close, remaining margin) at multiplier 0.001 and scale 6: a
# profit of 10,000 minor units, a loss of 6,000, and a break-even: every outcome in turn.
TEMPLATES = (
    (pb.SIDE_LONG, "1", "60000", "60010", 0),
    (pb.SIDE_SHORT, "2", "60000", "60005", 4_000),
    (pb.SIDE_LONG, "1", "60000", "59990", 10_000),
)


class Liquidations:
    """Serialized RecordLiquidationRequests whose constant part is encoded once; the wire
    format lets fields come in any order, so the id and the numbers are put in front."""

    def __init__(self, cycle_id: str, symbol: str) -> None:
        self._tails = [
            _text(2, cycle_id)
            + _text(3, symbol)
            + _uint(6, side)
            + _text(7, quantity)
            + _text(8, takeover)
            + _text(9, close)
            + _sint(10, margin)
            for side, quantity, takeover, close, margin in TEMPLATES
        ]

    def one(self, liquidation_id: str, n: int) -> bytes:
        head = _text(1, liquidation_id) + _uint(4, 1 + n % 997) + _uint(5, 1 + n)
        return head + self._tails[n % len(self._tails)]

    def batch(self, prefix: str, start: int, count: int) -> bytes:
        """A RecordLiquidationsRequest: field 1 repeated, one item each."""
        parts = []
        for n in range(start, start + count):
            item = self.one(f"{prefix}-{n}", n)
            parts.append(b"\x0a" + varint(len(item)) + item)
        return b"".join(parts)


def loss(liquidation_id: str, cycle_id: str, symbol: str) -> bytes:
    """A loss of 10 units of the currency (10,000,000 minor units at scale 6) in the cycle:
    what a close then covers and allocates."""
    request = pb.RecordLiquidationRequest(
        liquidation_id=liquidation_id,
        cycle_id=cycle_id,
        symbol=symbol,
        account_id=1,
        position_id=1,
        side=pb.SIDE_LONG,
        quantity="10",
        takeover_price="60000",
        close_price="59000",
    )
    return request.SerializeToString()


def generate_positions(count: int, distribution: str, seed: int) -> Positions:
    """A cycle's positions as columns, without a Python object per position: ids 1..count,
    accounts holding about three positions each, and integer pnl, either uniform in
    ±1,000,000 (flat) or Zipf-distributed in size (heavy: most small, a few huge), about
    60% of them profitable."""
    rng = np.random.default_rng(seed)
    position_id = np.arange(1, count + 1, dtype=np.uint64)
    account_id = rng.integers(1, max(2, count // 3) + 1, size=count, dtype=np.uint64)
    if distribution == "flat":
        pnl = rng.integers(-1_000_000, 1_000_001, size=count, dtype=np.int64)
    else:
        size = np.minimum(rng.zipf(1.5, size=count), 10**10).astype(np.int64) * 100
        profitable = rng.integers(0, 10, size=count) < 6
        pnl = np.where(profitable, size, -size)
    return Positions(position_id, account_id, pnl)


# --- measuring ------------------------------------------------------------------------------


@dataclass
class RpcStats:
    """One RPC's calls: counts, every call's latency (seconds), failures by status."""

    calls: int = 0
    items: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    item_errors: Counter[str] = field(default_factory=Counter)

    def merge(self, other: RpcStats) -> None:
        self.calls += other.calls
        self.items += other.items
        self.latencies.extend(other.latencies)
        self.errors.update(other.errors)
        self.item_errors.update(other.item_errors)

    def failures(self) -> int:
        return sum(self.errors.values()) + sum(self.item_errors.values())


Stats = dict[str, RpcStats]
Snapshot = dict[str, tuple[int, int, int]]  # rpc → (calls, items, failures)


def snapshot(stats: Stats) -> Snapshot:
    return {name: (s.calls, s.items, s.failures()) for name, s in stats.items()}


@dataclass
class WorkerResult:
    stats: Stats
    elapsed: float


class _Callers:
    """The callers of one process, on its event loop, over one channel."""

    def __init__(self, endpoint: Endpoint, plan: Plan, run_id: str, process: int) -> None:
        self.plan = plan
        self.run_id = run_id
        self.process = process
        self.metadata = endpoint.metadata()
        self.channel = endpoint.aio_channel()
        self.stats: Stats = {}
        self.deadline = 0.0
        path = method_path
        raw: Any = {"request_serializer": None, "response_deserializer": None}
        self.record = self.channel.unary_unary(path("Clearing", RECORD), **raw)
        self.record_batch = self.channel.unary_unary(path("Clearing", RECORD_BATCH), **raw)
        self.close = self.channel.stream_unary(path("Clearing", CLOSE), **raw)
        self.get_fund = self.channel.unary_unary(path("Query", GET_FUND), **raw)
        self.list_entries = self.channel.unary_unary(path("Query", LIST_ENTRIES), **raw)
        self.liquidations = Liquidations(f"{run_id}-open", plan.symbol)
        self._chunks: list[bytes] | None = None

    def stat(self, rpc: str) -> RpcStats:
        return self.stats.setdefault(rpc, RpcStats())

    async def connect(self) -> None:
        try:
            await asyncio.wait_for(self.channel.channel_ready(), START_SECONDS)
        except TimeoutError:
            raise ConnectionError(f"the server did not answer within {START_SECONDS:g} s") from None

    async def timed(
        self, rpc: str, items: int, call: Any, request: Any, timeout: float = CALL_SECONDS
    ) -> bytes | None:
        """Make one call and count it; None when it failed (its status is counted)."""
        stats = self.stat(rpc)
        start = time.perf_counter()
        try:
            reply: bytes = await call(request, metadata=self.metadata, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            stats.latencies.append(time.perf_counter() - start)
            stats.calls += 1
            stats.errors[error.code().name] += 1
            await asyncio.sleep(ERROR_PAUSE_SECONDS)
            return None
        stats.latencies.append(time.perf_counter() - start)
        stats.calls += 1
        stats.items += items
        return reply

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    async def unary(self, caller: int) -> None:
        n = 0
        prefix = f"{self.run_id}-u{caller}"
        while self.running():
            request = self.liquidations.one(f"{prefix}-{n}", n)
            await self.timed(RECORD, 1, self.record, request)
            n += 1

    async def batch(self, caller: int) -> None:
        n = 0
        size = self.plan.batch_size
        prefix = f"{self.run_id}-b{caller}"
        while self.running():
            request = self.liquidations.batch(prefix, n, size)
            reply = await self.timed(RECORD_BATCH, size, self.record_batch, request)
            if reply is not None:
                outcomes = pb.RecordLiquidationsResponse.FromString(reply).outcomes
                failed = Counter(o.code for o in outcomes if o.code != 0)
                for code, count in failed.items():
                    self.stat(RECORD_BATCH).item_errors[status_name(code)] += count
            n += size

    def chunks(self) -> list[bytes]:
        """The position chunks of every cycle this process closes, encoded once (only the
        header, which names the cycle, differs)."""
        if self._chunks is None:
            positions = generate_positions(
                self.plan.positions, self.plan.distribution, self.plan.seed + self.process
            )
            self._chunks = [m for m, _ in cycle_input("", "", positions)][1:]
        return self._chunks

    async def closer(self, caller: int) -> None:
        chunks = self.chunks()
        n = 0
        while self.running():
            cycle_id = f"{self.run_id}-c{caller}-{n}"
            n += 1
            request = loss(f"{cycle_id}-loss", cycle_id, self.plan.symbol)
            recorded = await self.timed(RECORD, 1, self.record, request)
            if recorded is None:
                continue
            header = pb.CycleInput(
                header=pb.CycleHeader(cycle_id=cycle_id, currency=self.plan.currency)
            ).SerializeToString()
            messages = iter([header, *chunks])
            await self.timed(CLOSE, self.plan.positions, self.close, messages, CLOSE_SECONDS)

    async def reader(self, caller: int) -> None:
        fund = pb.GetFundRequest(currency=self.plan.currency).SerializeToString()
        listing = pb.ListEntriesRequest(
            currency=self.plan.currency, account="insurance_fund", page_size=100
        ).SerializeToString()
        while self.running():
            await self.timed(GET_FUND, 1, self.get_fund, fund)
            await self.timed(LIST_ENTRIES, 1, self.list_entries, listing)

    async def run(self, share: list[tuple[int, str]], seconds: float) -> float:
        """Every caller of the share until the deadline; the seconds it took (calls in
        flight at the deadline included)."""
        if any(role == "close" for _, role in share):
            self.chunks()  # before the clock starts
        start = time.monotonic()
        self.deadline = start + seconds
        roles = {"unary": self.unary, "batch": self.batch, "close": self.closer}
        roles["reader"] = self.reader
        await asyncio.gather(*(roles[role](caller) for caller, role in share))
        return time.monotonic() - start


async def _reporting(callers: _Callers, report: Callable[[Snapshot], None]) -> None:
    while True:
        await asyncio.sleep(PROGRESS_SECONDS)
        report(snapshot(callers.stats))


async def _run_here(
    endpoint: Endpoint,
    plan: Plan,
    run_id: str,
    share: list[tuple[int, str]],
    process: int,
    report: Callable[[Snapshot], None],
    ready: Callable[[], Any],
) -> WorkerResult:
    """One process's callers: connect, say so, wait for the start (`ready` returns once the
    other processes are connected too), call until the deadline, report as it goes."""
    callers = _Callers(endpoint, plan, run_id, process)
    try:
        await callers.connect()
        await ready()
        reporter = asyncio.get_running_loop().create_task(_reporting(callers, report))
        try:
            elapsed = await callers.run(share, plan.seconds)
        finally:
            reporter.cancel()
        report(snapshot(callers.stats))
        return WorkerResult(callers.stats, elapsed)
    finally:
        await callers.channel.close(None)


def _process_main(
    endpoint: Endpoint,
    plan: Plan,
    run_id: str,
    share: list[tuple[int, str]],
    process: int,
    messages: Any,
    go: Any,
) -> None:
    """A client process (spawned): its callers, with progress and the result sent back."""

    async def ready() -> None:
        messages.put(("ready", process, None))
        started = await asyncio.get_running_loop().run_in_executor(None, go.wait, START_SECONDS)
        if not started:
            raise TimeoutError("the load test did not start")

    def report(progress: Snapshot) -> None:
        messages.put(("progress", process, progress))

    try:
        result = asyncio.run(_run_here(endpoint, plan, run_id, share, process, report, ready))
    except BaseException as error:
        messages.put(("failed", process, f"{type(error).__name__}: {error}"))
        raise
    messages.put(("done", process, result))


# --- the run and its report -----------------------------------------------------------------


def set_up(endpoint: Endpoint, plan: Plan) -> None:
    """The currency, its contract and a funded insurance fund; each step idempotent (a
    currency already there with another scale is used as it is). Those are Admin calls: a
    `clearing` token (which the load itself needs) may not make them, so then the load goes
    ahead on what an admin set up before, or says how to set it up."""
    try:
        _set_up_as_admin(endpoint, plan)
    except grpc.RpcError as error:
        if not (isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.PERMISSION_DENIED):
            raise
        if not _contract_there(endpoint, plan):
            raise UsageProblem(
                f"this token may not set up the load (Admin: PERMISSION_DENIED), and contract "
                f"{plan.symbol} of {plan.currency} is not there yet: run the load once with "
                "an admin token (it sets up and then fails its Clearing calls), or create them "
                f"with `ledger currency create {plan.currency} --scale {SCALE}` and `ledger "
                f"contract upsert {plan.symbol} --currency {plan.currency} --kind linear "
                f"--multiplier {MULTIPLIER}`, then run it with a clearing token"
            ) from None


def _contract_there(endpoint: Endpoint, plan: Plan) -> bool:
    with Client(endpoint) as client:
        try:
            listed = client.unary(
                "Query",
                "ListContracts",
                pb.ListContractsRequest(currency=plan.currency),
                pb.ListContractsResponse,
            )
        except grpc.RpcError as error:
            if isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.NOT_FOUND:
                return False  # the currency is not there either
            raise
    return any(c.symbol == plan.symbol for c in listed.contracts)


def _set_up_as_admin(endpoint: Endpoint, plan: Plan) -> None:
    with Client(endpoint) as client:
        try:
            client.unary(
                "Admin",
                "CreateCurrency",
                pb.CreateCurrencyRequest(code=plan.currency, scale=SCALE),
                pb.Currency,
            )
        except grpc.RpcError as error:
            if not (
                isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.ALREADY_EXISTS
            ):
                raise
        client.unary(
            "Admin",
            "UpsertContract",
            pb.UpsertContractRequest(
                symbol=plan.symbol,
                margin_currency=plan.currency,
                kind=pb.CONTRACT_KIND_LINEAR,
                multiplier=MULTIPLIER,
            ),
            pb.Contract,
        )
        client.unary(
            "Admin",
            "TransferFund",
            pb.TransferFundRequest(
                transfer_id=f"loadtest-seed-{plan.currency}",
                currency=plan.currency,
                direction=pb.TRANSFER_DIRECTION_DEPOSIT,
                amount=SEED_DEPOSIT,
                memo="ledger loadtest: the fund's seed",
            ),
            pb.Entry,
        )


@dataclass
class Report:
    plan: Plan
    target: str
    elapsed: float
    stats: Stats

    @property
    def failed(self) -> bool:
        return any(s.failures() for s in self.stats.values())

    def rpcs(self) -> list[tuple[str, RpcStats]]:
        return sorted(self.stats.items(), key=lambda kv: RPC_ORDER.index(kv[0]))

    def to_dict(self) -> dict[str, Any]:
        seconds = max(self.elapsed, 1e-9)
        rpcs = {}
        for name, s in self.rpcs():
            latencies = np.asarray(s.latencies, dtype=np.float64) * 1000
            p50, p90, p99 = (
                np.percentile(latencies, [50, 90, 99]).tolist() if len(latencies) else [0, 0, 0]
            )
            rpcs[name] = {
                "calls": s.calls,
                "items": s.items,
                "calls_per_second": round(s.calls / seconds, 3),
                "items_per_second": round(s.items / seconds, 3),
                "latency_ms": {
                    "p50": round(p50, 3),
                    "p90": round(p90, 3),
                    "p99": round(p99, 3),
                    "max": round(float(latencies.max()) if len(latencies) else 0.0, 3),
                },
                "errors": dict(s.errors),
                "item_errors": dict(s.item_errors),
            }
        errors: Counter[str] = Counter()
        item_errors: Counter[str] = Counter()
        for s in self.stats.values():
            errors.update(s.errors)
            item_errors.update(s.item_errors)
        plan = self.plan
        return {
            "scenario": plan.scenario,
            "target": self.target,
            "seconds": round(self.elapsed, 3),
            "processes": len(plan.shares()),
            "callers": len(plan.roles()),
            "batch_size": plan.batch_size,
            "positions": plan.positions,
            "distribution": plan.distribution,
            "currency": plan.currency,
            "rpcs": rpcs,
            "errors": dict(errors),
            "item_errors": dict(item_errors),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def table(self) -> Any:
        from rich.table import Table

        data = self.to_dict()
        table = Table(
            title=f"loadtest {data['scenario']} against {data['target']}: {data['callers']} "
            f"callers in {data['processes']} process{'es' if data['processes'] > 1 else ''} "
            f"for {data['seconds']:.2f} s",
            title_justify="left",
        )
        headers = ("rpc", "calls", "calls/s", "items", "items/s", "p50 ms", "p90 ms")
        for header in (*headers, "p99 ms", "max ms", "errors"):
            table.add_column(header, justify="left" if header == "rpc" else "right")
        for name, r in data["rpcs"].items():
            latency = r["latency_ms"]
            failures = sum(r["errors"].values()) + sum(r["item_errors"].values())
            table.add_row(
                name,
                f"{r['calls']:,}",
                f"{r['calls_per_second']:,.1f}",
                f"{r['items']:,}",
                f"{r['items_per_second']:,.1f}",
                *(f"{latency[p]:.2f}" for p in ("p50", "p90", "p99", "max")),
                f"{failures:,}",
            )
        return table

    def errors_table(self) -> Any:
        from rich.table import Table

        if not self.failed:
            return None
        table = Table(title="errors by status", title_justify="left")
        for header in ("rpc", "status", "count"):
            table.add_column(header)
        for name, s in self.rpcs():
            for code, count in sorted(s.errors.items()):
                table.add_row(name, code, f"{count:,}")
            for code, count in sorted(s.item_errors.items()):
                table.add_row(name, f"{code} (items)", f"{count:,}")
        return table


class _Live:
    """The live display on stderr (a terminal only): calls, rates and failures so far."""

    def __init__(self, plan: Plan, enabled: bool) -> None:
        self.plan = plan
        self.enabled = enabled and sys.stderr.isatty()
        self.progress: dict[int, Snapshot] = {}
        self.start = time.monotonic()
        self._live: Any = None

    def __enter__(self) -> _Live:
        if self.enabled:
            from rich.live import Live

            from ledger.client.render import stderr

            self._live = Live(self._render(), console=stderr(), transient=True, auto_refresh=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def started(self) -> None:
        self.start = time.monotonic()

    def update(self, process: int, progress: Snapshot) -> None:
        self.progress[process] = progress
        if self._live is not None:
            self._live.update(self._render(), refresh=True)

    def _render(self) -> Any:
        from rich.table import Table

        elapsed = time.monotonic() - self.start
        totals: dict[str, list[int]] = {}
        for progress in self.progress.values():
            for name, values in progress.items():
                total = totals.setdefault(name, [0, 0, 0])
                for k, value in enumerate(values):
                    total[k] += value
        table = Table(
            title=f"loadtest {self.plan.scenario}: {min(elapsed, self.plan.seconds):.1f} of "
            f"{self.plan.seconds:g} s",
            title_justify="left",
        )
        for header in ("rpc", "calls", "calls/s", "items/s", "errors"):
            table.add_column(header, justify="left" if header == "rpc" else "right")
        seconds = max(elapsed, 1e-9)
        for name in RPC_ORDER:
            if name in totals:
                calls, items, failures = totals[name]
                rates = f"{calls / seconds:,.1f}", f"{items / seconds:,.1f}"
                table.add_row(name, f"{calls:,}", *rates, f"{failures:,}")
        return table


def run(endpoint: Endpoint, plan: Plan, *, live: bool = True) -> Report:
    """Set up, run the callers (here, or in `plan.processes` spawned processes), report."""
    plan.check()
    set_up(endpoint, plan)
    run_id = f"lt-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    shares = plan.shares()
    with _Live(plan, live) as display:
        if len(shares) == 1:

            async def ready() -> None:
                display.started()

            result = asyncio.run(
                _run_here(
                    endpoint,
                    plan,
                    run_id,
                    shares[0],
                    0,
                    lambda progress: display.update(0, progress),
                    ready,
                )
            )
            stats, elapsed = result.stats, result.elapsed
        else:
            stats, elapsed = _run_processes(endpoint, plan, run_id, shares, display)
    return Report(plan, endpoint.target, elapsed, stats)


def _run_processes(
    endpoint: Endpoint,
    plan: Plan,
    run_id: str,
    shares: list[list[tuple[int, str]]],
    display: _Live,
) -> tuple[Stats, float]:
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    go = context.Event()
    processes = [
        context.Process(
            target=_process_main,
            args=(endpoint, plan, run_id, share, k, messages, go),
            name=f"ledger-loadtest-{k}",
            daemon=True,
        )
        for k, share in enumerate(shares)
    ]
    for process in processes:
        process.start()
    results: dict[int, WorkerResult] = {}
    ready: set[int] = set()
    started_by = time.monotonic() + START_SECONDS
    finished_by = started_by + plan.seconds + CLOSE_SECONDS
    try:
        while len(results) < len(processes):
            if time.monotonic() > (finished_by if go.is_set() else started_by):
                raise TimeoutError("the load test's processes did not finish")
            try:
                kind, k, payload = messages.get(timeout=PROGRESS_SECONDS)
            except queue.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{dead[0].name} exited with {dead[0].exitcode}") from None
                continue
            if kind == "ready":
                ready.add(k)
                if len(ready) == len(processes):
                    display.started()
                    go.set()
            elif kind == "progress":
                display.update(k, payload)
            elif kind == "done":
                results[k] = payload
            else:
                raise RuntimeError(f"load-test process {k} failed: {payload}")
    finally:
        go.set()
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()
    stats: Stats = {}
    for result in results.values():
        for name, s in result.stats.items():
            stats.setdefault(name, RpcStats()).merge(s)
    return stats, max(r.elapsed for r in results.values())
