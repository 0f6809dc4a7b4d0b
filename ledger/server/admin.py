"""insurance.v1.Admin: currencies, contracts, policy, fund transfers and corrections
(operators)."""

from __future__ import annotations

import grpc

from ledger import currency, cycle, fund, liquidation
from ledger.api.v1 import insurance_pb2 as pb
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc
from ledger.db.session import Database
from ledger.server import convert


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, database: Database) -> None:
        self._db = database

    def CreateCurrency(
        self, request: pb.CreateCurrencyRequest, context: grpc.ServicerContext
    ) -> pb.Currency:
        with self._db.write() as session:
            view = currency.create_currency(session, request.code, request.scale)
        return convert.currency(view)

    def ListCurrencies(
        self, request: pb.ListCurrenciesRequest, context: grpc.ServicerContext
    ) -> pb.ListCurrenciesResponse:
        with self._db.read() as session:
            views = currency.list_currencies(session)
        return pb.ListCurrenciesResponse(currencies=[convert.currency(v) for v in views])

    def UpsertContract(
        self, request: pb.UpsertContractRequest, context: grpc.ServicerContext
    ) -> pb.Contract:
        with self._db.write() as session:
            view = currency.upsert_contract(
                session, request.symbol, request.margin_currency, request.kind, request.multiplier
            )
        return convert.contract(view)

    def SetPolicy(self, request: pb.SetPolicyRequest, context: grpc.ServicerContext) -> pb.Policy:
        with self._db.write() as session:
            view = currency.set_policy(
                session,
                request.currency,
                request.insurance_share,
                request.coverage_ratio,
                request.ranking,
            )
        return convert.policy(view)

    def TransferFund(
        self, request: pb.TransferFundRequest, context: grpc.ServicerContext
    ) -> pb.Entry:
        with self._db.write() as session:
            entry = fund.transfer_fund(
                session,
                request.transfer_id,
                request.currency,
                request.direction,
                request.amount,
                request.memo,
            )
        return convert.entry(entry)

    def ReverseLiquidation(
        self, request: pb.ReverseLiquidationRequest, context: grpc.ServicerContext
    ) -> pb.Entry:
        with self._db.write() as session:
            entry = liquidation.reverse(session, request.liquidation_id, request.reason)
        return convert.entry(entry)

    def ReverseCycle(
        self, request: pb.ReverseCycleRequest, context: grpc.ServicerContext
    ) -> pb.CycleSummary:
        key = cycle.check_header(request.cycle_id, request.currency)
        return convert.cycle_summary(cycle.reverse(self._db, key, request.reason))
