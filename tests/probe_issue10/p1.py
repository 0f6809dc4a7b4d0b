import sys, grpc
from ledger.api.v1 import insurance_pb2 as pb, insurance_pb2_grpc as pb_grpc
port = sys.argv[1]
ch = grpc.insecure_channel(f"127.0.0.1:{port}")
admin = pb_grpc.AdminStub(ch); cl = pb_grpc.ClearingStub(ch); q = pb_grpc.QueryStub(ch)
try:
    admin.CreateCurrency(pb.CreateCurrencyRequest(code="USDT", scale=6))
    admin.UpsertContract(pb.UpsertContractRequest(symbol="BTCUSDT", margin_currency="USDT", kind=1, multiplier="0.001"))
except grpc.RpcError as e: print("setup", e.code(), e.details())
def liq(lid, **kw):
    d = dict(liquidation_id=lid, cycle_id="c1", symbol="BTCUSDT", account_id=7, position_id=11, side=1,
             quantity="1", takeover_price="60000", close_price="60100", remaining_margin=5)
    d.update(kw); return pb.RecordLiquidationRequest(**d)
def unary(r):
    try:
        res = cl.RecordLiquidation(r, timeout=30); return (0, "", res)
    except grpc.RpcError as e: return (e.code().value[0], e.details(), None)
cases = {
 "empty_id": dict(liquidation_id=""), "long_id": dict(liquidation_id="x"*129), "ctrl_id": dict(liquidation_id="a\nb"),
 "empty_cycle": dict(cycle_id=""), "empty_symbol": dict(symbol=""), "unknown_symbol": dict(symbol="NOPE"),
 "side0": dict(side=0), "side3": dict(side=3),
 "q_1e5": dict(quantity="1e5"), "q_-1": dict(quantity="-1"), "q_0": dict(quantity="0"), "q_1.": dict(quantity="1."),
 "q_.5": dict(quantity=".5"), "q_NaN": dict(quantity="NaN"), "q_huge": dict(quantity="9"*41), "q_empty": dict(quantity=""),
 "q_19places": dict(quantity="0."+"1"*19), "q_space": dict(quantity=" 1"), "q_plus": dict(quantity="+1"), "q_inf": dict(quantity="Infinity"),
 "q_0.000": dict(quantity="0.000"), "q_unicode": dict(quantity="١"),
 "tp_0": dict(takeover_price="0"), "cp_bad": dict(close_price="abc"), "cp_40": dict(close_price="9"*40),
 "margin_neg": dict(remaining_margin=-1), "margin_max": dict(remaining_margin=2**63-1),
 "overflow": dict(quantity="9"*30, close_price="9"*10),
 "acct0": dict(account_id=0), "acctmax": dict(account_id=2**64-1), "pos0": dict(position_id=0),
 "ok": dict(),
}
import itertools
n = 0
for name, kw in cases.items():
    n += 1
    base_u = f"u-{name}"; base_b = f"b-{name}"
    ku = dict(kw); kb = dict(kw)
    if "liquidation_id" not in kw: ku["liquidation_id"] = base_u; kb["liquidation_id"] = base_b
    ru = liq(**ku) if False else pb.RecordLiquidationRequest(**{**liq("x").__class__().__dict__}) if False else None
    ru = liq(ku.pop("liquidation_id"), **ku); rb = liq(kb.pop("liquidation_id"), **kb)
    u = unary(ru)
    resp = cl.RecordLiquidations(pb.RecordLiquidationsRequest(liquidations=[liq(f"nb1-{name}"), rb, liq(f"nb2-{name}")]), timeout=30)
    o = resp.outcomes[1]
    b = (o.code, o.message, o.result if o.HasField("result") else None)
    neighbours = [x.code for x in (resp.outcomes[0], resp.outcomes[2])]
    same = (u[0], u[1]) == (b[0], b[1]) and (u[2] is None) == (b[2] is None)
    print(("SAME " if same else "DIFF ") + name, "| unary:", u[0], u[1][:160], "| batch:", b[0], b[1][:160], "| neigh", neighbours, "| result set when ok:", (b[0]==0) == (b[2] is not None), "| msg empty ok:", (b[0]!=0) or b[1]=="")
