"""Roles and tokens (issue 11, item 1) and secure by default (item 3), on a real server.

Proves, on SQLite and PostgreSQL, that each role may call its services and no other: a
table of callers (each role, no token, an unknown token, the hash sent as the token, other
schemes, a bare "Bearer", two headers) × one call of every kind of every service (unary,
client-streaming CloseCycle, server-streaming StreamAllocations, the liquidation calls that
run on the event loop) gives OK / NOT_FOUND when the role allows it, PERMISSION_DENIED for a
known caller on another role's service and UNAUTHENTICATED for an unknown one, and that a
refused call writes nothing (tests/ledger_db.snapshot before and after; an allowed write
does change it) and is refused before its request is even decoded; that health and
reflection stay open; that refusals are logged with the caller's name and never a token;
that SIGHUP reloads the file in a `ledger serve` process (a new token works, a removed one
is refused, a changed role applies, a malformed file keeps the old one and says why), in
every worker too; that a malformed auth file stops the start naming the line; and that
without an auth file the server listens on loopback only, says so in its start line, and
refuses any other address unless --insecure is given.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ledger.api.v1 import insurance_pb2 as pb
from ledger.api.v1 import insurance_pb2_grpc as pb_grpc
from ledger.server.app import LedgerServer, Settings
from ledger.server.auth import is_loopback, listen_host
from tests import cycle_streams as cs
from tests.conftest import Client
from tests.ledger_db import snapshot
from tests.test_liquidation import LONG, liq, setup_market
from tests.test_server_process import EXIT_SECONDS, free_port, ledger_serve

OK = grpc.StatusCode.OK
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
CALL_SECONDS = 30

# Written here, not imported from the server, so that a wrong table there fails here.
SERVICES_OF_ROLE = {
    "admin": {"Admin", "Query"},
    "clearing": {"Clearing", "Query"},
    "reader": {"Query"},
}

# One token per role, made fresh for each test run, as the README says to make them.
TOKENS = {role: secrets.token_urlsafe(32) for role in SERVICES_OF_ROLE}
TOKEN_NAMES = {"admin": "ops-desk", "clearing": "clearing-engine", "reader": "risk-dashboard"}


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def auth_toml(
    tokens: dict[str, tuple[str, str]], certificates: dict[str, str] | None = None
) -> str:
    """An auth file: tokens by name → (role, token), certificates by CN → role."""
    parts = [
        f'[[tokens]]\nname = "{name}"\nrole = "{role}"\nsha256 = "{sha256_hex(token)}"\n'
        for name, (role, token) in tokens.items()
    ]
    parts += [
        f'[[certificates]]\ncommon_name = "{cn}"\nrole = "{role}"\n'
        for cn, role in (certificates or {}).items()
    ]
    return "\n".join(parts)


def role_tokens() -> dict[str, tuple[str, str]]:
    return {TOKEN_NAMES[role]: (role, token) for role, token in TOKENS.items()}


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# --- clients that send metadata on every call --------------------------------------------


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class SendMetadata(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds the same metadata (a caller's credentials) to every call of a channel."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def _with(self, details: Any) -> Any:
        return _Details(
            details.method,
            details.timeout,
            (*(details.metadata or ()), *self._metadata),
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with(details), requests)


def client_on(channel: grpc.Channel, metadata: Sequence[tuple[str, str]] = ()) -> Client:
    """Stubs of the three services over `channel` (ready), every call sending `metadata`."""
    grpc.channel_ready_future(channel).result(timeout=10)
    if metadata:
        channel = grpc.intercept_channel(channel, SendMetadata(metadata))
    return Client(
        channel,
        pb_grpc.AdminStub(channel),
        pb_grpc.ClearingStub(channel),
        pb_grpc.QueryStub(channel),
    )


def plain_client(port: int, metadata: Sequence[tuple[str, str]] = ()) -> Client:
    return client_on(grpc.insecure_channel(f"127.0.0.1:{port}"), metadata)


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return OK, ""


# --- the table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    label: str
    metadata: tuple[tuple[str, str], ...]
    role: str | None  # the role it is judged by; None: unknown (UNAUTHENTICATED)
    secrets_sent: tuple[str, ...] = ()  # must appear in no reply and no log line


@dataclass(frozen=True)
class Call:
    name: str
    service: str
    allowed: grpc.StatusCode  # the status when the role may call it
    writes: bool  # an allowed call changes the snapshot
    run: Callable[[Client, str], object]


def token_callers() -> list[Caller]:
    unknown = secrets.token_urlsafe(32)
    admin = TOKENS["admin"]
    return [
        *[Caller(role, bearer(TOKENS[role]), role, (TOKENS[role],)) for role in TOKENS],
        Caller("admin, scheme in lower case", (("authorization", f"bearer {admin}"),), "admin"),
        Caller("no token", (), None),
        Caller("unknown token", bearer(unknown), None, (unknown,)),
        Caller("the admin's sha256 as the token", bearer(sha256_hex(admin)), None),
        Caller("Basic scheme", (("authorization", f"Basic {admin}"),), None, (admin,)),
        Caller("Basic x", (("authorization", "Basic x"),), None),
        Caller("Bearer with nothing", (("authorization", "Bearer"),), None),
        Caller("two tokens in one header", bearer(f"{admin} {admin}"), None, (admin,)),
        Caller(
            "two authorization headers",
            (*bearer(admin), *bearer(TOKENS["reader"])),
            None,
            (admin, TOKENS["reader"]),
        ),
        Caller("token in another header", (("x-token", admin),), None, (admin,)),
    ]


def _liquidation(key: str) -> pb.RecordLiquidationRequest:
    return liq(f"liq-{key}", "BTCUSDT", LONG, "1", "60000", "60001", 0)


def _record_batch(client: Client, key: str) -> None:
    reply = client.clearing.RecordLiquidations(
        pb.RecordLiquidationsRequest(liquidations=[_liquidation(f"batch-{key}")]),
        timeout=CALL_SECONDS,
    )
    assert [o.code for o in reply.outcomes] == [0], reply


def _close(client: Client, key: str) -> None:
    summary = cs.close(
        client.channel, f"cycle-{key}", "USDT", cs.Positions.of([]), timeout=CALL_SECONDS
    )
    assert summary.state == pb.CYCLE_STATE_CLOSED


CALLS = [
    Call(
        "Admin.ListCurrencies",
        "Admin",
        OK,
        False,
        lambda c, k: c.admin.ListCurrencies(pb.ListCurrenciesRequest(), timeout=CALL_SECONDS),
    ),
    Call(
        "Admin.TransferFund",
        "Admin",
        OK,
        True,
        lambda c, k: c.admin.TransferFund(
            pb.TransferFundRequest(
                transfer_id=f"t-{k}",
                currency="USDT",
                direction=pb.TRANSFER_DIRECTION_DEPOSIT,
                amount=1,
            ),
            timeout=CALL_SECONDS,
        ),
    ),
    Call(
        "Admin.ReverseCycle",
        "Admin",
        NOT_FOUND,
        False,
        lambda c, k: c.admin.ReverseCycle(
            pb.ReverseCycleRequest(cycle_id=f"none-{k}", currency="USDT"), timeout=CALL_SECONDS
        ),
    ),
    Call(
        "Clearing.RecordLiquidation",
        "Clearing",
        OK,
        True,
        lambda c, k: c.clearing.RecordLiquidation(_liquidation(k), timeout=CALL_SECONDS),
    ),
    Call("Clearing.RecordLiquidations", "Clearing", OK, True, _record_batch),
    Call("Clearing.CloseCycle", "Clearing", OK, True, _close),
    Call(
        "Query.GetFund",
        "Query",
        OK,
        False,
        lambda c, k: c.query.GetFund(pb.GetFundRequest(currency="USDT"), timeout=CALL_SECONDS),
    ),
    Call(
        "Query.StreamAllocations",
        "Query",
        NOT_FOUND,
        False,
        lambda c, k: list(
            c.query.StreamAllocations(
                pb.StreamAllocationsRequest(cycle_id=f"none-{k}", currency="USDT"),
                timeout=CALL_SECONDS,
            )
        ),
    ),
]


def expected_status(caller: Caller, call: Call) -> grpc.StatusCode:
    if caller.role is None:
        return UNAUTHENTICATED
    if call.service in SERVICES_OF_ROLE[caller.role]:
        return call.allowed
    return PERMISSION_DENIED


def run_table(
    database_url: str, callers: Sequence[tuple[Caller, Client]], calls: Sequence[Call] = CALLS
) -> list[str]:
    """Every caller × every call: the status, and the ledger unchanged by each refusal (and
    changed by each allowed write, so that the snapshot is seen to notice a write). Returns
    one line per case, each ending "ok" or "FAILED: why"."""
    lines = []
    for n, (caller, client) in enumerate(callers):
        for m, call in enumerate(calls):
            before = snapshot(database_url)
            code, details = status_of(lambda: call.run(client, f"{n}-{m}"))  # noqa: B023
            after = snapshot(database_url)
            want = expected_status(caller, call)
            problems = []
            if code != want:
                problems.append(f"got {code.name} ({details}), want {want.name}")
            if want in (UNAUTHENTICATED, PERMISSION_DENIED) and after != before:
                problems.append("a refused call wrote to the ledger")
            if want == OK and call.writes and after == before:
                problems.append("an allowed write changed nothing (the snapshot is blind?)")
            if code == PERMISSION_DENIED and f"role {caller.role}" not in details:
                problems.append(f"the refusal does not name the role: {details!r}")
            if any(secret in details for secret in caller.secrets_sent):
                problems.append("the reply shows the token")
            verdict = "FAILED: " + "; ".join(problems) if problems else "ok"
            lines.append(f"{caller.label:34} {call.name:28} {code.name:18} {verdict}")
    return lines


def assert_table(lines: list[str]) -> None:
    assert not [line for line in lines if "FAILED" in line], "\n" + "\n".join(lines)


# --- a server with an auth file ----------------------------------------------------------


@pytest.fixture
def auth_server(database_url: str, tmp_path: Path) -> Iterator[LedgerServer]:
    path = tmp_path / "auth.toml"
    path.write_text(auth_toml(role_tokens()))
    server = LedgerServer(
        Settings(listen="127.0.0.1:0", database_url=database_url, auth_file=str(path))
    )
    server.start()
    try:
        admin = plain_client(server.port, bearer(TOKENS["admin"]))
        try:
            setup_market(admin)
        finally:
            admin.channel.close()
        yield server
    finally:
        server.stop(grace_seconds=5)


def test_each_role_may_call_its_services_and_no_other(
    auth_server: LedgerServer, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    callers = [(c, plain_client(auth_server.port, c.metadata)) for c in token_callers()]
    try:
        assert_table(run_table(database_url, callers))
    finally:
        for _, client in callers:
            client.channel.close()
    # Refusals are logged with the caller's name and the call log's status; never a token.
    log = caplog.text
    assert re.search(
        r"refused method=/insurance.v1.Admin/TransferFund code=PERMISSION_DENIED "
        r"identity=risk-dashboard role=reader",
        log,
    ), log
    assert "method=/insurance.v1.Clearing/CloseCycle status=UNAUTHENTICATED" in log
    for caller, _ in callers:
        for secret in caller.secrets_sent:
            assert secret not in log, f"{caller.label}: a token was logged"


def test_a_refusal_comes_before_the_request_is_read(
    auth_server: LedgerServer, database_url: str
) -> None:
    """Garbage that the handler would answer INVALID_ARGUMENT is refused unread."""
    garbage = b"\xff\xff\xff not a message"
    plain = grpc.insecure_channel(f"127.0.0.1:{auth_server.port}")
    clearing = plain_client(auth_server.port, bearer(TOKENS["clearing"]))
    reader = plain_client(auth_server.port, bearer(TOKENS["reader"]))
    try:
        record = "/insurance.v1.Clearing/RecordLiquidation"

        def raw_record(channel: grpc.Channel, metadata: Sequence[tuple[str, str]] = ()) -> None:
            channel.unary_unary(record, request_serializer=None, response_deserializer=None)(
                garbage, metadata=metadata, timeout=CALL_SECONDS
            )

        def raw_close(client: Client) -> None:
            call = cs.raw_call(client.channel, cs.CLOSE_METHOD)
            call(iter([garbage, garbage]), timeout=CALL_SECONDS)

        before = snapshot(database_url)
        assert status_of(lambda: raw_record(plain))[0] == UNAUTHENTICATED
        assert status_of(lambda: raw_record(plain, bearer("nope")))[0] == UNAUTHENTICATED
        assert status_of(lambda: raw_close(reader))[0] == PERMISSION_DENIED
        assert snapshot(database_url) == before
        # The same garbage from the clearing role reaches the handlers, which refuse it.
        assert (
            status_of(lambda: raw_record(clearing.channel))[0] == grpc.StatusCode.INVALID_ARGUMENT
        )
        assert status_of(lambda: raw_close(clearing))[0] == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        for channel in (plain, clearing.channel, reader.channel):
            channel.close()


def check_open_services(port: int, metadata: Sequence[tuple[str, str]] = ()) -> None:
    """Health's Check (whole server and each service) and reflection's list_services."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "insurance.v1.Admin", "insurance.v1.Clearing", "insurance.v1.Query"):
            reply = health.Check(
                health_pb2.HealthCheckRequest(service=service), metadata=metadata, timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (listed,) = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)
        names = {s.name for s in listed.list_services_response.service}
        assert {"insurance.v1.Admin", "insurance.v1.Clearing", "insurance.v1.Query"} <= names


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer unknown"),), (("authorization", "Basic x"),)],
    ids=["no token", "unknown token", "malformed header"],
)
def test_health_and_reflection_stay_open(
    auth_server: LedgerServer, metadata: tuple[tuple[str, str], ...]
) -> None:
    check_open_services(auth_server.port, metadata)
    # ... while the services beside them are closed to the same caller.
    with grpc.insecure_channel(f"127.0.0.1:{auth_server.port}") as channel:
        code, _ = status_of(
            lambda: pb_grpc.QueryStub(channel).GetFund(
                pb.GetFundRequest(currency="USDT"), metadata=metadata, timeout=10
            )
        )
        assert code == UNAUTHENTICATED


