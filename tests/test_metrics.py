"""Prometheus metrics and health that means something, through a real server.

Proves that /metrics on `--metrics-listen` counts every call by the grpc-prometheus names and
labels (started, handled by code, the latency histogram), reports each currency's fund
balance as the ledger holds it, the last close per currency, the liquidation writer's batch
sizes (their sum is the liquidations written) and the liquidations waiting; and that the
health service says NOT_SERVING while the database is unreachable and SERVING again once it
is back, without a restart of the server.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ledger.api.v1 import insurance_pb2 as pb
from ledger.server.app import LedgerServer, Settings
from tests import cycle_streams as cs
from tests.conftest import Client
from tests.cycle_streams import Positions
from tests.pg_cluster import private_cluster
from tests.test_cycle import JPY, KRW, deposit, liquidate, market

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def observed(database_url: str) -> Iterator[tuple[LedgerServer, Client]]:
    server = LedgerServer(
        Settings(listen="127.0.0.1:0", database_url=database_url, metrics_listen="127.0.0.1:0")
    )
    server.start()
    client = Client.connect(f"127.0.0.1:{server.port}")
    try:
        yield server, client
    finally:
        client.channel.close()
        server.stop(grace_seconds=5)


def scrape(port: int) -> Samples:
    """The exposition parsed: (name, labels) → value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        found = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        assert found, line
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', found.group(2) or ""))
        samples[(found.group(1), labels)] = float(found.group(3))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_when(port: int, name: str, want: float, **labels: str) -> Samples:
    """A scrape once `name{labels}` reads `want`, within a few seconds: a call is counted as
    its handler ends, which may be just after its client has the reply."""
    deadline = time.monotonic() + 5
    while True:
        samples = scrape(port)
        if value(samples, name, **labels) == want or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


def test_calls_are_counted_by_method_and_code(observed: tuple[LedgerServer, Client]) -> None:
    server, client = observed
    market(client)  # 2 CreateCurrency, 2 UpsertContract
    for _ in range(3):
        client.query.GetFund(pb.GetFundRequest(currency=JPY))
    with pytest.raises(grpc.RpcError):
        client.query.GetFund(pb.GetFundRequest(currency="NOPE"))
    with pytest.raises(grpc.RpcError):
        client.query.GetFund(pb.GetFundRequest(currency="bad"))
    query = {"grpc_type": "unary", "grpc_service": "insurance.v1.Query", "grpc_method": "GetFund"}
    samples = scrape_when(server.metrics_port, "grpc_server_handling_seconds_count", 5, **query)
    assert value(samples, "grpc_server_started_total", **query) == 5
    assert value(samples, "grpc_server_handled_total", **query, grpc_code="OK") == 3
    assert value(samples, "grpc_server_handled_total", **query, grpc_code="NOT_FOUND") == 1
    assert value(samples, "grpc_server_handled_total", **query, grpc_code="INVALID_ARGUMENT") == 1
    assert value(samples, "grpc_server_handling_seconds_count", **query) == 5
    assert value(samples, "grpc_server_handling_seconds_bucket", **query, le="+Inf") == 5
    admin = {
        "grpc_type": "unary",
        "grpc_service": "insurance.v1.Admin",
        "grpc_method": "CreateCurrency",
    }
    assert value(samples, "grpc_server_handled_total", **admin, grpc_code="OK") == 2


def test_ledger_metrics_follow_the_ledger(observed: tuple[LedgerServer, Client]) -> None:
    server, client = observed
    market(client)
    deposit(client, "d1", 7_000)
    deposit(client, "d2", 500, KRW)
    liquidate(client, "L1", "c1", -3_000)
    liquidate(client, "L2", "c1", 40)
    batch = pb.RecordLiquidationsRequest(
        liquidations=[
            pb.RecordLiquidationRequest(
                liquidation_id=f"B{k}",
                cycle_id="c2",
                symbol="XJPY",
                side=pb.SIDE_LONG,
                quantity="5",
                takeover_price="2",
                close_price="3",
            )
            for k in range(10)
        ]
    )
    assert all(o.code == 0 for o in client.clearing.RecordLiquidations(batch).outcomes)
    ids = np.arange(1, 2_001, dtype=np.uint64)
    summary = cs.close(
        client.channel, "c1", JPY, Positions(ids, ids % np.uint64(17), (ids * 3).astype(np.int64))
    )
    samples = scrape_when(server.metrics_port, "ledger_cycle_positions", 2_000, currency=JPY)
    for code in (JPY, KRW):
        fund = client.query.GetFund(pb.GetFundRequest(currency=code)).balance
        assert value(samples, "ledger_insurance_fund_balance", currency=code) == fund
    assert value(samples, "ledger_cycle_positions", currency=JPY) == 2_000
    assert value(samples, "ledger_cycle_participants", currency=JPY) == summary.participant_count
    assert value(samples, "ledger_cycle_close_seconds", currency=JPY) > 0
    assert ("ledger_cycle_positions", frozenset({("currency", KRW)})) not in samples
    # Every liquidation went through a writer transaction: 2 unary + 10 in a batch.
    assert value(samples, "ledger_liquidation_batch_size_sum") == 12
    assert 2 <= value(samples, "ledger_liquidation_batch_size_count") <= 3
    assert value(samples, "ledger_pending_liquidations") == 0
    assert value(samples, "ledger_cycle_streams_open") == 0  # the close has given its place back


def health(client: Client) -> int:
    stub = health_pb2_grpc.HealthStub(client.channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    status: int = reply.status
    return status


def wait_for(client: Client, status: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        seen = health(client)
        if seen == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"health stayed {seen}, expected {status}")


@pytest.mark.slow
def test_health_follows_the_database(tmp_path: Path) -> None:
    with private_cluster(tmp_path) as cluster:
        server = LedgerServer(Settings(listen="127.0.0.1:0", database_url=cluster.url))
        server.start()
        client = Client.connect(f"127.0.0.1:{server.port}")
        try:
            market(client)
            assert health(client) == health_pb2.HealthCheckResponse.SERVING
            cluster.stop()
            wait_for(client, health_pb2.HealthCheckResponse.NOT_SERVING, 15)
            with pytest.raises(grpc.RpcError) as refused:
                client.query.GetFund(pb.GetFundRequest(currency=JPY), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            cluster.start()
            wait_for(client, health_pb2.HealthCheckResponse.SERVING, 30)
            deposit(client, "after", 5)
            liquidate(client, "L-after", "c9", -7)
            assert client.query.GetFund(pb.GetFundRequest(currency=JPY)).balance == 5
        finally:
            client.channel.close()
            server.stop(grace_seconds=5)
