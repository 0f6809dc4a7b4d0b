"""Faults: PostgreSQL restarted under load, and the server SIGKILLed at random points.

With `ledger serve` as a real process, proves:

- PostgreSQL restarted while 8 clients post liquidations (unary RecordLiquidation and
  RecordLiquidations batches) and retry every UNAVAILABLE, DEADLINE_EXCEEDED and CANCELLED
  with the same request: a fast stop, a second down and a start, then an immediate restart
  (a crash and its recovery), on a private cluster of the test's own (tests/pg_cluster.py).
  Afterwards every retried liquidation has been acknowledged; every acknowledged one is in
  `liquidations` exactly once, with the result it was acknowledged with, and with one entry;
  nothing else is there; VerifyLedger is ok; the health service answers throughout and says
  SERVING again within seconds of each restart; and the same server process, never
  restarted, then records a liquidation, reads the fund and closes a cycle whose loss is
  exactly the acknowledged losses.

- On SQLite and PostgreSQL, the server SIGKILLed at 12 random (seeded) moments of a stream of
  unary liquidations, RecordLiquidations batches, deposits and cycle closes of 50k-200k
  positions, and restarted on the same database each time. After every restart: each
  acknowledged write is there as acknowledged (liquidations and deposits by SQL, deposits by
  ListEntries, closed cycles by GetCycle, SQL and StreamAllocations); what was in flight is
  wholly there or not at all (a liquidation with its entry or neither, a deposit with its
  entry or neither, a cycle closed with its cover and every allocation row or NOT_FOUND with
  none); no allocation row belongs to no cycle; VerifyLedger is ok; and no process of the
  killed server outlives it. Retrying what was in flight, with the same ids, succeeds and
  returns what was stored; at the end the fund is deposits + profits - covers.

Expectations are independent of the code under test: a liquidation's engine result is its
signed quantity (a LONG taken over at 2 and closed at 3 or 1, scale 0, multiplier 1, no
margin); a close's summary follows from its one loss liquidation and its positions, where
every profitable pnl is equal, so each of the P profitable positions takes part and gets
user_due // P, the user_due % P smallest ids one unit more.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text

from ledger.api.v1 import insurance_pb2 as pb
from tests import cycle_streams as cs
from tests.conftest import BACKENDS, Client
from tests.pg_cluster import private_cluster
from tests.test_cycle import JPY, market
from tests.test_server_process import free_port, wait_serving

RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
RETRYABLE_NUMBERS = frozenset(int(code.value[0]) for code in RETRYABLE)
EXIT_SECONDS = 30
DESCENDANTS_GONE_SECONDS = 20

# PostgreSQL restarted under load
LOAD_CLIENTS = 8
LOAD_SECONDS = 14.0
FAST_STOP_AT = 3.0  # seconds into the load: stop -m fast, a second down, start
IMMEDIATE_RESTART_AT = 9.0  # restart -m immediate: a crash and its recovery
DOWN_SECONDS = 1.0
RETRY_BUDGET_SECONDS = 60.0  # after the load, for the calls still being retried
LOAD_CALL_TIMEOUT = 5.0
HEALTH_BACK_SECONDS = 10.0
LOAD_CYCLE = "r1"

# SIGKILL at random points
KILLS = 12
# The kill moments and the workload come from this seed; another may be given to explore.
KILL_SEED = int(os.environ.get("LEDGER_TEST_FAULT_SEED") or 20_240_607)
KILL_DELAY_SECONDS = (0.3, 2.5)  # after the workload resumes
FINAL_ROUND_SECONDS = 2.0
CLOSE_POSITIONS = (50_000, 200_000)
PNL = 1_000  # every profitable position's pnl
LOSING_EVERY = 97  # every 97th position id lost money in the cycle
LOSING_PNL = -500
LIVE_CYCLE = "live"  # the cycle of the stream's liquidations; never closed


# --- requests and expectations -------------------------------------------------------------


def liquidation(lid: str, cycle_id: str, result: int) -> pb.RecordLiquidationRequest:
    """A liquidation whose engine result is `result` yen (never 0)."""
    assert result != 0
    return pb.RecordLiquidationRequest(
        liquidation_id=lid,
        cycle_id=cycle_id,
        symbol="XJPY",
        account_id=7,
        position_id=11,
        side=pb.SIDE_LONG,
        quantity=str(abs(result)),
        takeover_price="2",
        close_price="3" if result > 0 else "1",
        remaining_margin=0,
    )


def result_of(request: pb.RecordLiquidationRequest) -> int:
    """The engine result `liquidation` encodes, from the request alone."""
    return int(request.quantity) * (1 if request.close_price == "3" else -1)


def outcome_of(result: int) -> int:
    return pb.OUTCOME_FUND_INFLOW if result > 0 else pb.OUTCOME_SYSTEM_LOSS


def half_up_fifth(amount: int) -> int:
    """0.2 × amount, rounded half up: the fund's share of a cycle's loss."""
    return (2 * amount + 5) // 10


@dataclass(frozen=True)
class CloseSpec:
    """A cycle close: its one loss liquidation and its positions, all known beforehand."""

    cycle_id: str
    count: int
    loss: int
    seed: int

    @property
    def loss_id(self) -> str:
        return f"loss-{self.cycle_id}"

    def ids(self) -> np.ndarray[Any, np.dtype[np.uint64]]:
        return np.arange(1, self.count + 1, dtype=np.uint64)

    def positions(self) -> cs.Positions:
        ids = np.random.default_rng(self.seed).permutation(self.ids())
        pnl = np.full(self.count, PNL, dtype=np.int64)
        pnl[ids % np.uint64(LOSING_EVERY) == 0] = LOSING_PNL
        return cs.Positions(ids, ids % np.uint64(5_000) + np.uint64(1), pnl)

    @property
    def profitable(self) -> int:
        return self.count - self.count // LOSING_EVERY

    @cached_property
    def digest(self) -> str:
        return cs.input_digest(self.positions())

    def problems(self, summary: pb.CycleSummary) -> list[str]:
        """How a summary of this close differs from what the rules give (the fund it started
        from is the summary's own: other writes move the fund meanwhile)."""
        fund_paid = min(half_up_fifth(self.loss), summary.fund_balance_before)
        user_due = self.loss - fund_paid
        p = self.profitable
        assert p <= user_due < p * PNL  # every participant gets at least 1, none all its pnl
        want = {
            "cycle_id": self.cycle_id,
            "currency": JPY,
            "state": pb.CYCLE_STATE_CLOSED,
            "loss_total": self.loss,
            "fund_share": half_up_fifth(self.loss),
            "fund_paid": fund_paid,
            "user_due": user_due,
            "allocated_total": user_due,
            "uncovered": 0,
            "positions_total": self.count,
            "profitable_count": p,
            "profit_total": p * PNL,
            "participant_count": p,
            "participant_profit": p * PNL,
            "cutoff_pnl": PNL,
            "widened": False,
            "input_digest": self.digest,
            "insurance_share": "0.2",
            "coverage_ratio": "0.9",
        }
        got = {name: getattr(summary, name) for name in want}
        problems = [
            f"{self.cycle_id}: {name} is {got[name]!r}, expected {want[name]!r}"
            for name in want
            if got[name] != want[name]
        ]
        if summary.fund_balance_before < 0 or not summary.HasField("closed_at"):
            problems.append(f"{self.cycle_id}: fund_balance_before or closed_at wrong: {summary}")
        return problems

    def allocation_problems(self, query: Any, summary: pb.CycleSummary) -> list[str]:
        """StreamAllocations against the exact allocation: the profitable ids in order, each
        with user_due // P, the user_due % P smallest one more."""
        ids, accounts, pnls, amounts = [], [], [], []
        for part in query.StreamAllocations(
            pb.StreamAllocationsRequest(cycle_id=self.cycle_id, currency=JPY), timeout=120
        ):
            ids.append(np.array(part.position_id, dtype=np.uint64))
            accounts.append(np.array(part.account_id, dtype=np.uint64))
            pnls.append(np.array(part.pnl, dtype=np.int64))
            amounts.append(np.array(part.amount, dtype=np.int64))
        got_ids, got_amounts = np.concatenate(ids or [[]]), np.concatenate(amounts or [[]])
        want_ids = self.ids()[self.ids() % np.uint64(LOSING_EVERY) != 0]
        base, extra = divmod(summary.user_due, self.profitable)
        want_amounts = np.full(len(want_ids), base, dtype=np.int64)
        want_amounts[:extra] += 1
        problems = []
        if not np.array_equal(got_ids.astype(np.uint64), want_ids):
            problems.append(
                f"{self.cycle_id}: streamed {len(got_ids)} rows, not the profitable ids"
            )
        elif not np.array_equal(got_amounts, want_amounts):
            problems.append(f"{self.cycle_id}: streamed amounts differ from the exact allocation")
        elif not (
            np.array_equal(np.concatenate(accounts), want_ids % np.uint64(5_000) + np.uint64(1))
            and bool(np.all(np.concatenate(pnls) == PNL))
        ):
            problems.append(f"{self.cycle_id}: streamed account ids or pnl are wrong")
        return problems


# --- the server as a process, and what it leaves behind -------------------------------------


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of a process from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[19]), fields[0]


