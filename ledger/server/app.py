"""Assemble and run the gRPC server: services, health, reflection, limits, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent import futures
from dataclasses import dataclass, replace
from types import FrameType
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from ledger import currency, fund, statement
from ledger.api.v1 import insurance_pb2 as pb
from ledger.db.migrate import upgrade
from ledger.db.session import (
    LOCK_TIMEOUT_SECONDS_DEFAULT,
    STATEMENT_TIMEOUT_SECONDS_DEFAULT,
    Checkpointer,
    Database,
)
from ledger.group_commit import GroupCommitter
from ledger.limits import (
    BATCH_ITEMS_MAX_DEFAULT,
    CLIENT_PING_INTERVAL_SECONDS_MIN,
    CONNECTION_AGE_GRACE_SECONDS,
    CONNECTION_AGE_SECONDS_DEFAULT,
    CONNECTION_IDLE_SECONDS,
    CYCLE_POSITIONS_MAX_DEFAULT,
    CYCLE_STREAMS_MAX_DEFAULT,
    KEEPALIVE_SECONDS_DEFAULT,
    KEEPALIVE_TIMEOUT_SECONDS,
    MESSAGE_BYTES_MAX,
    PENDING_LIQUIDATIONS_MAX_DEFAULT,
    SERVER_THREADS_DEFAULT,
    SHUTDOWN_GRACE_SECONDS,
    STREAM_IDLE_SECONDS_DEFAULT,
)
from ledger.server import auth, heap
from ledger.server.admin import AdminService
from ledger.server.clearing import ClearingService, Committer
from ledger.server.cycles import CycleService
from ledger.server.dashboard import Dashboard, channel_credentials, check_listen, dial_target
from ledger.server.health import DatabaseHealth
from ledger.server.interceptors import CallInterceptor
from ledger.server.liquidation_writer import WriterProcess, WriterSettings
from ledger.server.metrics import Metrics
from ledger.server.query import QueryService

log = logging.getLogger("ledger.server")

_T = TypeVar("_T")

SERVICE_NAMES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    database_url: str = ""
    threads: int = SERVER_THREADS_DEFAULT
    cycle_positions_max: int = CYCLE_POSITIONS_MAX_DEFAULT
    # Liquidations one writer transaction takes at most (a larger RecordLiquidations: alone).
    batch_max: int = BATCH_ITEMS_MAX_DEFAULT
    # Liquidations waiting for the writer, per process, before calls are refused.
    pending_max: int = PENDING_LIQUIDATIONS_MAX_DEFAULT
    # CloseCycle/PreviewCycle streams open at once, and how long one may stay silent.
    streams_max: int = CYCLE_STREAMS_MAX_DEFAULT
    stream_idle_s: float = STREAM_IDLE_SECONDS_DEFAULT
    lock_timeout_s: float = LOCK_TIMEOUT_SECONDS_DEFAULT
    statement_timeout_s: float = STATEMENT_TIMEOUT_SECONDS_DEFAULT
    max_connection_age_s: float = CONNECTION_AGE_SECONDS_DEFAULT
    keepalive_s: float = KEEPALIVE_SECONDS_DEFAULT
    # Server processes sharing the port; each has its own pool, writer and GIL.
    workers: int = 1
    # Who may call what (ledger.server.auth): the TOML file of tokens and certificate CNs;
    # "" lets every caller have every role, and then only loopback may be listened on,
    # unless `insecure` accepts another address.
    auth_file: str = ""
    insecure: bool = False
    # PEM files: the server's certificate and key (TLS), and the CA that must have signed
    # every client's certificate (mutual TLS).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # HOST:PORT serving Prometheus metrics at /metrics ("": none).
    metrics_listen: str = ""
    # HOST:PORT serving the read-only dashboard and its JSON ("": none).
    http_listen: str = ""


def security_of(settings: Settings) -> auth.Security:
    """The settings' auth file and TLS files, loaded and checked, and the dashboard's
    address checked by the same rule as the gRPC port's (auth.StartupError)."""
    security = auth.security(
        listen=settings.listen,
        auth_file=settings.auth_file,
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
        tls_client_ca=settings.tls_client_ca,
        insecure=settings.insecure,
    )
    check_listen(settings.http_listen, security, insecure=settings.insecure)
    return security


