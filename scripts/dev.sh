#!/usr/bin/env bash
# The two commands of the README:
#   scripts/dev.sh serve [ledger serve options]   install everything, serve on ./ledger.db
#   scripts/dev.sh test  [pytest options]         install everything, run every test
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${LEDGER_VENV:-$ROOT/.venv}

install() {
  if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # Builds the Rust extension in release mode (maturin) and installs the ledger package.
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
}

ensure_postgres() {
  if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
    if [[ $(id -u) -ne 0 ]]; then
      echo "PostgreSQL is needed for the tests: apt-get install postgresql" >&2
      exit 1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
  fi
  LEDGER_TEST_POSTGRES_URL=$(scripts/pg.sh start)
  export LEDGER_TEST_POSTGRES_URL
}

ensure_chromium() {
  # The dashboard's browser test drives Debian's chromium through its chromedriver.
  if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
    if [[ $(id -u) -ne 0 ]]; then
      echo "Chromium is needed for the tests: apt-get install chromium chromium-driver" >&2
      exit 1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null
  fi
}

case "${1:-}" in
  serve)
    shift
    install
    exec "$VENV/bin/ledger" serve "$@"
    ;;
  test)
    shift
    install
    ensure_postgres
    ensure_chromium
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/mypy"
    cargo fmt --check
    cargo clippy --locked -p rust_alloc --all-targets --features python -- -D warnings
    cargo test --locked -p rust_alloc --release --features python
    # The benchmark's load generator is a crate of its own (not in the workspace).
    cargo fmt --check --manifest-path bench/loadgen/Cargo.toml
    cargo clippy --locked --release --manifest-path bench/loadgen/Cargo.toml -- -D warnings
    "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh serve|test" >&2
    exit 2
    ;;
esac
