"""`ledger serve`: run the gRPC server, from flags or LEDGER_* environment variables.

A module of its own, loaded only when `serve` is asked for (or listed in the help): its
defaults come from the server's modules, whose imports (SQLAlchemy, psycopg) would otherwise
slow every client command down by half a second.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from ledger.db.session import (
    LOCK_TIMEOUT_SECONDS_DEFAULT,
    STATEMENT_TIMEOUT_SECONDS_DEFAULT,
    default_database_url,
)
from ledger.limits import (
    BATCH_ITEMS_MAX_DEFAULT,
    CONNECTION_AGE_SECONDS_DEFAULT,
    CYCLE_POSITIONS_MAX_DEFAULT,
    CYCLE_STREAMS_MAX_DEFAULT,
    KEEPALIVE_SECONDS_DEFAULT,
    PENDING_LIQUIDATIONS_MAX_DEFAULT,
    STREAM_IDLE_SECONDS_DEFAULT,
)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="markdown")

# The limits checked before anything starts, in this order; the messages are the ones the
# argparse version gave (scripts and tests read them).
AT_LEAST_ONE = ("batch_max", "pending_max", "streams_max", "workers", "threads")
POSITIVE_SECONDS = (
    "stream_idle_seconds",
    "lock_timeout_seconds",
    "statement_timeout_seconds",
    "max_connection_age_seconds",
    "keepalive_seconds",
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _integer(text: str) -> int:
    """An integer flag's value; the message quotes what was given."""
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an integer") from None


def _seconds(text: str) -> float:
    """A duration flag's value in seconds; the message quotes what was given."""
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number of seconds") from None


def _refuse(message: str) -> None:
    """A usage error as argparse wrote it (exit code 2, the message on stderr), plain text
    so that no terminal width can wrap it."""
    print(f"usage: ledger serve [OPTIONS]\nledger serve: error: {message}", file=sys.stderr)
    raise typer.Exit(2)


