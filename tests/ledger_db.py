"""Direct looks at the database behind a server, for "nothing was written" and invariants.

These read the tables with plain SQL, independently of the service's own read paths.
"""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import create_engine, text

TABLES = (
    "currencies",
    "accounts",
    "policies",
    "contracts",
    "entries",
    "transfers",
    "liquidations",
    "cycles",
    "allocations",
    "cycle_reversals",
    "allocation_reversals",
)


def snapshot(database_url: str) -> dict[str, object]:
    """Row counts of every table and every account's totals: equal snapshots = no write."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            counts = {
                t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES
            }
            accounts = conn.execute(
                text(
                    "SELECT currency, name, balance, credit_total, debit_total FROM accounts "
                    "ORDER BY currency, name"
                )
            ).all()
            policies = conn.execute(
                text("SELECT currency, version, insurance_share, coverage_ratio FROM policies")
            ).all()
            contracts = conn.execute(
                text("SELECT symbol, margin_currency, kind, multiplier FROM contracts")
            ).all()
    finally:
        engine.dispose()
    return {
        "counts": counts,
        "accounts": [tuple(r) for r in accounts],
        "policies": sorted(tuple(r) for r in policies),
        "contracts": sorted(tuple(r) for r in contracts),
    }


def balances_from_journal(database_url: str) -> dict[tuple[str, str], int]:
    """Every account's balance recomputed from the raw journal rows (entries, allocations and
    their reversals)."""
    engine = create_engine(database_url)
    totals: defaultdict[tuple[str, str], int] = defaultdict(int)
    try:
        with engine.connect() as conn:
            for currency, debit, credit, amount in conn.execute(
                text("SELECT currency, debit_account, credit_account, amount FROM entries")
            ):
                totals[(currency, debit)] -= amount
                totals[(currency, credit)] += amount
            for currency, account_id, amount in conn.execute(
                text(
                    "SELECT c.currency, a.account_id, a.amount FROM allocations a "
                    "JOIN cycles c ON c.id = a.cycle_pk"
                )
            ):
                user = f"user:{account_id + (1 << 64) if account_id < 0 else account_id}"
                totals[(currency, user)] -= amount
                totals[(currency, "system_loss")] += amount
            for currency, account_id, amount in conn.execute(
                text(
                    "SELECT c.currency, a.account_id, a.amount FROM allocation_reversals a "
                    "JOIN cycle_reversals c ON c.cycle_pk = a.cycle_pk"
                )
            ):
                user = f"user:{account_id + (1 << 64) if account_id < 0 else account_id}"
                totals[(currency, user)] += amount
                totals[(currency, "system_loss")] -= amount
    finally:
        engine.dispose()
    return dict(totals)


def cached_balances(database_url: str) -> dict[tuple[str, str], int]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT currency, name, balance FROM accounts")).all()
    finally:
        engine.dispose()
    return {(c, n): b for c, n, b in rows}
