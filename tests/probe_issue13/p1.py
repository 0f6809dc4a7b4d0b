from common import *
from fractions import Fraction
C="AAA"
market(C); deposit(C,"d1",10000); liq(C,"L1","c1",-1000)
W=[(1,1001,500),(2,1002,300),(3,1003,150),(4,1004,50),(5,1005,-80)]
p=preview(C,"c1",W); print("preview rate", p.allocation_rate, p.version, p.ranking, p.state)
s=close(C,"c1",W); print("close", s.allocation_rate, s.version, s.ranking, s.state)
for pid in [1,2,3,4,5,99]:
    print(pid, err(explain,C,"c1",pid))
print("unknown cycle", err(explain,C,"nope",1))
print("reverse", err(admin.ReverseCycle, pb.ReverseCycleRequest(cycle_id="c1", currency=C, reason="x")))
r=admin.ReverseCycle(pb.ReverseCycleRequest(cycle_id="c1", currency=C, reason="y"))
print("repeat", r.state, r.version)
for pid in [2,5,99]:
    print("after rev", pid, err(explain,C,"c1",pid))
for v in [0,1,2,3, 2**31, 2**32-1]:
    print("getcycle v", v, err(q.GetCycle, pb.GetCycleRequest(cycle_id="c1", currency=C, version=v)))
print("open", q.ListOpenCycles(pb.ListOpenCyclesRequest(currency=C)))
liq(C,"L2","c1",-300)
s2=close(C,"c1",[(6,1,900),(7,2,600),(1,1001,40)]); print("close2", s2.version, s2.allocated_total, s2.fund_paid, s2.allocation_rate)
lc=q.ListCycles(pb.ListCyclesRequest(currency=C)); print([(c.version,c.state) for c in lc.cycles], lc.next_page_token)
for tok in ["", "abc", "1.2", "-1.2", "1.2.3"]:
    print("tok", repr(tok), err(q.ListCycles, pb.ListCyclesRequest(currency=C, page_token=tok, page_size=1)))
print("ps1", q.ListCycles(pb.ListCyclesRequest(currency=C, page_size=1)).next_page_token)
print("ps huge", err(q.ListCycles, pb.ListCyclesRequest(currency=C, page_size=100000)))
print("unknown cur", err(q.ListCycles, pb.ListCyclesRequest(currency="ZZZ")))
print("empty cur", err(q.ListCycles, pb.ListCyclesRequest(currency="")))
print("rev unknown", err(admin.ReverseCycle, pb.ReverseCycleRequest(cycle_id="nope", currency=C, reason="")))
liq(C,"L3","c9",-10)
print("rev open", err(admin.ReverseCycle, pb.ReverseCycleRequest(cycle_id="c9", currency=C, reason="")))
print("rev long", err(admin.ReverseCycle, pb.ReverseCycleRequest(cycle_id="c1", currency=C, reason="r"*5000)))
print("verify", q.VerifyLedger(pb.VerifyLedgerRequest(currency=C)))
