"""Health that means something: NOT_SERVING while the database is unreachable.

A task on the event loop asks the database for `SELECT 1` every HEALTH_INTERVAL_SECONDS
(on a thread of the pool, with a short timeout) and sets every service's status in the
standard grpc.health.v1 servicer from the answer: a load balancer or an orchestrator then
stops sending calls to a server that can only answer UNAVAILABLE, and sends them again once
the database is back, without a restart of the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from concurrent.futures import Executor

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from sqlalchemy import text

from ledger.db.session import Database

log = logging.getLogger("ledger.health")

HEALTH_INTERVAL_SECONDS = 1.0
PING_TIMEOUT_SECONDS = 3.0

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class DatabaseHealth:
    """Watches the database; `run()` is the task, until `stop()`."""

    def __init__(
        self,
        database: Database,
        servicer: HealthServicer,
        services: Sequence[str],
        pool: Executor,
        interval_s: float = HEALTH_INTERVAL_SECONDS,
    ) -> None:
        self._database = database
        self._servicer = servicer
        self._services = (*services, "")  # "": the server as a whole
        self._pool = pool
        self._interval_s = interval_s
        self._serving: bool | None = None
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                reachable = await asyncio.wait_for(
                    loop.run_in_executor(self._pool, self._ping), PING_TIMEOUT_SECONDS
                )
            except (TimeoutError, RuntimeError):  # a stuck database; a pool shutting down
                reachable = False
            await self._set(reachable)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)

    def stop(self) -> None:
        self._stopping.set()

    def _ping(self) -> bool:
        try:
            with self._database.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except Exception as error:
            if self._serving is not False:
                log.warning("the database is unreachable: %s", error)
            return False

    async def _set(self, reachable: bool) -> None:
        if reachable == self._serving or self._stopping.is_set():
            return
        if self._serving is not None:
            log.warning("the database is %s", "back: serving" if reachable else "gone: NOT_SERVING")
        self._serving = reachable
        for name in self._services:
            await self._servicer.set(name, SERVING if reachable else NOT_SERVING)
