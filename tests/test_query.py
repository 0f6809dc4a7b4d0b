"""insurance.v1.Query (GetFund, ListEntries) through a real server, on SQLite and PostgreSQL.

Proves that the fund's balance and totals follow the deposits and withdrawals made; that the
journal of an account reads back newest first, exactly as TransferFund returned each entry,
in pages that together hold every entry exactly once; that page sizes, kinds, accounts,
currencies and page tokens are validated with the listed status, naming field and value; and
that reading writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from ledger.api.v1 import insurance_pb2 as pb
from ledger.server.app import LedgerServer, Settings
from tests.conftest import BACKENDS, Client, fresh_database
from tests.ledger_db import snapshot
from tests.test_admin import (
    DEPOSIT,
    INVALID,
    NOT_FOUND,
    WITHDRAW,
    assert_rejected,
    row,
    transfer,
    usd,
)

ENTRIES_COUNT = 105  # more than the default page of 100


@dataclass
class Journal:
    """A server whose USD fund saw ENTRIES_COUNT transfers (and BTC a few of its own)."""

    client: Client
    database_url: str
    entries: list[pb.Entry]  # USD, oldest first, as TransferFund returned them

    def newest_first(self) -> list[pb.Entry]:
        return self.entries[::-1]


@pytest.fixture(scope="module", params=BACKENDS)
def journal(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Journal]:
    directory = tmp_path_factory.mktemp(f"journal-{request.param}")
    with fresh_database(request.param, directory) as url:
        server = LedgerServer(Settings(listen="127.0.0.1:0", database_url=url))
        server.start()
        client = Client.connect(f"127.0.0.1:{server.port}")
        try:
            usd(client)
            usd(client, "BTC", 8)
            entries = []
            for i in range(ENTRIES_COUNT):
                if i % 3 == 2:
                    entries.append(transfer(client, f"w-{i}", WITHDRAW, 50 + i))
                else:
                    entries.append(transfer(client, f"d-{i}", DEPOSIT, 100 + i, memo=f"#{i}"))
                if i % 20 == 0:  # another currency's entries interleave
                    transfer(client, f"btc-{i}", DEPOSIT, 7, currency="BTC")
            yield Journal(client, url, entries)
        finally:
            client.channel.close()
            server.stop(grace_seconds=1)


def list_entries(journal: Journal, **fields: Any) -> pb.ListEntriesResponse:
    request = pb.ListEntriesRequest(**{"currency": "USD", "account": "insurance_fund", **fields})
    return journal.client.query.ListEntries(request)  # type: ignore[no-any-return]


# --- GetFund ----------------------------------------------------------------------------------


def test_get_fund_follows_deposits_and_withdrawals(journal: Journal) -> None:
    inflow = sum(e.postings[1].amount for e in journal.entries if e.kind == 1)
    outflow = sum(e.postings[1].amount for e in journal.entries if e.kind == 2)
    fund = journal.client.query.GetFund(pb.GetFundRequest(currency="USD"))
    assert fund == pb.Fund(
        currency="USD", balance=inflow - outflow, inflow_total=inflow, outflow_total=outflow
    )
    btc = journal.client.query.GetFund(pb.GetFundRequest(currency="BTC"))
    assert btc == pb.Fund(currency="BTC", balance=42, inflow_total=42, outflow_total=0)


def test_get_fund_of_a_fresh_currency_is_zero(client: Client, database_url: str) -> None:
    usd(client, "EUR")
    transfer(client, "e-1", DEPOSIT, 500, currency="EUR")
    transfer(client, "e-2", WITHDRAW, 200, currency="EUR")
    transfer(client, "e-3", DEPOSIT, 30, currency="EUR")
    transfer(client, "e-4", WITHDRAW, 330, currency="EUR")
    fund = client.query.GetFund(pb.GetFundRequest(currency="EUR"))
    assert fund == pb.Fund(currency="EUR", balance=0, inflow_total=530, outflow_total=530)
    usd(client, "JPY", 0)
    fund = client.query.GetFund(pb.GetFundRequest(currency="JPY"))
    assert fund == pb.Fund(currency="JPY", balance=0, inflow_total=0, outflow_total=0)


@pytest.mark.parametrize(
    ("request_", "code", "value"),
    [
        pytest.param(pb.GetFundRequest(currency="EUR"), NOT_FOUND, "EUR", id="unknown"),
        pytest.param(pb.GetFundRequest(currency=""), INVALID, "currency", id="empty"),
        pytest.param(pb.GetFundRequest(currency="usd"), INVALID, "'usd'", id="lowercase"),
        pytest.param(pb.GetFundRequest(currency="U" * 17), INVALID, "U" * 17, id="too-long"),
    ],
)
def test_get_fund_rejects(
    journal: Journal, request_: pb.GetFundRequest, code: grpc.StatusCode, value: str
) -> None:
    assert_rejected(journal.database_url, journal.client.query.GetFund, request_, code, value)


# --- ListEntries ------------------------------------------------------------------------------


def test_list_entries_newest_first_as_posted(journal: Journal) -> None:
    before = snapshot(journal.database_url)
    page = list_entries(journal, page_size=1000)
    assert list(page.entries) == journal.newest_first()
    ids = [e.entry_id for e in page.entries]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    assert page.next_page_token == ""
    assert snapshot(journal.database_url) == before


def test_list_entries_default_page_is_100(journal: Journal) -> None:
    page = list_entries(journal)
    assert list(page.entries) == journal.newest_first()[:100]
    assert page.next_page_token != ""
    rest = list_entries(journal, page_token=page.next_page_token)
    assert list(rest.entries) == journal.newest_first()[100:]
    assert rest.next_page_token == ""


@pytest.mark.parametrize("page_size", [1, 7, 52, 104, 105, 106, 1000])
def test_list_entries_pages_walk_every_entry_once(journal: Journal, page_size: int) -> None:
    seen: list[pb.Entry] = []
    token = ""
    pages = 0
    while True:
        page = list_entries(journal, page_size=page_size, page_token=token)
        pages += 1
        assert 0 < len(page.entries) <= page_size
        seen.extend(page.entries)
        token = page.next_page_token
        if not token:
            break
        assert pages <= ENTRIES_COUNT, "pagination does not end"
    assert seen == journal.newest_first()
    assert pages == -(-ENTRIES_COUNT // page_size)


@pytest.mark.parametrize(
    ("kind", "expected_kinds"),
    [
        (pb.ENTRY_KIND_UNSPECIFIED, {pb.ENTRY_KIND_FUND_DEPOSIT, pb.ENTRY_KIND_FUND_WITHDRAWAL}),
        (pb.ENTRY_KIND_FUND_DEPOSIT, {pb.ENTRY_KIND_FUND_DEPOSIT}),
        (pb.ENTRY_KIND_FUND_WITHDRAWAL, {pb.ENTRY_KIND_FUND_WITHDRAWAL}),
        (pb.ENTRY_KIND_LIQUIDATION_PROFIT, set()),
        (pb.ENTRY_KIND_ALLOCATION, set()),
        (pb.ENTRY_KIND_UNCOVERED_LOSS, set()),
    ],
)
def test_list_entries_kind_filter(journal: Journal, kind: int, expected_kinds: set[int]) -> None:
    expected = [e for e in journal.newest_first() if e.kind in expected_kinds]
    seen: list[pb.Entry] = []
    token = ""
    while True:  # small pages, so the filter also holds across page boundaries
        page = list_entries(journal, kind=kind, page_size=10, page_token=token)
        seen.extend(page.entries)
        token = page.next_page_token
        if not token:
            break
    assert seen == expected


@pytest.mark.parametrize(
    ("account", "expected"),
    [
        ("insurance_fund", "all"),
        ("external", "all"),  # the other side of every transfer
        ("liquidation_engine", "none"),
        ("system_loss", "none"),
        ("uncovered_loss", "none"),
        ("user:42", "none"),
        ("user:0", "none"),
        ("user:18446744073709551615", "none"),
    ],
)
def test_list_entries_by_account(journal: Journal, account: str, expected: str) -> None:
    page = list_entries(journal, account=account, page_size=1000)
    assert list(page.entries) == (journal.newest_first() if expected == "all" else [])
    assert page.next_page_token == ""


def test_list_entries_keeps_currencies_apart(journal: Journal) -> None:
    page = list_entries(journal, currency="BTC", page_size=1000)
    assert [e.reference for e in page.entries] == [f"btc-{i}" for i in (100, 80, 60, 40, 20, 0)]
    assert all(e.currency == "BTC" for e in page.entries)


def entries_request(**fields: Any) -> pb.ListEntriesRequest:
    return pb.ListEntriesRequest(**{"currency": "USD", "account": "insurance_fund", **fields})


@pytest.mark.parametrize(
    ("request_", "field", "value"),
    [
        row(entries_request(page_size=1001), "page_size", "1001"),
        row(entries_request(page_size=2**32 - 1), "page_size", str(2**32 - 1)),
        row(entries_request(account="bogus"), "account", "'bogus'"),
        row(entries_request(account="user:abc"), "account", "'user:abc'"),
        row(entries_request(account=""), "account", "''"),
        row(entries_request(account="user:"), "account", "'user:'"),
        row(entries_request(account="user:-1"), "account", "'user:-1'"),
        row(entries_request(account="user:042"), "account", "'user:042'"),
        row(entries_request(account="user:18446744073709551616"), "account", "551616"),
        row(entries_request(account="USER:1"), "account", "'USER:1'"),
        row(entries_request(account="Insurance_Fund"), "account", "'Insurance_Fund'"),
        row(entries_request(account="insurance_fund "), "account", "'insurance_fund '"),
        row(entries_request(kind=99), "kind", "99"),
        row(entries_request(page_token="abc"), "page_token", "'abc'"),
        row(entries_request(page_token="-1"), "page_token", "'-1'"),
        row(entries_request(page_token="1.5"), "page_token", "'1.5'"),
        row(entries_request(page_token=" 5"), "page_token", "' 5'"),
        row(entries_request(page_token="9" * 20), "page_token", "9" * 20),
        row(entries_request(page_token="9" * 19), "page_token", "9" * 19),  # beyond int64
        row(entries_request(page_token="\u00b2"), "page_token", "'\u00b2'"),  # isdigit()
        row(entries_request(page_token="\u0662"), "page_token", "'\u0662'"),
        row(entries_request(currency=""), "currency", "''"),
        row(entries_request(currency="usd"), "currency", "'usd'"),
    ],
)
def test_list_entries_rejects(
    journal: Journal, request_: pb.ListEntriesRequest, field: str, value: str
) -> None:
    call = journal.client.query.ListEntries
    assert_rejected(journal.database_url, call, request_, INVALID, field, value)


def test_list_entries_unknown_currency_not_found(journal: Journal) -> None:
    call = journal.client.query.ListEntries
    request = entries_request(currency="EUR")
    assert_rejected(journal.database_url, call, request, NOT_FOUND, "EUR")
