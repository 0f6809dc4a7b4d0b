"""The `ledger` console script: `ledger serve` runs the server; every other command is a
client of a running one, over gRPC.

Global options say where the server is and how to reach it (--target, TLS); the caller's
token comes from LEDGER_TOKEN only, so that it never shows in a process list or a shell's
history. Commands print tables for people and, with --json, one line of protobuf JSON per
reply for programs. A failed call prints the server's status and message on stderr and exits
2 for INVALID_ARGUMENT (as a malformed argument does), 1 for any other status.

This module only declares the commands; what they do lives in ledger/client/ (connection,
files, streams, amounts, tables) and ledger/loadtest.py.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import grpc
import typer
from typer.core import TyperGroup

from ledger.api.v1 import insurance_pb2 as pb
from ledger.client import render
from ledger.client.amounts import show, to_minor
from ledger.client.connection import (
    DEFAULT_TARGET,
    Client,
    Endpoint,
    UsageProblem,
    status_name,
)
from ledger.limits import LIQUIDATIONS_PER_CALL_MAX, PAGE_SIZE_MAX

FAILURES_SHOWN_MAX = 20  # failed items of record-file listed on stderr; the rest are counted


class _Commands(TyperGroup):
    """The command tree, with `serve` loaded only when it is asked for (see cli_serve)."""

    def list_commands(self, ctx: typer.Context) -> list[str]:  # type: ignore[override]
        return ["serve", *super().list_commands(ctx)]

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:  # type: ignore[override]
        if cmd_name == "serve":
            from ledger import cli_serve

            return typer.main.get_command(cli_serve.app)
        return super().get_command(ctx, cmd_name)


def _typer(help: str) -> typer.Typer:
    return typer.Typer(
        help=help,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
        rich_markup_mode="markdown",
    )


app = typer.Typer(
    cls=_Commands,
    help=__doc__.split("\n\n")[0] if __doc__ else None,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="markdown",
)
currency_app = _typer("Currencies: create one, list them.")
contract_app = _typer("Contracts: the symbols liquidations name.")
policy_app = _typer("The insurance-fund policy of a currency.")
fund_app = _typer("The insurance fund: deposits, withdrawals, its balance.")
liquidation_app = _typer("Liquidations: one, or a file of them in batches.")
cycle_app = _typer("Settlement cycles: close or preview from a file, show, allocations.")
entries_app = _typer("The journal.")
app.add_typer(currency_app, name="currency")
app.add_typer(contract_app, name="contract")
app.add_typer(policy_app, name="policy")
app.add_typer(fund_app, name="fund")
app.add_typer(liquidation_app, name="liquidation")
app.add_typer(cycle_app, name="cycle")
app.add_typer(entries_app, name="entries")

Json = Annotated[
    bool,
    typer.Option(
        "--json", help="print each reply as one line of protobuf JSON (64-bit integers as strings)"
    ),
]
CurrencyOption = Annotated[str, typer.Option("--currency", help="the currency's code")]


class Kind(StrEnum):
    linear = "linear"
    inverse = "inverse"


class Side(StrEnum):
    long = "long"
    short = "short"


@app.callback()
def _connection(
    ctx: typer.Context,
    target: Annotated[
        str, typer.Option("--target", envvar="LEDGER_TARGET", help="the server's HOST:PORT")
    ] = DEFAULT_TARGET,
    tls_ca: Annotated[
        str,
        typer.Option(
            "--tls-ca",
            envvar="LEDGER_TLS_CA",
            help="connect with TLS, trusting the CA certificates of this PEM file",
            show_default=False,
        ),
    ] = "",
    tls_cert: Annotated[
        str,
        typer.Option(
            "--tls-cert",
            envvar="LEDGER_TLS_CLIENT_CERT",
            help="mutual TLS: this client's certificate chain (PEM)",
            show_default=False,
        ),
    ] = "",
    tls_key: Annotated[
        str,
        typer.Option(
            "--tls-key",
            envvar="LEDGER_TLS_CLIENT_KEY",
            help="mutual TLS: the private key of --tls-cert (PEM)",
            show_default=False,
        ),
    ] = "",
    tls_server_name: Annotated[
        str,
        typer.Option(
            "--tls-server-name",
            envvar="LEDGER_TLS_SERVER_NAME",
            help="the name to expect in the server's certificate, when it is not the target's host",
            show_default=False,
        ),
    ] = "",
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            envvar="LEDGER_TIMEOUT",
            help="seconds a unary call may take (streams have no deadline)",
        ),
    ] = 60.0,
) -> None:
    """Every command but `serve` calls the server at --target; the token (if the server has
    an auth file) comes from the environment variable LEDGER_TOKEN."""
    ctx.obj = Endpoint(
        target=target,
        token=os.environ.get("LEDGER_TOKEN", "").strip(),
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_server_name=tls_server_name,
        timeout_s=timeout,
    )


# --- failures ------------------------------------------------------------------------------


def _fail(code: grpc.StatusCode | None, message: str) -> NoReturn:
    """The one way a command fails: the status (if a call's) and the message on stderr."""
    prefix = f"{code.name}: " if code is not None else ""
    print(f"ledger: {prefix}{message}", file=sys.stderr, flush=True)
    raise typer.Exit(exit_code(code))


def exit_code(code: grpc.StatusCode | None) -> int:
    """2 for what the caller got wrong (INVALID_ARGUMENT, a usage problem), 1 otherwise."""
    return 2 if code in (None, grpc.StatusCode.INVALID_ARGUMENT) else 1


@contextmanager
def _client(ctx: typer.Context) -> Iterator[Client]:
    """A connected client whose call failures end the command with the status."""
    endpoint: Endpoint = ctx.obj
    try:
        with Client(endpoint) as client:
            yield client
    except UsageProblem as problem:
        _fail(None, str(problem))
    except grpc.RpcError as error:
        call: Any = error
        _fail(call.code(), call.details() or "")


def _currencies(client: Client) -> dict[str, int]:
    reply = client.unary(
        "Admin", "ListCurrencies", pb.ListCurrenciesRequest(), pb.ListCurrenciesResponse
    )
    return {c.code: c.scale for c in reply.currencies}


def _scale(client: Client, code: str, *, needed: bool = True) -> int:
    """The currency's scale (decimals of its minor unit), for reading and showing amounts.

    ListCurrencies is an Admin call: a `reader` token may not make it. Where the scale is only
    needed to show amounts, they are then shown in minor units, and stderr says so."""
    try:
        scales = _currencies(client)
    except grpc.RpcError as error:
        if needed or not (isinstance(error, grpc.Call) and error.code() == DENIED):
            raise
        print(
            f"ledger: note: amounts in minor units of {code} (this token may not call "
            "ListCurrencies to learn the scale)",
            file=sys.stderr,
        )
        return 0
    if code not in scales:
        _fail(grpc.StatusCode.NOT_FOUND, f"currency: unknown currency {code!r}")
    return scales[code]


DENIED = grpc.StatusCode.PERMISSION_DENIED


def _show(table: Any) -> None:
    render.stdout().print(table)


# --- currency, contract, policy --------------------------------------------------------------


@currency_app.command("create")
def currency_create(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="1 to 16 characters of A-Z0-9, e.g. USDT")],
    scale: Annotated[int, typer.Option("--scale", help="decimals of the minor unit, 0 to 18")],
    json: Json = False,
) -> None:
    """Create a currency (its accounts and default policy); the same again is a no-op."""
    with _client(ctx) as client:
        reply = client.unary(
            "Admin", "CreateCurrency", pb.CreateCurrencyRequest(code=code, scale=scale), pb.Currency
        )
    if json:
        render.print_json(reply)
    else:
        print(f"currency {reply.code}: scale {reply.scale}")


