#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests and benchmarks, from Debian's packages.
#   scripts/pg.sh start   → prints the database URL (postgresql+psycopg://…) on stdout
#   scripts/pg.sh stop
# Data lives in $LEDGER_PG_DIR (default /tmp/ledger-pg); port $LEDGER_PG_PORT (default 54329).
set -euo pipefail

PG_DIR=${LEDGER_PG_DIR:-/tmp/ledger-pg}
PG_PORT=${LEDGER_PG_PORT:-54329}
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [[ -z "$PG_BIN" ]]; then
  echo "PostgreSQL server binaries not found: apt-get install postgresql" >&2
  exit 1
fi

as_owner() {
  # initdb and postgres refuse to run as root; run them as the postgres user then.
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

url="postgresql+psycopg://ledger:ledger@127.0.0.1:${PG_PORT}/ledger"

case "${1:-}" in
  start)
    if [[ ! -f "$PG_DIR/PG_VERSION" ]]; then
      mkdir -p "$PG_DIR"
      [[ $(id -u) -eq 0 ]] && chown postgres:postgres "$PG_DIR"
      pwfile=$(mktemp)
      echo ledger > "$pwfile"
      chmod 644 "$pwfile"
      as_owner "$PG_BIN/initdb" -D "$PG_DIR" -U ledger --pwfile="$pwfile" \
        --auth=scram-sha-256 -E UTF8 >/dev/null
      rm -f "$pwfile"
      cat >> "$PG_DIR/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = ${PG_PORT}
unix_socket_directories = '${PG_DIR}'
max_connections = 400
shared_buffers = 512MB
max_wal_size = 4GB
CONF
    fi
    if ! as_owner "$PG_BIN/pg_ctl" -D "$PG_DIR" status >/dev/null 2>&1; then
      as_owner "$PG_BIN/pg_ctl" -D "$PG_DIR" -l "$PG_DIR/server.log" -w start >/dev/null
    fi
    PGPASSWORD=ledger "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U ledger -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = 'ledger'" | grep -q 1 ||
      PGPASSWORD=ledger "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U ledger -d postgres \
        -qc "CREATE DATABASE ledger"
    echo "$url"
    ;;
  stop)
    as_owner "$PG_BIN/pg_ctl" -D "$PG_DIR" -m fast stop >/dev/null 2>&1 || true
    ;;
  *)
    echo "usage: scripts/pg.sh start|stop" >&2
    exit 2
    ;;
esac
