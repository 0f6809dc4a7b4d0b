import sys, grpc, time
from ledger.api.v1 import insurance_pb2 as pb, insurance_pb2_grpc as pb_grpc
port = sys.argv[1]
ch = grpc.insecure_channel(f"127.0.0.1:{port}")
admin = pb_grpc.AdminStub(ch); cl = pb_grpc.ClearingStub(ch); q = pb_grpc.QueryStub(ch)
def liq(lid, **kw):
    d = dict(liquidation_id=lid, cycle_id="c1", symbol="BTCUSDT", account_id=7, position_id=11, side=1,
             quantity="1", takeover_price="60000", close_price="60100", remaining_margin=5)
    d.update(kw); return pb.RecordLiquidationRequest(**d)
def entries():
    out=[]; tok=""
    while True:
        p = q.ListEntries(pb.ListEntriesRequest(currency="USDT", account="liquidation_engine", page_size=1000, page_token=tok))
        out += list(p.entries); tok = p.next_page_token
        if not tok: return out
def fund(): return q.GetFund(pb.GetFundRequest(currency="USDT"))
B = lambda items, **k: cl.RecordLiquidations(pb.RecordLiquidationsRequest(liquidations=items), timeout=k.get("timeout", 60))
f0 = fund(); print("fund0", f0)
#r = B([liq("d1"), liq("d1"), liq("d1", quantity="2"), liq("d2", close_price="59000"), liq("d3"), liq("d2")])
#for o in r.outcomes: print(o.code, o.message, o.result.fund_balance, o.result.engine_result, o.result.entry_id)
# replay whole batch
e1 = len(entries())
items = [liq(f"r{i}", close_price=str(60000 + (i%3-1)*10)) for i in range(20)]
a = B(items); e2 = len(entries()); b = B(items); e3 = len(entries())
print("entries", e1, e2, e3, "replay same:", list(a.outcomes)==list(b.outcomes))
# unary replay of batch item
u = cl.RecordLiquidation(items[3]); print("unary replay equal", u == a.outcomes[3].result)
# different content on replay
r = B([items[0], liq("r1", quantity="5")]); print([(o.code, o.message) for o in r.outcomes])
# empty
for n in (0,):
    try: B([]); print("empty OK?!")
    except grpc.RpcError as e: print("empty", e.code(), e.details())
e4=len(entries())
big = [liq(f"big{i}") for i in range(10001)]
t=time.time()
try: B(big); print("10001 OK?!")
except grpc.RpcError as e: print("10001", e.code(), e.details(), time.time()-t)
print("entries unchanged", e4 == len(entries()))
t=time.time()
r = B(big[:10000], timeout=120); print("10000", len(r.outcomes), set(o.code for o in r.outcomes), time.time()-t)
print("order ok", [o.result.liquidation_id for o in r.outcomes] == [f"big{i}" for i in range(10000)])
fb = [o.result.fund_balance for o in r.outcomes]; er = [o.result.engine_result for o in r.outcomes]
print("fund increments ok", all(fb[i]-fb[i-1]==er[i] for i in range(1,10000)))
