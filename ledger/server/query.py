"""insurance.v1.Query: read-only views of funds, cycles, allocations and the journal."""

from __future__ import annotations

import grpc

from ledger import entries, fund
from ledger.api.v1 import insurance_pb2 as pb
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc
from ledger.db.session import Database
from ledger.server import convert


class QueryService(pb_grpc.QueryServicer):
    def __init__(self, database: Database) -> None:
        self._db = database

    def GetFund(self, request: pb.GetFundRequest, context: grpc.ServicerContext) -> pb.Fund:
        with self._db.read() as session:
            view = fund.get_fund(session, request.currency)
        return convert.fund(view)

    def ListEntries(
        self, request: pb.ListEntriesRequest, context: grpc.ServicerContext
    ) -> pb.ListEntriesResponse:
        kind = request.kind or None
        with self._db.read() as session:
            page = entries.list_entries(
                session,
                request.currency,
                request.account,
                kind,
                request.page_size,
                request.page_token,
            )
        return pb.ListEntriesResponse(
            entries=[convert.entry(e) for e in page.entries],
            next_page_token=page.next_page_token,
        )