def test_without_an_auth_file_every_caller_has_every_role(
    client: Client, database_url: str
) -> None:
    """Item 4: the conftest server (no auth file) takes every call, with or without a
    token, as before."""
    setup_market(client)
    anybody = [
        (Caller("no token", (), "admin"), client),
        (Caller("unknown token", bearer("x"), "admin"), plain_client(_port(client), bearer("x"))),
    ]
    lines = run_table(database_url, anybody, [c for c in CALLS if c.service != "Clearing"])
    lines += run_table(
        database_url,
        [(Caller(c.label, c.metadata, "clearing"), cl) for c, cl in anybody],
        [c for c in CALLS if c.service == "Clearing"],
    )
    anybody[1][1].channel.close()
    assert_table(lines)


def _port(client: Client) -> int:
    return int(client.target.rpartition(":")[2])


# --- the auth file through `ledger serve` ------------------------------------------------


def serve_command(port: int, database_url: str, *extra: str, host: str = "127.0.0.1") -> list[str]:
    return [
        *[sys.executable, "-m", "ledger.cli", "serve"],
        *["--listen", f"{host}:{port}", "--database-url", database_url, *extra],
    ]


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds} s: {what}")
        time.sleep(0.05)


def list_currencies(port: int, token: str) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AdminStub(channel)
        return status_of(
            lambda: stub.ListCurrencies(
                pb.ListCurrenciesRequest(), metadata=bearer(token), timeout=10
            )
        )[0]