@currency_app.command("list")
def currency_list(ctx: typer.Context, json: Json = False) -> None:
    """Every currency and its scale."""
    with _client(ctx) as client:
        reply = client.unary(
            "Admin", "ListCurrencies", pb.ListCurrenciesRequest(), pb.ListCurrenciesResponse
        )
    if json:
        render.print_json(reply)
    else:
        _show(render.currencies(reply))


@contract_app.command("upsert")
def contract_upsert(
    ctx: typer.Context,
    symbol: Annotated[str, typer.Argument(help="the contract's symbol, e.g. BTCUSDT")],
    currency: Annotated[str, typer.Option("--currency", help="the margin currency's code")],
    kind: Annotated[Kind, typer.Option("--kind", help="linear or inverse")],
    multiplier: Annotated[
        str, typer.Option("--multiplier", help="decimal > 0; for inverse the face value")
    ],
    json: Json = False,
) -> None:
    """Create or change a contract."""
    request = pb.UpsertContractRequest(
        symbol=symbol,
        margin_currency=currency,
        kind=pb.CONTRACT_KIND_LINEAR if kind is Kind.linear else pb.CONTRACT_KIND_INVERSE,
        multiplier=multiplier,
    )
    with _client(ctx) as client:
        reply = client.unary("Admin", "UpsertContract", request, pb.Contract)
    if json:
        render.print_json(reply)
    else:
        _show(render.contract(reply))


