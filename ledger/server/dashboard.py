"""The read-only insurance-fund dashboard: one page and the JSON behind it, over HTTP.

A risk desk wants to see a fund's history and a cycle's allocation without writing a gRPC
client, and other tools want the same numbers as JSON; so `--http-listen HOST:PORT` serves

    GET /                                                      the page (HTML, JS, CSS)
    GET /api/currencies                                        codes and scales
    GET /api/currencies/{code}/fund-history[?limit=N]          one point per fund entry
    GET /api/currencies/{code}/cycles[?limit=N]                closed cycles, newest first
    GET /api/currencies/{code}/cycles/{cycle_id}/concentration[?points=N]

The dashboard is a client of the same contract as everyone else: each handler calls the
server's own gRPC API over a channel to its port (with the server's TLS settings), sending
the HTTP request's `Authorization: Bearer <token>` as the call's `authorization` metadata.
So the server's auth interceptor decides who may read (the reader role is enough for the
Query service), the dashboard holds no credentials of its own and never opens the database,
and whatever a reader may not see through gRPC it may not see here either.

JSON conventions (those of the proto3 JSON mapping, as the CLI's --json prints them):
every 64-bit integer (money in minor units, ids, counts) is a string, so no value beyond
2^53 is rounded by a JavaScript reader; enums are their full names; times are RFC 3339 in
UTC. An error is `{"error": {"code": "<gRPC status name>", "message": "..."}}` with 401 for
UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 NOT_FOUND, 400 INVALID_ARGUMENT and 502 for any
other status of the server.

The HTTP server is the standard library's ThreadingHTTPServer on a thread of its own, one
thread per request, one request per connection (HTTP/1.0), so that a stop waits only for the
requests in flight, never for an idle keep-alive connection.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import json_format

from ledger.api.v1 import insurance_pb2 as pb
from ledger.journal import INSURANCE_FUND
from ledger.limits import MESSAGE_BYTES_MAX, PAGE_SIZE_MAX
from ledger.server import auth

log = logging.getLogger("ledger.dashboard")

# The most points one fund-history reply holds (the newest ones; the default too).
FUND_HISTORY_POINTS_MAX = 100_000
# The most cycles one cycles reply holds (the newest ones; the default too).
CYCLES_MAX = 10_000
# Points of a concentration curve: the first, the cut and the last always, so at least 3.
CONCENTRATION_POINTS_MIN = 3
CONCENTRATION_POINTS_MAX = 100_000
CONCENTRATION_POINTS_DEFAULT = 1_000
# The largest allocations of a cycle that the concentration reply lists.
LARGEST_ALLOCATIONS = 10
# Each gRPC call the dashboard makes; a fund history of many pages makes many calls.
CALL_SECONDS = 30.0
# Seconds a client may take to send its request before its connection is dropped.
REQUEST_SECONDS = 30.0

STATIC_FILES: Mapping[str, str] = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
PAGE_FILE = "index.html"
# The page loads only its own files and talks only to this origin; nothing inline runs.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_HTTP_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
}
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


class ApiError(Exception):
    """An error reply: the HTTP status, a gRPC-style code name and a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


def _from_rpc(error: grpc.RpcError) -> ApiError:
    code = error.code()
    details = error.details() or ""
    status = _HTTP_STATUS.get(code)
    if status is None:
        return ApiError(502, code.name, f"the ledger server answered {code.name}: {details}")
    return ApiError(status, code.name, details)


# --- startup checks --------------------------------------------------------------------


def check_listen(http_listen: str, security: auth.Security, *, insecure: bool) -> None:
    """Refuse an --http-listen that must not start, like the gRPC port's rule: without an
    auth file every caller reads everything, so only loopback unless --insecure; with one
    beyond loopback, tokens would cross the network in plaintext HTTP, which is logged."""
    if not http_listen:
        return
    host, _ = _split_listen(http_listen)
    loopback = auth.is_loopback(host)
    if security.auth is None and not loopback and not insecure:
        shown = host or "every address"
        raise auth.StartupError(
            f"refusing to serve the dashboard on {shown} ({http_listen}) without an auth "
            "file: every caller that reaches it could read every fund and cycle. Give "
            "--auth-file PATH (readers then need a token), listen on a loopback address, "
            "or pass --insecure to accept this on a network you trust"
        )
    if security.auth is not None and not loopback:
        log.warning(
            "the dashboard on %s is plain HTTP: its callers' bearer tokens cross the network "
            "in plaintext; put it behind a TLS-terminating proxy",
            http_listen,
        )