def get_fund(port: int, token: str) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.QueryStub(channel)
        return status_of(
            lambda: stub.GetFund(
                pb.GetFundRequest(currency="USD"), metadata=bearer(token), timeout=10
            )
        )[0]


def test_sighup_reloads_the_auth_file(database_url: str, tmp_path: Path) -> None:
    old, new = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    path = tmp_path / "auth.toml"
    path.write_text(auth_toml({"old-ops": ("admin", old)}))
    port = free_port()
    command = serve_command(port, database_url, "--auth-file", str(path))
    with ledger_serve(command, tmp_path / "workdir", port) as (process, stderr):
        assert list_currencies(port, old) == OK
        assert list_currencies(port, new) == UNAUTHENTICATED

        # A new token works and a removed one is refused, without a restart.
        path.write_text(auth_toml({"new-ops": ("admin", new)}))
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: list_currencies(port, new) == OK, "the new token works")
        assert list_currencies(port, old) == UNAUTHENTICATED

        # A file that does not parse leaves the one in force, and the log says why.
        path.write_text(f'[[tokens]]\nname = "x"\nrole = "root"\nsha256 = "{"0" * 64}"\n')
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: "not reloaded" in stderr.read_text(), "the failed reload is logged")
        assert re.search(r"not reloaded.*auth.toml: line 3: .*role 'root'", stderr.read_text())
        assert list_currencies(port, new) == OK
        assert list_currencies(port, old) == UNAUTHENTICATED

        # A changed role applies from the next call.
        path.write_text(auth_toml({"new-ops": ("reader", new)}))
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: list_currencies(port, new) == PERMISSION_DENIED, "the role changed")
        assert get_fund(port, new) == NOT_FOUND  # Query: allowed (no such currency)

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_SECONDS) == 0
        log = stderr.read_text()
    assert log.count("reloaded: 1 token, 0 certificates") == 2, log
    assert "identity=new-ops role=reader" in log  # refusals name the caller
    assert old not in log and new not in log, "a token was logged"


