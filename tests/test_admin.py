"""insurance.v1.Admin through a real server and channel, on SQLite and PostgreSQL.

Proves every rule of the Admin rows of the contract: each malformed or out-of-range field is
rejected with INVALID_ARGUMENT naming the field and the value, unknown currencies give
NOT_FOUND, reused ids with other content ALREADY_EXISTS and rules of the ledger's state
FAILED_PRECONDITION; every rejection leaves the database exactly as it was; repeats are
idempotent; and fund transfers post balanced entries with the documented postings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from ledger.api.v1 import insurance_pb2 as pb
from ledger.journal import SYSTEM_ACCOUNTS
from ledger.server.app import LedgerServer, Settings
from tests.conftest import BACKENDS, Client, fresh_database
from tests.ledger_db import snapshot

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXISTS = grpc.StatusCode.ALREADY_EXISTS
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

LINEAR = pb.CONTRACT_KIND_LINEAR
INVERSE = pb.CONTRACT_KIND_INVERSE
DEPOSIT = pb.TRANSFER_DIRECTION_DEPOSIT
WITHDRAW = pb.TRANSFER_DIRECTION_WITHDRAW
INT64_MAX = 2**63 - 1


@dataclass
class Shared:
    """One server per module and backend for the rows of rejection tables: a rejection
    writes nothing (each row proves it), so the rows cannot disturb each other. Rows that
    write use names of their own."""

    client: Client
    database_url: str


@pytest.fixture(scope="module", params=BACKENDS)
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Shared]:
    directory = tmp_path_factory.mktemp(f"shared-{request.param}")
    with fresh_database(request.param, directory) as url:
        server = LedgerServer(Settings(listen="127.0.0.1:0", database_url=url))
        server.start()
        client = Client.connect(f"127.0.0.1:{server.port}")
        try:
            usd(client)
            usd(client, "USDT", 6)
            usd(client, "BTC", 8)
            client.admin.UpsertContract(contract())
            transfer(client, "seed-usd", DEPOSIT, 1_000)
            transfer(client, "seed-btc", DEPOSIT, 1_000, currency="BTC")
            transfer(client, "t-1", DEPOSIT, 250, memo="ops ticket 7")
            yield Shared(client, url)
        finally:
            client.channel.close()
            server.stop(grace_seconds=1)


def assert_rejected(
    database_url: str,
    call: Callable[[Any], Any],
    request: Any,
    code: grpc.StatusCode,
    *named: str,
) -> grpc.RpcError:
    """The call fails with `code`, its message names every string in `named`, and the
    database is untouched."""
    before = snapshot(database_url)
    with pytest.raises(grpc.RpcError) as raised:
        call(request)
    error = raised.value
    details = error.details() or ""
    assert error.code() == code, details
    for text in named:
        assert text in details, (text, details)
    assert snapshot(database_url) == before
    return error


def row(request: Any, field: str, value: str) -> Any:
    """One row of a rejection table: the request, and the field and value the error names."""
    return pytest.param(request, field, value, id=f"{field}={value}"[:48])


def usd(client: Client, code: str = "USD", scale: int = 2) -> None:
    client.admin.CreateCurrency(pb.CreateCurrencyRequest(code=code, scale=scale))


def transfer(
    client: Client,
    transfer_id: str,
    direction: int,
    amount: int,
    currency: str = "USD",
    memo: str = "",
) -> pb.Entry:
    return client.admin.TransferFund(  # type: ignore[no-any-return]
        pb.TransferFundRequest(
            transfer_id=transfer_id,
            currency=currency,
            direction=direction,  # type: ignore[arg-type]
            amount=amount,
            memo=memo,
        )
    )


def contract(
    symbol: str = "BTCUSDT", currency: str = "USDT", kind: int = LINEAR, multiplier: str = "1"
) -> pb.UpsertContractRequest:
    return pb.UpsertContractRequest(
        symbol=symbol,
        margin_currency=currency,
        kind=kind,  # type: ignore[arg-type]
        multiplier=multiplier,
    )


def policy_request(
    share: str = "0.2", coverage: str = "0.9", currency: str = "USD"
) -> pb.SetPolicyRequest:
    return pb.SetPolicyRequest(currency=currency, insurance_share=share, coverage_ratio=coverage)


def transfer_request(**fields: Any) -> pb.TransferFundRequest:
    base: dict[str, Any] = {
        "transfer_id": "t-x",
        "currency": "USD",
        "direction": DEPOSIT,
        "amount": 10,
        "memo": "",
    }
    return pb.TransferFundRequest(**{**base, **fields})


# --- CreateCurrency / ListCurrencies ----------------------------------------------------------


@pytest.mark.parametrize(("code", "scale"), [("JPY", 0), ("X", 18), ("A" * 16, 18), ("1INCH", 4)])
def test_create_currency_accepts(shared: Shared, code: str, scale: int) -> None:
    request = pb.CreateCurrencyRequest(code=code, scale=scale)
    assert shared.client.admin.CreateCurrency(request) == pb.Currency(code=code, scale=scale)
    accounts = [a for a in snapshot(shared.database_url)["accounts"] if a[0] == code]  # type: ignore[attr-defined]
    assert accounts == [(code, name, 0, 0, 0) for name in sorted(SYSTEM_ACCOUNTS)]


def test_create_currency_repeat_returns_the_same_and_writes_nothing(shared: Shared) -> None:
    before = snapshot(shared.database_url)
    again = shared.client.admin.CreateCurrency(pb.CreateCurrencyRequest(code="USD", scale=2))
    assert again == pb.Currency(code="USD", scale=2)
    assert snapshot(shared.database_url) == before


@pytest.mark.parametrize("scale", [0, 3, 18])
def test_create_currency_with_another_scale_already_exists(shared: Shared, scale: int) -> None:
    request = pb.CreateCurrencyRequest(code="USD", scale=scale)
    assert_rejected(shared.database_url, shared.client.admin.CreateCurrency, request, EXISTS, "USD")


@pytest.mark.parametrize(
    ("request_", "field", "value"),
    [
        row(pb.CreateCurrencyRequest(code="", scale=2), "code", "''"),
        row(pb.CreateCurrencyRequest(code="eur", scale=2), "code", "'eur'"),
        row(pb.CreateCurrencyRequest(code="Eur", scale=2), "code", "'Eur'"),
        row(pb.CreateCurrencyRequest(code="A" * 17, scale=2), "code", "A" * 17),
        row(pb.CreateCurrencyRequest(code="EU-R", scale=2), "code", "'EU-R'"),
        row(pb.CreateCurrencyRequest(code="EU R", scale=2), "code", "'EU R'"),
        row(pb.CreateCurrencyRequest(code="ÉUR", scale=2), "code", "'ÉUR'"),
        row(pb.CreateCurrencyRequest(code="EUR", scale=19), "scale", "19"),
        row(pb.CreateCurrencyRequest(code="EUR", scale=2**32 - 1), "scale", str(2**32 - 1)),
    ],
)
def test_create_currency_rejects(
    shared: Shared, request_: pb.CreateCurrencyRequest, field: str, value: str
) -> None:
    call = shared.client.admin.CreateCurrency
    assert_rejected(shared.database_url, call, request_, INVALID, field, value)


def test_list_currencies_sorted_by_code(client: Client) -> None:
    assert client.admin.ListCurrencies(pb.ListCurrenciesRequest()).currencies == []
    for code, scale in [("USDT", 6), ("BTC", 8), ("ETH", 18), ("1INCH", 4), ("EUR", 2)]:
        usd(client, code, scale)
    listed = client.admin.ListCurrencies(pb.ListCurrenciesRequest()).currencies
    assert [(c.code, c.scale) for c in listed] == [
        ("1INCH", 4),
        ("BTC", 8),
        ("ETH", 18),
        ("EUR", 2),
        ("USDT", 6),
    ]


def test_create_currency_creates_accounts_and_default_policy(
    client: Client, database_url: str
) -> None:
    usd(client)
    state = snapshot(database_url)
    assert state["accounts"] == [("USD", name, 0, 0, 0) for name in sorted(SYSTEM_ACCOUNTS)]
    assert state["policies"] == [("USD", 1, "0.2", "0.9")]
    fund = client.query.GetFund(pb.GetFundRequest(currency="USD"))
    assert fund == pb.Fund(currency="USD", balance=0, inflow_total=0, outflow_total=0)
    # The default is version 1: setting the same ratios again keeps it.
    policy = client.admin.SetPolicy(
        pb.SetPolicyRequest(currency="USD", insurance_share="0.20", coverage_ratio="0.9")
    )
    assert policy == pb.Policy(
        currency="USD",
        insurance_share="0.2",
        coverage_ratio="0.9",
        version=1,
        ranking=pb.RANKING_POSITION,
    )
    assert client.admin.SetPolicy(policy_request("0.3", "0.9")).version == 2


# --- UpsertContract ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("symbol", "kind", "multiplier", "returned"),
    [
        ("LIN1", LINEAR, "1", "1"),
        ("LIN2", LINEAR, "0.001", "0.001"),
        ("LIN3", LINEAR, "0.0010", "0.001"),
        ("INV1", INVERSE, "100", "100"),
        ("INV2", INVERSE, "0.000000000000000001", "0.000000000000000001"),
        ("a-b_c.d/e:f", INVERSE, "10", "10"),
    ],
)
def test_upsert_contract_creates(
    shared: Shared, symbol: str, kind: int, multiplier: str, returned: str
) -> None:
    got = shared.client.admin.UpsertContract(contract(symbol, "USDT", kind, multiplier))
    assert got == pb.Contract(
        symbol=symbol,
        margin_currency="USDT",
        kind=kind,  # type: ignore[arg-type]
        multiplier=returned,
    )
    contracts = snapshot(shared.database_url)["contracts"]
    assert (symbol, "USDT", kind, returned) in contracts  # type: ignore[operator]


def test_upsert_contract_updates_kind_and_multiplier(shared: Shared) -> None:
    admin = shared.client.admin
    admin.UpsertContract(contract("ETHUSD", "BTC", LINEAR, "1"))
    updated = admin.UpsertContract(contract("ETHUSD", "BTC", INVERSE, "100"))
    assert (updated.kind, updated.multiplier) == (INVERSE, "100")
    contracts = snapshot(shared.database_url)["contracts"]
    assert [c for c in contracts if c[0] == "ETHUSD"] == [  # type: ignore[attr-defined]
        ("ETHUSD", "BTC", INVERSE, "100")
    ]
    # The same request again returns the same contract and changes nothing.
    before = snapshot(shared.database_url)
    assert admin.UpsertContract(contract("ETHUSD", "BTC", INVERSE, "100")) == updated
    assert snapshot(shared.database_url) == before


@pytest.mark.parametrize(
    ("request_", "field", "value"),
    [
        row(contract(kind=pb.CONTRACT_KIND_UNSPECIFIED), "kind", "0"),
        row(contract(kind=3), "kind", "3"),
        row(contract(multiplier="0"), "multiplier", "'0'"),
        row(contract(multiplier="0.000"), "multiplier", "'0.000'"),
        row(contract(multiplier="-1"), "multiplier", "'-1'"),
        row(contract(multiplier="+1"), "multiplier", "'+1'"),
        row(contract(multiplier="1e3"), "multiplier", "'1e3'"),
        row(contract(multiplier="1.0000000000000000001"), "multiplier", "'1.0000000000000000001'"),
        row(contract(multiplier=""), "multiplier", "''"),
        row(contract(multiplier=" 1"), "multiplier", "' 1'"),
        row(contract(multiplier="1."), "multiplier", "'1.'"),
        row(contract(multiplier=".5"), "multiplier", "'.5'"),
        row(contract(multiplier="NaN"), "multiplier", "'NaN'"),
        row(contract(multiplier="Infinity"), "multiplier", "'Infinity'"),
        row(contract(symbol=""), "symbol", "''"),
        row(contract(symbol="S" * 129), "symbol", "S" * 129),
        row(contract(currency="usdt"), "margin_currency", "'usdt'"),
        row(contract(currency=""), "margin_currency", "''"),
    ],
)
def test_upsert_contract_rejects(
    shared: Shared, request_: pb.UpsertContractRequest, field: str, value: str
) -> None:
    call = shared.client.admin.UpsertContract
    assert_rejected(shared.database_url, call, request_, INVALID, field, value)


@pytest.mark.parametrize("symbol", ["BTCUSDT", "NEWSYMBOL"])
def test_upsert_contract_unknown_currency_not_found(shared: Shared, symbol: str) -> None:
    request = contract(symbol=symbol, currency="EUR")
    call = shared.client.admin.UpsertContract
    assert_rejected(shared.database_url, call, request, NOT_FOUND, "EUR")


def test_upsert_contract_cannot_change_margin_currency(shared: Shared) -> None:
    request = contract("BTCUSDT", "BTC", INVERSE, "100")
    call = shared.client.admin.UpsertContract
    assert_rejected(shared.database_url, call, request, PRECONDITION, "BTCUSDT", "USDT", "BTC")


# --- SetPolicy --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("currency", "share", "coverage", "returned"),
    [
        ("P1", "0.25", "0.8", ("0.25", "0.8")),
        ("P2", "0", "0.9", ("0", "0.9")),
        ("P3", "1", "0.9", ("1", "0.9")),
        ("P4", "1.000", "1", ("1", "1")),
        ("P5", "0.2", "1", ("0.2", "1")),
        ("P6", "0.2", "0.000000000000000001", ("0.2", "0.000000000000000001")),
        ("P7", "0.123456789012345678", "0.9", ("0.123456789012345678", "0.9")),
    ],
)
def test_set_policy_accepts(
    shared: Shared, currency: str, share: str, coverage: str, returned: tuple[str, str]
) -> None:
    usd(shared.client, currency)
    got = shared.client.admin.SetPolicy(policy_request(share, coverage, currency))
    assert got == pb.Policy(
        currency=currency,
        insurance_share=returned[0],
        coverage_ratio=returned[1],
        version=2,
        ranking=pb.RANKING_POSITION,
    )
    policies = snapshot(shared.database_url)["policies"]
    assert [p for p in policies if p[0] == currency] == [  # type: ignore[attr-defined]
        (currency, 1, "0.2", "0.9"),
        (currency, 2, *returned),
    ]


@pytest.mark.parametrize(
    ("request_", "field", "value"),
    [
        row(policy_request(coverage="0"), "coverage_ratio", "'0'"),
        row(policy_request(coverage="0.0"), "coverage_ratio", "'0.0'"),
        row(policy_request(coverage="1.01"), "coverage_ratio", "'1.01'"),
        row(policy_request(coverage="-0.5"), "coverage_ratio", "'-0.5'"),
        row(policy_request(coverage="9e-1"), "coverage_ratio", "'9e-1'"),
        row(policy_request(coverage="0.9000000000000000001"), "coverage_ratio", "0.90000000000"),
        row(policy_request(coverage=""), "coverage_ratio", "''"),
        row(policy_request(share="1.5"), "insurance_share", "'1.5'"),
        row(policy_request(share="1.000000000000000001"), "insurance_share", "'1.00000000000"),
        row(policy_request(share="-0.1"), "insurance_share", "'-0.1'"),
        row(policy_request(share="-0"), "insurance_share", "'-0'"),
        row(policy_request(share="2E-1"), "insurance_share", "'2E-1'"),
        row(policy_request(share="0.1234567890123456789"), "insurance_share", "'0.12345678901"),
        row(policy_request(share=""), "insurance_share", "''"),
        row(policy_request(share="0,2"), "insurance_share", "'0,2'"),
        row(policy_request(currency="usd"), "currency", "'usd'"),
        row(policy_request(currency=""), "currency", "''"),
    ],
)
def test_set_policy_rejects(
    shared: Shared, request_: pb.SetPolicyRequest, field: str, value: str
) -> None:
    call = shared.client.admin.SetPolicy
    assert_rejected(shared.database_url, call, request_, INVALID, field, value)


def test_set_policy_unknown_currency_not_found(shared: Shared) -> None:
    request = policy_request(currency="EUR")
    assert_rejected(shared.database_url, shared.client.admin.SetPolicy, request, NOT_FOUND, "EUR")


def test_set_policy_version_rises_with_each_change(client: Client) -> None:
    usd(client)
    usd(client, "BTC", 8)
    steps = [
        (("0.3", "0.9"), 2),
        (("0.3", "0.9"), 2),  # no change: the same version
        (("0.30", "0.90"), 2),  # the same ratios written otherwise: no change
        (("0.3", "0.8"), 3),
        (("0.2", "0.9"), 4),  # back to the default is a change too
        (("0", "1"), 5),
    ]
    for (share, coverage), version in steps:
        assert client.admin.SetPolicy(policy_request(share, coverage)).version == version
    # Versions count per currency.
    assert client.admin.SetPolicy(policy_request("0.5", "0.5", currency="BTC")).version == 2


# --- TransferFund -----------------------------------------------------------------------------


def test_deposit_and_withdraw_post_balanced_entries(client: Client) -> None:
    usd(client)
    deposit = transfer(client, "t-1", DEPOSIT, 1_000, memo="seed the fund")
    assert deposit.entry_id > 0
    assert deposit.kind == pb.ENTRY_KIND_FUND_DEPOSIT
    assert (deposit.currency, deposit.reference, deposit.memo) == ("USD", "t-1", "seed the fund")
    assert {p.account: p.amount for p in deposit.postings} == {
        "external": -1_000,
        "insurance_fund": 1_000,
    }
    assert deposit.created_at.ToMicroseconds() > 0

    withdrawal = transfer(client, "t-2", WITHDRAW, 400)
    assert withdrawal.entry_id > deposit.entry_id
    assert withdrawal.kind == pb.ENTRY_KIND_FUND_WITHDRAWAL
    assert withdrawal.reference == "t-2"
    assert {p.account: p.amount for p in withdrawal.postings} == {
        "insurance_fund": -400,
        "external": 400,
    }
    for entry in (deposit, withdrawal):
        assert len(entry.postings) == 2
        assert sum(p.amount for p in entry.postings) == 0
    fund = client.query.GetFund(pb.GetFundRequest(currency="USD"))
    assert (fund.balance, fund.inflow_total, fund.outflow_total) == (600, 1_000, 400)


def test_withdraw_the_whole_balance(client: Client) -> None:
    usd(client)
    transfer(client, "in", DEPOSIT, INT64_MAX)
    transfer(client, "out", WITHDRAW, INT64_MAX)
    assert client.query.GetFund(pb.GetFundRequest(currency="USD")).balance == 0


@pytest.mark.parametrize(
    ("request_", "field", "value"),
    [
        row(transfer_request(amount=0), "amount", "0"),
        row(transfer_request(amount=-1), "amount", "-1"),
        row(transfer_request(amount=-(2**63)), "amount", str(-(2**63))),
        row(transfer_request(direction=WITHDRAW, amount=-5), "amount", "-5"),
        row(transfer_request(direction=pb.TRANSFER_DIRECTION_UNSPECIFIED), "direction", "0"),
        row(transfer_request(direction=3), "direction", "3"),
        row(transfer_request(transfer_id=""), "transfer_id", "''"),
        row(transfer_request(transfer_id="t" * 129), "transfer_id", "t" * 129),
        row(transfer_request(transfer_id="t\n1"), "transfer_id", "'t\\n1'"),
        row(transfer_request(currency=""), "currency", "''"),
        row(transfer_request(currency="usd"), "currency", "'usd'"),
        row(transfer_request(memo="m" * 1025), "memo", "mmm"),
    ],
)
def test_transfer_rejects(
    shared: Shared, request_: pb.TransferFundRequest, field: str, value: str
) -> None:
    call = shared.client.admin.TransferFund
    assert_rejected(shared.database_url, call, request_, INVALID, field, value)


@pytest.mark.parametrize("direction", [DEPOSIT, WITHDRAW])
def test_transfer_unknown_currency_not_found(shared: Shared, direction: int) -> None:
    request = transfer_request(currency="EUR", direction=direction)
    call = shared.client.admin.TransferFund
    assert_rejected(shared.database_url, call, request, NOT_FOUND, "EUR")


@pytest.mark.parametrize(
    ("currency", "balance", "amount"),
    [("W1", 0, 1), ("W2", 100, 101), ("W3", 100, INT64_MAX)],
)
def test_withdraw_beyond_balance_fails_and_writes_nothing(
    shared: Shared, currency: str, balance: int, amount: int
) -> None:
    client = shared.client
    usd(client, currency)
    if balance:
        transfer(client, f"{currency}-seed", DEPOSIT, balance, currency=currency)
    request = transfer_request(
        transfer_id=f"{currency}-w", currency=currency, direction=WITHDRAW, amount=amount
    )
    assert_rejected(
        shared.database_url, client.admin.TransferFund, request, PRECONDITION, "insurance_fund"
    )
    assert client.query.GetFund(pb.GetFundRequest(currency=currency)).balance == balance
    # The failed withdrawal did not use up its transfer_id: once the fund holds enough, the
    # same request goes through.
    transfer(client, f"{currency}-top-up", DEPOSIT, amount - balance, currency=currency)
    done = client.admin.TransferFund(request)
    assert (done.kind, done.reference) == (pb.ENTRY_KIND_FUND_WITHDRAWAL, f"{currency}-w")
    assert client.query.GetFund(pb.GetFundRequest(currency=currency)).balance == 0


def test_fund_balance_beyond_int64_is_rejected(client: Client, database_url: str) -> None:
    """A deposit that would carry the fund's balance past int64 is refused, writing nothing."""
    usd(client)
    transfer(client, "big", DEPOSIT, INT64_MAX)
    before = snapshot(database_url)
    with pytest.raises(grpc.RpcError) as raised:
        transfer(client, "one-more", DEPOSIT, 1)
    assert raised.value.code() in (INVALID, PRECONDITION), raised.value.details()
    assert snapshot(database_url) == before
    fund = client.query.GetFund(pb.GetFundRequest(currency="USD"))
    assert (fund.balance, fund.inflow_total) == (INT64_MAX, INT64_MAX)


