"""insurance.v1.Clearing: liquidations through a cycle (the cycle close is in cycles.py).

Both liquidation calls run on the event loop and wait for the process's liquidation writer
(ledger.group_commit, ledger.server.liquidation_writer) without holding a thread. They are
registered without a request deserializer and a response serializer: the request's bytes go
to the writer as they came, and its reply goes out as it comes back, so the loop does no
work per liquidation. A unary call is a batch of one; RecordLiquidations is one call of the
writer's queue with all its items.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError

from ledger.api.v1 import insurance_pb2 as pb
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc
from ledger.errors import InvalidArgument
from ledger.group_commit import GroupCommitter
from ledger.limits import LIQUIDATIONS_PER_CALL_MAX
from ledger.server.interceptors import Aborted
from ledger.server.liquidation_writer import BATCH, UNARY, Call, Reply
from ledger.server.status import grpc_status

if TYPE_CHECKING:
    from grpc.aio import ServicerContext

Committer = GroupCommitter[Call, Reply]


class ClearingService(pb_grpc.ClearingServicer):
    def __init__(self, committer: Committer) -> None:
        self._committer = committer

    async def RecordLiquidation(  # raw bytes in and out
        self, request: bytes, context: ServicerContext[Any, Any]
    ) -> bytes:
        return await self._record((UNARY, request), 1, context)

    async def RecordLiquidations(  # raw bytes in and out
        self, request: bytes, context: ServicerContext[Any, Any]
    ) -> bytes:
        """One outcome per item, in order; each item is what the unary call with it would be.
        The items are counted here (the queue's limit counts them), checked by the writer."""
        try:
            count = len(pb.RecordLiquidationsRequest.FromString(request).liquidations)
        except DecodeError as error:
            raise InvalidArgument(
                "request", f"{len(request)} bytes", f"is not a valid message: {error}"
            ) from None
        if not 1 <= count <= LIQUIDATIONS_PER_CALL_MAX:
            raise InvalidArgument(
                "liquidations",
                count,
                f"must hold 1 to {LIQUIDATIONS_PER_CALL_MAX} items "
                f"({LIQUIDATIONS_PER_CALL_MAX:,} is the limit of one call)",
            )
        return await self._record((BATCH, request), count, context)

    async def _record(self, call: Call, items: int, context: ServicerContext[Any, Any]) -> bytes:
        pending = self._committer.submit(call, items, context.time_remaining())
        reply = await self._committer.result(pending)
        if isinstance(reply, bytes):
            return reply
        if isinstance(reply, Exception):
            raise reply
        code, message, status = reply
        raise Aborted(grpc_status(code), message, status)
