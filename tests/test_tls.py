"""TLS and mutual TLS (issue 11, item 2), with a CA and certificates made at test time.

Proves, on SQLite and PostgreSQL, that with --tls-cert/--tls-key a client that trusts the
CA completes the handshake (by IP and by name: the server certificate's SAN has both), and
a plaintext client or one trusting another CA does not; that with --tls-client-ca a client
without a certificate, or with one from another CA, fails the handshake; that a client
certificate listed under [[certificates]] carries its role on every kind of call (the same
table as test_auth, so the blocking, streaming and event-loop handlers are each gated), an
unlisted one is UNAUTHENTICATED unless it sends a token, and a call with a token is judged
by its token alone; that a reload applies to certificates too; and that `ledger serve`
takes the flags and says TLS in its start line, and refuses them half given.
"""

from __future__ import annotations

import datetime
import ipaddress
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ledger.api.v1 import insurance_pb2 as pb
from ledger.server.app import LedgerServer, Settings
from tests.conftest import Client
from tests.test_auth import (
    OK,
    PERMISSION_DENIED,
    TOKENS,
    UNAUTHENTICATED,
    UNAVAILABLE,
    Caller,
    assert_table,
    auth_toml,
    bearer,
    client_on,
    role_tokens,
    run_table,
    serve_command,
    status_of,
    wait_for,
)
from tests.test_liquidation import setup_market
from tests.test_server_process import EXIT_SECONDS, free_port

HANDSHAKE_SECONDS = 5


