"""The `ledger` console script."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ledger.db.session import (
    LOCK_TIMEOUT_SECONDS_DEFAULT,
    STATEMENT_TIMEOUT_SECONDS_DEFAULT,
    default_database_url,
)
from ledger.limits import (
    BATCH_ITEMS_MAX_DEFAULT,
    CONNECTION_AGE_SECONDS_DEFAULT,
    CYCLE_STREAMS_MAX_DEFAULT,
    KEEPALIVE_SECONDS_DEFAULT,
    PENDING_LIQUIDATIONS_MAX_DEFAULT,
    STREAM_IDLE_SECONDS_DEFAULT,
)
from ledger.server.app import Settings, serve


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ledger", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the gRPC server")
    serve_cmd.add_argument(
        "--listen",
        default=os.environ.get("LEDGER_LISTEN", "127.0.0.1:50051"),
        help="HOST:PORT to listen on (env LEDGER_LISTEN; default 127.0.0.1:50051)",
    )
    serve_cmd.add_argument(
        "--database-url",
        default=os.environ.get("LEDGER_DATABASE_URL") or default_database_url(),
        help="sqlite:///path or postgresql+psycopg://… (env LEDGER_DATABASE_URL; "
        "default a SQLite file ledger.db in the working directory)",
    )
    serve_cmd.add_argument(
        "--threads",
        type=int,
        default=_env_int("LEDGER_THREADS", 32),
        help="threads for the blocking handlers (env LEDGER_THREADS; default 32)",
    )
    serve_cmd.add_argument(
        "--cycle-positions-max",
        type=int,
        default=int(os.environ.get("LEDGER_CYCLE_POSITIONS_MAX", "50000000")),
        help="positions a cycle close may stream before RESOURCE_EXHAUSTED",
    )
    serve_cmd.add_argument(
        "--batch-max",
        type=int,
        default=_env_int("LEDGER_BATCH_MAX", BATCH_ITEMS_MAX_DEFAULT),
        help="liquidations one writer transaction takes at most; 1 gives each call its own "
        f"(env LEDGER_BATCH_MAX; default {BATCH_ITEMS_MAX_DEFAULT})",
    )
    serve_cmd.add_argument(
        "--pending-max",
        type=int,
        default=_env_int("LEDGER_PENDING_MAX", PENDING_LIQUIDATIONS_MAX_DEFAULT),
        help="liquidations that may wait for the writer per process; beyond it calls get "
        f"RESOURCE_EXHAUSTED (env LEDGER_PENDING_MAX; default {PENDING_LIQUIDATIONS_MAX_DEFAULT})",
    )
    serve_cmd.add_argument(
        "--streams-max",
        type=int,
        default=_env_int("LEDGER_STREAMS_MAX", CYCLE_STREAMS_MAX_DEFAULT),
        help="CloseCycle/PreviewCycle streams open at once per process "
        f"(env LEDGER_STREAMS_MAX; default {CYCLE_STREAMS_MAX_DEFAULT})",
    )
    serve_cmd.add_argument(
        "--stream-idle-seconds",
        type=float,
        default=_env_float("LEDGER_STREAM_IDLE_SECONDS", STREAM_IDLE_SECONDS_DEFAULT),
        help="a cycle stream silent this long is ended with DEADLINE_EXCEEDED "
        f"(default {STREAM_IDLE_SECONDS_DEFAULT:g})",
    )
    serve_cmd.add_argument(
        "--lock-timeout-seconds",
        type=float,
        default=_env_float("LEDGER_LOCK_TIMEOUT_SECONDS", LOCK_TIMEOUT_SECONDS_DEFAULT),
        help="how long a database session waits for a lock "
        f"(default {LOCK_TIMEOUT_SECONDS_DEFAULT:g})",
    )
    serve_cmd.add_argument(
        "--statement-timeout-seconds",
        type=float,
        default=_env_float("LEDGER_STATEMENT_TIMEOUT_SECONDS", STATEMENT_TIMEOUT_SECONDS_DEFAULT),
        help="how long one statement of the liquidation writer may run "
        f"(default {STATEMENT_TIMEOUT_SECONDS_DEFAULT:g})",
    )
    serve_cmd.add_argument(
        "--max-connection-age-seconds",
        type=float,
        default=_env_float("LEDGER_MAX_CONNECTION_AGE_SECONDS", CONNECTION_AGE_SECONDS_DEFAULT),
        help="clients are asked to reconnect after this long, so that they spread over "
        f"processes and hosts (default {CONNECTION_AGE_SECONDS_DEFAULT:g})",
    )
    serve_cmd.add_argument(
        "--keepalive-seconds",
        type=float,
        default=_env_float("LEDGER_KEEPALIVE_SECONDS", KEEPALIVE_SECONDS_DEFAULT),
        help="the server pings an idle connection this often "
        f"(default {KEEPALIVE_SECONDS_DEFAULT:g})",
    )
    serve_cmd.add_argument(
        "--workers",
        type=int,
        default=_env_int("LEDGER_WORKERS", 1),
        help="server processes sharing the port (SO_REUSEPORT), for hosts with more cores "
        "(env LEDGER_WORKERS; default 1)",
    )
    serve_cmd.add_argument(
        "--auth-file",
        default=os.environ.get("LEDGER_AUTH_FILE", ""),
        help="TOML file of the callers' token hashes and certificate names, each with a role "
        "(admin, clearing, reader); SIGHUP reloads it. Without one every caller has every "
        "role and only loopback may be listened on (env LEDGER_AUTH_FILE; README, Operations)",
    )
    serve_cmd.add_argument(
        "--insecure",
        action="store_true",
        help="without --auth-file, listen on a non-loopback address anyway: every caller "
        "that reaches the port may then move the fund, post liquidations and close cycles",
    )
    serve_cmd.add_argument(
        "--tls-cert",
        default=os.environ.get("LEDGER_TLS_CERT", ""),
        help="the server's certificate chain (PEM): serve TLS (env LEDGER_TLS_CERT)",
    )
    serve_cmd.add_argument(
        "--tls-key",
        default=os.environ.get("LEDGER_TLS_KEY", ""),
        help="the private key of --tls-cert (PEM) (env LEDGER_TLS_KEY)",
    )
    serve_cmd.add_argument(
        "--tls-client-ca",
        default=os.environ.get("LEDGER_TLS_CLIENT_CA", ""),
        help="CA certificates (PEM) one of which must have signed each client's certificate "
        "(mutual TLS); a client certificate's CN listed in the auth file carries its role "
        "(env LEDGER_TLS_CLIENT_CA)",
    )
    serve_cmd.add_argument(
        "--metrics-listen",
        default=os.environ.get("LEDGER_METRICS_LISTEN", ""),
        help="HOST:PORT to serve Prometheus metrics at /metrics; with --workers N, worker k "
        "serves on PORT + k (env LEDGER_METRICS_LISTEN)",
    )
    args = parser.parse_args(argv)
    for name in ("batch_max", "pending_max", "streams_max", "workers", "threads"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be at least 1 (got {getattr(args, name)})")
    for name in (
        "stream_idle_seconds",
        "lock_timeout_seconds",
        "statement_timeout_seconds",
        "max_connection_age_seconds",
        "keepalive_seconds",
    ):
        if not getattr(args, name) > 0:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be greater than 0 (got {getattr(args, name)})")
    logging.basicConfig(
        level=os.environ.get("LEDGER_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    settings = Settings(
        listen=args.listen,
        database_url=args.database_url,
        threads=args.threads,
        cycle_positions_max=args.cycle_positions_max,
        batch_max=args.batch_max,
        pending_max=args.pending_max,
        streams_max=args.streams_max,
        stream_idle_s=args.stream_idle_seconds,
        lock_timeout_s=args.lock_timeout_seconds,
        statement_timeout_s=args.statement_timeout_seconds,
        max_connection_age_s=args.max_connection_age_seconds,
        keepalive_s=args.keepalive_seconds,
        workers=args.workers,
        auth_file=args.auth_file,
        insecure=args.insecure,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        metrics_listen=args.metrics_listen,
    )
    return serve(settings)


if __name__ == "__main__":
    raise SystemExit(main())