def _split_listen(listen: str) -> tuple[str, int]:
    _, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise auth.StartupError(f"--http-listen {listen!r} is not HOST:PORT")
    return auth.listen_host(listen), int(port)


def dial_target(grpc_listen: str, port: int) -> str:
    """Where the dashboard reaches the server's gRPC port: the listen host itself, or
    loopback when the server listens on every address."""
    host = auth.listen_host(grpc_listen)
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def channel_credentials(
    tls_cert: str, tls_key: str, tls_client_ca: str
) -> grpc.ChannelCredentials | None:
    """The dashboard's TLS credentials towards its own server, or None for plaintext.

    It trusts exactly the server's certificate (which must name the address dialled, see
    dial_target). With client certificates required (--tls-client-ca) it presents the
    server's own certificate and key, which the handshake accepts when that certificate is
    issued by the client CA and allows client authentication; it carries no role of its own,
    because every call the dashboard makes carries the caller's token, and a request
    without one is refused before any call (Dashboard.metadata).
    """
    if not tls_cert:
        return None
    certificate = Path(tls_cert).read_bytes()
    if not tls_client_ca:
        return grpc.ssl_channel_credentials(root_certificates=certificate)
    return grpc.ssl_channel_credentials(
        root_certificates=certificate,
        private_key=Path(tls_key).read_bytes(),
        certificate_chain=certificate,
    )


# --- the data, from the gRPC API ---------------------------------------------------------


Metadata = tuple[tuple[str, str], ...]
CurrencyList = Callable[[], list[tuple[str, int]]]  # (code, scale) of every currency