def descendants(pid: int) -> list[tuple[int, int]]:
    """Every process below `pid` (its writer, the forkserver), as (pid, start time)."""
    table: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) is not None and stat[2] != "Z":
            table[int(name)] = (stat[0], stat[1])
    found: list[tuple[int, int]] = []
    parents = [pid]
    while parents:
        parent = parents.pop()
        for child, (ppid, started) in table.items():
            if ppid == parent:
                found.append((child, started))
                parents.append(child)
    return found


def still_alive(process: tuple[int, int]) -> bool:
    stat = _stat(process[0])
    return stat is not None and stat[1] == process[1] and stat[2] != "Z"


class Served:
    """One `ledger serve` process on a database, its stderr in a file, and a client."""

    def __init__(self, database_url: str, directory: Path, name: str) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log = directory / f"{name}.log"
        self.leftovers: list[tuple[int, int]] = []  # processes that outlived the server
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
        command = [sys.executable, "-m", "ledger.cli", "serve", "--listen", self.target]
        with self.log.open("wb") as stderr:
            self.process = subprocess.Popen(
                [*command, "--database-url", database_url],
                cwd=directory,
                env={**env, "PYTHONUNBUFFERED": "1"},
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self._tree: list[tuple[int, int]] = []
        self.client: Client | None = None
        self.reaped_s = 0.0  # how long what it started took to go after it

    def connect(self) -> Client:
        wait_serving(self.process, self.port, self.log)
        self._tree = descendants(self.process.pid)
        self.client = Client.connect(self.target)
        return self.client

    def kill(self) -> None:
        """SIGKILL, as a crash; then wait until what it started has gone too."""
        self._tree = descendants(self.process.pid) or self._tree
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(EXIT_SECONDS)
        self._reap()

    def stop(self) -> int:
        """SIGTERM: the exit code of a graceful stop."""
        self._tree = descendants(self.process.pid) or self._tree
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(EXIT_SECONDS)
        self._reap()
        return code

    def _reap(self) -> None:
        started = time.monotonic()
        deadline = started + DESCENDANTS_GONE_SECONDS
        while any(still_alive(p) for p in self._tree) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.reaped_s = time.monotonic() - started
        for process in self._tree:
            if still_alive(process):  # ours, the same start time: end it, and report it
                self.leftovers.append(process)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process[0], signal.SIGKILL)
        self._tree = []

    def close(self) -> None:
        if self.client is not None:
            self.client.channel.close()
            self.client = None
        if self.process.poll() is None:
            self.kill()
        self._reap()

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def served(database_url: str, directory: Path, name: str) -> Iterator[Served]:
    server = Served(database_url, directory, name)
    try:
        server.connect()
        yield server
    finally:
        server.close()


