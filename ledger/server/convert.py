"""Domain views ↔ protobuf messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from ledger import money
from ledger.api.v1 import insurance_pb2 as pb
from ledger.currency import ContractView, CurrencyView, PolicyView
from ledger.cycle import CycleSummary, OpenCycle
from ledger.db.store import StoredEntry
from ledger.fund import FundView
from ledger.liquidation import LiquidationRecord
from ledger.statement import Explanation


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
        ranking=int(view.ranking),  # type: ignore[arg-type]
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
        reverses=view.reverses,
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
        version=view.version,
        allocation_rate=money.rate(view.allocated_total, view.participant_profit),
        ranking=int(view.ranking),  # type: ignore[arg-type]
    )
    if view.closed_at_us:
        message.closed_at.CopyFrom(timestamp(view.closed_at_us))
    return message


def liquidation_record(view: LiquidationRecord) -> pb.Liquidation:
    r = view.result
    return pb.Liquidation(
        request=pb.RecordLiquidationRequest(
            liquidation_id=view.liquidation_id,
            cycle_id=view.cycle_id,
            symbol=view.symbol,
            account_id=view.account_id,
            position_id=view.position_id,
            side=int(view.side),  # type: ignore[arg-type]
            quantity=view.quantity,
            takeover_price=view.takeover_price,
            close_price=view.close_price,
            remaining_margin=view.remaining_margin,
        ),
        result=pb.LiquidationResult(
            liquidation_id=r.liquidation_id,
            currency=r.currency,
            engine_result=r.engine_result,
            outcome=int(r.outcome),  # type: ignore[arg-type]
            fund_balance=r.fund_balance,
            entry_id=r.entry_id,
        ),
        recorded_at=timestamp(view.recorded_at_us),
        reversed=view.reversed,
    )


def open_cycle(view: OpenCycle) -> pb.OpenCycle:
    return pb.OpenCycle(
        cycle_id=view.cycle_id,
        currency=view.currency,
        loss_total=view.loss_total,
        liquidations_count=view.liquidations_count,
        first_recorded_at=timestamp(view.first_recorded_at_us),
        last_recorded_at=timestamp(view.last_recorded_at_us),
    )


def explanation(view: Explanation) -> pb.AllocationExplanation:
    return pb.AllocationExplanation(
        position_id=view.position_id,
        account_id=view.account_id,
        pnl=view.pnl,
        rank=view.rank,
        profitable_count=view.profitable_count,
        cutoff_pnl=view.cutoff_pnl,
        participant=view.participant,
        participant_profit=view.participant_profit,
        allocated_total=view.allocated_total,
        share_numerator=str(view.share_numerator),
        share_denominator=str(view.share_denominator),
        amount=view.amount,
        remainder_unit=view.remainder_unit,
    )