def test_sighup_reloads_every_worker(database_url: str, tmp_path: Path) -> None:
    """With --workers 2 the first process passes SIGHUP on: every worker reloads, whichever
    a new connection lands on."""
    old, new = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    path = tmp_path / "auth.toml"
    path.write_text(auth_toml({"old-ops": ("admin", old)}))
    port = free_port()
    command = serve_command(port, database_url, "--auth-file", str(path), "--workers", "2")
    with ledger_serve(command, tmp_path / "workdir", port) as (process, stderr):
        stdout = (tmp_path / "workdir" / f"stdout-{port}.log").read_text
        wait_for(lambda: "listening" in stdout(), "the start line")
        assert "(2 workers; auth file " in stdout()
        path.write_text(auth_toml({"new-ops": ("admin", new)}))
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: stderr.read_text().count("reloaded: 1 token") == 2, "both reloaded")
        # Each channel is a new connection, which may land on either worker.
        assert {list_currencies(port, new) for _ in range(12)} == {OK}
        assert {list_currencies(port, old) for _ in range(12)} == {UNAUTHENTICATED}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_SECONDS) == 0, stderr.read_text()


H = "ab" * 32  # a well-formed sha256

MALFORMED = [
    pytest.param('[[tokens]]\nname = "a"\nrole = "admin\n', "line 3", id="not TOML"),
    pytest.param(
        f'[[tokens]]\nname = "a"\nrole = "root"\nsha256 = "{H}"\n',
        "line 3: tokens entry 1 ('a'): role 'root' is not one of admin, clearing, reader",
        id="unknown role",
    ),
    pytest.param(
        f'[[tokens]]\nname = "a"\nrole = "admin"\nsha256 = "{H}"\n\n'
        '[[tokens]]\nname = "b"\nrole = "reader"\n',
        "line 6: tokens entry 2 ('b'): missing sha256",
        id="missing key",
    ),
    pytest.param(
        '[[tokens]]\nname = "a"\nrole = "admin"\nsha256 = "a-plaintext-secret"\n',
        "line 4: tokens entry 1 ('a'): sha256 must be the token's SHA-256 as 64 hex characters",
        id="sha256 not 64 hex",
    ),
    pytest.param(
        f'[[tokens]]\nname = "a"\nrole = "admin"\nsha256 = "{"g" * 64}"\n',
        "line 4: tokens entry 1 ('a'): sha256 must be",
        id="sha256 not hex",
    ),
    pytest.param(
        f'[[tokens]]\nname = "a"\nrole = "admin"\nsha256 = "{H}"\n\n'
        f'[[tokens]]\nname = "a"\nrole = "reader"\nsha256 = "{"cd" * 32}"\n',
        "line 7: tokens entry 2 ('a'): token name 'a' is already used by tokens entry 1 ('a') "
        "at line 1",
        id="duplicate name",
    ),
    pytest.param(
        f'[[tokens]]\nname = "a"\nrole = "admin"\nsha256 = "{H}"\ntoken = "secret"\n',
        "line 5: tokens entry 1 ('a'): unknown key 'token'",
        id="unknown key",
    ),
    pytest.param(
        '[[certificates]]\ncommon_name = "c"\nrole = "clearing"\n\n'
        '[[certificates]]\ncommon_name = "c"\nrole = "reader"\n',
        "line 6: certificates entry 2 ('c'): common_name 'c' is already listed",
        id="duplicate certificate",
    ),
    pytest.param(None, "cannot read the auth file", id="no such file"),
]