def health_status(target: str) -> str:
    """The health service's answer for the whole server, or the call's status code."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        except grpc.RpcError as error:
            return f"error {error.code().name}"


def wait_health_serving(target: str, within_s: float) -> float:
    """Seconds until the health service says SERVING; fails after `within_s`."""
    started = time.monotonic()
    seen: list[str] = []
    while True:
        status = health_status(target)
        if status == "SERVING":
            return time.monotonic() - started
        seen.append(status)
        if time.monotonic() - started > within_s:
            pytest.fail(f"health not SERVING {within_s}s after the restart; saw {set(seen)}")
        time.sleep(0.1)


def verify(client: Client) -> pb.VerifyReport:
    return client.query.VerifyLedger(pb.VerifyLedgerRequest(currency=""), timeout=300)


# --- the database, by plain SQL -----------------------------------------------------------


@contextmanager
def sql(database_url: str) -> Iterator[Callable[[str], list[tuple[Any, ...]]]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:

            def rows(statement: str) -> list[tuple[Any, ...]]:
                return [tuple(r) for r in conn.execute(text(statement))]

            yield rows
    finally:
        engine.dispose()


# Each names rows that break a rule of the journal; every one must come back empty.
JOURNAL_RULES = {
    "a liquidation whose entry is missing, another's, or of another amount": (
        "SELECT l.liquidation_id FROM liquidations l LEFT JOIN entries e ON e.id = l.entry_id "
        "WHERE l.entry_id IS NOT NULL AND (e.id IS NULL OR e.reference <> l.liquidation_id "
        "OR e.kind NOT IN (3, 4) OR e.amount <> abs(l.engine_result))"
    ),
    "a liquidation with a result but no entry": (
        "SELECT liquidation_id FROM liquidations WHERE entry_id IS NULL AND engine_result <> 0"
    ),
    # (Joined by the referenced row's key: liquidations.entry_id has no index.)
    "a liquidation entry of no liquidation": (
        "SELECT e.id FROM entries e LEFT JOIN liquidations l ON l.liquidation_id = e.reference "
        "WHERE e.kind IN (3, 4) AND (l.entry_id IS NULL OR l.entry_id <> e.id)"
    ),
    "a liquidation id with two entries": (
        "SELECT reference FROM entries WHERE kind IN (3, 4) GROUP BY reference HAVING count(*) > 1"
    ),
    "a transfer whose entry is missing or another's": (
        "SELECT t.transfer_id FROM transfers t LEFT JOIN entries e ON e.id = t.entry_id "
        "WHERE e.id IS NULL OR e.reference <> t.transfer_id OR e.kind NOT IN (1, 2)"
    ),
    "a deposit or withdrawal entry of no transfer": (
        "SELECT e.id FROM entries e LEFT JOIN transfers t ON t.transfer_id = e.reference "
        "WHERE e.kind IN (1, 2) AND (t.entry_id IS NULL OR t.entry_id <> e.id)"
    ),
    "a cover of no closed cycle": (
        "SELECT e.reference FROM entries e LEFT JOIN cycles c "
        "ON c.currency = e.currency AND c.cycle_id = e.reference "
        "WHERE e.kind IN (5, 7) AND c.id IS NULL"
    ),
    "a close attempt left behind": "SELECT id, cycle_id FROM close_attempts",
}


def journal_problems(rows: Callable[[str], list[tuple[Any, ...]]]) -> list[str]:
    problems = []
    for rule, statement in JOURNAL_RULES.items():
        found = rows(statement)
        if found:
            problems.append(f"{rule}: {len(found)} rows, e.g. {found[:5]}")
    return problems


def stored_liquidations(rows: Callable[[str], list[tuple[Any, ...]]]) -> dict[str, tuple[Any, ...]]:
    """liquidation_id → (currency, engine_result, outcome, fund_balance_after, entry_id)."""
    return {
        r[0]: (r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5] or 0))
        for r in rows(
            "SELECT liquidation_id, currency, engine_result, outcome, fund_balance_after, "
            "entry_id FROM liquidations"
        )
    }


def as_stored(result: pb.LiquidationResult) -> tuple[Any, ...]:
    return (
        result.currency,
        result.engine_result,
        result.outcome,
        result.fund_balance,
        result.entry_id,
    )


# --- 1. PostgreSQL restarted under load ------------------------------------------------------


class LoadBook:
    """What the load's clients were told, shared by their threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[str, pb.LiquidationResult] = {}
        self.sent: set[str] = set()
        self.retried: set[str] = set()
        self.given_up: set[str] = set()
        self.retry_codes: dict[str, int] = {}
        self.problems: list[str] = []

    def ack(self, request: pb.RecordLiquidationRequest, result: pb.LiquidationResult) -> None:
        lid = request.liquidation_id
        want = result_of(request)
        with self.lock:
            if (result.liquidation_id, result.currency, result.engine_result) != (lid, JPY, want):
                self.problems.append(f"{lid}: acknowledged {result}, expected a result of {want}")
            if result.outcome != outcome_of(want) or result.entry_id == 0:
                self.problems.append(f"{lid}: acknowledged outcome/entry wrong: {result}")
            prior = self.acked.setdefault(lid, result)
            if prior != result:
                self.problems.append(f"{lid}: acknowledged {prior} first and {result} on retry")

    def note_retry(self, ids: list[str], reason: str) -> None:
        with self.lock:
            self.retried.update(ids)
            self.retry_codes[reason] = self.retry_codes.get(reason, 0) + 1


