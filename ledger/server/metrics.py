"""Prometheus metrics (prometheus-client), served at /metrics on `--metrics-listen`.

The gRPC ones carry the grpc-prometheus names and labels (so existing dashboards and alerts
work), counted once for every call by the call interceptor: grpc_server_started_total,
grpc_server_handled_total{grpc_code} and the histogram grpc_server_handling_seconds. The
ledger's own: each currency's insurance fund balance (read from the ledger when scraped), the
last close per currency (seconds, positions, participants), the liquidation writer's batch
sizes and the liquidations waiting for it.

Each server has a registry of its own (a test process runs many servers); with `--workers N`
the worker k serves it on the metrics port + k.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler
from prometheus_client.registry import Collector

log = logging.getLogger("ledger.metrics")

# grpc-prometheus's buckets (seconds), and batch sizes up to a RecordLiquidations call.
HANDLING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 5000, 10000)


# A method's started counter, handling histogram, and handled counters by code.
_Children = tuple[Any, Any, dict[str, Any]]


class Metrics:
    """The server's metrics, and the HTTP server that serves them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            labels,
            registry=self.registry,
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*labels, "grpc_code"),
            registry=self.registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            labels,
            buckets=HANDLING_BUCKETS,
            registry=self.registry,
        )
        self.close_seconds = Gauge(
            "ledger_cycle_close_seconds",
            "Seconds the last CloseCycle of the currency took, from its first message.",
            ("currency",),
            registry=self.registry,
        )
        self.cycle_positions = Gauge(
            "ledger_cycle_positions",
            "Positions of the last closed cycle of the currency.",
            ("currency",),
            registry=self.registry,
        )
        self.cycle_participants = Gauge(
            "ledger_cycle_participants",
            "Participants of the last closed cycle of the currency.",
            ("currency",),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "ledger_liquidation_batch_size",
            "Liquidations in each transaction of the liquidation writer.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.pending = Gauge(
            "ledger_pending_liquidations",
            "Liquidations waiting for the writer, queued or being written.",
            registry=self.registry,
        )
        self.cycle_streams = Gauge(
            "ledger_cycle_streams_open",
            "CloseCycle/PreviewCycle streams open in this process (at most --streams-max).",
            registry=self.registry,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._by_method: dict[tuple[str, str], _Children] = {}

    # --- what the server reports ----------------------------------------------------------

    def call_started(self, method: str, grpc_type: str) -> None:
        self._children(method, grpc_type)[0].inc()

    def call_handled(self, method: str, grpc_type: str, code: str, seconds: float) -> None:
        _started, handling, handled = self._children(method, grpc_type)
        counter = handled.get(code)
        if counter is None:
            service, name = split_method(method)
            counter = handled[code] = self.handled.labels(grpc_type, service, name, code)
        counter.inc()
        handling.observe(seconds)

    def _children(self, method: str, grpc_type: str) -> _Children:
        """The method's labelled metrics, looked up once (labels() takes a lock and builds its
        key at every call: a tenth of what the interceptor costs a liquidation)."""
        children = self._by_method.get((method, grpc_type))
        if children is None:
            service, name = split_method(method)
            children = (
                self.started.labels(grpc_type, service, name),
                self.handling.labels(grpc_type, service, name),
                {},
            )
            self._by_method[(method, grpc_type)] = children
        return children

    def cycle_closed(
        self, currency: str, seconds: float, positions: int, participants: int
    ) -> None:
        self.close_seconds.labels(currency).set(seconds)
        self.cycle_positions.labels(currency).set(positions)
        self.cycle_participants.labels(currency).set(participants)

    def watch_pending(self, pending: Callable[[], int]) -> None:
        self.pending.set_function(lambda: float(pending()))

    def watch_cycle_streams(self, streams_open: Callable[[], int]) -> None:
        self.cycle_streams.set_function(lambda: float(streams_open()))

    def watch_funds(self, funds: Callable[[], list[tuple[str, int]]]) -> None:
        """The fund balances, read from the ledger at each scrape (never a stale copy)."""
        self.registry.register(_FundCollector(funds))

    # --- serving ---------------------------------------------------------------------------

    def serve(self, listen: str) -> int:
        """Serve /metrics on HOST:PORT from a thread; returns the port (0 picks a free one)."""
        host, _, port = listen.rpartition(":")
        app = make_wsgi_app(self.registry)
        server = ThreadingWSGIServer((host.strip("[]") or "0.0.0.0", int(port)), _SilentHandler)
        server.set_app(app)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="ledger-metrics", daemon=True
        )
        self._thread.start()
        bound: int = server.server_port
        log.info("metrics on %s:%d/metrics", host or "0.0.0.0", bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()


def split_method(method: str) -> tuple[str, str]:
    """'/insurance.v1.Query/GetFund' → ('insurance.v1.Query', 'GetFund')."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class _FundCollector(Collector):
    def __init__(self, funds: Callable[[], list[tuple[str, int]]]) -> None:
        self._funds = funds

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily(
            "ledger_insurance_fund_balance",
            "The insurance fund's balance of the currency, in minor units.",
            labels=("currency",),
        )
        try:
            for currency, balance in self._funds():
                family.add_metric((currency,), float(balance))
        except Exception:  # the database is away: the scrape still answers, without them
            log.warning("fund balances unavailable for /metrics", exc_info=True)
        yield family

    def describe(self) -> Iterator[Any]:
        return iter(())
