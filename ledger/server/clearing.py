"""insurance.v1.Clearing: liquidations through a cycle, and the cycle close."""

from __future__ import annotations

import grpc

from ledger import liquidation
from ledger.api.v1 import insurance_pb2 as pb
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc
from ledger.group_commit import GroupCommitter
from ledger.liquidation import LiquidationRequest, LiquidationResult


class ClearingService(pb_grpc.ClearingServicer):
    def __init__(self, liquidations: GroupCommitter[LiquidationRequest, LiquidationResult]) -> None:
        self._liquidations = liquidations

    def RecordLiquidation(
        self, request: pb.RecordLiquidationRequest, context: grpc.ServicerContext
    ) -> pb.LiquidationResult:
        validated = liquidation.validate(
            request.liquidation_id,
            request.cycle_id,
            request.symbol,
            request.account_id,
            request.position_id,
            request.side,
            request.quantity,
            request.takeover_price,
            request.close_price,
            request.remaining_margin,
        )
        result = self._liquidations.submit(validated)
        return pb.LiquidationResult(
            liquidation_id=result.liquidation_id,
            currency=result.currency,
            engine_result=result.engine_result,
            outcome=int(result.outcome),  # type: ignore[arg-type]
            fund_balance=result.fund_balance,
            entry_id=result.entry_id,
        )