def post_until_acknowledged(
    client: Client,
    requests: list[pb.RecordLiquidationRequest],
    batch: bool,
    book: LoadBook,
    give_up_at: float,
) -> None:
    """One call, repeated with the same request on every retryable failure, until each of
    its liquidations is acknowledged or the budget is spent."""
    ids = [r.liquidation_id for r in requests]
    with book.lock:
        book.sent.update(ids)
    attempt = 0
    while True:
        try:
            if not batch:
                (request,) = requests
                book.ack(
                    request, client.clearing.RecordLiquidation(request, timeout=LOAD_CALL_TIMEOUT)
                )
                return
            reply = client.clearing.RecordLiquidations(
                pb.RecordLiquidationsRequest(liquidations=requests), timeout=LOAD_CALL_TIMEOUT
            )
            if len(reply.outcomes) != len(requests):
                book.problems.append(f"{ids[0]}…: {len(reply.outcomes)} outcomes")
                return
            codes = {o.code for o in reply.outcomes}
            for request, outcome in zip(requests, reply.outcomes, strict=True):
                if outcome.code == 0:
                    book.ack(request, outcome.result)
            if codes == {0}:
                return
            if codes - RETRYABLE_NUMBERS - {0}:
                book.problems.append(f"{ids[0]}…: item codes {codes}: {list(reply.outcomes)[:3]}")
                return
            reason = f"item code {sorted(codes - {0})}"
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE:
                book.problems.append(f"{ids[0]}: {error.code().name}: {error.details()}")
                return
            reason = error.code().name
        book.note_retry(ids, reason)
        if time.monotonic() > give_up_at:
            with book.lock:
                book.given_up.update(i for i in ids if i not in book.acked)
            return
        attempt += 1
        time.sleep(min(0.02 * 2**attempt, 0.5) * random.uniform(0.5, 1.0))


def load_client(
    target: str, number: int, book: LoadBook, load_end: float, give_up_at: float
) -> None:
    rng = random.Random(1_000 + number)
    try:
        client = Client.connect(target)
        try:
            n = 0
            while time.monotonic() < load_end:
                size = 1 if rng.random() < 0.5 else rng.randint(2, 40)
                requests = [
                    liquidation(
                        f"t{number}-{n}-{i}",
                        LOAD_CYCLE,
                        rng.choice((-1, 1)) * rng.randint(1, 1_000),
                    )
                    for i in range(size)
                ]
                post_until_acknowledged(client, requests, size > 1, book, give_up_at)
                n += 1
        finally:
            client.channel.close()
    except Exception:
        book.problems.append(f"client {number} failed:\n{traceback.format_exc()}")


class HealthWatch:
    """Asks the health service every 0.1 s and keeps what it said, in order."""

    def __init__(self, target: str) -> None:
        self.seen: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(target,), daemon=True)
        self._thread.start()

    def _run(self, target: str) -> None:
        while not self._stop.wait(0.1):
            self.seen.append((time.monotonic(), health_status(target)))

    def stop(self) -> list[tuple[float, str]]:
        self._stop.set()
        self._thread.join(30)
        return self.seen


