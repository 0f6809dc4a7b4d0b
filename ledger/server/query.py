"""insurance.v1.Query: read-only views of funds, cycles, allocations and the journal."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from ledger import currency, cycle, entries, fund, liquidation, statement, verify
from ledger.alloc import encode_allocation_columns
from ledger.api.v1 import insurance_pb2 as pb
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc
from ledger.db.session import Database
from ledger.limits import CHUNK_ROWS_MAX
from ledger.server import convert


class QueryService(pb_grpc.QueryServicer):
    def __init__(self, database: Database, keeper: statement.Keeper | None = None) -> None:
        self._db = database
        self._keeper = keeper

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

    def GetCycle(
        self, request: pb.GetCycleRequest, context: grpc.ServicerContext
    ) -> pb.CycleSummary:
        key = cycle.check_header(request.cycle_id, request.currency)
        with self._db.read() as session:
            summary = cycle.get(session, key, request.version)
        return convert.cycle_summary(summary)

    def StreamAllocations(
        self, request: pb.StreamAllocationsRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Chunks of at most 65,536 rows in position_id order, encoded in Rust: the method is
        registered without a response serializer, so the bytes go out as they are."""
        key = cycle.check_header(request.cycle_id, request.currency)
        account_id = request.account_id if request.HasField("account_id") else None
        with self._db.read() as session:
            for columns in cycle.allocations(session, key, account_id, CHUNK_ROWS_MAX):
                yield from encode_allocation_columns(
                    columns.position_id,
                    columns.account_id,
                    columns.pnl,
                    columns.amount,
                    CHUNK_ROWS_MAX,
                )

    def VerifyLedger(
        self, request: pb.VerifyLedgerRequest, context: grpc.ServicerContext
    ) -> pb.VerifyReport:
        """Recomputes every chain and checks every invariant, over one snapshot."""
        with self._db.snapshot() as session:
            report = verify.verify(session, request.currency)
        return pb.VerifyReport(
            ok=report.ok, entries_checked=report.entries_checked, problems=report.problems
        )

    def ListCycles(
        self, request: pb.ListCyclesRequest, context: grpc.ServicerContext
    ) -> pb.ListCyclesResponse:
        with self._db.read() as session:
            page = cycle.list_cycles(
                session, request.currency, request.page_size, request.page_token
            )
        return pb.ListCyclesResponse(
            cycles=[convert.cycle_summary(c) for c in page.cycles],
            next_page_token=page.next_page_token,
        )

    def GetPolicy(self, request: pb.GetPolicyRequest, context: grpc.ServicerContext) -> pb.Policy:
        with self._db.read() as session:
            return convert.policy(currency.get_policy(session, request.currency))

    def ListPolicies(
        self, request: pb.ListPoliciesRequest, context: grpc.ServicerContext
    ) -> pb.ListPoliciesResponse:
        with self._db.read() as session:
            views = currency.list_policies(session, request.currency)
        return pb.ListPoliciesResponse(policies=[convert.policy(v) for v in views])

    def ListContracts(
        self, request: pb.ListContractsRequest, context: grpc.ServicerContext
    ) -> pb.ListContractsResponse:
        with self._db.read() as session:
            views = currency.list_contracts(session, request.currency)
        return pb.ListContractsResponse(contracts=[convert.contract(v) for v in views])

    def GetLiquidation(
        self, request: pb.GetLiquidationRequest, context: grpc.ServicerContext
    ) -> pb.Liquidation:
        with self._db.read() as session:
            return convert.liquidation_record(liquidation.get(session, request.liquidation_id))

    def ExplainAllocation(
        self, request: pb.ExplainAllocationRequest, context: grpc.ServicerContext
    ) -> pb.AllocationExplanation:
        if self._keeper is not None:
            self._keeper.wait(request.currency, request.cycle_id)
        with self._db.read() as session:
            view = statement.explain(
                session, request.cycle_id, request.currency, request.position_id
            )
        return convert.explanation(view)

    def ListOpenCycles(
        self, request: pb.ListOpenCyclesRequest, context: grpc.ServicerContext
    ) -> pb.ListOpenCyclesResponse:
        with self._db.read() as session:
            views = cycle.list_open(session, request.currency)
        return pb.ListOpenCyclesResponse(cycles=[convert.open_cycle(v) for v in views])
