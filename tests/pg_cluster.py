"""A private PostgreSQL cluster for one test, from Debian's server binaries (as scripts/pg.sh).

`private_cluster(directory)` runs initdb into a new data directory, starts the server on a
port of its own (TCP on 127.0.0.1 only, no Unix socket), waits until it takes connections,
creates the `ledger` database, and yields a `PgCluster` whose stop/start/restart a test may
call as it likes; the cluster is always stopped, and its data directory removed, at the end.

As root, initdb and postgres run as the `postgres` user (through runuser), which cannot
enter pytest's temporary directories (mode 0700, owned by root): the data directory is then
made under the system's temporary directory, owned by `postgres`, with a symbolic link to it
in `directory`. The server's log is copied into `directory` (postgresql.log) when the cluster
is removed, so that it stays with the test's other logs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from tests.test_server_process import free_port

USER = "ledger"
PASSWORD = "ledger"
DATABASE = "ledger"
READY_SECONDS = 60
COMMAND_SECONDS = 120


def server_binaries() -> Path:
    """The newest /usr/lib/postgresql/*/bin holding initdb and pg_ctl."""
    found = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "pg_ctl").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql")
    return found[-1]


def _as_owner(command: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the postgres user then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.getuid() == 0 else command


class PgCluster:
    """One initialized data directory and its server on `port`."""

    def __init__(self, data: Path, port: int, bin_dir: Path) -> None:
        self.data = data
        self.port = port
        self.bin = bin_dir
        self.log = data / "server.log"  # written by the server, so inside its own directory

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the `ledger` database (what `ledger serve` takes)."""
        return f"postgresql+psycopg://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}"

    def conninfo(self, database: str = DATABASE) -> str:
        return (
            f"host=127.0.0.1 port={self.port} user={USER} password={PASSWORD} "
            f"dbname={database} connect_timeout=3"
        )

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = _as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), *args])
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=COMMAND_SECONDS, check=False
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
                f"\n--- server log ---\n{self.log_tail()}"
            )
        return done

    def initdb(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".pw", delete=False) as pwfile:
            pwfile.write(PASSWORD + "\n")
        try:
            os.chmod(pwfile.name, 0o644)
            command = _as_owner(
                [
                    str(self.bin / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    USER,
                    f"--pwfile={pwfile.name}",
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ]
            )
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=COMMAND_SECONDS, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"initdb failed:\n{done.stdout}{done.stderr}")
        finally:
            os.unlink(pwfile.name)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# tests/pg_cluster.py\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                "unix_socket_directories = ''\n"
                "max_connections = 200\n"
                "log_line_prefix = '%m [%p] '\n"
            )

    def start(self) -> None:
        """Start the server and wait until it answers a query."""
        self._pg_ctl("-l", str(self.log), "-w", "-t", str(READY_SECONDS), "start")
        self.wait_ready()

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "-w", "-t", str(READY_SECONDS), "stop")

    def restart(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "-l", str(self.log), "-w", "-t", str(READY_SECONDS), "restart")
        self.wait_ready()

    def running(self) -> bool:
        return self._pg_ctl("status", check=False).returncode == 0

    def wait_ready(self, timeout_s: float = READY_SECONDS) -> None:
        """pg_isready until it says yes, then a real connection and a query."""
        deadline = time.monotonic() + timeout_s
        isready = [
            str(self.bin / "pg_isready"),
            *["-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d", "postgres", "-t", "2"],
        ]
        last = ""
        while time.monotonic() < deadline:
            done = subprocess.run(isready, capture_output=True, text=True, timeout=30, check=False)
            if done.returncode == 0:
                try:
                    with psycopg.connect(self.conninfo("postgres")) as conn:
                        conn.execute("SELECT 1")
                    return
                except psycopg.Error as error:
                    last = str(error)
            else:
                last = done.stdout + done.stderr
            time.sleep(0.1)
        raise RuntimeError(
            f"PostgreSQL on port {self.port} not ready after {timeout_s}s: {last}\n"
            f"--- server log ---\n{self.log_tail()}"
        )

    def create_database(self, name: str = DATABASE) -> None:
        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as error:
            return f"(no server log: {error})"


def _data_directory(directory: Path) -> tuple[Path, Path | None]:
    """Where the cluster lives, and the directory to remove afterwards (None: inside
    `directory`, which pytest removes)."""
    if os.getuid() != 0:
        return directory / "pgdata", None
    outside = Path(tempfile.mkdtemp(prefix="ledger-test-pg-"))
    shutil.chown(outside, "postgres", "postgres")
    (directory / "pgdata").symlink_to(outside, target_is_directory=True)
    return outside, outside


@contextmanager
def private_cluster(directory: Path, start_attempts: int = 3) -> Iterator[PgCluster]:
    """A started cluster with a `ledger` database; stopped and removed on the way out."""
    directory.mkdir(parents=True, exist_ok=True)
    bin_dir = server_binaries()
    data, remove = _data_directory(directory)
    cluster: PgCluster | None = None
    try:
        for attempt in range(1, start_attempts + 1):
            # A free port may be taken by someone else before the server binds it: then
            # a new data directory on another port.
            if data.exists() and any(data.iterdir()):
                shutil.rmtree(data)
                data.mkdir()
                if remove is not None:
                    shutil.chown(data, "postgres", "postgres")
            cluster = PgCluster(data, free_port(), bin_dir)
            cluster.initdb()
            try:
                cluster.start()
                break
            except RuntimeError:
                if cluster.running():
                    cluster.stop("immediate")
                if attempt == start_attempts:
                    raise
        assert cluster is not None
        cluster.create_database()
        yield cluster
    finally:
        if cluster is not None:
            if cluster.running():
                try:
                    cluster.stop("fast")
                except (RuntimeError, subprocess.TimeoutExpired):
                    cluster.stop("immediate")
            with contextlib.suppress(OSError):
                shutil.copyfile(cluster.log, directory / "postgresql.log")
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True)
            with contextlib.suppress(OSError):
                (directory / "pgdata").unlink()
