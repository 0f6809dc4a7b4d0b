"""What the CLI prints: protobuf JSON for programs, rich tables for people.

`--json` prints each reply as one line of protobuf JSON (the proto's field names; 64-bit
integers as strings, as the proto3 JSON mapping writes them; fields at their default value
included, so that a program finds `"ok": false` rather than no key). Otherwise amounts are
shown as decimals at their currency's scale and enums by their short names. Markup is off
everywhere: a memo or a server message with brackets in it is printed as it is.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table

from ledger.api.v1 import insurance_pb2 as pb
from ledger.client.amounts import show

# Wide enough for a 64-character digest beside its label when the output is not a terminal
# (rich would otherwise assume 80 columns and wrap it); COLUMNS still wins.
PIPE_WIDTH = 160


def console(stream: Any) -> Console:
    width = None if stream.isatty() or "COLUMNS" in os.environ else PIPE_WIDTH
    return Console(file=stream, markup=False, highlight=False, emoji=False, width=width)


def stdout() -> Console:
    return console(sys.stdout)


def stderr() -> Console:
    return console(sys.stderr)


def as_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(message: Message) -> None:
    sys.stdout.write(json.dumps(as_dict(message), ensure_ascii=False) + "\n")
    sys.stdout.flush()


def enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)


def timestamp(value: Timestamp) -> str:
    if value.seconds == 0 and value.nanos == 0:
        return ""
    moment = value.ToDatetime(tzinfo=datetime.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def key_values(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return table


def rows_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for header in headers:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def _ranking(value: int) -> list[tuple[str, str]]:
    """The ranking, when the server says which (UNSPECIFIED tells nothing)."""
    if value == pb.RANKING_UNSPECIFIED:
        return []
    return [("ranking", enum_name(pb.Ranking, value, "RANKING_").lower())]


def currencies(reply: pb.ListCurrenciesResponse) -> Table:
    return rows_table(
        "Currencies", ("code", "scale"), ((c.code, str(c.scale)) for c in reply.currencies)
    )


def contract(reply: pb.Contract) -> Table:
    return key_values(
        f"Contract {reply.symbol}",
        [
            ("symbol", reply.symbol),
            ("margin currency", reply.margin_currency),
            ("kind", enum_name(pb.ContractKind, reply.kind, "CONTRACT_KIND_").lower()),
            ("multiplier", reply.multiplier),
        ],
    )


def policy(reply: pb.Policy) -> Table:
    return key_values(
        f"Policy of {reply.currency}",
        [
            ("insurance share", reply.insurance_share),
            ("coverage ratio", reply.coverage_ratio),
            ("version", str(reply.version)),
            *_ranking(reply.ranking),
        ],
    )


def fund(reply: pb.Fund, scale: int) -> Table:
    return key_values(
        f"Insurance fund of {reply.currency}",
        [
            ("balance", show(reply.balance, scale)),
            ("inflow total", show(reply.inflow_total, scale)),
            ("outflow total", show(reply.outflow_total, scale)),
        ],
    )


def postings(entry: pb.Entry, scale: int) -> str:
    return ", ".join(f"{p.account} {show(p.amount, scale)}" for p in entry.postings)


def entry(reply: pb.Entry, scale: int) -> Table:
    rows = [
        ("entry", str(reply.entry_id)),
        ("kind", enum_name(pb.EntryKind, reply.kind, "ENTRY_KIND_")),
        ("currency", reply.currency),
        ("reference", reply.reference),
        ("postings", postings(reply, scale)),
        ("created at", timestamp(reply.created_at)),
    ]
    if reply.reverses:
        rows.append(("reverses", f"entry {reply.reverses}"))
    if reply.memo:
        rows.append(("memo", reply.memo))
    return key_values(f"Entry {reply.entry_id}", rows)


def entries(reply_pages: Sequence[pb.ListEntriesResponse], account: str, scale: int) -> Table:
    return rows_table(
        f"Entries of {account}",
        ("entry", "time", "kind", "reference", "postings", "reverses", "memo"),
        (
            (
                str(e.entry_id),
                timestamp(e.created_at),
                enum_name(pb.EntryKind, e.kind, "ENTRY_KIND_"),
                e.reference,
                postings(e, scale),
                str(e.reverses) if e.reverses else "",
                e.memo,
            )
            for page in reply_pages
            for e in page.entries
        ),
    )


def liquidation_result(reply: pb.LiquidationResult, scale: int) -> Table:
    return key_values(
        f"Liquidation {reply.liquidation_id}",
        [
            ("outcome", enum_name(pb.Outcome, reply.outcome, "OUTCOME_")),
            ("engine result", show(reply.engine_result, scale)),
            ("fund balance after", show(reply.fund_balance, scale)),
            ("entry", str(reply.entry_id) if reply.entry_id else "none (break-even)"),
            ("currency", reply.currency),
        ],
    )


def cycle_summary(reply: pb.CycleSummary, scale: int) -> Table:
    money = {
        "loss total": reply.loss_total,
        "fund balance before": reply.fund_balance_before,
        "fund share": reply.fund_share,
        "fund paid": reply.fund_paid,
        "user due": reply.user_due,
        "allocated total": reply.allocated_total,
        "uncovered": reply.uncovered,
        "profit total": reply.profit_total,
        "participant profit": reply.participant_profit,
        "cutoff pnl": reply.cutoff_pnl,
    }
    rows = [
        ("cycle", reply.cycle_id),
        ("currency", reply.currency),
        ("state", enum_name(pb.CycleState, reply.state, "CYCLE_STATE_")),
        ("version", str(reply.version)),
        *((name, show(value, scale)) for name, value in money.items()),
        ("positions", str(reply.positions_total)),
        ("profitable", str(reply.profitable_count)),
        ("participants", str(reply.participant_count)),
        ("widened", "yes" if reply.widened else "no"),
        ("allocation rate", reply.allocation_rate),
        ("insurance share", reply.insurance_share),
        ("coverage ratio", reply.coverage_ratio),
        *_ranking(reply.ranking),
        ("input digest", reply.input_digest),
        ("closed at", timestamp(reply.closed_at)),
    ]
    return key_values(f"Cycle {reply.cycle_id} of {reply.currency}", rows)


def contracts(reply: pb.ListContractsResponse) -> Table:
    return rows_table(
        "Contracts",
        ("symbol", "margin currency", "kind", "multiplier"),
        (
            (
                c.symbol,
                c.margin_currency,
                enum_name(pb.ContractKind, c.kind, "CONTRACT_KIND_").lower(),
                c.multiplier,
            )
            for c in reply.contracts
        ),
    )


def policies(reply: pb.ListPoliciesResponse) -> Table:
    return rows_table(
        "Policy versions",
        ("version", "insurance share", "coverage ratio", "ranking"),
        (
            (
                str(p.version),
                p.insurance_share,
                p.coverage_ratio,
                enum_name(pb.Ranking, p.ranking, "RANKING_").lower(),
            )
            for p in reply.policies
        ),
    )


def liquidation(reply: pb.Liquidation, scale: int) -> Table:
    request, result = reply.request, reply.result
    side = enum_name(pb.Side, request.side, "SIDE_").lower()
    return key_values(
        f"Liquidation {request.liquidation_id}",
        [
            ("cycle", request.cycle_id),
            ("symbol", request.symbol),
            ("account", str(request.account_id)),
            ("position", str(request.position_id)),
            ("side", side),
            ("quantity", request.quantity),
            ("takeover price", request.takeover_price),
            ("close price", request.close_price),
            ("remaining margin", show(request.remaining_margin, scale)),
            ("outcome", enum_name(pb.Outcome, result.outcome, "OUTCOME_")),
            ("engine result", show(result.engine_result, scale)),
            ("fund balance after", show(result.fund_balance, scale)),
            ("entry", str(result.entry_id) if result.entry_id else "none (break-even)"),
            ("recorded at", timestamp(reply.recorded_at)),
            ("reversed", "yes" if reply.reversed else "no"),
        ],
    )


def cycles(pages: Sequence[pb.ListCyclesResponse], currency: str, scale: int) -> Table:
    return rows_table(
        f"Closed cycles of {currency}, newest first",
        ("cycle", "version", "state", "closed at", "loss", "fund paid", "allocated",
         "uncovered", "participants", "allocation rate"),
        (
            (
                c.cycle_id,
                str(c.version),
                enum_name(pb.CycleState, c.state, "CYCLE_STATE_"),
                timestamp(c.closed_at),
                show(c.loss_total, scale),
                show(c.fund_paid, scale),
                show(c.allocated_total, scale),
                show(c.uncovered, scale),
                f"{c.participant_count} of {c.profitable_count}",
                c.allocation_rate,
            )
            for page in pages
            for c in page.cycles
        ),
    )  # fmt: skip


def open_cycles(reply: pb.ListOpenCyclesResponse, scale: int | None) -> Table:
    """Amounts at the currency's scale; in minor units (`scale` None) over several currencies."""
    return rows_table(
        "Open cycles" + (" (amounts in minor units)" if scale is None else ""),
        ("cycle", "currency", "loss", "liquidations", "first recorded", "last recorded"),
        (
            (
                c.cycle_id,
                c.currency,
                str(c.loss_total) if scale is None else show(c.loss_total, scale),
                str(c.liquidations_count),
                timestamp(c.first_recorded_at),
                timestamp(c.last_recorded_at),
            )
            for c in reply.cycles
        ),
    )


def explanation(reply: pb.AllocationExplanation, scale: int) -> Table:
    share = f"{reply.share_numerator}/{reply.share_denominator}"
    return key_values(
        f"Position {reply.position_id}",
        [
            ("account", str(reply.account_id)),
            ("pnl", show(reply.pnl, scale)),
            ("rank", f"{reply.rank} of {reply.profitable_count} profitable"),
            ("cutoff pnl", show(reply.cutoff_pnl, scale)),
            ("participant", "yes" if reply.participant else "no"),
            ("participant profit", show(reply.participant_profit, scale)),
            ("allocated total", show(reply.allocated_total, scale)),
            ("exact share (minor units)", share),
            ("amount", show(reply.amount, scale)),
            ("remainder unit", "yes" if reply.remainder_unit else "no"),
        ],
    )
