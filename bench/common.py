"""Shared by the benchmarks: fresh databases, a server subprocess, free ports, medians."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_admin_url() -> str:
    url = os.environ.get("LEDGER_TEST_POSTGRES_URL")
    if url:
        return url
    out = subprocess.run(
        [str(ROOT / "scripts" / "pg.sh"), "start"], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def fresh_database(backend: str) -> Iterator[str]:
    """A new empty database of the backend; removed afterwards."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp:
            yield f"sqlite:///{tmp}/ledger.db"
        return
    admin = postgres_admin_url()
    name = f"ledger_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_libpq(admin), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_libpq(admin), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def server_process(database_url: str, *extra: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`ledger serve` in its own process, as in production; yields (target, process)."""
    port = free_port()
    env = dict(os.environ, LEDGER_LOG_LEVEL="WARNING")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ledger.cli",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--database-url",
            database_url,
            *extra,
        ],
        env=env,
    )
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target)
        yield target, proc
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def wait_serving(target: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server at {target} did not start")
            time.sleep(0.1)


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a live process: its peak resident set size."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]