@policy_app.command("set")
def policy_set(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="the currency's code")],
    insurance_share: Annotated[
        str, typer.Option("--insurance-share", help="decimal in [0, 1]: the fund's part")
    ],
    coverage_ratio: Annotated[
        str, typer.Option("--coverage-ratio", help="decimal in (0, 1]: profit the cut covers")
    ],
    ranking: Annotated[
        str,
        typer.Option(
            "--ranking",
            help="what the cut ranks: position (the seed's rule) or account; left out, the "
            "ranking in force stays",
            show_default=False,
        ),
    ] = "",
    json: Json = False,
) -> None:
    """Set the policy in force for the next closes (a new version when it changes)."""
    rankings = {"": pb.RANKING_UNSPECIFIED, "position": pb.RANKING_POSITION}
    rankings["account"] = pb.RANKING_ACCOUNT
    if ranking.lower() not in rankings:
        _fail(None, f"--ranking {ranking!r} is not position or account")
    request = pb.SetPolicyRequest(
        currency=code,
        insurance_share=insurance_share,
        coverage_ratio=coverage_ratio,
        ranking=rankings[ranking.lower()],
    )
    with _client(ctx) as client:
        reply = client.unary("Admin", "SetPolicy", request, pb.Policy)
    if json:
        render.print_json(reply)
    else:
        _show(render.policy(reply))


# --- fund ------------------------------------------------------------------------------------


def _transfer(
    ctx: typer.Context,
    code: str,
    amount: str,
    transfer_id: str,
    memo: str,
    direction: pb.TransferDirection,
    json: bool,
) -> None:
    with _client(ctx) as client:
        scale = _scale(client, code)
        minor = to_minor(amount, scale, currency=code)
        request = pb.TransferFundRequest(
            transfer_id=transfer_id, currency=code, direction=direction, amount=minor, memo=memo
        )
        reply = client.unary("Admin", "TransferFund", request, pb.Entry)
    if json:
        render.print_json(reply)
    else:
        _show(render.entry(reply, scale))


TransferId = Annotated[
    str, typer.Option("--id", help="the transfer's id: the same id again is the same transfer")
]
Amount = Annotated[str, typer.Argument(help="a decimal at the currency's scale, e.g. 12.34")]
Memo = Annotated[str, typer.Option("--memo", help="a note kept with the entry")]


@fund_app.command("deposit")
def fund_deposit(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="the currency's code")],
    amount: Amount,
    transfer_id: TransferId,
    memo: Memo = "",
    json: Json = False,
) -> None:
    """Move AMOUNT into the insurance fund (sent as minor units: 12.34 at scale 2 is 1234)."""
    _transfer(ctx, code, amount, transfer_id, memo, pb.TRANSFER_DIRECTION_DEPOSIT, json)


@fund_app.command("withdraw")
def fund_withdraw(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="the currency's code")],
    amount: Amount,
    transfer_id: TransferId,
    memo: Memo = "",
    json: Json = False,
) -> None:
    """Move AMOUNT out of the insurance fund (never below zero)."""
    _transfer(ctx, code, amount, transfer_id, memo, pb.TRANSFER_DIRECTION_WITHDRAW, json)


@fund_app.command("show")
def fund_show(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="the currency's code")],
    json: Json = False,
) -> None:
    """The fund's balance and its inflow and outflow totals."""
    with _client(ctx) as client:
        reply = client.unary("Query", "GetFund", pb.GetFundRequest(currency=code), pb.Fund)
        scale = 0 if json else _scale(client, code, needed=False)
    if json:
        render.print_json(reply)
    else:
        _show(render.fund(reply, scale))


