"""Currencies, their insurance-fund policy, and the contracts margined in them."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ledger import money
from ledger.alloc import Ranking
from ledger.db import models
from ledger.db.store import now_us
from ledger.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ledger.journal import GENESIS_HASH, SYSTEM_ACCOUNTS

DEFAULT_INSURANCE_SHARE = "0.2"
DEFAULT_COVERAGE_RATIO = "0.9"


class ContractKind(enum.IntEnum):
    """Numbers are those of insurance.v1.ContractKind."""

    LINEAR = 1
    INVERSE = 2


@dataclass(frozen=True, slots=True)
class CurrencyView:
    code: str
    scale: int


@dataclass(frozen=True, slots=True)
class PolicyView:
    currency: str
    insurance_share: str
    coverage_ratio: str
    version: int
    ranking: Ranking = Ranking.POSITION


@dataclass(frozen=True, slots=True)
class ContractView:
    symbol: str
    margin_currency: str
    kind: ContractKind
    multiplier: str


def create_currency(session: Session, code: str, scale: int) -> CurrencyView:
    """Create the currency, its system accounts and its default policy; a repeat is a no-op."""
    money.currency_code("code", code)
    money.scale("scale", scale)
    existing = session.get(models.Currency, code)
    if existing is not None:
        return _same_currency(existing, scale)
    created = now_us()
    try:
        with session.begin_nested():
            session.add(models.Currency(code=code, scale=scale, created_at_us=created))
            session.flush()
    except IntegrityError:  # a concurrent create of the same code won the race
        existing = session.get(models.Currency, code, populate_existing=True)
        assert existing is not None
        return _same_currency(existing, scale)
    session.add_all(
        models.Account(currency=code, name=name, balance=0, credit_total=0, debit_total=0)
        for name in SYSTEM_ACCOUNTS
    )
    session.add(models.ChainHead(currency=code, seq=0, hash=GENESIS_HASH))
    session.add(
        models.Policy(
            currency=code,
            version=1,
            insurance_share=DEFAULT_INSURANCE_SHARE,
            coverage_ratio=DEFAULT_COVERAGE_RATIO,
            created_at_us=created,
        )
    )
    session.flush()
    return CurrencyView(code, scale)


def _same_currency(existing: models.Currency, scale: int) -> CurrencyView:
    if existing.scale != scale:
        raise AlreadyExists(
            f"currency {existing.code} exists with scale {existing.scale}, not {scale}"
        )
    return CurrencyView(existing.code, existing.scale)


def list_currencies(session: Session) -> list[CurrencyView]:
    rows = session.scalars(select(models.Currency).order_by(models.Currency.code))
    return [CurrencyView(row.code, row.scale) for row in rows]


def get_currency(session: Session, code: str, field: str = "currency") -> CurrencyView:
    money.currency_code(field, code)
    row = session.get(models.Currency, code)
    if row is None:
        raise NotFound(f"{field}: unknown currency {code!r}")
    return CurrencyView(row.code, row.scale)


def current_policy(session: Session, currency: str) -> PolicyView:
    row = session.scalars(
        select(models.Policy)
        .where(models.Policy.currency == currency)
        .order_by(models.Policy.version.desc())
        .limit(1)
    ).one()
    return _policy_view(row)


def _policy_view(row: models.Policy) -> PolicyView:
    return PolicyView(
        row.currency, row.insurance_share, row.coverage_ratio, row.version, Ranking(row.ranking)
    )


RANKINGS = {0: "UNSPECIFIED", 1: "POSITION", 2: "ACCOUNT"}  # the contract's Ranking values


def set_policy(
    session: Session, currency: str, insurance_share: str, coverage_ratio: str, ranking: int = 0
) -> PolicyView:
    """Record a new policy version; the same ratios and ranking again keep the version as it
    is. `ranking` 0 (RANKING_UNSPECIFIED) keeps the ranking in force."""
    share = money.ratio("insurance_share", insurance_share, zero_allowed=True)
    coverage = money.ratio("coverage_ratio", coverage_ratio, zero_allowed=False)
    if isinstance(ranking, bool) or ranking not in RANKINGS:
        raise InvalidArgument(
            "ranking", ranking, "must be RANKING_POSITION (1), RANKING_ACCOUNT (2) or 0 to keep it"
        )
    get_currency(session, currency)
    current = current_policy(session, currency)
    share_text, coverage_text = money.canonical(share), money.canonical(coverage)
    chosen = current.ranking if ranking == 0 else Ranking(ranking)
    if (share_text, coverage_text, chosen) == (
        current.insurance_share,
        current.coverage_ratio,
        current.ranking,
    ):
        return current
    version = (
        session.scalar(
            select(func.max(models.Policy.version)).where(models.Policy.currency == currency)
        )
        or 0
    ) + 1
    session.add(
        models.Policy(
            currency=currency,
            version=version,
            insurance_share=share_text,
            coverage_ratio=coverage_text,
            created_at_us=now_us(),
            ranking=int(chosen),
        )
    )
    session.flush()
    return PolicyView(currency, share_text, coverage_text, version, chosen)


def upsert_contract(
    session: Session, symbol: str, margin_currency: str, kind: int, multiplier: str
) -> ContractView:
    money.identifier("symbol", symbol)
    money.currency_code("margin_currency", margin_currency)
    if kind not in ContractKind.__members__.values():
        raise InvalidArgument("kind", kind, "must be LINEAR (1) or INVERSE (2)")
    multiplier_text = money.canonical(money.positive_decimal("multiplier", multiplier))
    get_currency(session, margin_currency, "margin_currency")
    row = session.get(models.Contract, symbol, with_for_update=True)
    if row is None:
        row = models.Contract(
            symbol=symbol,
            margin_currency=margin_currency,
            kind=kind,
            multiplier=multiplier_text,
            updated_at_us=now_us(),
        )
        session.add(row)
    else:
        if row.margin_currency != margin_currency:
            raise FailedPrecondition(
                f"contract {symbol} is margined in {row.margin_currency}; its margin currency "
                f"cannot change to {margin_currency}",
                type="CONTRACT_CURRENCY_FIXED",
                subject=f"contract {symbol}",
            )
        row.kind, row.multiplier, row.updated_at_us = kind, multiplier_text, now_us()
    session.flush()
    return ContractView(symbol, margin_currency, ContractKind(kind), multiplier_text)


def list_policies(session: Session, currency: str) -> list[PolicyView]:
    """Every policy version of the currency, oldest first."""
    get_currency(session, currency)
    rows = session.scalars(
        select(models.Policy)
        .where(models.Policy.currency == currency)
        .order_by(models.Policy.version)
    )
    return [_policy_view(r) for r in rows]


def get_policy(session: Session, currency: str) -> PolicyView:
    """The policy in force."""
    get_currency(session, currency)
    return current_policy(session, currency)


def list_contracts(session: Session, currency: str) -> list[ContractView]:
    """The contracts margined in the currency (empty: every contract), by symbol."""
    query = select(models.Contract).order_by(models.Contract.symbol)
    if currency:
        get_currency(session, currency)
        query = query.where(models.Contract.margin_currency == currency)
    return [
        ContractView(r.symbol, r.margin_currency, ContractKind(r.kind), r.multiplier)
        for r in session.scalars(query)
    ]
