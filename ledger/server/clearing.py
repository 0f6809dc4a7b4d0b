"""insurance.v1.Clearing: liquidations through a cycle, and the cycle close."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from ledger import liquidation
from ledger.api.v1 import insurance_pb2 as pb
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc
from ledger.group_commit import BatchWriter
from ledger.liquidation import LiquidationRequest, LiquidationResult
from ledger.server.status import internal_details, status_for

if TYPE_CHECKING:
    from grpc.aio import ServicerContext

RECORD_LIQUIDATION = "/insurance.v1.Clearing/RecordLiquidation"

log = logging.getLogger("ledger.calls")

RecordFn = Callable[[LiquidationRequest], Awaitable[LiquidationResult]]
# A call's answer to the front end: its serialized response, or (status code, message).
Reply = bytes | tuple[int, str]


class ClearingService(pb_grpc.ClearingServicer):
    def __init__(self, record: RecordFn) -> None:
        """`record`: the liquidation's result once it is durable, in a transaction of its own
        (with group commit, the front end answers RecordLiquidation through RecordBatches)."""
        self._record = record

    async def RecordLiquidation(
        self, request: pb.RecordLiquidationRequest, context: ServicerContext[Any, Any]
    ) -> pb.LiquidationResult:
        """On the event loop: the call waits for its commit without holding a thread."""
        return _response(await self._record(_validated(request)))


class RecordBatches:
    """RecordLiquidation with group commit: the front end hands over the calls queued while
    the previous batch was written, as serialized requests, and gets one reply per call.

    Called on the front end's one writer thread. Requests that fail validation are answered
    at once; the rest are recorded as one transaction by `writer`.
    """

    def __init__(self, writer: BatchWriter[LiquidationRequest, LiquidationResult]) -> None:
        self._writer = writer

    def __call__(self, messages: Sequence[bytes]) -> list[Reply]:
        started = time.perf_counter()
        replies: list[Reply] = [b""] * len(messages)
        requests: list[LiquidationRequest] = []
        positions: list[int] = []
        for i, message in enumerate(messages):
            try:
                requests.append(_validated(pb.RecordLiquidationRequest.FromString(message)))
            except Exception as error:
                replies[i] = _status(error)
                continue
            positions.append(i)
        if requests:
            for i, outcome in zip(positions, self._writer.write(requests), strict=True):
                replies[i] = _reply(outcome)
        if log.isEnabledFor(logging.INFO):
            elapsed_ms = (time.perf_counter() - started) * 1000
            for reply in replies:
                name = "OK" if isinstance(reply, bytes) else _CODE_NAMES[reply[0]]
                log.info(
                    "method=%s status=%s duration_ms=%.2f batch=%d",
                    RECORD_LIQUIDATION,
                    name,
                    elapsed_ms,
                    len(replies),
                )
        return replies


def _reply(outcome: LiquidationResult | Exception) -> Reply:
    """The call's reply; a failure here fails this call alone (its batch has committed)."""
    if isinstance(outcome, Exception):
        return _status(outcome)
    try:
        return _response(outcome).SerializeToString()
    except Exception as error:
        return _status(error)


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


def _status(error: Exception) -> tuple[int, str]:
    code = status_for(error)
    if code is None:
        return _INTERNAL, internal_details(RECORD_LIQUIDATION, error)
    return code.value[0], str(error)


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_INTERNAL = grpc.StatusCode.INTERNAL.value[0]
