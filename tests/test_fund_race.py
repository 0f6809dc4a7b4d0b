"""Many clients withdrawing from one insurance fund at once never drive it below zero.

Sixteen threads, each over its own channel, withdraw random amounts while the fund holds
less than they ask for in total. Proves, on SQLite and PostgreSQL: every withdrawal either
succeeds or fails with FAILED_PRECONDITION; the final balance is the deposits minus the
successful withdrawals and is not negative; replayed in entry order the fund's balance never
dips below zero; and the cached account balances equal those recomputed from the journal.
Also: clients racing with one transfer_id post it once.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from ledger.api.v1 import insurance_pb2 as pb
from ledger.server.app import LedgerServer
from tests.conftest import Client
from tests.ledger_db import balances_from_journal, cached_balances
from tests.test_admin import DEPOSIT, WITHDRAW, transfer, usd

THREADS = 16
WITHDRAWALS_PER_THREAD = 20
DEPOSIT_TOTAL = 250_000  # about half of what the threads ask for in total
WITHDRAWAL_MAX = 3_000


def withdraw_many(port: int, worker: int, start: threading.Barrier) -> list[tuple[int, bool]]:
    """One client's withdrawals: (amount, succeeded) each."""
    rng = random.Random(worker)
    client = Client.connect(f"127.0.0.1:{port}")
    outcomes = []
    try:
        start.wait()
        for n in range(WITHDRAWALS_PER_THREAD):
            amount = rng.randint(1, WITHDRAWAL_MAX)
            try:
                transfer(client, f"w-{worker}-{n}", WITHDRAW, amount)
                outcomes.append((amount, True))
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
                outcomes.append((amount, False))
    finally:
        client.channel.close()
    return outcomes


def test_concurrent_withdrawals_never_overdraw_the_fund(
    server: LedgerServer, client: Client, database_url: str
) -> None:
    usd(client)
    transfer(client, "seed-1", DEPOSIT, DEPOSIT_TOTAL - 1)
    transfer(client, "seed-2", DEPOSIT, 1)
    start = threading.Barrier(THREADS)
    with ThreadPoolExecutor(THREADS) as pool:
        runs = [pool.submit(withdraw_many, server.port, w, start) for w in range(THREADS)]
        outcomes = [o for run in runs for o in run.result(timeout=120)]

    withdrawn = sum(amount for amount, ok in outcomes if ok)
    failed = sum(1 for _, ok in outcomes if not ok)
    assert len(outcomes) == THREADS * WITHDRAWALS_PER_THREAD
    assert failed > 0, "the race never ran the fund dry; ask for more"
    assert withdrawn > DEPOSIT_TOTAL - WITHDRAWAL_MAX, "the fund was not drained"

    fund = client.query.GetFund(pb.GetFundRequest(currency="USD"))
    assert fund.balance == DEPOSIT_TOTAL - withdrawn >= 0
    assert (fund.inflow_total, fund.outflow_total) == (DEPOSIT_TOTAL, withdrawn)

    # Entry ids are taken under the same lock as the balance moves: replayed in id order,
    # the fund never goes below zero.
    balance = 0
    token = ""
    entries: list[pb.Entry] = []
    while True:
        page = client.query.ListEntries(
            pb.ListEntriesRequest(
                currency="USD", account="insurance_fund", page_size=1000, page_token=token
            )
        )
        entries.extend(page.entries)
        token = page.next_page_token
        if not token:
            break
    for entry in reversed(entries):
        balance += next(p.amount for p in entry.postings if p.account == "insurance_fund")
        assert balance >= 0, entry
    assert balance == fund.balance
    assert len(entries) == 2 + len(outcomes) - failed

    journal = balances_from_journal(database_url)
    cached = cached_balances(database_url)
    assert {k: v for k, v in cached.items() if v} == {k: v for k, v in journal.items() if v}
    assert cached[("USD", "insurance_fund")] == fund.balance


def test_concurrent_repeats_of_one_transfer_post_it_once(
    server: LedgerServer, client: Client, database_url: str
) -> None:
    """Clients racing with the same transfer_id: the same request always gets the one entry;
    other content under that id gets ALREADY_EXISTS."""
    usd(client)
    start = threading.Barrier(THREADS)

    def send(worker: int) -> pb.Entry | grpc.StatusCode:
        own = Client.connect(f"127.0.0.1:{server.port}")
        try:
            start.wait()
            amount = 500 if worker % 4 else 501  # every fourth client sends other content
            return transfer(own, "same-id", DEPOSIT, amount)
        except grpc.RpcError as error:
            return error.code()
        finally:
            own.channel.close()

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(send, range(THREADS)))

    entries = [r for r in results if isinstance(r, pb.Entry)]
    codes = [r for r in results if not isinstance(r, pb.Entry)]
    assert entries, "no client got the transfer through"
    assert all(e == entries[0] for e in entries)
    winner = entries[0].postings[1].amount
    assert len(entries) == (THREADS * 3 // 4 if winner == 500 else THREADS // 4)
    assert set(codes) == {grpc.StatusCode.ALREADY_EXISTS}
    fund = client.query.GetFund(pb.GetFundRequest(currency="USD"))
    assert (fund.balance, fund.inflow_total) == (winner, winner)
    assert balances_from_journal(database_url)[("USD", "insurance_fund")] == winner