@app.command(
    "serve", help="Run the gRPC server (SIGTERM or SIGINT: finish in-flight calls, exit 0)."
)
def serve(
    listen: Annotated[
        str, typer.Option("--listen", envvar="LEDGER_LISTEN", help="HOST:PORT to listen on")
    ] = "127.0.0.1:50051",
    database_url: Annotated[
        str,
        typer.Option(
            "--database-url",
            envvar="LEDGER_DATABASE_URL",
            help="sqlite:///path or postgresql+psycopg://…",
            show_default="a SQLite file ledger.db in the working directory",
        ),
    ] = "",
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            parser=_integer,
            envvar="LEDGER_THREADS",
            help="threads for the blocking handlers",
        ),
    ] = 32,
    cycle_positions_max: Annotated[
        int,
        typer.Option(
            "--cycle-positions-max",
            parser=_integer,
            envvar="LEDGER_CYCLE_POSITIONS_MAX",
            help="positions a cycle close may stream before RESOURCE_EXHAUSTED",
        ),
    ] = CYCLE_POSITIONS_MAX_DEFAULT,
    batch_max: Annotated[
        int,
        typer.Option(
            "--batch-max",
            parser=_integer,
            envvar="LEDGER_BATCH_MAX",
            help="liquidations one writer transaction takes at most; 1 gives each call its own",
        ),
    ] = BATCH_ITEMS_MAX_DEFAULT,
    pending_max: Annotated[
        int,
        typer.Option(
            "--pending-max",
            parser=_integer,
            envvar="LEDGER_PENDING_MAX",
            help="liquidations that may wait for the writer per process; beyond it calls get "
            "RESOURCE_EXHAUSTED",
        ),
    ] = PENDING_LIQUIDATIONS_MAX_DEFAULT,
    streams_max: Annotated[
        int,
        typer.Option(
            "--streams-max",
            parser=_integer,
            envvar="LEDGER_STREAMS_MAX",
            help="CloseCycle/PreviewCycle streams open at once per process",
        ),
    ] = CYCLE_STREAMS_MAX_DEFAULT,
    stream_idle_seconds: Annotated[
        float,
        typer.Option(
            "--stream-idle-seconds",
            parser=_seconds,
            envvar="LEDGER_STREAM_IDLE_SECONDS",
            help="a cycle stream silent this long is ended with DEADLINE_EXCEEDED",
        ),
    ] = STREAM_IDLE_SECONDS_DEFAULT,
    lock_timeout_seconds: Annotated[
        float,
        typer.Option(
            "--lock-timeout-seconds",
            parser=_seconds,
            envvar="LEDGER_LOCK_TIMEOUT_SECONDS",
            help="how long a database session waits for a lock",
        ),
    ] = LOCK_TIMEOUT_SECONDS_DEFAULT,
    statement_timeout_seconds: Annotated[
        float,
        typer.Option(
            "--statement-timeout-seconds",
            parser=_seconds,
            envvar="LEDGER_STATEMENT_TIMEOUT_SECONDS",
            help="how long one statement of the liquidation writer may run",
        ),
    ] = STATEMENT_TIMEOUT_SECONDS_DEFAULT,
    max_connection_age_seconds: Annotated[
        float,
        typer.Option(
            "--max-connection-age-seconds",
            parser=_seconds,
            envvar="LEDGER_MAX_CONNECTION_AGE_SECONDS",
            help="clients are asked to reconnect after this long, so that they spread over "
            "processes and hosts",
        ),
    ] = CONNECTION_AGE_SECONDS_DEFAULT,
    keepalive_seconds: Annotated[
        float,
        typer.Option(
            "--keepalive-seconds",
            parser=_seconds,
            envvar="LEDGER_KEEPALIVE_SECONDS",
            help="the server pings an idle connection this often",
        ),
    ] = KEEPALIVE_SECONDS_DEFAULT,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            parser=_integer,
            envvar="LEDGER_WORKERS",
            help="server processes sharing the port (SO_REUSEPORT), for hosts with more cores",
        ),
    ] = 1,
    auth_file: Annotated[
        str,
        typer.Option(
            "--auth-file",
            envvar="LEDGER_AUTH_FILE",
            help="TOML file of the callers' token hashes and certificate names, each with a "
            "role (admin, clearing, reader); SIGHUP reloads it. Without one every caller has "
            "every role and only loopback may be listened on (README, Operations)",
            show_default=False,
        ),
    ] = "",
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="without --auth-file, listen on a non-loopback address anyway: every caller "
            "that reaches the port may then move the fund, post liquidations and close cycles",
        ),
    ] = False,
    tls_cert: Annotated[
        str,
        typer.Option(
            "--tls-cert",
            envvar="LEDGER_TLS_CERT",
            help="the server's certificate chain (PEM): serve TLS",
            show_default=False,
        ),
    ] = "",
    tls_key: Annotated[
        str,
        typer.Option(
            "--tls-key",
            envvar="LEDGER_TLS_KEY",
            help="the private key of --tls-cert (PEM)",
            show_default=False,
        ),
    ] = "",
    tls_client_ca: Annotated[
        str,
        typer.Option(
            "--tls-client-ca",
            envvar="LEDGER_TLS_CLIENT_CA",
            help="CA certificates (PEM) one of which must have signed each client's "
            "certificate (mutual TLS); a client certificate's CN listed in the auth file "
            "carries its role",
            show_default=False,
        ),
    ] = "",
    metrics_listen: Annotated[
        str,
        typer.Option(
            "--metrics-listen",
            envvar="LEDGER_METRICS_LISTEN",
            help="HOST:PORT to serve Prometheus metrics at /metrics; with --workers N, worker "
            "k serves on PORT + k",
            show_default=False,
        ),
    ] = "",
    http_listen: Annotated[
        str,
        typer.Option(
            "--http-listen",
            envvar="LEDGER_HTTP_LISTEN",
            help="HOST:PORT to serve the read-only dashboard and its JSON API",
            show_default=False,
        ),
    ] = "",
) -> None:
    values = locals()
    for name in AT_LEAST_ONE:
        if values[name] < 1:
            _refuse(f"{_flag(name)} must be at least 1 (got {values[name]})")
    for name in POSITIVE_SECONDS:
        if not values[name] > 0:
            _refuse(f"{_flag(name)} must be greater than 0 (got {values[name]})")
    logging.basicConfig(
        level=os.environ.get("LEDGER_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    from ledger.server.app import Settings
    from ledger.server.app import serve as run

    settings = Settings(
        listen=listen,
        database_url=database_url or default_database_url(),
        threads=threads,
        cycle_positions_max=cycle_positions_max,
        batch_max=batch_max,
        pending_max=pending_max,
        streams_max=streams_max,
        stream_idle_s=stream_idle_seconds,
        lock_timeout_s=lock_timeout_seconds,
        statement_timeout_s=statement_timeout_seconds,
        max_connection_age_s=max_connection_age_seconds,
        keepalive_s=keepalive_seconds,
        workers=workers,
        auth_file=auth_file,
        insecure=insecure,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        metrics_listen=metrics_listen,
        http_listen=http_listen,
    )
    raise typer.Exit(run(settings))
