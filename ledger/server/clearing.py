"""insurance.v1.Clearing: liquidations through a cycle (the cycle close is in cycles.py).

Both liquidation calls run on the event loop and wait for the process's one writer
(ledger.group_commit) without holding a thread: a unary call is a batch of one, and
RecordLiquidations hands over all its valid items as one call of the writer's queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

import grpc

from ledger import liquidation
from ledger.api.v1 import insurance_pb2 as pb
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc
from ledger.errors import InvalidArgument
from ledger.group_commit import GroupCommitter
from ledger.limits import LIQUIDATIONS_PER_CALL_MAX
from ledger.liquidation import LiquidationRequest, LiquidationResult
from ledger.server.status import internal_details, status_for

if TYPE_CHECKING:
    from grpc.aio import ServicerContext

RECORD_LIQUIDATIONS = "/insurance.v1.Clearing/RecordLiquidations"
# A batch this large is validated on a thread of the pool, so that the event loop keeps
# serving other calls meanwhile.
VALIDATE_ON_POOL_ITEMS_MIN = 256

Committer = GroupCommitter[LiquidationRequest, LiquidationResult]


class ClearingService(pb_grpc.ClearingServicer):
    def __init__(self, committer: Committer, pool: Executor) -> None:
        self._committer = committer
        self._pool = pool

    async def RecordLiquidation(
        self, request: pb.RecordLiquidationRequest, context: ServicerContext[Any, Any]
    ) -> pb.LiquidationResult:
        pending = self._committer.submit([_validated(request)], context.time_remaining())
        (outcome,) = await self._committer.result(pending)
        if isinstance(outcome, Exception):
            raise outcome
        return _response(outcome)

    async def RecordLiquidations(
        self, request: pb.RecordLiquidationsRequest, context: ServicerContext[Any, Any]
    ) -> pb.RecordLiquidationsResponse:
        """One outcome per item, in order; each item is what the unary call with it would be."""
        items = request.liquidations
        if not 1 <= len(items) <= LIQUIDATIONS_PER_CALL_MAX:
            raise InvalidArgument(
                "liquidations",
                len(items),
                f"must hold 1 to {LIQUIDATIONS_PER_CALL_MAX} items (the limit of one call)",
            )
        if len(items) >= VALIDATE_ON_POOL_ITEMS_MIN:
            loop = asyncio.get_running_loop()
            checked = await loop.run_in_executor(self._pool, _validate_all, items)
        else:
            checked = _validate_all(items)
        valid = [c for c in checked if isinstance(c, LiquidationRequest)]
        recorded: list[LiquidationResult | Exception] = []
        if valid:
            pending = self._committer.submit(valid, context.time_remaining())
            recorded = await self._committer.result(pending)
        results = iter(recorded)
        outcomes = [
            _outcome(next(results) if isinstance(c, LiquidationRequest) else c) for c in checked
        ]
        return pb.RecordLiquidationsResponse(outcomes=outcomes)


def _validate_all(
    items: Sequence[pb.RecordLiquidationRequest],
) -> list[LiquidationRequest | Exception]:
    checked: list[LiquidationRequest | Exception] = []
    for item in items:
        try:
            checked.append(_validated(item))
        except Exception as error:
            checked.append(error)
    return checked


def _validated(request: pb.RecordLiquidationRequest) -> LiquidationRequest:
    return liquidation.validate(
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


def _response(result: LiquidationResult) -> pb.LiquidationResult:
    return pb.LiquidationResult(
        liquidation_id=result.liquidation_id,
        currency=result.currency,
        engine_result=result.engine_result,
        outcome=int(result.outcome),  # type: ignore[arg-type]
        fund_balance=result.fund_balance,
        entry_id=result.entry_id,
    )


def _outcome(outcome: LiquidationResult | Exception) -> pb.LiquidationOutcome:
    """An item's outcome: the status its unary call would end with, and its result if OK."""
    if not isinstance(outcome, Exception):
        return pb.LiquidationOutcome(code=0, result=_response(outcome))
    code = status_for(outcome)
    if code is None:
        return pb.LiquidationOutcome(
            code=_INTERNAL, message=internal_details(RECORD_LIQUIDATIONS, outcome)
        )
    return pb.LiquidationOutcome(code=code.value[0], message=str(outcome))


_INTERNAL = grpc.StatusCode.INTERNAL.value[0]