@pytest.mark.parametrize("direction", [DEPOSIT, WITHDRAW])
def test_transfer_repeat_returns_the_same_entry_and_posts_nothing(
    shared: Shared, direction: int
) -> None:
    client = shared.client
    transfer_id = f"repeat-{direction}"
    first = transfer(client, transfer_id, direction, 25, memo="ops ticket 8")
    before = snapshot(shared.database_url)
    for _ in range(3):
        again = transfer(client, transfer_id, direction, 25, memo="ops ticket 8")
        assert again == first
        assert (again.entry_id, again.created_at) == (first.entry_id, first.created_at)
    assert snapshot(shared.database_url) == before


@pytest.mark.parametrize(
    "changed",
    [
        {"amount": 251},
        {"direction": WITHDRAW},
        {"memo": "another memo"},
        {"memo": ""},
        {"currency": "BTC"},
    ],
    ids=lambda changed: ",".join(changed),
)
def test_transfer_id_reused_with_other_content_already_exists(
    shared: Shared, changed: dict[str, Any]
) -> None:
    # "t-1" was a deposit of 250 USD with memo "ops ticket 7" (see `shared`).
    request = transfer_request(
        **{"transfer_id": "t-1", "amount": 250, "memo": "ops ticket 7", **changed}
    )
    call = shared.client.admin.TransferFund
    assert_rejected(shared.database_url, call, request, EXISTS, "t-1")