@pytest.mark.parametrize(("content", "message"), MALFORMED)
def test_a_malformed_auth_file_stops_the_start(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "auth.toml"
    if content is not None:
        path.write_text(content)
    database = tmp_path / "ledger.db"
    result = subprocess.run(
        serve_command(free_port(), f"sqlite:///{database}", "--auth-file", str(path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result
    assert f"ledger: cannot start: {path}: " in result.stderr
    assert message in result.stderr, result.stderr
    assert "a-plaintext-secret" not in result.stderr  # a pasted token is never echoed
    assert "listening" not in result.stdout
    assert not database.exists(), "the database was touched"


def test_the_auth_file_may_come_from_the_environment(database_url: str, tmp_path: Path) -> None:
    token = secrets.token_urlsafe(32)
    path = tmp_path / "auth.toml"
    path.write_text(auth_toml({"ops": ("admin", token)}))
    port = free_port()
    env = {"LEDGER_AUTH_FILE": str(path)}
    with ledger_serve(serve_command(port, database_url), tmp_path / "w", port, env) as (proc, _):
        assert list_currencies(port, token) == OK
        assert list_currencies(port, "other") == UNAUTHENTICATED
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=EXIT_SECONDS) == 0


# --- secure by default -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.255.255.254", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost", True),
        ("0.0.0.0", False),
        ("[::]", False),
        ("", False),
        ("128.0.0.1", False),
        ("10.1.2.3", False),
        ("[::ffff:127.0.0.1]", False),
        ("[::2]", False),
        ("localhost.localdomain", False),
        ("ledger.example.com", False),
    ],
)
def test_loopback_is_127_0_0_0_8_and_1_and_localhost(host: str, loopback: bool) -> None:
    assert is_loopback(listen_host(f"{host}:50051")) is loopback


def start_line(directory: Path, port: int) -> str:
    out = directory / f"stdout-{port}.log"
    wait_for(lambda: "listening" in out.read_text(), "the start line")
    return out.read_text().strip()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_without_an_auth_file_the_server_says_it_is_loopback_only(
    database_url: str, tmp_path: Path, host: str
) -> None:
    port = free_port()
    command = serve_command(port, database_url, host=host)
    with ledger_serve(command, tmp_path / "w", port) as (process, _):
        assert start_line(tmp_path / "w", port) == (
            f"ledger listening on port {port} "
            "(no auth file: loopback only, every caller has every role)"
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_SECONDS) == 0


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "[::]", "", "192.0.2.10", "ledger.example.com", "[::ffff:127.0.0.1]"]
)
def test_without_an_auth_file_another_address_is_refused(tmp_path: Path, host: str) -> None:
    database = tmp_path / "ledger.db"
    result = subprocess.run(
        serve_command(free_port(), f"sqlite:///{database}", host=host),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result
    message = result.stderr
    assert "ledger: cannot start: refusing to listen on" in message
    assert "without an auth file" in message and "every role" in message  # why
    assert "--auth-file" in message and "--insecure" in message  # what to do
    assert "listening" not in result.stdout
    assert not database.exists(), "the database was touched"


def test_insecure_accepts_another_address_without_an_auth_file(
    database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    command = serve_command(port, database_url, "--insecure", host="0.0.0.0")
    with ledger_serve(command, tmp_path / "w", port) as (process, _):
        assert start_line(tmp_path / "w", port) == (
            f"ledger listening on port {port} "
            "(no auth file, --insecure: every caller that reaches the port has every role)"
        )
        assert list_currencies(port, "anything") == OK  # no auth at all
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_SECONDS) == 0


def test_with_an_auth_file_another_address_is_accepted(database_url: str, tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(auth_toml(role_tokens()))
    port = free_port()
    command = serve_command(port, database_url, "--auth-file", str(path), host="0.0.0.0")
    with ledger_serve(command, tmp_path / "w", port) as (process, _):
        assert start_line(tmp_path / "w", port) == (
            f"ledger listening on port {port} (auth file {path}: 3 tokens, 0 certificates)"
        )
        assert list_currencies(port, TOKENS["admin"]) == OK
        assert list_currencies(port, TOKENS["reader"]) == PERMISSION_DENIED
        assert list_currencies(port, "anything") == UNAUTHENTICATED
        check_open_services(port)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_SECONDS) == 0