@pytest.mark.slow
def test_postgresql_restarted_under_load(tmp_path: Path) -> None:
    if "postgresql" not in BACKENDS:
        pytest.skip("LEDGER_TEST_BACKENDS leaves PostgreSQL out")
    with (
        private_cluster(tmp_path / "pg") as cluster,
        served(cluster.url, tmp_path, "server") as server,
    ):
        client = server.client
        assert client is not None
        pid = server.process.pid
        market(client)
        book = LoadBook()
        started = time.monotonic()
        load_end = started + LOAD_SECONDS
        give_up_at = load_end + RETRY_BUDGET_SECONDS
        watch = HealthWatch(server.target)
        clients = [
            threading.Thread(
                target=load_client, args=(server.target, n, book, load_end, give_up_at)
            )
            for n in range(LOAD_CLIENTS)
        ]
        for thread in clients:
            thread.start()
        back_after: list[float] = []
        try:
            time.sleep(max(0.0, started + FAST_STOP_AT - time.monotonic()))
            acked_before = len(book.acked)
            cluster.stop("fast")
            down_at = time.monotonic()
            time.sleep(DOWN_SECONDS)
            cluster.start()
            up_at = time.monotonic()
            back_after.append(wait_health_serving(server.target, HEALTH_BACK_SECONDS))
            time.sleep(max(0.0, started + IMMEDIATE_RESTART_AT - time.monotonic()))
            cluster.restart("immediate")
            back_after.append(wait_health_serving(server.target, HEALTH_BACK_SECONDS))
        finally:
            for thread in clients:
                thread.join(LOAD_SECONDS + RETRY_BUDGET_SECONDS + 60)
            seen = watch.stop()
        assert not any(t.is_alive() for t in clients), "a client is still running"
        unanswered = [(round(t - started, 2), s) for t, s in seen if s.startswith("error")]
        assert not unanswered, f"the health service did not answer: {unanswered[:10]}"
        assert acked_before > 0, "no liquidation was acknowledged before the restart"

        # The clients: every retried liquidation acknowledged, none refused.
        assert not book.problems, "\n".join(book.problems[:20]) + "\n" + server.log_tail()
        assert not book.given_up, f"never acknowledged: {sorted(book.given_up)[:20]}"
        assert book.retried, "no call was retried: the restarts were not felt"
        assert book.retried <= set(book.acked)
        assert set(book.acked) == book.sent

        # The ledger: each acknowledged liquidation once, as acknowledged; nothing else.
        with sql(cluster.url) as rows:
            stored = stored_liquidations(rows)
            twice = rows(
                "SELECT liquidation_id, count(*) FROM liquidations GROUP BY liquidation_id "
                "HAVING count(*) > 1"
            )
            problems = journal_problems(rows)
        assert not twice, twice
        assert set(stored) == set(book.acked)
        differ = [lid for lid, r in book.acked.items() if stored[lid] != as_stored(r)]
        assert not differ, [(lid, stored[lid], book.acked[lid]) for lid in differ[:10]]
        assert not problems, problems
        report = verify(client)
        assert report.ok and not report.problems, list(report.problems)
        assert report.entries_checked >= len(book.acked)

        # The same process serves every kind of call again, at the first try.
        assert server.process.poll() is None and server.process.pid == pid
        assert health_status(server.target) == "SERVING"
        profits = sum(r.engine_result for r in book.acked.values() if r.engine_result > 0)
        losses = -sum(r.engine_result for r in book.acked.values() if r.engine_result < 0)
        fund = client.query.GetFund(pb.GetFundRequest(currency=JPY), timeout=10)
        assert (fund.balance, fund.inflow_total, fund.outflow_total) == (profits, profits, 0)
        fresh = client.clearing.RecordLiquidation(
            liquidation("after-restart", LOAD_CYCLE, -5), timeout=10
        )
        assert (fresh.engine_result, fresh.fund_balance) == (-5, profits)
        positions = CloseSpec(LOAD_CYCLE, 1_000, 0, seed=3).positions()
        summary = cs.close(client.channel, LOAD_CYCLE, JPY, positions, timeout=60)
        loss = losses + 5
        fund_paid = min(half_up_fifth(loss), profits)
        assert (summary.state, summary.loss_total, summary.fund_balance_before) == (
            pb.CYCLE_STATE_CLOSED,
            loss,
            profits,
        )
        assert (summary.fund_paid, summary.user_due) == (fund_paid, loss - fund_paid)
        assert summary.allocated_total + summary.uncovered == summary.user_due
        got = client.query.GetCycle(pb.GetCycleRequest(cycle_id=LOAD_CYCLE, currency=JPY))
        assert got == summary
        report = verify(client)
        assert report.ok and not report.problems, list(report.problems)
        log = server.log.read_text(errors="replace")
        assert log.count("serving on port") == 1, "the server restarted"
        assert server.stop() == 0
    assert not server.leftovers, f"processes outlived the server: {server.leftovers}"

    statuses = [s for t, s in seen if down_at <= t]
    not_serving = sorted({s for s in statuses if s != "SERVING"})
    print(
        f"\nPostgreSQL restarted twice under load: {len(book.acked)} liquidations acknowledged, "
        f"{len(book.retried)} of them after retries {dict(book.retry_codes)}; "
        f"down {DOWN_SECONDS}s at {down_at - started:.1f}s, back at {up_at - started:.1f}s; "
        f"health SERVING again after {[round(b, 2) for b in back_after]}s; "
        f"health said {not_serving or 'only SERVING'} meanwhile; "
        f"UNAVAILABLE in the server log: {log.count('status=UNAVAILABLE')} calls"
    )


# --- 2. SIGKILL at random points ---------------------------------------------------------------


@dataclass
class Op:
    """One write of the stream: what it sends, and what its acknowledgement must be."""

    kind: str  # unary, batch, deposit, loss, close
    key: str
    liquidations: list[pb.RecordLiquidationRequest] = field(default_factory=list)
    amount: int = 0  # a deposit's
    close: CloseSpec | None = None
    pause_after: float = 0.0  # seconds the driver waits after its acknowledgement
    interrupted: int = 0  # times a kill cut it short

    def describe(self) -> str:
        if self.kind == "batch":
            return f"batch {self.key} ({len(self.liquidations)} items)"
        if self.close is not None:
            return f"close {self.key} ({self.close.count:,} positions)"
        return f"{self.kind} {self.key}"