# --- liquidations ----------------------------------------------------------------------------


@liquidation_app.command("record")
def liquidation_record(
    ctx: typer.Context,
    liquidation_id: Annotated[str, typer.Option("--id", help="the liquidation's id")],
    cycle: Annotated[str, typer.Option("--cycle", help="the settlement cycle it belongs to")],
    symbol: Annotated[str, typer.Option("--symbol", help="the contract")],
    account: Annotated[int, typer.Option("--account", help="the liquidated account", min=0)],
    position: Annotated[int, typer.Option("--position", help="the liquidated position", min=0)],
    side: Annotated[Side, typer.Option("--side", help="long or short")],
    quantity: Annotated[str, typer.Option("--quantity", help="decimal, contracts")],
    takeover: Annotated[str, typer.Option("--takeover", help="decimal: the takeover price")],
    close: Annotated[str, typer.Option("--close", help="decimal: the close price")],
    margin: Annotated[int, typer.Option("--margin", help="remaining margin, in minor units")] = 0,
    json: Json = False,
) -> None:
    """Record one liquidation: its result flows into the fund or the cycle's loss."""
    request = pb.RecordLiquidationRequest(
        liquidation_id=liquidation_id,
        cycle_id=cycle,
        symbol=symbol,
        account_id=account,
        position_id=position,
        side=pb.SIDE_LONG if side is Side.long else pb.SIDE_SHORT,
        quantity=quantity,
        takeover_price=takeover,
        close_price=close,
        remaining_margin=margin,
    )
    with _client(ctx) as client:
        reply = client.unary("Clearing", "RecordLiquidation", request, pb.LiquidationResult)
        scale = 0 if json else _scale(client, reply.currency, needed=False)
    if json:
        render.print_json(reply)
    else:
        _show(render.liquidation_result(reply, scale))


@liquidation_app.command("record-file")
def liquidation_record_file(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV or Parquet, one liquidation a row, columns named like "
            "RecordLiquidationRequest's fields (remaining_margin may be left out)"
        ),
    ],
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            help="liquidations per RecordLiquidations call (one durable commit each)",
            min=1,
            max=LIQUIDATIONS_PER_CALL_MAX,
        ),
    ] = 1000,
    json: Json = False,
) -> None:
    """Record a file of liquidations through RecordLiquidations, in batches, with progress.

    Prints how many items ended with each status (and each outcome); exits non-zero when
    any item failed (2 when every failure is INVALID_ARGUMENT), listing the first failures.
    A re-run of the same file is safe: a recorded id gives its stored result again.
    """
    from ledger.client.files import read_liquidations

    codes: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    done = 0
    with _client(ctx) as client:
        liquidations = read_liquidations(file)
        with _progress(json) as progress:
            task = progress.add_task("recording", total=liquidations.rows)
            for batch in liquidations.batches(batch_size):
                request = pb.RecordLiquidationsRequest(liquidations=batch)
                try:
                    reply = client.unary(
                        "Clearing", "RecordLiquidations", request, pb.RecordLiquidationsResponse
                    )
                except grpc.RpcError:
                    print(
                        f"ledger: stopped after {done} of {liquidations.rows} rows", file=sys.stderr
                    )
                    raise
                if json:
                    render.print_json(reply)
                for n, (item, outcome) in enumerate(zip(batch, reply.outcomes, strict=True)):
                    name = (
                        grpc.StatusCode.OK.name if outcome.code == 0 else status_name(outcome.code)
                    )
                    codes[name] += 1
                    if outcome.code == 0:
                        outcomes[
                            render.enum_name(pb.Outcome, outcome.result.outcome, "OUTCOME_")
                        ] += 1
                    elif len(failures) < FAILURES_SHOWN_MAX:
                        failures.append(
                            f"row {done + n + 1} ({item.liquidation_id}): {name}: {outcome.message}"
                        )
                done += len(batch)
                progress.update(task, completed=done)
    failed = sum(count for name, count in codes.items() if name != "OK")
    if not json:
        rows = [(name, str(count)) for name, count in sorted(codes.items())]
        rows += [(f"OK, {name}", str(count)) for name, count in sorted(outcomes.items())]
        _show(render.rows_table(f"{done} liquidations from {file.name}", ("status", "items"), rows))
    if failed:
        for line in failures:
            print(f"ledger: {line}", file=sys.stderr)
        if failed > len(failures):
            print(f"ledger: … and {failed - len(failures)} more failed items", file=sys.stderr)
        only_invalid = set(codes) - {"OK"} == {"INVALID_ARGUMENT"}
        raise typer.Exit(2 if only_invalid else 1)


