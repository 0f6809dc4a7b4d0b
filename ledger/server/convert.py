"""Domain views ↔ protobuf messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from ledger.api.v1 import insurance_pb2 as pb
from ledger.currency import ContractView, CurrencyView, PolicyView
from ledger.cycle import CycleSummary
from ledger.db.store import StoredEntry
from ledger.fund import FundView


def timestamp(micros: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMicroseconds(micros)
    return ts


def currency(view: CurrencyView) -> pb.Currency:
    return pb.Currency(code=view.code, scale=view.scale)


def policy(view: PolicyView) -> pb.Policy:
    return pb.Policy(
        currency=view.currency,
        insurance_share=view.insurance_share,
        coverage_ratio=view.coverage_ratio,
        version=view.version,
    )


def contract(view: ContractView) -> pb.Contract:
    return pb.Contract(
        symbol=view.symbol,
        margin_currency=view.margin_currency,
        kind=int(view.kind),  # type: ignore[arg-type]
        multiplier=view.multiplier,
    )


def entry(view: StoredEntry) -> pb.Entry:
    return pb.Entry(
        entry_id=view.entry_id,
        kind=int(view.kind),  # type: ignore[arg-type]
        currency=view.currency,
        reference=view.reference,
        postings=[pb.Posting(account=p.account, amount=p.amount) for p in view.postings],
        created_at=timestamp(view.created_at_us),
        memo=view.memo,
        position_id=view.position_id,
        pnl=view.pnl,
    )


def fund(view: FundView) -> pb.Fund:
    return pb.Fund(
        currency=view.currency,
        balance=view.balance,
        inflow_total=view.inflow_total,
        outflow_total=view.outflow_total,
    )


def cycle_summary(view: CycleSummary) -> pb.CycleSummary:
    message = pb.CycleSummary(
        cycle_id=view.cycle_id,
        currency=view.currency,
        state=int(view.state),  # type: ignore[arg-type]
        loss_total=view.loss_total,
        fund_balance_before=view.fund_balance_before,
        fund_share=view.fund_share,
        fund_paid=view.fund_paid,
        user_due=view.user_due,
        allocated_total=view.allocated_total,
        uncovered=view.uncovered,
        positions_total=view.positions_total,
        profitable_count=view.profitable_count,
        profit_total=view.profit_total,
        participant_count=view.participant_count,
        participant_profit=view.participant_profit,
        cutoff_pnl=view.cutoff_pnl,
        widened=view.widened,
        input_digest=view.input_digest,
        insurance_share=view.insurance_share,
        coverage_ratio=view.coverage_ratio,
    )
    if view.closed_at_us:
        message.closed_at.CopyFrom(timestamp(view.closed_at_us))
    return message