class LedgerServer:
    """A started server; `stop()` lets in-flight calls finish.

    One grpc.aio server serves every service on the port, on an event loop of its own
    thread; blocking handlers (database sessions, the Rust allocator) run on a pool of
    `threads`, and liquidations go through the process's queue (GroupCommitter) to its
    one writer (WriterProcess). The methods here are called from any other thread.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        reuse_port: bool = False,
        security: auth.Security | None = None,
    ) -> None:
        self.settings = settings
        # Before the database is touched: a server that may not start changes nothing.
        self.security = security_of(settings) if security is None else security
        self._auth = (
            None
            if self.security.auth is None
            else auth.AuthInterceptor(
                self.security.auth, client_certificates=self.security.client_certificates
            )
        )
        self.database = Database(
            settings.database_url,
            pool_size=settings.threads,
            lock_timeout_s=settings.lock_timeout_s,
            statement_timeout_s=settings.statement_timeout_s,
        )
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
        self._committer: Committer | None = None
        self._writer: WriterProcess | None = None
        self._checkpointer = Checkpointer(self.database) if self.database.is_sqlite else None
        self.metrics = Metrics()
        self.metrics_port = 0
        self._reuse_port = reuse_port
        self._dashboard: Dashboard | None = None
        self.http_port = 0
        self._health_watch: DatabaseHealth | None = None
        self._keeper = statement.Keeper(self.database)
        try:
            self._writer = WriterProcess(
                WriterSettings(
                    settings.database_url,
                    settings.lock_timeout_s,
                    settings.statement_timeout_s,
                    logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                    settings.batch_max,
                )
            )
            self._committer = GroupCommitter(
                self._writer,
                pending_max=settings.pending_max,
                batch_max=settings.batch_max,
                on_batch=self.metrics.batch_size.observe,
            )
            self.metrics.watch_pending(self.pending_liquidations)
            self.metrics.watch_funds(lambda: fund.balances(self.database))
            self._cycles = CycleService(
                self.database,
                settings.cycle_positions_max,
                settings.streams_max,
                on_close=self.metrics.cycle_closed,
                keeper=self._keeper,
            )
            cycles = self._cycles
            self.metrics.watch_cycle_streams(lambda: cycles.streams_open)
            self._cycles.recover()
            self._health, self._server, self.port = self._on_loop(
                self._build(self._committer, reuse_port)
            )
        except BaseException:
            self._close()
            raise

    async def _build(
        self, committer: Committer, reuse_port: bool
    ) -> tuple[HealthServicer, grpc.aio.Server, int]:
        """Made on the loop, which grpc.aio binds the server to."""
        settings = self.settings
        # The call log first, the auth check innermost: refusals are logged like any call.
        interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = [
            CallInterceptor(self._pool, stream_idle_s=settings.stream_idle_s, metrics=self.metrics)
        ]
        if self._auth is not None:
            interceptors.append(self._auth)
        server = grpc.aio.server(
            interceptors=interceptors,
            options=server_options(settings, reuse_port),
        )
        admin = AdminService(self.database)
        clearing = ClearingService(committer)
        cycles = self._cycles
        query = QueryService(self.database, self._keeper)
        server.add_generic_rpc_handlers(
            (
                service_handler("Admin", admin),
                service_handler(
                    "Clearing",
                    clearing,
                    overrides={"CloseCycle": cycles.close, "PreviewCycle": cycles.preview},
                    raw_requests={
                        "CloseCycle",
                        "PreviewCycle",
                        "RecordLiquidation",
                        "RecordLiquidations",
                    },
                    raw_responses={"RecordLiquidation", "RecordLiquidations"},
                ),
                service_handler("Query", query, raw_responses={"StreamAllocations"}),
            )
        )
        health_servicer = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        credentials = self.security.credentials
        if credentials is None:
            port = server.add_insecure_port(settings.listen)
        else:
            port = server.add_secure_port(settings.listen, credentials)
        if port == 0:
            raise OSError(f"cannot listen on {settings.listen}")
        self._health_watch = DatabaseHealth(
            self.database, health_servicer, SERVICE_NAMES, self._pool
        )
        return health_servicer, server, port

    def pending_liquidations(self) -> int:
        """Liquidations queued or being written, not yet answered."""
        return 0 if self._committer is None else self._committer.pending_items

    def writer_pid(self) -> int | None:
        """The liquidation writer process's pid (operators' tools, tests)."""
        return None if self._writer is None else self._writer.pid

    def _on_loop(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def start(self) -> None:
        self._on_loop(self._start())
        if self.settings.metrics_listen:
            self.metrics_port = self.metrics.serve(self.settings.metrics_listen)
        if self.settings.http_listen:
            self._start_dashboard()
        log.info("serving on port %d, database %s", self.port, self.database.backend)

    def _start_dashboard(self) -> None:
        """The dashboard calls this server's gRPC port like any client, with its TLS."""
        settings = self.settings
        self._dashboard = Dashboard(
            dial_target(settings.listen, self.port),
            channel_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca),
            require_token=self.security.auth is not None,
            known_currencies=self._currencies,
        )
        self.http_port = self._dashboard.serve(settings.http_listen, reuse_port=self._reuse_port)

    def _currencies(self) -> list[tuple[str, int]]:
        with self.database.read() as session:
            return [(view.code, view.scale) for view in currency.list_currencies(session)]

    async def _start(self) -> None:
        await self._server.start()
        for name in (*SERVICE_NAMES, ""):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self._health_watch is not None:
            self._health_task = asyncio.get_running_loop().create_task(self._health_watch.run())

    def stop(self, grace_seconds: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop taking calls and let those in flight finish (the writer answers every
        liquidation queued), within the grace."""
        # The dashboard first: its requests in flight still find the gRPC server up.
        if self._dashboard is not None:
            self._dashboard.close()
        if self._health_watch is not None:
            self._loop.call_soon_threadsafe(self._health_watch.stop)
        self._on_loop(self._health.enter_graceful_shutdown())
        self._on_loop(self._server.stop(grace_seconds))
        self._close()

    def _close(self) -> None:
        if self._dashboard is not None:
            self._dashboard.close()  # a no-op after stop() closed it
        self.metrics.close()
        if self._committer is not None:
            self._committer.close()  # answers everything queued, then stops the writer
        elif self._writer is not None:
            self._on_loop(self._writer.aclose())
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._pool.shutdown(wait=True)  # blocking handlers still running finish first
        self._keeper.close()  # the inputs of the closes it answered
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join()
        self._loop.close()
        self.database.dispose()

    def wait(self) -> None:
        self._on_loop(self._server.wait_for_termination())

    def reload_auth(self) -> bool:
        """Read the auth file again (SIGHUP); False, and the old one kept, if it is malformed
        or there is none."""
        if self._auth is None:
            log.warning("no auth file to reload (the server was started without --auth-file)")
            return False
        return self._auth.reload()


def server_options(settings: Settings, reuse_port: bool) -> list[tuple[str, int]]:
    """grpc core's channel arguments of the server: message limits, keepalive, and a maximum
    connection age so that clients reconnect and spread over processes and hosts."""

    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    return [
        ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
        ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.keepalive_time_ms", ms(settings.keepalive_s)),
        ("grpc.keepalive_timeout_ms", ms(KEEPALIVE_TIMEOUT_SECONDS)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", ms(CLIENT_PING_INTERVAL_SECONDS_MIN)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", ms(CONNECTION_IDLE_SECONDS)),
        ("grpc.max_connection_age_ms", ms(settings.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(CONNECTION_AGE_GRACE_SECONDS)),
    ]


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


# How often the main thread looks up from waiting for the stop signal.
SIGNAL_POLL_SECONDS = 0.25


class StopRequest:
    """Set by the SIGTERM/SIGINT handler, read by the main thread. A plain flag, not a
    threading.Event: a handler runs on the main thread between two bytecodes, and if that
    thread is inside Event.wait it holds the Event's lock there, so the handler's Event.set
    waits for a lock its own thread holds and the process never stops (seen in CI: a
    SIGTERM that a worker of `--workers 2` never acted on)."""

    def __init__(self) -> None:
        self._requested = False

    def set(self) -> None:
        self._requested = True

    def is_set(self) -> bool:
        return self._requested


def wait_for_stop(stopping: StopRequest) -> None:
    """Wait until a signal handler sets `stopping`, waking now and then. Python runs signal
    handlers on the main thread only when it runs bytecode, and a process's signal may be
    delivered to any of its threads (grpc's, rayon's): a main thread blocked in one untimed
    wait is then never woken to run the handler (seen in CI: a SIGTERM that never stopped
    the server). Sleeping holds no lock a handler could need."""
    while not stopping.is_set():
        time.sleep(SIGNAL_POLL_SECONDS)


def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then finish in-flight calls and return 0.

    With `workers` > 1, that many server processes share the port (SO_REUSEPORT, the
    multiprocessing pattern grpcio recommends, since one Python process serves calls on one
    core at a time); this process migrates the database, starts them, forwards the stop
    signal and returns 0 once every one has stopped cleanly.
    """
    stopping = StopRequest()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        # Checked here first, so that a malformed auth file or an unsafe address stops the
        # start with a message before any worker or database is touched.
        security = security_of(settings)
    except auth.StartupError as error:
        print(f"ledger: cannot start: {error}", file=sys.stderr, flush=True)
        return 2
    if settings.workers > 1:
        return _serve_workers(settings, stopping, security)
    reload = _Reloader()
    signal.signal(signal.SIGHUP, reload.on_signal)
    server = LedgerServer(settings, security=security)
    reload.attach(server)
    server.start()
    heap.settle()
    print(f"ledger listening on port {server.port} ({server.security.note()})", flush=True)
    wait_for_stop(stopping)
    server.stop()
    log.info("stopped")
    return 0


class _Reloader:
    """SIGHUP: reload the auth file. A SIGHUP that comes while the server is still being
    built (its default action would end the process) is applied once it is."""

    def __init__(self) -> None:
        self._server: LedgerServer | None = None
        self._pending = False

    def on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        log.info("received SIGHUP, reloading the auth file")
        if self._server is None:
            self._pending = True
        else:
            self._server.reload_auth()

    def attach(self, server: LedgerServer) -> None:
        self._server = server
        if self._pending:
            self._pending = False
            server.reload_auth()


def _serve_workers(settings: Settings, stopping: StopRequest, security: auth.Security) -> int:
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
        context.Process(
            target=_worker, args=(_worker_settings(shared, n), ready), name=f"ledger-worker-{n}"
        )
        for n in range(settings.workers)
    ]

    def forward_hup(_signum: int, _frame: FrameType | None) -> None:
        log.info("received SIGHUP, asking every worker to reload the auth file")
        for worker in workers:
            if worker.pid is not None and worker.exitcode is None:
                os.kill(worker.pid, signal.SIGHUP)

    # A worker inherits an ignored SIGHUP until it has its own handler (else SIGHUP's default
    # would end it); it reads the auth file after that, so it misses no change.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for worker in workers:
        worker.start()
    signal.signal(signal.SIGHUP, forward_hup)
    started = 0
    while started < len(workers) and not stopping.is_set():
        try:
            ready.get(timeout=0.2)
            started += 1
        except queue.Empty:
            if any(w.exitcode not in (None, 0) for w in workers):
                stopping.set()
    if started == len(workers):
        print(
            f"ledger listening on port {port} ({len(workers)} workers; {security.note()})",
            flush=True,
        )
    wait_for_stop(stopping)
    for worker in workers:
        if worker.pid is not None and worker.exitcode is None:
            os.kill(worker.pid, signal.SIGTERM)
    for worker in workers:
        worker.join()
    log.info("stopped")
    return 0 if all(w.exitcode == 0 for w in workers) else 1


def _worker_settings(shared: Settings, n: int) -> Settings:
    """Worker n's settings: its metrics (if any) on the metrics port + n."""
    if not shared.metrics_listen:
        return shared
    host, _, port = shared.metrics_listen.rpartition(":")
    return replace(shared, metrics_listen=f"{host}:{int(port) + n}")


def _worker(settings: Settings, ready: Any) -> None:
    """One server process of several on one port."""
    logging.basicConfig(
        level=os.environ.get("LEDGER_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s %(message)s",
    )
    stopping = StopRequest()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    reload = _Reloader()
    signal.signal(signal.SIGHUP, reload.on_signal)
    server = LedgerServer(settings, reuse_port=True)
    reload.attach(server)
    server.start()
    heap.settle()
    ready.put(os.getpid())
    wait_for_stop(stopping)
    server.stop()
