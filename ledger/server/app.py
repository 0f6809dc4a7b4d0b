"""Assemble and run the gRPC server: services, health, reflection, limits, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import signal
import socket
import threading
from collections.abc import Callable, Coroutine
from concurrent import futures
from dataclasses import dataclass, replace
from types import FrameType
from typing import Any, TypeVar

import grpc
import grpc.aio
import psycopg
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy.engine import make_url

from ledger import liquidation
from ledger._alloc import FrontEnd
from ledger.api.v1 import insurance_pb2 as pb
from ledger.db.migrate import upgrade
from ledger.db.session import Database, SqliteWriter
from ledger.group_commit import BATCH_REQUESTS_MAX, BatchWriter, run_alone
from ledger.limits import (
    CYCLE_POSITIONS_MAX_DEFAULT,
    MESSAGE_BYTES_MAX,
    SERVER_THREADS_DEFAULT,
    SHUTDOWN_GRACE_SECONDS,
)
from ledger.liquidation import LiquidationRequest, LiquidationResult
from ledger.server.admin import AdminService
from ledger.server.clearing import RECORD_LIQUIDATION, ClearingService, RecordBatches
from ledger.server.cycles import CycleService
from ledger.server.interceptors import CallInterceptor
from ledger.server.query import QueryService

log = logging.getLogger("ledger.server")

_T = TypeVar("_T")

_LOOPBACK_ANY_PORT = "127.0.0.1:0"  # grpc.aio behind the front end
WRITER_CONNECT_TIMEOUT_SECONDS = 10

SERVICE_NAMES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    database_url: str = ""
    threads: int = SERVER_THREADS_DEFAULT
    cycle_positions_max: int = CYCLE_POSITIONS_MAX_DEFAULT
    # Off: one transaction per RecordLiquidation call (the benchmark's comparison).
    group_commit: bool = True
    # Liquidations one group commit transaction takes at most (1: a transaction per call).
    batch_max: int = BATCH_REQUESTS_MAX
    # Server processes sharing the port; each has its own pool, writer and GIL.
    workers: int = 1


class LedgerServer:
    """A started server; `stop()` lets in-flight calls finish.

    With group commit (the default) the listening port is the front end's (rust_alloc's
    front.rs): it answers RecordLiquidation by handing the calls queued meanwhile to one
    writer thread as a batch (RecordBatches), and forwards every other call to grpc.aio on a
    loopback port. grpc.aio runs on an event loop of its own thread and its blocking handlers
    on a pool of `threads`. Without group commit grpc.aio listens on the port itself. The
    methods here are called from any other thread.
    """

    def __init__(self, settings: Settings, *, reuse_port: bool = False) -> None:
        self.settings = settings
        self.database = Database(settings.database_url, pool_size=settings.threads)
        try:
            upgrade(self.database)
        except BaseException:
            self.database.dispose()
            raise
        self._pool = futures.ThreadPoolExecutor(
            max_workers=settings.threads, thread_name_prefix="ledger-rpc"
        )
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="ledger-grpc", daemon=True
        )
        self._loop_thread.start()
        self._writer: BatchWriter[LiquidationRequest, LiquidationResult] | None = None
        self._front: FrontEnd | None = None
        try:
            listen = _LOOPBACK_ANY_PORT if settings.group_commit else settings.listen
            self._health, self._server, self.port = self._on_loop(
                self._build(listen, reuse_port and not settings.group_commit)
            )
            if settings.group_commit:
                self._writer = self._batch_writer()
                self._front = FrontEnd(
                    settings.listen,
                    self.port,
                    RECORD_LIQUIDATION,
                    RecordBatches(self._writer),
                    batch_max=settings.batch_max,
                    reuse_port=reuse_port,
                )
                self.port = self._front.port
        except BaseException:
            self._close()
            raise

    def _batch_writer(self) -> BatchWriter[LiquidationRequest, LiquidationResult]:
        """The group commit writer's own connection: a raw psycopg connection on PostgreSQL,
        a raw sqlite3 connection behind the write gate on SQLite."""
        database = self.database
        if database.is_sqlite:
            return BatchWriter(lambda: SqliteWriter(database), liquidation.record_batch_sqlite)
        url = make_url(database.url).set(drivername="postgresql")
        params = conninfo_to_dict(url.render_as_string(hide_password=False))
        # Custom plans only: the driver prepares the batch's statements, and a generic plan
        # made while `liquidations` was small (a fresh database, before autoanalyze) scans the
        # whole table for earlier uses of the ids, every batch, as the table grows; measured,
        # half the throughput. A custom plan sees the table's current size. Added to the
        # URL's own options (a search_path, say), not in their place.
        params["options"] = " ".join(
            filter(None, [str(params.get("options", "")), "-c plan_cache_mode=force_custom_plan"])
        )
        params.setdefault("connect_timeout", WRITER_CONNECT_TIMEOUT_SECONDS)
        conninfo = make_conninfo("", **params)
        return BatchWriter(lambda: psycopg.connect(conninfo), liquidation.record_batch_postgres)

    async def _build(
        self, listen: str, reuse_port: bool
    ) -> tuple[HealthServicer, grpc.aio.Server, int]:
        """Made on the loop, which grpc.aio binds the server to."""
        settings = self.settings
        server = grpc.aio.server(
            interceptors=[CallInterceptor(self._pool)],
            options=[
                ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
                ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
                ("grpc.so_reuseport", 1 if reuse_port else 0),
            ],
        )
        admin = AdminService(self.database)
        clearing = ClearingService(self._record_liquidation)
        cycles = CycleService(self.database, settings.cycle_positions_max)
        query = QueryService(self.database)
        server.add_generic_rpc_handlers(
            (
                service_handler("Admin", admin),
                service_handler(
                    "Clearing",
                    clearing,
                    overrides={"CloseCycle": cycles.close, "PreviewCycle": cycles.preview},
                    raw_requests={"CloseCycle", "PreviewCycle"},
                ),
                service_handler("Query", query, raw_responses={"StreamAllocations"}),
            )
        )
        health_servicer = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        port = server.add_insecure_port(listen)
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
        return health_servicer, server, port

    async def _record_liquidation(self, request: LiquidationRequest) -> LiquidationResult:
        """One transaction per call, on a thread of the pool: RecordLiquidation without
        group commit (the benchmark's comparison)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, run_alone, self.database, liquidation.record_batch, request
        )

    def _on_loop(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def start(self) -> None:
        self._on_loop(self._start())
        if self._front is not None:
            self._front.start()
        log.info("serving on port %d, database %s", self.port, self.database.backend)

    async def _start(self) -> None:
        await self._server.start()
        for name in (*SERVICE_NAMES, ""):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace_seconds: float = SHUTDOWN_GRACE_SECONDS) -> None:
        self._on_loop(self._health.enter_graceful_shutdown())
        if self._front is not None:  # its calls in flight, forwarded ones too, finish first
            self._front.stop(grace_seconds)
        self._on_loop(self._server.stop(grace_seconds))
        self._close()

    def _close(self) -> None:
        if self._front is not None:
            self._front.stop(0)
        if self._writer is not None:
            self._writer.close()
        self._pool.shutdown(wait=True)  # blocking handlers still running finish first
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join()
        self._loop.close()
        self.database.dispose()

    def wait(self) -> None:
        self._on_loop(self._server.wait_for_termination())


