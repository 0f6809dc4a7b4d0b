import grpc, sys
sys.path.insert(0, "/work/main")
from ledger.api.v1 import insurance_pb2 as pb, insurance_pb2_grpc as pb_grpc
from tests import cycle_streams as cs
ch = grpc.insecure_channel("127.0.0.1:48713")
admin = pb_grpc.AdminStub(ch); q = pb_grpc.QueryStub(ch); clr = pb_grpc.ClearingStub(ch)
def err(f, *a, **k):
    try:
        r = f(*a, **k); return ("OK", r)
    except grpc.RpcError as e:
        return (e.code().name, e.details())
def market(code):
    admin.CreateCurrency(pb.CreateCurrencyRequest(code=code, scale=0))
    admin.UpsertContract(pb.UpsertContractRequest(symbol="X"+code, margin_currency=code, kind=pb.CONTRACT_KIND_LINEAR, multiplier="1"))
def deposit(code, tid, amt):
    admin.TransferFund(pb.TransferFundRequest(transfer_id=tid, currency=code, direction=pb.TRANSFER_DIRECTION_DEPOSIT, amount=amt))
def liq(code, lid, cyc, result, acct=1, pos=1):
    close = "1" if result < 0 else ("3" if result > 0 else "2")
    return clr.RecordLiquidation(pb.RecordLiquidationRequest(liquidation_id=lid, cycle_id=cyc, symbol="X"+code, account_id=acct, position_id=pos, side=pb.SIDE_LONG, quantity=str(abs(result) or 1), takeover_price="2", close_price=close, remaining_margin=0))
def close(code, cyc, rows): return cs.close(ch, cyc, code, cs.Positions.of(rows))
def preview(code, cyc, rows): return cs.preview(ch, cyc, code, cs.Positions.of(rows))
def explain(code, cyc, pid): return q.ExplainAllocation(pb.ExplainAllocationRequest(cycle_id=cyc, currency=code, position_id=pid))