@contextmanager
def _progress(quiet: bool) -> Iterator[Any]:
    """A progress bar on stderr (stdout stays the command's output, JSON or tables)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=render.stderr(),
        transient=True,
        disable=quiet or not sys.stderr.isatty(),
    )
    with progress:
        yield progress


# --- cycles ----------------------------------------------------------------------------------


def _cycle_stream(
    ctx: typer.Context, method: str, cycle: str, currency: str, positions: Path, json: bool
) -> None:
    from ledger.client.files import read_positions
    from ledger.client.streams import cycle_input

    with _client(ctx) as client:
        scale = _scale(client, currency, needed=False)
        columns = read_positions(positions)
        with _progress(json) as progress:
            task = progress.add_task(f"streaming {positions.name}", total=len(columns))

            def messages() -> Iterator[bytes]:
                for message, rows in cycle_input(cycle, currency, columns):
                    yield message
                    progress.advance(task, rows)
                progress.update(task, description="waiting for the server")

            reply = client.stream_unary_raw("Clearing", method, messages(), pb.CycleSummary)
    if json:
        render.print_json(reply)
    else:
        _show(render.cycle_summary(reply, scale))


Positions = Annotated[
    Path,
    typer.Option(
        "--positions",
        help="CSV or Parquet with columns position_id, account_id, pnl (minor units)",
    ),
]
CycleId = Annotated[str, typer.Argument(help="the cycle's id")]


@cycle_app.command("close")
def cycle_close(
    ctx: typer.Context,
    cycle: CycleId,
    currency: CurrencyOption,
    positions: Positions,
    json: Json = False,
) -> None:
    """Close the cycle: cover its loss from the fund and allocate the rest over the file's
    profitable positions (streamed as 65,536-row chunks). The same file again is a no-op."""
    _cycle_stream(ctx, "CloseCycle", cycle, currency, positions, json)


@cycle_app.command("preview")
def cycle_preview(
    ctx: typer.Context,
    cycle: CycleId,
    currency: CurrencyOption,
    positions: Positions,
    json: Json = False,
) -> None:
    """What closing the cycle with this file would do, writing nothing."""
    _cycle_stream(ctx, "PreviewCycle", cycle, currency, positions, json)


@cycle_app.command("show")
def cycle_show(
    ctx: typer.Context,
    cycle: CycleId,
    currency: CurrencyOption,
    version: Annotated[
        int, typer.Option("--version", help="the close's version; 0: the latest", min=0)
    ] = 0,
    json: Json = False,
) -> None:
    """The summary of a closed cycle."""
    request = pb.GetCycleRequest(cycle_id=cycle, currency=currency, version=version)
    with _client(ctx) as client:
        reply = client.unary("Query", "GetCycle", request, pb.CycleSummary)
        scale = 0 if json else _scale(client, currency, needed=False)
    if json:
        render.print_json(reply)
    else:
        _show(render.cycle_summary(reply, scale))


@cycle_app.command("reverse")
def cycle_reverse(
    ctx: typer.Context,
    cycle: CycleId,
    currency: CurrencyOption,
    reason: Annotated[str, typer.Option("--reason", help="why (kept as the entries' memo)")],
    json: Json = False,
) -> None:
    """Reverse the cycle's close (ReverseCycle): its cover, uncovered rest and every
    allocation flow go back, as new entries; the cycle is open again and may be closed again
    with new input. The same again returns the same summary."""
    request = pb.ReverseCycleRequest(cycle_id=cycle, currency=currency, reason=reason)
    with _client(ctx) as client:
        reply = client.unary("Admin", "ReverseCycle", request, pb.CycleSummary)
        scale = 0 if json else _scale(client, currency, needed=False)
    if json:
        render.print_json(reply)
    else:
        _show(render.cycle_summary(reply, scale))


@cycle_app.command("allocations")
def cycle_allocations(
    ctx: typer.Context,
    cycle: CycleId,
    currency: CurrencyOption,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="where to write: .csv or .parquet, columns position_id, account_id, pnl, amount "
            "(minor units), in position order",
        ),
    ],
    account: Annotated[
        int | None, typer.Option("--account", help="only this account's rows", min=0)
    ] = None,
    json: Json = False,
) -> None:
    """Write a closed cycle's allocations (StreamAllocations) to a file."""
    from ledger.client.files import file_format, write_allocations
    from ledger.client.streams import Allocations, allocation_columns, concatenate

    try:
        file_format(out)  # a wrong suffix is refused before the call
    except UsageProblem as problem:
        _fail(None, str(problem))
    request = pb.StreamAllocationsRequest(cycle_id=cycle, currency=currency)
    if account is not None:
        request.account_id = account
    parts: list[Allocations] = []
    with _client(ctx) as client:
        scale = _scale(client, currency, needed=False)
        with _progress(json) as progress:
            task = progress.add_task("receiving allocations", total=None)
            chunks = client.unary_stream("Query", "StreamAllocations", request, pb.AllocationChunk)
            for chunk in chunks:
                if json:
                    render.print_json(chunk)
                parts.extend(allocation_columns([chunk]))
                progress.advance(task, len(chunk.amount))
        allocations = concatenate(parts)
        write_allocations(out, allocations)
    if not json:
        total = int(allocations.amount.sum(dtype="int64")) if len(allocations) else 0
        print(
            f"wrote {len(allocations)} allocation rows to {out} "
            f"(allocated {show(total, scale)} {currency})"
        )


