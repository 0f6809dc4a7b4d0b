"""The `ledger` console script."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ledger.db.session import default_database_url
from ledger.group_commit import BATCH_REQUESTS_MAX
from ledger.server.app import Settings, serve


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
        "--threads", type=int, default=int(os.environ.get("LEDGER_THREADS", "32"))
    )
    serve_cmd.add_argument(
        "--cycle-positions-max",
        type=int,
        default=int(os.environ.get("LEDGER_CYCLE_POSITIONS_MAX", "50000000")),
        help="positions a cycle close may stream before RESOURCE_EXHAUSTED",
    )
    serve_cmd.add_argument(
        "--group-commit",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("LEDGER_GROUP_COMMIT", "1") not in ("0", "false", "no"),
        help="gather concurrent liquidations into one transaction (env LEDGER_GROUP_COMMIT)",
    )
    serve_cmd.add_argument(
        "--batch-max",
        type=int,
        default=int(os.environ.get("LEDGER_BATCH_MAX", str(BATCH_REQUESTS_MAX))),
        help="liquidations one group commit transaction takes at most; 1 gives each call its "
        f"own transaction (env LEDGER_BATCH_MAX; default {BATCH_REQUESTS_MAX})",
    )
    serve_cmd.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("LEDGER_WORKERS", "1")),
        help="server processes sharing the port (env LEDGER_WORKERS; default 1)",
    )
    args = parser.parse_args(argv)
    if args.batch_max < 1:
        parser.error(f"--batch-max must be at least 1 (got {args.batch_max})")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1 (got {args.workers})")
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
        group_commit=args.group_commit,
        batch_max=args.batch_max,
        workers=args.workers,
    )
    return serve(settings)


if __name__ == "__main__":
    raise SystemExit(main())
