"""insurance.v1.Clearing: liquidations through a cycle, and the cycle close."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ledger import liquidation
from ledger.api.v1 import insurance_pb2 as pb
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc
from ledger.liquidation import LiquidationRequest, LiquidationResult

if TYPE_CHECKING:
    from grpc.aio import ServicerContext


RecordFn = Callable[[LiquidationRequest], Awaitable[LiquidationResult]]


class ClearingService(pb_grpc.ClearingServicer):
    def __init__(self, record: RecordFn) -> None:
        """`record`: the liquidation's result once it is durable (a group commit's submit)."""
        self._record = record

    async def RecordLiquidation(
        self, request: pb.RecordLiquidationRequest, context: ServicerContext[Any, Any]
    ) -> pb.LiquidationResult:
        """On the event loop: the call waits for its batch's commit without holding a thread."""
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
        result = await self._record(validated)
        return pb.LiquidationResult(
            liquidation_id=result.liquidation_id,
            currency=result.currency,
            engine_result=result.engine_result,
            outcome=int(result.outcome),  # type: ignore[arg-type]
            fund_balance=result.fund_balance,
            entry_id=result.entry_id,
        )