class Ledger:
    """The gRPC calls the dashboard makes, over one channel to the server's port."""

    def __init__(self, channel: grpc.Channel, known_currencies: CurrencyList | None = None) -> None:
        self._known_currencies = known_currencies
        self._list_currencies: grpc.UnaryUnaryMultiCallable[
            pb.ListCurrenciesRequest, pb.ListCurrenciesResponse
        ] = channel.unary_unary(
            "/insurance.v1.Admin/ListCurrencies",
            request_serializer=pb.ListCurrenciesRequest.SerializeToString,
            response_deserializer=pb.ListCurrenciesResponse.FromString,
        )
        self._list_entries: grpc.UnaryUnaryMultiCallable[
            pb.ListEntriesRequest, pb.ListEntriesResponse
        ] = channel.unary_unary(
            "/insurance.v1.Query/ListEntries",
            request_serializer=pb.ListEntriesRequest.SerializeToString,
            response_deserializer=pb.ListEntriesResponse.FromString,
        )
        self._list_cycles: grpc.UnaryUnaryMultiCallable[
            pb.ListCyclesRequest, pb.ListCyclesResponse
        ] = channel.unary_unary(
            "/insurance.v1.Query/ListCycles",
            request_serializer=pb.ListCyclesRequest.SerializeToString,
            response_deserializer=pb.ListCyclesResponse.FromString,
        )
        self._get_cycle: grpc.UnaryUnaryMultiCallable[pb.GetCycleRequest, pb.CycleSummary] = (
            channel.unary_unary(
                "/insurance.v1.Query/GetCycle",
                request_serializer=pb.GetCycleRequest.SerializeToString,
                response_deserializer=pb.CycleSummary.FromString,
            )
        )
        self._stream_allocations: grpc.UnaryStreamMultiCallable[
            pb.StreamAllocationsRequest, pb.AllocationChunk
        ] = channel.unary_stream(
            "/insurance.v1.Query/StreamAllocations",
            request_serializer=pb.StreamAllocationsRequest.SerializeToString,
            response_deserializer=pb.AllocationChunk.FromString,
        )

    def currencies(self, metadata: Metadata) -> dict[str, Any]:
        """Every currency with its scale. The contract lists them in Admin.ListCurrencies,
        which a reader's token may not call; its PERMISSION_DENIED still proves the token
        valid (the server judged it), and the codes and scales are no secret to a reader, so
        the server's own list answers then."""
        try:
            reply = self._list_currencies(
                pb.ListCurrenciesRequest(), timeout=CALL_SECONDS, metadata=metadata
            )
            listed = [(c.code, c.scale) for c in reply.currencies]
        except grpc.RpcError as error:
            denied = isinstance(error, grpc.Call) and (
                error.code() == grpc.StatusCode.PERMISSION_DENIED
            )
            if not denied or self._known_currencies is None:
                raise
            listed = self._known_currencies()
        return {"currencies": [{"code": code, "scale": scale} for code, scale in listed]}

    def fund_history(self, currency: str, limit: int, metadata: Metadata) -> dict[str, Any]:
        """The fund's entries, oldest first, each with the balance right after it.

        ListEntries gives the insurance_fund account's entries newest first, in pages; every
        page is read, the newest `limit` entries are kept as points, and the older ones are
        only summed, so that the first point's balance is exact (from 0 before the first
        entry) however many are left out.
        """
        kept: list[tuple[int, str, str, str, int]] = []  # id, time, kind, reference, amount
        older = 0  # the sum of the entries older than those kept
        total = 0
        token = ""
        while True:
            page = self._list_entries(
                pb.ListEntriesRequest(
                    currency=currency,
                    account=INSURANCE_FUND,
                    page_size=PAGE_SIZE_MAX,
                    page_token=token,
                ),
                timeout=CALL_SECONDS,
                metadata=metadata,
            )
            for entry in page.entries:
                amount = sum(p.amount for p in entry.postings if p.account == INSURANCE_FUND)
                total += 1
                if len(kept) < limit:
                    kept.append(
                        (
                            entry.entry_id,
                            entry.created_at.ToJsonString(),
                            _entry_kind(entry.kind),
                            entry.reference,
                            amount,
                        )
                    )
                else:
                    older += amount
            token = page.next_page_token
            if not token:
                break
        balance = older
        points = []
        for entry_id, time, kind, reference, amount in reversed(kept):
            balance += amount
            points.append(
                {
                    "entry_id": str(entry_id),
                    "time": time,
                    "kind": kind,
                    "reference": reference,
                    "amount": str(amount),
                    "balance": str(balance),
                }
            )
        return {
            "currency": currency,
            "limit": limit,
            "entries_total": str(total),
            "truncated": total > len(kept),
            "points": points,
        }

    def cycles(self, currency: str, limit: int, metadata: Metadata) -> dict[str, Any]:
        """The currency's closed cycles, newest first, each summary as the proto3 JSON
        mapping writes it (its field names, allocation_rate among them)."""
        cycles: list[dict[str, Any]] = []
        token = ""
        truncated = False
        while True:
            page = self._list_cycles(
                pb.ListCyclesRequest(currency=currency, page_size=PAGE_SIZE_MAX, page_token=token),
                timeout=CALL_SECONDS,
                metadata=metadata,
            )
            for summary in page.cycles:
                if len(cycles) == limit:
                    truncated = True
                    break
                cycles.append(summary_json(summary))
            token = page.next_page_token
            if truncated or not token:
                break
        return {"currency": currency, "limit": limit, "truncated": truncated, "cycles": cycles}

    def concentration(
        self, currency: str, cycle_id: str, points: int, metadata: Metadata
    ) -> dict[str, Any]:
        """The cycle's concentration curve and its largest allocations; see
        concentration_curve for what the curve is and where it is exact."""
        summary = self._get_cycle(
            pb.GetCycleRequest(cycle_id=cycle_id, currency=currency),
            timeout=CALL_SECONDS,
            metadata=metadata,
        )
        rows = self._allocations(currency, cycle_id, metadata)
        allocated = int(rows.amount.sum(dtype=np.int64))
        if allocated != summary.allocated_total or len(rows.pnl) > summary.participant_count:
            raise ApiError(
                502,
                "ABORTED",
                f"cycle {cycle_id}: its allocation rows do not match its summary (was it "
                "reversed or closed again while being read?); try again",
            )
        curve = concentration_curve(
            Concentration(
                int(summary.profitable_count),
                int(summary.profit_total),
                int(summary.participant_count),
                int(summary.participant_profit),
            ),
            rows.pnl,
            points,
        )
        return {
            "currency": currency,
            "cycle_id": cycle_id,
            "points_max": points,
            "summary": summary_json(summary),
            **curve,
            "allocations": {
                "count": str(len(rows.amount)),
                "total": str(int(rows.amount.sum(dtype=np.int64))),
                "largest": largest_allocations(rows, LARGEST_ALLOCATIONS),
            },
        }

    def _allocations(self, currency: str, cycle_id: str, metadata: Metadata) -> Allocations:
        columns: list[list[npt.NDArray[Any]]] = [[], [], [], []]
        stream = self._stream_allocations(
            pb.StreamAllocationsRequest(cycle_id=cycle_id, currency=currency),
            timeout=CALL_SECONDS,
            metadata=metadata,
        )
        for chunk in stream:
            columns[0].append(np.array(chunk.position_id, dtype=np.uint64))
            columns[1].append(np.array(chunk.account_id, dtype=np.uint64))
            columns[2].append(np.array(chunk.pnl, dtype=np.int64))
            columns[3].append(np.array(chunk.amount, dtype=np.int64))
        position_id, account_id, pnl, amount = (
            np.concatenate(c) if c else np.empty(0, dtype=dtype)
            for c, dtype in zip(columns, (np.uint64, np.uint64, np.int64, np.int64), strict=True)
        )
        return Allocations(position_id, account_id, pnl, amount)


