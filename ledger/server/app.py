"""Assemble and run the gRPC server: services, health, reflection, limits, graceful stop."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ledger import liquidation
from ledger.api.v1 import insurance_pb2 as pb
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc
from ledger.db.migrate import upgrade
from ledger.db.session import Database
from ledger.group_commit import GroupCommitter
from ledger.limits import (
    CYCLE_POSITIONS_MAX_DEFAULT,
    MESSAGE_BYTES_MAX,
    SERVER_THREADS_DEFAULT,
    SHUTDOWN_GRACE_SECONDS,
)
from ledger.liquidation import LiquidationRequest, LiquidationResult
from ledger.server.admin import AdminService
from ledger.server.clearing import ClearingService
from ledger.server.interceptors import CallInterceptor
from ledger.server.query import QueryService

log = logging.getLogger("ledger.server")

SERVICE_NAMES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    database_url: str = ""
    threads: int = SERVER_THREADS_DEFAULT
    cycle_positions_max: int = CYCLE_POSITIONS_MAX_DEFAULT
    # Off: one transaction per RecordLiquidation call (the benchmark's comparison).
    group_commit: bool = True


class LedgerServer:
    """A started server; `stop()` lets in-flight calls finish."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database = Database(settings.database_url, pool_size=settings.threads)
        try:
            upgrade(self.database)
        except BaseException:
            self.database.dispose()
            raise
        self._health = health.HealthServicer()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=settings.threads, thread_name_prefix="ledger-rpc"
            ),
            interceptors=[CallInterceptor()],
            options=[
                ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
                ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_AdminServicer_to_server(AdminService(self.database), self._server)
        self._liquidations: GroupCommitter[LiquidationRequest, LiquidationResult] = GroupCommitter(
            self.database,
            liquidation.record_batch,
            enabled=settings.group_commit,
            name="liquidation-writer",
        )
        pb_grpc.add_ClearingServicer_to_server(ClearingService(self._liquidations), self._server)
        pb_grpc.add_QueryServicer_to_server(QueryService(self.database), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.port = self._server.add_insecure_port(settings.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.listen}")

    def start(self) -> None:
        self._server.start()
        for name in (*SERVICE_NAMES, ""):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on port %d, database %s", self.port, self.database.backend)

    def stop(self, grace_seconds: float = SHUTDOWN_GRACE_SECONDS) -> None:
        self._health.enter_graceful_shutdown()
        self._server.stop(grace_seconds).wait()
        self._liquidations.close()
        self.database.dispose()

    def wait(self) -> None:
        self._server.wait_for_termination()


def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then finish in-flight calls and return 0."""
    server = LedgerServer(settings)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    print(f"ledger listening on port {server.port}", flush=True)
    stopping.wait()
    server.stop()
    log.info("stopped")
    return 0