class KillBook:
    """Every write sent and every acknowledgement, shared by the drivers and the checks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.expected: dict[str, int] = {}  # liquidation id → its engine result, once sent
        self.acked: dict[str, pb.LiquidationResult] = {}
        self.deposits: dict[str, int] = {}  # transfer id → amount, once sent
        self.deposit_acks: dict[str, pb.Entry] = {}
        self.closes: dict[str, CloseSpec] = {}  # once sent
        self.close_acks: dict[str, pb.CycleSummary] = {}
        self.found_closed: dict[str, pb.CycleSummary] = {}  # closed, not yet acknowledged
        self.streamed: set[str] = set()  # cycles whose allocations were streamed and checked
        self.retried: list[Op] = []  # every write a kill cut short, to be retried
        self.problems: list[str] = []
        self.unkilled_retries: list[str] = []

    def acknowledged(self, op: Op) -> bool:
        with self.lock:
            if op.close is not None:
                return op.key in self.close_acks
            if op.kind == "deposit":
                return op.key in self.deposit_acks
            return all(r.liquidation_id in self.acked for r in op.liquidations)

    def sent(self, op: Op) -> None:
        with self.lock:
            for request in op.liquidations:
                self.expected[request.liquidation_id] = result_of(request)
            if op.kind == "deposit":
                self.deposits[op.key] = op.amount
            if op.close is not None:
                self.closes[op.key] = op.close

    def ack_liquidation(self, result: pb.LiquidationResult, lid: str) -> None:
        with self.lock:
            want = self.expected[lid]
            if (result.liquidation_id, result.currency, result.engine_result) != (lid, JPY, want):
                self.problems.append(f"{lid}: acknowledged {result}, expected a result of {want}")
            prior = self.acked.setdefault(lid, result)
            if prior != result:
                self.problems.append(f"{lid}: acknowledged {prior} first, then {result}")

    def ack_deposit(self, op: Op, entry: pb.Entry) -> None:
        with self.lock:
            if (entry.reference, entry.kind, entry.currency) != (
                op.key,
                pb.ENTRY_KIND_FUND_DEPOSIT,
                JPY,
            ) or {p.account: p.amount for p in entry.postings}.get("insurance_fund") != op.amount:
                self.problems.append(f"{op.key}: acknowledged {entry}")
            prior = self.deposit_acks.setdefault(op.key, entry)
            if prior != entry:
                self.problems.append(f"{op.key}: acknowledged {prior} first, then {entry}")

    def ack_close(self, spec: CloseSpec, summary: pb.CycleSummary) -> None:
        with self.lock:
            self.problems.extend(spec.problems(summary))
            seen = self.found_closed.pop(spec.cycle_id, None)
            if seen is not None and seen != summary:
                self.problems.append(
                    f"{spec.cycle_id}: found closed as {seen}, retry gave {summary}"
                )
            prior = self.close_acks.setdefault(spec.cycle_id, summary)
            if prior != summary:
                self.problems.append(f"{spec.cycle_id}: acknowledged {prior}, then {summary}")


class ItemsUnavailable(Exception):
    """A RecordLiquidations call answered, with retryable codes for some items."""


def stream_ops(seed: int) -> Iterator[Op]:
    """Unary liquidations, batches and deposits, in a seeded order."""
    rng = random.Random(seed)
    for k in range(10**9):
        draw = rng.random()
        if draw < 0.45:
            result = rng.choice((-1, 1)) * rng.randint(1, 1_000)
            yield Op("unary", f"u{k}", [liquidation(f"u{k}", LIVE_CYCLE, result)])
        elif draw < 0.85:
            size = rng.randint(2, 200)
            items = [
                liquidation(f"b{k}-{i}", LIVE_CYCLE, rng.choice((-1, 1)) * rng.randint(1, 1_000))
                for i in range(size)
            ]
            yield Op("batch", f"b{k}", items)
        else:
            yield Op("deposit", f"d{k}", amount=rng.randint(1_000, 1_000_000))


def close_ops(seed: int) -> Iterator[Op]:
    """Cycle after cycle: its loss liquidation, then its close."""
    rng = random.Random(seed)
    for k in range(10**9):
        count = rng.randint(*CLOSE_POSITIONS)
        spec = CloseSpec(f"c{k}", count, 5 * count + rng.randint(0, 999), seed=seed + k)
        yield Op("loss", spec.loss_id, [liquidation(spec.loss_id, spec.cycle_id, -spec.loss)])
        yield Op("close", spec.cycle_id, close=spec, pause_after=rng.uniform(0.3, 1.5))


class Driver:
    """Runs its ops one after the other on a server, until that server is killed (the op in
    flight is kept, and retried first on the next server) or it is told to stop."""

    def __init__(self, name: str, ops: Iterator[Op], book: KillBook) -> None:
        self.name = name
        self.ops = ops
        self.book = book
        self.pending: Op | None = None
        self.done = 0
        self.error_at_kill = ""
        self._thread: threading.Thread | None = None

    def start(self, client: Client, killed: threading.Event, stop: threading.Event) -> None:
        self.error_at_kill = ""
        self._thread = threading.Thread(
            target=self._run, args=(client, killed, stop), name=f"driver-{self.name}"
        )
        self._thread.start()

    def join(self) -> None:
        assert self._thread is not None
        self._thread.join(180)
        assert not self._thread.is_alive(), f"driver {self.name} did not stop"

    def _run(self, client: Client, killed: threading.Event, stop: threading.Event) -> None:
        try:
            while True:
                if self.pending is None:
                    if stop.is_set():
                        return
                    self.pending = next(self.ops)
                    self.book.sent(self.pending)
                op = self.pending
                try:
                    self._execute(op, client)
                except (grpc.RpcError, ItemsUnavailable) as error:
                    code = error.code() if isinstance(error, grpc.RpcError) else None
                    name = code.name if code is not None else str(error)
                    if killed.is_set():
                        op.interrupted += 1
                        self.error_at_kill = name
                        with self.book.lock:
                            if op.interrupted == 1:
                                self.book.retried.append(op)
                        return
                    if code is None or code in RETRYABLE:
                        self.book.unkilled_retries.append(f"{op.describe()}: {name}")
                        time.sleep(0.1)
                        continue
                    details = error.details() if isinstance(error, grpc.RpcError) else ""
                    self.book.problems.append(f"{op.describe()}: {name}: {details}")
                    return
                self.pending = None
                self.done += 1
                if op.pause_after and killed.wait(op.pause_after):
                    return
        except Exception:
            self.book.problems.append(f"driver {self.name} failed:\n{traceback.format_exc()}")

    def _execute(self, op: Op, client: Client) -> None:
        book = self.book
        if op.kind in ("unary", "loss"):
            (request,) = op.liquidations
            result = client.clearing.RecordLiquidation(request, timeout=30)
            book.ack_liquidation(result, request.liquidation_id)
        elif op.kind == "batch":
            reply = client.clearing.RecordLiquidations(
                pb.RecordLiquidationsRequest(liquidations=op.liquidations), timeout=60
            )
            assert len(reply.outcomes) == len(op.liquidations), reply
            codes = {o.code for o in reply.outcomes}
            for request, outcome in zip(op.liquidations, reply.outcomes, strict=True):
                if outcome.code == 0:
                    book.ack_liquidation(outcome.result, request.liquidation_id)
            if codes - {0} and not codes - RETRYABLE_NUMBERS - {0}:
                raise ItemsUnavailable(f"item codes {sorted(codes)}")
            if codes != {0}:
                book.problems.append(f"{op.describe()}: item codes {codes}")
        elif op.kind == "deposit":
            entry = client.admin.TransferFund(
                pb.TransferFundRequest(
                    transfer_id=op.key,
                    currency=JPY,
                    direction=pb.TRANSFER_DIRECTION_DEPOSIT,
                    amount=op.amount,
                ),
                timeout=30,
            )
            book.ack_deposit(op, entry)
        else:
            assert op.close is not None
            positions = op.close.positions().shuffled(op.interrupted)  # the same digest
            summary = cs.close(client.channel, op.key, JPY, positions, timeout=120)
            book.ack_close(op.close, summary)


def all_entries(client: Client, kind: int) -> list[pb.Entry]:
    found: list[pb.Entry] = []
    token = ""
    while True:
        page = client.query.ListEntries(
            pb.ListEntriesRequest(
                currency=JPY, account="insurance_fund", kind=kind, page_size=1000, page_token=token
            ),
            timeout=60,
        )
        found.extend(page.entries)
        token = page.next_page_token
        if not token:
            return found


def check_after_restart(
    database_url: str, client: Client, book: KillBook, in_flight: list[Op]
) -> tuple[list[str], list[str]]:
    """Everything acknowledged is there as acknowledged, what was in flight is whole or
    absent, the journal keeps its rules and VerifyLedger agrees. Returns the problems found,
    and (for the report) what became of each write in flight."""
    problems: list[str] = []
    fates: list[str] = []
    with sql(database_url) as rows:
        stored = stored_liquidations(rows)
        transfers = {
            r[0]: (int(r[1]), int(r[2]))
            for r in rows(
                "SELECT t.transfer_id, t.entry_id, e.amount FROM transfers t "
                "JOIN entries e ON e.id = t.entry_id"
            )
        }
        cycles = {
            r[0]: (int(r[1]), int(r[2]), int(r[3]), r[4], int(r[5]))
            for r in rows(
                "SELECT cycle_id, id, participant_count, allocated_total, input_digest, fund_paid "
                "FROM cycles WHERE currency = 'JPY'"
            )
        }
        allocations = {
            int(r[0]): (int(r[1]), int(r[2]))
            for r in rows(
                "SELECT cycle_pk, count(*), sum(amount) FROM allocations GROUP BY cycle_pk"
            )
        }
        covers = {
            r[0]: int(r[1])
            for r in rows(
                "SELECT reference, count(*) FROM entries WHERE kind = 5 GROUP BY reference"
            )
        }
        problems.extend(journal_problems(rows))

    with book.lock:
        acked = dict(book.acked)
        expected = dict(book.expected)
        deposit_acks = dict(book.deposit_acks)
        deposits = dict(book.deposits)
        closes = dict(book.closes)
        close_acks = dict(book.close_acks)

    # Liquidations: each acknowledged one as acknowledged; nothing never sent; every one
    # stored with the result its request gives (its entry: journal_problems).
    for lid, result in acked.items():
        if stored.get(lid) != as_stored(result):
            problems.append(f"{lid}: acknowledged {as_stored(result)}, stored {stored.get(lid)}")
    for lid, row in stored.items():
        if lid not in expected:
            problems.append(f"{lid}: stored but never sent")
        elif row[1:3] != (expected[lid], outcome_of(expected[lid])):
            problems.append(f"{lid}: stored {row}, expected a result of {expected[lid]}")

    # Deposits: by SQL, and each acknowledged entry as ListEntries gives it.
    listed = {e.reference: e for e in all_entries(client, pb.ENTRY_KIND_FUND_DEPOSIT)}
    if set(listed) != set(transfers):
        problems.append(f"deposits listed {sorted(set(listed) ^ set(transfers))[:5]} differ")
    for tid, entry in deposit_acks.items():
        if transfers.get(tid) != (entry.entry_id, deposits[tid]) or listed.get(tid) != entry:
            problems.append(f"{tid}: acknowledged {entry}, stored {transfers.get(tid)}")
    for tid, (_, amount) in transfers.items():
        if deposits.get(tid) != amount:
            problems.append(f"{tid}: a deposit of {amount} stored, {deposits.get(tid)} sent")

    # Cycles: closed with every row, or not at all.
    known_pks = set()
    for cycle_id, spec in closes.items():
        try:
            summary: pb.CycleSummary | None = client.query.GetCycle(
                pb.GetCycleRequest(cycle_id=cycle_id, currency=JPY), timeout=30
            )
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            summary = None
        row = cycles.get(cycle_id)
        if summary is None:
            if cycle_id in close_acks:
                problems.append(f"{cycle_id}: acknowledged closed, GetCycle NOT_FOUND")
            if row is not None or covers.get(cycle_id):
                problems.append(f"{cycle_id}: NOT_FOUND but its row or cover is there: {row}")
            continue
        if cycle_id in close_acks and summary != close_acks[cycle_id]:
            problems.append(f"{cycle_id}: acknowledged {close_acks[cycle_id]}, now {summary}")
        if cycle_id not in close_acks:
            with book.lock:
                book.found_closed[cycle_id] = summary
        problems.extend(spec.problems(summary))
        if row is None:
            problems.append(f"{cycle_id}: GetCycle finds it, SQL does not")
            continue
        pk, participants, allocated, digest, fund_paid = row
        known_pks.add(pk)
        count, total = allocations.get(pk, (0, 0))
        if (count, total) != (participants, allocated) or participants != summary.participant_count:
            problems.append(
                f"{cycle_id}: {count} allocation rows of {total}, the summary says "
                f"{summary.participant_count} of {summary.allocated_total}"
            )
        if (digest, fund_paid) != (spec.digest, summary.fund_paid):
            problems.append(f"{cycle_id}: stored digest/fund_paid {digest}/{fund_paid} differ")
        if covers.get(cycle_id, 0) != (1 if summary.fund_paid > 0 else 0):
            problems.append(f"{cycle_id}: {covers.get(cycle_id, 0)} cover entries")
        if spec.loss_id not in stored:
            problems.append(f"{cycle_id}: closed, but its loss liquidation is not there")
        if cycle_id not in book.streamed:
            problems.extend(spec.allocation_problems(client.query, summary))
            book.streamed.add(cycle_id)
    for cycle_id in cycles:
        if cycle_id not in closes:
            problems.append(f"{cycle_id}: closed but never sent")
    orphans = set(allocations) - known_pks
    if orphans:
        problems.append(f"allocation rows of no closed cycle: {[allocations[p] for p in orphans]}")

    # What was in flight at the kill: whole or absent (the checks above), and which.
    for op in in_flight:
        if op.close is not None:
            there = op.key in cycles
        elif op.kind == "deposit":
            there = op.key in transfers
        else:
            present = [r.liquidation_id in stored for r in op.liquidations]
            if any(present) and not all(present):
                problems.append(f"{op.describe()}: only {sum(present)} of its items are there")
            there = all(present)
        fates.append(f"{op.describe()}: {'written' if there else 'not written'}")

    report = verify(client)
    if not report.ok or report.problems:
        problems.append(f"VerifyLedger: ok={report.ok} {list(report.problems)[:10]}")
    return problems, fates


def close_in_write_phase(database_url: str) -> bool:
    """Whether a close is writing its allocation rows right now (for the report): on SQLite
    a close attempt is committed while it writes them in steps; on PostgreSQL, their COPY."""
    with sql(database_url) as rows:
        if database_url.startswith("sqlite"):
            return bool(rows("SELECT count(*) FROM close_attempts")[0][0])
        return bool(
            rows(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'active' AND query ILIKE 'COPY allocations%'"
            )[0][0]
        )


@pytest.mark.slow
def test_sigkill_at_random_points_loses_nothing_acknowledged(
    database_url: str, tmp_path: Path
) -> None:
    rng = random.Random(KILL_SEED)
    book = KillBook()
    drivers = [
        Driver("stream", stream_ops(KILL_SEED + 1), book),
        Driver("closes", close_ops(KILL_SEED + 2), book),
    ]
    kills: list[str] = []
    leftovers: list[tuple[int, int]] = []
    previous_log = ""
    started = time.monotonic()
    for round_number in range(KILLS + 1):
        round_started = time.monotonic()
        with served(database_url, tmp_path, f"server-{round_number}") as server:
            client = server.client
            assert client is not None
            serving_s = time.monotonic() - round_started
            if round_number == 0:
                market(client)
            else:
                in_flight = [d.pending for d in drivers if d.pending is not None]
                problems, fates = check_after_restart(database_url, client, book, in_flight)
                assert not problems, (
                    f"after kill {round_number}:\n" + "\n".join(problems[:30]) + "\n"
                    f"--- the killed server's log ({tmp_path}) ---\n{previous_log}"
                )
                kills[-1] += (
                    f"; restarted in {serving_s:.1f}s, checked in "
                    f"{time.monotonic() - round_started - serving_s:.1f}s: "
                    + ("; ".join(fates) or "nothing was in flight")
                )
            assert not book.problems, "\n".join(book.problems[:20]) + "\n" + server.log_tail()
            killed, stop = threading.Event(), threading.Event()
            for driver in drivers:
                driver.start(client, killed, stop)
            if round_number < KILLS:
                delay = rng.uniform(*KILL_DELAY_SECONDS)
                time.sleep(delay)
                writing = close_in_write_phase(database_url)
                killed.set()
                server.kill()
                for driver in drivers:
                    driver.join()
                errors = [f"{d.name}: {d.error_at_kill}" for d in drivers if d.error_at_kill]
                kills.append(
                    f"kill {round_number + 1} after {delay:.2f}s"
                    + (" (a close writing its allocation rows)" if writing else "")
                    + f", calls ended {errors}, its processes gone {server.reaped_s:.2f}s later"
                )
            else:  # the last server: finish what is pending, write a little more, stop
                time.sleep(FINAL_ROUND_SECONDS)
                stop.set()
                for driver in drivers:
                    driver.join()
                assert all(d.pending is None for d in drivers)
                problems, _ = check_after_restart(database_url, client, book, [])
                assert not problems, "\n".join(problems[:30])
                # Every write in flight at a kill was retried to its acknowledgement, and
                # the fund is what the acknowledgements add up to.
                assert book.retried, "no kill caught a write in flight"
                assert all(book.acknowledged(op) for op in book.retried)
                assert set(book.acked) == set(book.expected)
                assert set(book.deposit_acks) == set(book.deposits)
                assert set(book.close_acks) == set(book.closes)
                profits = sum(r.engine_result for r in book.acked.values() if r.engine_result > 0)
                deposited = sum(book.deposits.values())
                covers = sum(s.fund_paid for s in book.close_acks.values())
                fund = client.query.GetFund(pb.GetFundRequest(currency=JPY), timeout=10)
                assert (fund.balance, fund.inflow_total, fund.outflow_total) == (
                    deposited + profits - covers,
                    deposited + profits,
                    covers,
                )
                assert server.stop() == 0, server.log_tail()
            previous_log = server.log_tail()
        leftovers.extend(server.leftovers)
        assert not book.problems, "\n".join(book.problems[:20]) + "\n" + server.log_tail()
    assert not leftovers, f"processes of a killed server outlived it: {leftovers}"
    assert len(kills) >= 10
    print(
        f"\n{database_url.split(':')[0]} (seed {KILL_SEED}): {len(kills)} kill points survived in "
        f"{time.monotonic() - started:.0f}s; {len(book.acked)} liquidations, "
        f"{len(book.deposit_acks)} deposits, {len(book.close_acks)} cycle closes acknowledged; "
        f"{len(book.retried)} writes cut short by a kill and retried; "
        f"retries without a kill: {book.unkilled_retries[:5]}"
    )
    for line in kills:
        print("  " + line)