def _entry_kind(kind: int) -> str:
    try:
        return pb.EntryKind.Name(kind)
    except ValueError:
        return str(kind)  # a kind newer than these stubs


def summary_json(summary: pb.CycleSummary) -> dict[str, Any]:
    """A CycleSummary as the proto3 JSON mapping writes it, with every field present."""
    result: dict[str, Any] = json_format.MessageToDict(
        summary,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    return result


@dataclass(frozen=True, slots=True)
class Allocations:
    """A cycle's allocation rows as columns, in position_id order (StreamAllocations')."""

    position_id: npt.NDArray[np.uint64]
    account_id: npt.NDArray[np.uint64]
    pnl: npt.NDArray[np.int64]
    amount: npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Concentration:
    """The counts and sums of a cycle's summary that the curve needs."""

    profitable_count: int
    profit_total: int
    participant_count: int
    participant_profit: int


def concentration_curve(
    cycle: Concentration, allocated_pnl: npt.NDArray[np.int64], points: int
) -> dict[str, Any]:
    """The cumulative share of the cycle's profit held by its most profitable positions,
    against their share of the profitable positions, in at most `points` points.

    The contract gives each position's pnl only for the allocation rows: the participants
    whose allocated amount is above 0. Those are the top of the ranking (an amount grows
    with the pnl), so the curve over them is exact: point k is (k / profitable_count, the
    top k pnl summed / profit_total). Of the rest only counts and sums are known, so each
    part is one straight segment between exact end points: the participants allocated 0
    (the smallest pnl above the cutoff, where rounding left nothing), from the last row to
    the cut (participant_count, participant_profit); then the positions below the cut, from
    it to (1, 1). A straight segment lies on or below the true (concave) curve.

    Downsampling keeps the first point, the cut and the last (and the last allocation row
    when there is room for a fourth), and spreads the others evenly over the allocation
    rows by rank. Each point has its exact
    counts as strings (`positions`, `profit`) beside its shares as numbers (`x`, `y`).
    Without a profitable position the curve is the two end points and the cut is (0, 0).
    """
    count, total = cycle.profitable_count, cycle.profit_total
    if count <= 0 or total <= 0:
        start = {"x": 0.0, "y": 0.0, "positions": "0", "profit": "0"}
        end = {"x": 1.0, "y": 1.0, "positions": "0", "profit": "0"}
        none = {"positions": "0", "profit": "0", "interpolated": False}
        return {
            "points": [start, end],
            "allocated_index": 0,
            "cut": {**start, "index": 0},
            "unallocated": none,
            "tail": none,
        }
    rows = len(allocated_pnl)
    ranked = np.sort(allocated_pnl)[::-1]
    cumulative = np.concatenate(([0], np.cumsum(ranked, dtype=np.int64)))
    rows_profit = int(cumulative[rows])
    unallocated = cycle.participant_count > rows
    tail = count > cycle.participant_count
    budget = points - int(unallocated) - int(tail)  # ≥ 1, since points ≥ 3
    if rows + 1 <= budget:
        ranks = list(range(rows + 1))
    elif budget == 1:
        ranks = [0]
    else:
        # i × rows // (budget − 1) for i in 0 … budget − 1: 0 and rows among them.
        ranks = sorted({i * rows // (budget - 1) for i in range(budget)})
    curve = [_point(k, int(cumulative[k]), count, total) for k in ranks]
    allocated_index = len(curve) - 1
    if unallocated:
        curve.append(_point(cycle.participant_count, cycle.participant_profit, count, total))
    cut_index = len(curve) - 1
    if tail:
        curve.append(_point(count, total, count, total))
    return {
        "points": curve,
        "allocated_index": allocated_index,
        "cut": {**curve[cut_index], "index": cut_index},
        "unallocated": {
            "positions": str(cycle.participant_count - rows),
            "profit": str(cycle.participant_profit - rows_profit),
            "interpolated": unallocated,
        },
        "tail": {
            "positions": str(count - cycle.participant_count),
            "profit": str(total - cycle.participant_profit),
            "interpolated": tail,
        },
    }


def _point(positions: int, profit: int, profitable_count: int, profit_total: int) -> dict[str, Any]:
    # Python's int / int is correctly rounded at any size; numpy's float64 division is not.
    return {
        "x": positions / profitable_count,
        "y": profit / profit_total,
        "positions": str(positions),
        "profit": str(profit),
    }


def largest_allocations(rows: Allocations, count: int) -> list[dict[str, str]]:
    """The `count` largest allocated amounts, largest first, ties by position_id: those
    above the count-th largest amount, then those equal to it in position order."""
    n = len(rows.amount)
    if n <= count:
        chosen = np.arange(n)
    else:
        threshold = np.partition(rows.amount, n - count)[n - count]
        above = np.flatnonzero(rows.amount > threshold)
        equal = np.flatnonzero(rows.amount == threshold)[: count - len(above)]
        chosen = np.concatenate((above, equal))
    ordered = sorted(
        (int(i) for i in chosen), key=lambda i: (-int(rows.amount[i]), int(rows.position_id[i]))
    )
    return [
        {
            "position_id": str(int(rows.position_id[i])),
            "account_id": str(int(rows.account_id[i])),
            "pnl": str(int(rows.pnl[i])),
            "amount": str(int(rows.amount[i])),
        }
        for i in ordered
    ]


# --- HTTP ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


def json_reply(status: int, value: object, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    body = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return Reply(status, body, "application/json; charset=utf-8", headers)


def error_reply(error: ApiError) -> Reply:
    headers: tuple[tuple[str, str], ...] = ()
    if error.status == 401:
        headers = (("WWW-Authenticate", 'Bearer realm="ledger"'),)
    elif error.status == 405:
        headers = (("Allow", "GET, HEAD"),)
    return json_reply(error.status, error.body(), headers)


_Route = Callable[["Dashboard", Sequence[str], Mapping[str, list[str]], Metadata], Reply]


class Dashboard:
    """The HTTP side door of one LedgerServer: routes, the gRPC client, the HTTP server.

    `require_token`: the server has an auth file, so a request must carry a token; one
    without is refused here, before any call, because with mutual TLS the dashboard's
    channel presents a certificate of its own, which must never stand in for a caller.
    """

    def __init__(
        self,
        grpc_target: str,
        credentials: grpc.ChannelCredentials | None,
        *,
        require_token: bool,
        known_currencies: CurrencyList | None = None,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
        ]
        self._channel = (
            grpc.insecure_channel(grpc_target, options=options)
            if credentials is None
            else grpc.secure_channel(grpc_target, credentials, options=options)
        )
        self.ledger = Ledger(self._channel, known_currencies)
        self._require_token = require_token
        self._files = _load_files()
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    # --- serving ---------------------------------------------------------------------

    def serve(self, listen: str, *, reuse_port: bool = False) -> int:
        """Serve on HOST:PORT from a thread; returns the port (0 picks a free one). With
        reuse_port the workers of `ledger serve --workers N` share one port."""
        host, port = _split_listen(listen)
        server = _HttpServer(
            (host or "0.0.0.0", port), _Handler, dashboard=self, reuse_port=reuse_port
        )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="ledger-dashboard", daemon=True
        )
        self._thread.start()
        bound: int = server.server_address[1]
        log.info("dashboard on http://%s:%d/", host or "0.0.0.0", bound)
        return bound

    def close(self) -> None:
        """Stop taking requests, let those in flight finish, then close the channel."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()  # joins the threads of requests in flight
        if self._thread is not None:
            self._thread.join()
        self._channel.close()

    # --- answering ------------------------------------------------------------------

    def answer(self, method: str, target: str, authorization: list[str]) -> Reply:
        """The reply to one request; never raises."""
        try:
            if method not in ("GET", "HEAD"):
                raise ApiError(405, "METHOD_NOT_ALLOWED", f"{method}: the dashboard is read-only")
            parts = urlsplit(target)
            path = parts.path
            if path in ("/", "/index.html"):
                return self._file(PAGE_FILE, "text/html; charset=utf-8", page=True)
            if path.startswith("/static/"):
                name = path.removeprefix("/static/")
                if name in STATIC_FILES:
                    return self._file(name, STATIC_FILES[name])
                raise ApiError(404, "NOT_FOUND", f"no such file: {path}")
            segments = [unquote(s, errors="strict") for s in path.split("/")[1:]]
            route, arguments = _route(segments)
            query = parse_qs(parts.query, keep_blank_values=True, errors="strict")
            return route(self, arguments, query, self.metadata(authorization))
        except ApiError as error:
            return error_reply(error)
        except grpc.RpcError as error:
            return error_reply(_from_rpc(error))
        except UnicodeDecodeError:
            return error_reply(ApiError(400, "INVALID_ARGUMENT", "the URL is not UTF-8"))
        except Exception:
            log.exception("dashboard: %s %s failed", method, urlsplit(target).path)
            return error_reply(
                ApiError(500, "INTERNAL", "the dashboard failed; the server log says why")
            )

    def metadata(self, authorization: list[str]) -> Metadata:
        """The caller's Authorization header(s), sent on as `authorization` metadata for
        the server to judge (it refuses two headers, or another scheme, itself)."""
        if not authorization:
            if self._require_token:
                raise ApiError(
                    401,
                    "UNAUTHENTICATED",
                    "no credentials: send 'Authorization: Bearer <token>' (on the page: "
                    "paste a token in its token field)",
                )
            return ()
        for value in authorization:
            if not _PRINTABLE_ASCII.fullmatch(value):
                raise ApiError(
                    401, "UNAUTHENTICATED", "the Authorization header must be printable ASCII"
                )
        return tuple(("authorization", value.strip()) for value in authorization)

    def _file(self, name: str, content_type: str, *, page: bool = False) -> Reply:
        headers: tuple[tuple[str, str], ...] = ()
        if page:
            headers = (("Content-Security-Policy", PAGE_POLICY),)
        return Reply(200, self._files[name], content_type, headers)

    # --- the JSON endpoints -------------------------------------------------------------

    def _currencies(
        self, arguments: Sequence[str], query: Mapping[str, list[str]], metadata: Metadata
    ) -> Reply:
        _check_query(query, ())
        return json_reply(200, self.ledger.currencies(metadata))

    def _fund_history(
        self, arguments: Sequence[str], query: Mapping[str, list[str]], metadata: Metadata
    ) -> Reply:
        _check_query(query, ("limit",))
        limit = _int_argument(query, "limit", 1, FUND_HISTORY_POINTS_MAX, FUND_HISTORY_POINTS_MAX)
        return json_reply(200, self.ledger.fund_history(arguments[0], limit, metadata))

    def _cycles(
        self, arguments: Sequence[str], query: Mapping[str, list[str]], metadata: Metadata
    ) -> Reply:
        _check_query(query, ("limit",))
        limit = _int_argument(query, "limit", 1, CYCLES_MAX, CYCLES_MAX)
        return json_reply(200, self.ledger.cycles(arguments[0], limit, metadata))

    def _concentration(
        self, arguments: Sequence[str], query: Mapping[str, list[str]], metadata: Metadata
    ) -> Reply:
        _check_query(query, ("points",))
        points = _int_argument(
            query,
            "points",
            CONCENTRATION_POINTS_MIN,
            CONCENTRATION_POINTS_MAX,
            CONCENTRATION_POINTS_DEFAULT,
        )
        currency, cycle_id = arguments
        return json_reply(200, self.ledger.concentration(currency, cycle_id, points, metadata))


_ROUTES: list[tuple[tuple[str | None, ...], _Route]] = [
    (("api", "currencies"), Dashboard._currencies),
    (("api", "currencies", None, "fund-history"), Dashboard._fund_history),
    (("api", "currencies", None, "cycles"), Dashboard._cycles),
    (("api", "currencies", None, "cycles", None, "concentration"), Dashboard._concentration),
]


def _route(segments: Sequence[str]) -> tuple[_Route, list[str]]:
    """The endpoint of a path's segments, and the segments that are its arguments (None in
    a pattern: a currency code or a cycle id, any non-empty text)."""
    for pattern, route in _ROUTES:
        if len(pattern) == len(segments) and all(
            p == s or (p is None and s) for p, s in zip(pattern, segments, strict=True)
        ):
            return route, [s for p, s in zip(pattern, segments, strict=True) if p is None]
    raise ApiError(404, "NOT_FOUND", "no such endpoint: /" + "/".join(segments))


def _check_query(query: Mapping[str, list[str]], allowed: Sequence[str]) -> None:
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        takes = f"only {', '.join(allowed)}" if allowed else "none"
        raise ApiError(
            400,
            "INVALID_ARGUMENT",
            f"unknown query parameter {unknown[0]!r} (this endpoint takes {takes})",
        )


def _int_argument(
    query: Mapping[str, list[str]], name: str, low: int, high: int, default: int
) -> int:
    values = query.get(name)
    if values is None:
        return default
    text = values[0] if len(values) == 1 else ""
    if len(values) != 1 or not text.isdigit() or not low <= int(text) <= high:
        shown = values[0] if len(values) == 1 else values
        raise ApiError(
            400,
            "INVALID_ARGUMENT",
            f"{name} must be one integer from {low} to {high} (got {shown!r})",
        )
    return int(text)


def _load_files() -> dict[str, bytes]:
    """The page's files, read once: from the package, so they come with a wheel too."""
    folder = resources.files("ledger.server").joinpath("dashboard")
    return {name: folder.joinpath(name).read_bytes() for name in (PAGE_FILE, *STATIC_FILES)}


class _HttpServer(ThreadingHTTPServer):
    # Threads of requests in flight are joined by server_close, so a stop leaves none.
    daemon_threads = False
    block_on_close = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        dashboard: Dashboard,
        reuse_port: bool,
    ) -> None:
        self.dashboard = dashboard
        self._reuse_port = reuse_port
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def server_bind(self) -> None:
        if self._reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    # One request per connection: a stop never waits on an idle keep-alive connection.
    protocol_version = "HTTP/1.0"
    timeout = REQUEST_SECONDS
    server_version = "ledger-dashboard"

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_POST(self) -> None:
        self._answer(head=False)

    def do_PUT(self) -> None:
        self._answer(head=False)

    def do_PATCH(self) -> None:
        self._answer(head=False)

    def do_DELETE(self) -> None:
        self._answer(head=False)

    def _answer(self, *, head: bool) -> None:
        reply = self.server.dashboard.answer(
            self.command, self.path, self.headers.get_all("Authorization") or []
        )
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            # A token given in the page's URL (?token=) is never sent on as a Referer.
            self.send_header("Referrer-Policy", "no-referrer")
            for name, value in reply.headers:
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; nothing to tell it

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The path only: a query string may hold the page's ?token=.
        log.debug("%s %s %s", self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard: " + format, *args)