# --- reading back, corrections, statements ---------------------------------------------------


@contract_app.command("list")
def contract_list(
    ctx: typer.Context,
    currency: Annotated[
        str, typer.Option("--currency", help="only the contracts margined in this currency")
    ] = "",
    json: Json = False,
) -> None:
    """The contracts (ListContracts), by symbol."""
    request = pb.ListContractsRequest(currency=currency)
    with _client(ctx) as client:
        reply = client.unary("Query", "ListContracts", request, pb.ListContractsResponse)
    if json:
        render.print_json(reply)
    else:
        _show(render.contracts(reply))


@policy_app.command("show")
def policy_show(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="the currency's code")],
    json: Json = False,
) -> None:
    """The policy in force (GetPolicy)."""
    with _client(ctx) as client:
        reply = client.unary("Query", "GetPolicy", pb.GetPolicyRequest(currency=code), pb.Policy)
    if json:
        render.print_json(reply)
    else:
        _show(render.policy(reply))


@policy_app.command("history")
def policy_history(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="the currency's code")],
    json: Json = False,
) -> None:
    """Every version of the currency's policy (ListPolicies), oldest first."""
    request = pb.ListPoliciesRequest(currency=code)
    with _client(ctx) as client:
        reply = client.unary("Query", "ListPolicies", request, pb.ListPoliciesResponse)
    if json:
        render.print_json(reply)
    else:
        _show(render.policies(reply))


@liquidation_app.command("show")
def liquidation_show(
    ctx: typer.Context,
    liquidation_id: Annotated[str, typer.Argument(help="the liquidation's id")],
    json: Json = False,
) -> None:
    """A recorded liquidation: its request, its result and whether it was reversed."""
    request = pb.GetLiquidationRequest(liquidation_id=liquidation_id)
    with _client(ctx) as client:
        reply = client.unary("Query", "GetLiquidation", request, pb.Liquidation)
        scale = 0 if json else _scale(client, reply.result.currency, needed=False)
    if json:
        render.print_json(reply)
    else:
        _show(render.liquidation(reply, scale))