# --- a CA and its certificates -------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    key: bytes  # PEM
    cert: bytes  # PEM


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Authority:
    """A certificate authority of the test's own, issuing server and client certificates."""

    def __init__(self, name: str) -> None:
        self._key = _key()
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self._cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, *, server: bool = False) -> Issued:
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                    ]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(_pem_key(key), cert.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class Pki:
    ca: Authority
    other_ca: Authority  # trusted by nobody here
    server: Issued
    clients: dict[str, Issued]  # by CN, issued by `ca`
    rogue: Issued  # CN "clearing-1", issued by `other_ca`
    ca_file: Path
    cert_file: Path
    key_file: Path


CLIENT_NAMES = ("clearing-1", "reader-1", "admin-1", "stranger")
LISTED = {"clearing-1": "clearing", "reader-1": "reader", "admin-1": "admin"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other_ca = Authority("ledger test CA"), Authority("another CA")
    server = ca.issue("ledger-server", server=True)
    clients = {name: ca.issue(name) for name in CLIENT_NAMES}
    files = {"ca.pem": ca.pem, "server.pem": server.cert, "server.key": server.key}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return Pki(
        ca,
        other_ca,
        server,
        clients,
        other_ca.issue("clearing-1"),
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
    )


def tls_channel(
    port: int,
    root: bytes,
    client: Issued | None = None,
    host: str = "127.0.0.1",
) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.secure_channel(f"{host}:{port}", credentials)


def health_status(channel: grpc.Channel) -> grpc.StatusCode:
    """The status of a health Check: OK after a handshake, UNAVAILABLE when it fails."""
    stub = health_pb2_grpc.HealthStub(channel)
    return status_of(
        lambda: stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=HANDSHAKE_SECONDS)
    )[0]


@contextmanager
def tls_server(
    database_url: str, pki: Pki, *, client_ca: bool, auth_file: Path | None = None
) -> Iterator[LedgerServer]:
    server = LedgerServer(
        Settings(
            listen="127.0.0.1:0",
            database_url=database_url,
            tls_cert=str(pki.cert_file),
            tls_key=str(pki.key_file),
            tls_client_ca=str(pki.ca_file) if client_ca else "",
            auth_file=str(auth_file) if auth_file else "",
        )
    )
    server.start()
    try:
        yield server
    finally:
        server.stop(grace_seconds=5)


def test_tls_serves_a_client_that_trusts_the_ca(database_url: str, pki: Pki) -> None:
    with tls_server(database_url, pki, client_ca=False) as server:
        assert server.security.note() == (
            "no auth file: loopback only, every caller has every role; TLS"
        )
        for host in ("127.0.0.1", "localhost"):  # the SAN's IP and its DNS name
            with tls_channel(server.port, pki.ca.pem, host=host) as channel:
                assert health_status(channel) == OK, host
                client = client_on(channel)
                client.admin.CreateCurrency(pb.CreateCurrencyRequest(code=f"C{len(host)}"))
                assert len(client.admin.ListCurrencies(pb.ListCurrenciesRequest()).currencies)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as plaintext:
            assert health_status(plaintext) == UNAVAILABLE
        with tls_channel(server.port, pki.other_ca.pem) as distrusting:
            assert health_status(distrusting) == UNAVAILABLE


def test_mutual_tls_requires_a_certificate_from_the_ca(database_url: str, pki: Pki) -> None:
    """Without an auth file any certificate of the CA is enough (every role, loopback);
    without one, or with one of another CA, the handshake fails."""
    with tls_server(database_url, pki, client_ca=True) as server:
        with tls_channel(server.port, pki.ca.pem) as anonymous:
            assert health_status(anonymous) == UNAVAILABLE
        with tls_channel(server.port, pki.ca.pem, pki.rogue) as rogue:
            assert health_status(rogue) == UNAVAILABLE
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as plaintext:
            assert health_status(plaintext) == UNAVAILABLE
        with tls_channel(server.port, pki.ca.pem, pki.clients["stranger"]) as known:
            assert health_status(known) == OK
            client = client_on(known)
            client.admin.CreateCurrency(pb.CreateCurrencyRequest(code="USD", scale=2))
            assert client.query.GetFund(pb.GetFundRequest(currency="USD")).balance == 0


def certificate_callers(pki: Pki, port: int) -> list[tuple[Caller, Client]]:
    """(caller, its client over mutual TLS): listed and unlisted certificates, with and
    without tokens."""
    cases = [
        *[(Caller(f"certificate {cn}", (), role), cn) for cn, role in LISTED.items()],
        (Caller("certificate stranger (unlisted)", (), None), "stranger"),
        (Caller("stranger + admin token", bearer(TOKENS["admin"]), "admin"), "stranger"),
        (Caller("clearing-1 + reader token", bearer(TOKENS["reader"]), "reader"), "clearing-1"),
        (Caller("clearing-1 + unknown token", bearer("nope"), None), "clearing-1"),
        (Caller("clearing-1 + Basic x", (("authorization", "Basic x"),), None), "clearing-1"),
    ]
    return [
        (caller, client_on(tls_channel(port, pki.ca.pem, pki.clients[cn]), caller.metadata))
        for caller, cn in cases
    ]


def test_a_listed_certificate_carries_its_role(database_url: str, pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(auth_toml(role_tokens(), LISTED))
    with tls_server(database_url, pki, client_ca=True, auth_file=path) as server:
        assert server.security.note() == (
            f"auth file {path}: 3 tokens, 3 certificates; TLS, client certificates required"
        )
        admin = client_on(tls_channel(server.port, pki.ca.pem, pki.clients["admin-1"]))
        setup_market(admin)
        admin.channel.close()
        callers = certificate_callers(pki, server.port)
        try:
            assert_table(run_table(database_url, callers))
        finally:
            for _, client in callers:
                client.channel.close()


def test_a_reload_applies_to_certificates(database_url: str, pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(auth_toml({}, {"reader-1": "reader"}))
    with (
        tls_server(database_url, pki, client_ca=True, auth_file=path) as server,
        tls_channel(server.port, pki.ca.pem, pki.clients["reader-1"]) as channel,
    ):
        client = client_on(channel)

        def get_fund() -> grpc.StatusCode:
            request = pb.GetFundRequest(currency="USD")
            return status_of(lambda: client.query.GetFund(request, timeout=10))[0]

        assert get_fund() == grpc.StatusCode.NOT_FOUND  # allowed: no such currency
        path.write_text(auth_toml({}, {"reader-1": "clearing"}))
        assert server.reload_auth()
        assert get_fund() == grpc.StatusCode.NOT_FOUND  # clearing may read too
        code, _ = status_of(
            lambda: client.admin.ListCurrencies(pb.ListCurrenciesRequest(), timeout=10)
        )
        assert code == PERMISSION_DENIED
        path.write_text(auth_toml({}, {"admin-1": "admin"}))
        assert server.reload_auth()
        assert get_fund() == UNAUTHENTICATED
        path.write_text("[[certificates]]\ncommon_name = 3\n")
        assert not server.reload_auth()  # malformed: the last good file stays
        assert get_fund() == UNAUTHENTICATED


def wait_serving_tls(process: subprocess.Popen[bytes], channel: grpc.Channel, log: Path) -> None:
    deadline = time.monotonic() + 30
    while health_status(channel) != OK:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"server not serving over TLS after 30 s:\n{log.read_text()}")
        time.sleep(0.1)


def test_serve_takes_the_tls_flags(database_url: str, pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(auth_toml(role_tokens(), LISTED))
    port = free_port()
    command = serve_command(
        port,
        database_url,
        *["--auth-file", str(path), "--tls-cert", str(pki.cert_file)],
        *["--tls-key", str(pki.key_file), "--tls-client-ca", str(pki.ca_file)],
    )
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=stdout, stderr=stderr)
    try:
        with tls_channel(port, pki.ca.pem, pki.clients["reader-1"]) as channel:
            wait_serving_tls(process, channel, err)
            wait_for(lambda: "listening" in out.read_text(), "the start line")
            assert out.read_text().strip() == (
                f"ledger listening on port {port} (auth file {path}: 3 tokens, 3 certificates; "
                "TLS, client certificates required)"
            )
            reader = client_on(channel)
            code, _ = status_of(lambda: reader.query.GetFund(pb.GetFundRequest(currency="X")))
            assert code == grpc.StatusCode.NOT_FOUND
            code, _ = status_of(lambda: reader.admin.ListCurrencies(pb.ListCurrenciesRequest()))
            assert code == PERMISSION_DENIED
        with tls_channel(port, pki.ca.pem) as anonymous:
            assert health_status(anonymous) == UNAVAILABLE
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plaintext:
            assert health_status(plaintext) == UNAVAILABLE
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_SECONDS) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "{cert}"], "TLS needs both --tls-cert and --tls-key"),
        (["--tls-key", "{key}"], "TLS needs both --tls-cert and --tls-key"),
        (["--tls-client-ca", "{ca}"], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "{missing}", "--tls-key", "{key}"], "--tls-cert {missing}: cannot read"),
        (
            ["--tls-cert", "{cert}", "--tls-key", "{other_key}"],
            "--tls-cert {cert} and --tls-key {other_key} are not a certificate chain and its "
            "unencrypted private key",
        ),
        (["--tls-cert", "{cert}", "--tls-key", "{text}"], "--tls-key {text}: not a PEM file"),
        (
            [*["--tls-cert", "{cert}", "--tls-key", "{key}"], *["--tls-client-ca", "{key}"]],
            "--tls-client-ca {key}: not CA certificates",
        ),
    ],
    ids=[
        "cert only",
        "key only",
        "client CA only",
        "missing file",
        "another certificate's key",
        "not PEM",
        "a key as the client CA",
    ],
)
def test_tls_flags_given_wrong_stop_the_start(
    pki: Pki, tmp_path: Path, flags: list[str], message: str
) -> None:
    names = {
        "cert": str(pki.cert_file),
        "key": str(pki.key_file),
        "ca": str(pki.ca_file),
        "missing": str(tmp_path / "missing.pem"),
        "text": str(tmp_path / "text.pem"),
        "other_key": str(tmp_path / "other.key"),
    }
    (tmp_path / "text.pem").write_text("not a key\n")
    (tmp_path / "other.key").write_bytes(pki.clients["stranger"].key)
    database = tmp_path / "ledger.db"
    args = [flag.format(**names) for flag in flags]
    result = subprocess.run(
        serve_command(free_port(), f"sqlite:///{database}", *args),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result
    assert "listening" not in result.stdout
    assert f"ledger: cannot start: {message.format(**names)}" in result.stderr, result.stderr
    assert not database.exists(), "the database was touched"