def service_handler(
    name: str,
    servicer: object,
    *,
    overrides: dict[str, Callable[..., Any]] | None = None,
    raw_requests: frozenset[str] | set[str] = frozenset(),
    raw_responses: frozenset[str] | set[str] = frozenset(),
) -> grpc.GenericRpcHandler[Any, Any]:
    """The handlers of one insurance.v1 service, built from its descriptor.

    Methods named in raw_requests get each request message as bytes (no deserializer);
    those in raw_responses yield already-serialized bytes (no serializer): the hot paths
    whose messages are decoded and encoded in Rust.
    """
    service = pb.DESCRIPTOR.services_by_name[name]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        behavior = (overrides or {}).get(method.name) or getattr(servicer, method.name)
        request_class = message_class(method.input_type.name)
        response_class = message_class(method.output_type.name)
        deserializer = None if method.name in raw_requests else request_class.FromString
        serializer = None if method.name in raw_responses else response_class.SerializeToString
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            behavior, request_deserializer=deserializer, response_serializer=serializer
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def message_class(name: str) -> Any:
    return getattr(pb, name)


def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then finish in-flight calls and return 0.

    With `workers` > 1, that many server processes share the port (SO_REUSEPORT, the
    multiprocessing pattern grpcio recommends, since one Python process serves calls on one
    core at a time); this process migrates the database, starts them, forwards the stop
    signal and returns 0 once every one has stopped cleanly.
    """
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if settings.workers > 1:
        return _serve_workers(settings, stopping)
    server = LedgerServer(settings)
    server.start()
    print(f"ledger listening on port {server.port}", flush=True)
    stopping.wait()
    server.stop()
    log.info("stopped")
    return 0


def _serve_workers(settings: Settings, stopping: threading.Event) -> int:
    database = Database(settings.database_url, pool_size=1)
    try:
        upgrade(database)
    finally:
        database.dispose()
    host, _, port = settings.listen.rpartition(":")
    if int(port) == 0:  # every worker must bind the same port
        with socket.socket() as probe:
            probe.bind((host.strip("[]") or "127.0.0.1", 0))
            port = str(probe.getsockname()[1])
    shared = replace(settings, listen=f"{host}:{port}", workers=1)
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    workers = [
        context.Process(target=_worker, args=(shared, ready), name=f"ledger-worker-{n}")
        for n in range(settings.workers)
    ]
    for worker in workers:
        worker.start()
    started = 0
    while started < len(workers) and not stopping.is_set():
        try:
            ready.get(timeout=0.2)
            started += 1
        except queue.Empty:
            if any(w.exitcode not in (None, 0) for w in workers):
                stopping.set()
    if started == len(workers):
        print(f"ledger listening on port {port} ({len(workers)} workers)", flush=True)
    stopping.wait()
    for worker in workers:
        if worker.pid is not None and worker.exitcode is None:
            os.kill(worker.pid, signal.SIGTERM)
    for worker in workers:
        worker.join()
    log.info("stopped")
    return 0 if all(w.exitcode == 0 for w in workers) else 1


def _worker(settings: Settings, ready: Any) -> None:
    """One server process of several on one port."""
    logging.basicConfig(
        level=os.environ.get("LEDGER_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s %(message)s",
    )
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    server = LedgerServer(settings, reuse_port=True)
    server.start()
    ready.put(os.getpid())
    stopping.wait()
    server.stop()