@liquidation_app.command("reverse")
def liquidation_reverse(
    ctx: typer.Context,
    liquidation_id: Annotated[str, typer.Argument(help="the liquidation's id")],
    reason: Annotated[str, typer.Option("--reason", help="why (kept as the entry's memo)")],
    json: Json = False,
) -> None:
    """Post the opposite of a liquidation's entry, in its open cycle (ReverseLiquidation);
    the same again returns the same entry."""
    request = pb.ReverseLiquidationRequest(liquidation_id=liquidation_id, reason=reason)
    with _client(ctx) as client:
        reply = client.unary("Admin", "ReverseLiquidation", request, pb.Entry)
        scale = 0 if json else _scale(client, reply.currency, needed=False)
    if json:
        render.print_json(reply)
    else:
        _show(render.entry(reply, scale))


@cycle_app.command("list")
def cycle_list(
    ctx: typer.Context,
    currency: CurrencyOption,
    limit: Annotated[
        int, typer.Option("--limit", help="at most this many cycles, newest first", min=1)
    ] = 100,
    json: Json = False,
) -> None:
    """The currency's closed cycles, newest first (ListCycles, page by page)."""
    pages: list[pb.ListCyclesResponse] = []
    with _client(ctx) as client:
        token, left = "", limit
        while left > 0:
            request = pb.ListCyclesRequest(
                currency=currency, page_size=min(left, 1000), page_token=token
            )
            page = client.unary("Query", "ListCycles", request, pb.ListCyclesResponse)
            if json:
                render.print_json(page)
            pages.append(page)
            left -= len(page.cycles)
            token = page.next_page_token
            if not token:
                break
        scale = 0 if json else _scale(client, currency, needed=False)
    if not json:
        _show(render.cycles(pages, currency, scale))


@cycle_app.command("open")
def cycle_open(
    ctx: typer.Context,
    currency: Annotated[
        str, typer.Option("--currency", help="only this currency's open cycles")
    ] = "",
    json: Json = False,
) -> None:
    """The cycles with liquidations and no close in force (ListOpenCycles)."""
    request = pb.ListOpenCyclesRequest(currency=currency)
    with _client(ctx) as client:
        reply = client.unary("Query", "ListOpenCycles", request, pb.ListOpenCyclesResponse)
        scale = _scale(client, currency, needed=False) if currency and not json else None
    if json:
        render.print_json(reply)
    else:
        _show(render.open_cycles(reply, scale))


@cycle_app.command("explain")
def cycle_explain(
    ctx: typer.Context,
    cycle: CycleId,
    currency: CurrencyOption,
    position: Annotated[int, typer.Option("--position", help="the position's id", min=0)],
    json: Json = False,
) -> None:
    """Why a position of a closed cycle was charged what it was (ExplainAllocation)."""
    request = pb.ExplainAllocationRequest(cycle_id=cycle, currency=currency, position_id=position)
    with _client(ctx) as client:
        reply = client.unary("Query", "ExplainAllocation", request, pb.AllocationExplanation)
        scale = 0 if json else _scale(client, currency, needed=False)
    if json:
        render.print_json(reply)
    else:
        _show(render.explanation(reply, scale))


# --- the journal and its check ---------------------------------------------------------------


def _entry_kind(text: str) -> str:
    """`fund_deposit`, `FUND_DEPOSIT` or `ENTRY_KIND_FUND_DEPOSIT` → the enum's full name."""
    name = text.strip().upper().removeprefix("ENTRY_KIND_")
    try:
        pb.EntryKind.Value(f"ENTRY_KIND_{name}")
        return f"ENTRY_KIND_{name}"
    except ValueError:
        kinds = ", ".join(
            k.removeprefix("ENTRY_KIND_").lower()
            for k in pb.EntryKind.keys()  # noqa: SIM118 (an enum wrapper, not a dict)
            if k != "ENTRY_KIND_UNSPECIFIED"
        )
        raise typer.BadParameter(f"{text!r} is not one of {kinds}") from None


@entries_app.command("list")
def entries_list(
    ctx: typer.Context,
    currency: CurrencyOption,
    account: Annotated[
        str,
        typer.Option(
            "--account",
            help="insurance_fund, liquidation_engine, system_loss, uncovered_loss, external or "
            "user:ID",
        ),
    ],
    kind: Annotated[
        str | None,
        typer.Option("--kind", help="only entries of this kind, e.g. fund_deposit, allocation"),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", help="at most this many entries, newest first; 0: all", min=0)
    ] = 100,
    json: Json = False,
) -> None:
    """An account's entries, newest first (pages of up to 1,000 are fetched as needed)."""
    kind_value = "ENTRY_KIND_UNSPECIFIED" if kind is None else _entry_kind(kind)
    pages: list[pb.ListEntriesResponse] = []
    with _client(ctx) as client:
        token = ""
        left = limit
        while True:
            size = PAGE_SIZE_MAX if limit == 0 else min(left, PAGE_SIZE_MAX)
            request = pb.ListEntriesRequest(
                currency=currency,
                account=account,
                kind=kind_value,
                page_size=size,
                page_token=token,
            )
            page = client.unary("Query", "ListEntries", request, pb.ListEntriesResponse)
            if json:
                render.print_json(page)
            pages.append(page)
            left -= len(page.entries)
            token = page.next_page_token
            if not token or (limit and left <= 0):
                break
        scale = 0 if json else _scale(client, currency, needed=False)
    if not json:
        _show(render.entries(pages, account, scale))


@app.command("verify")
def verify(
    ctx: typer.Context,
    currency: Annotated[
        str, typer.Option("--currency", help="only this currency; default every one")
    ] = "",
    json: Json = False,
) -> None:
    """Recompute every chain and check every invariant of the ledger; exit 1 when not ok."""
    with _client(ctx) as client:
        reply = client.unary(
            "Query", "VerifyLedger", pb.VerifyLedgerRequest(currency=currency), pb.VerifyReport
        )
    if json:
        render.print_json(reply)
    elif reply.ok:
        print(f"ok: {reply.entries_checked} entries checked, no problem")
    else:
        print(f"NOT OK: {len(reply.problems)} problems in {reply.entries_checked} entries checked")
        for problem in reply.problems:
            print(f"  {problem}")
    if not reply.ok:
        raise typer.Exit(1)


# --- the load test ---------------------------------------------------------------------------


@app.command("loadtest")
def loadtest(
    ctx: typer.Context,
    scenario: Annotated[str, typer.Argument(help="liquidations, batch, close or mixed")],
    seconds: Annotated[
        float, typer.Option("--seconds", help="how long the callers call", min=0.1)
    ] = 10.0,
    callers: Annotated[
        int, typer.Option("--callers", help="concurrent callers (in all processes)", min=1)
    ] = 8,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            help="liquidations per RecordLiquidations call",
            min=1,
            max=LIQUIDATIONS_PER_CALL_MAX,
        ),
    ] = 1000,
    positions: Annotated[
        int, typer.Option("--positions", help="positions of each cycle closed", min=1)
    ] = 100_000,
    distribution: Annotated[
        str, typer.Option("--distribution", help="the positions' pnl: flat or heavy (heavy-tailed)")
    ] = "heavy",
    processes: Annotated[
        int,
        typer.Option("--processes", help="client processes (each an event loop of its own)", min=1),
    ] = 1,
    currency: Annotated[
        str, typer.Option("--currency", help="the currency (and its contract) the load uses")
    ] = "LT",
    json: Json = False,
) -> None:
    """Load the server from this machine and print calls and items per second and latency
    percentiles per RPC, and errors by status; exit 1 if any call or item failed."""
    from ledger import loadtest as lt

    plan = lt.Plan(
        scenario=scenario,
        seconds=seconds,
        callers=callers,
        batch_size=batch_size,
        positions=positions,
        distribution=distribution,
        processes=processes,
        currency=currency,
    )
    endpoint: Endpoint = ctx.obj
    try:
        plan.check()
        report = lt.run(endpoint, plan, live=not json)
    except UsageProblem as problem:
        _fail(None, str(problem))
    except grpc.RpcError as error:
        call: Any = error
        _fail(call.code(), f"setting up the load: {call.details()}")
    if json:
        sys.stdout.write(report.to_json() + "\n")
    else:
        _show(report.table())
        errors = report.errors_table()
        if errors is not None:
            _show(errors)
    if report.failed:
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> int:
    """The console script; returns the exit code (typer ends every command with one)."""
    try:
        app(args=argv, prog_name="ledger")
    except SystemExit as exit:
        if exit.code is None:
            return 0
        if isinstance(exit.code, int):
            return exit.code
        print(exit.code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
