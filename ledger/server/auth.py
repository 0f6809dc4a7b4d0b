"""Who may call what: bearer tokens and client certificates, each carrying one role.

The server moves an exchange's insurance fund, so only the clearing system may post
liquidations and close cycles, only an operator may move the fund or change its policy, and
anyone else with access may only read. Three roles say so, by service:

    admin     insurance.v1.Admin and insurance.v1.Query
    clearing  insurance.v1.Clearing and insurance.v1.Query
    reader    insurance.v1.Query

The health and reflection services stay open (load balancers and grpcurl use them, and
neither reveals or changes the ledger); any other service is refused to everyone, so a
service added later is closed until a role is given it here.

A caller proves its identity with `authorization: Bearer <token>` metadata, or, when the
server requires client certificates (--tls-client-ca), with a certificate whose subject CN is
listed in the auth file. A call with a token is judged by its token alone; one without by its
certificate. The auth file (auth_file_format below) holds only each token's SHA-256, so the
file and the server's memory never hold a token, and only a token's name is ever logged.

The check runs in AuthInterceptor, the innermost interceptor (after the call log and the
metrics, so that refusals are logged and counted like any other status), before the
method's handler: a refused call never reaches a handler, reads none of its request stream
and writes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import ipaddress
import logging
import re
import ssl
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from ledger.server.interceptors import Aborted

log = logging.getLogger("ledger.auth")

if TYPE_CHECKING:  # generic only in grpc-stubs; at runtime the class takes no parameters
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Handler = grpc.RpcMethodHandler
    _ServerInterceptor = grpc.aio.ServerInterceptor

ADMIN = "insurance.v1.Admin"
CLEARING = "insurance.v1.Clearing"
QUERY = "insurance.v1.Query"

ROLES: Mapping[str, frozenset[str]] = {
    "admin": frozenset({ADMIN, QUERY}),
    "clearing": frozenset({CLEARING, QUERY}),
    "reader": frozenset({QUERY}),
}

# Open to every caller, with or without credentials.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_TABLE_KEYS = {"tokens": ("name", "role", "sha256"), "certificates": ("common_name", "role")}
_HEADER = re.compile(r"^[ \t]*\[", re.MULTILINE)


class StartupError(Exception):
    """The server's security settings do not allow it to start; the message says why and
    what to change. The command line prints it and exits non-zero."""


class AuthFileError(StartupError):
    """The auth file cannot be read or is malformed; the message names the file and the
    line (or the entry) at fault, and never shows a sha256 value (it might be a token pasted
    in by mistake)."""


@dataclass(frozen=True, slots=True)
class Token:
    """One caller's token, known only by its SHA-256."""

    name: str
    role: str
    sha256: bytes  # 32 bytes


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a call is from, as the logs name it."""

    name: str
    role: str


@dataclass(frozen=True, slots=True)
class AuthFile:
    """The parsed auth file: the tokens, and the roles of client certificates by CN."""

    path: str
    tokens: tuple[Token, ...]
    certificates: Mapping[str, str]  # subject common name → role

    def identify_token(self, token: str) -> Identity | None:
        """The token's identity, or None for an unknown one.

        The digest is compared with every token's, each in constant time, and the loop never
        stops early, so neither the time taken nor a dictionary lookup tells a caller how
        much of a guess was right or where in the file a match is.
        """
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: Token | None = None
        for known in self.tokens:
            if hmac.compare_digest(digest, known.sha256):
                found = known
        return None if found is None else Identity(found.name, found.role)

    def identify_certificate(self, common_name: str) -> Identity | None:
        role = self.certificates.get(common_name)
        return None if role is None else Identity(f"certificate CN={common_name}", role)


# --- the auth file ---------------------------------------------------------------------


def load_auth_file(path: str | Path) -> AuthFile:
    """Read and check the auth file; AuthFileError names what is wrong and where.

    The format, exactly (any other key is an error, so that a typo cannot silently drop
    a token or a role):

        [[tokens]]
        name = "clearing-engine"     # shown in logs, never the token
        role = "clearing"            # admin | clearing | reader
        sha256 = "<hex SHA-256 of the token>"

        [[certificates]]             # with --tls-client-ca: a client certificate's CN
        common_name = "clearing-1"
        role = "clearing"
    """
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise AuthFileError(f"{name}: cannot read the auth file: {error.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise AuthFileError(f"{name}: the auth file is not UTF-8 text: {error}") from None
    return parse_auth_file(text, name)


def parse_auth_file(text: str, path: str = "<auth file>") -> AuthFile:
    """The auth file's text, checked: see load_auth_file."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:  # its message says "(at line L, column C)"
        raise AuthFileError(f"{path}: not valid TOML: {error}") from None
    unknown = sorted(set(document) - set(_TABLE_KEYS))
    if unknown:
        line = _key_line(text, 0, len(text), unknown[0])
        raise AuthFileError(
            f"{path}: {_at(line)}unknown key {unknown[0]!r} at the top level "
            "(only [[tokens]] and [[certificates]] entries are allowed)"
        )
    tokens = _entries(text, path, document, "tokens")
    certificates = _entries(text, path, document, "certificates")

    parsed_tokens: list[Token] = []
    names: dict[str, str] = {}
    digests: dict[bytes, str] = {}
    for where, entry in tokens:
        token_name = _text_value(path, where, entry, "name")
        role = _role(path, where, entry)
        sha256 = entry["sha256"]
        if not isinstance(sha256, str) or not _SHA256_HEX.fullmatch(sha256):
            length = f"{len(sha256)} characters" if isinstance(sha256, str) else "not a string"
            raise AuthFileError(
                f"{path}: {where.at('sha256')} sha256 must be the token's SHA-256 as 64 hex "
                f"characters (got {length}; the token itself never goes in this file)"
            )
        digest = bytes.fromhex(sha256)
        if token_name in names:
            raise AuthFileError(
                f"{path}: {where.at('name')} token name {token_name!r} is already used by "
                f"{names[token_name]}; each token needs a name of its own"
            )
        if digest in digests:
            raise AuthFileError(
                f"{path}: {where.at('sha256')} the same sha256 as {digests[digest]}: one token "
                "cannot have two names or roles"
            )
        names[token_name] = where.place()
        digests[digest] = where.place()
        parsed_tokens.append(Token(token_name, role, digest))

    roles: dict[str, str] = {}
    places: dict[str, str] = {}
    for where, entry in certificates:
        common_name = _text_value(path, where, entry, "common_name")
        role = _role(path, where, entry)
        if common_name in roles:
            raise AuthFileError(
                f"{path}: {where.at('common_name')} common_name {common_name!r} is already "
                f"listed by {places[common_name]}"
            )
        roles[common_name] = role
        places[common_name] = where.place()
    return AuthFile(path, tuple(parsed_tokens), roles)


@dataclass(frozen=True, slots=True)
class _Where:
    """An entry of the file: its table, its number, and its lines when they can be found."""

    table: str
    number: int  # from 1
    lines: Mapping[str, int]  # key → line; "" → the entry's [[table]] line
    name: str = ""

    def at(self, key: str = "") -> str:
        line = self.lines.get(key) or self.lines.get("")
        return f"{_at(line)}{self.describe()}:"

    def describe(self) -> str:
        named = f" ({self.name!r})" if self.name else ""
        return f"{self.table} entry {self.number}{named}"

    def place(self) -> str:
        """The entry as another entry's message refers to it."""
        line = self.lines.get("")
        return f"{self.describe()} at line {line}" if line else self.describe()


def _at(line: int | None) -> str:
    return f"line {line}: " if line else ""


def _entries(
    text: str, path: str, document: Mapping[str, object], table: str
) -> list[tuple[_Where, dict[str, object]]]:
    """The entries of one array of tables, each with where it is in the text."""
    raw = document.get(table, [])
    headers = _header_lines(text, table)
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        line = headers[0] if headers else _table_line(text, table)
        raise AuthFileError(f"{path}: {_at(line)}{table} must be [[{table}]] entries")
    if len(headers) != len(raw):
        headers = []  # written some other way (inline tables): name entries by number only
    allowed = _TABLE_KEYS[table]
    entries = []
    for number, entry in enumerate(raw, start=1):
        lines: dict[str, int] = {}
        if headers:
            start = _offset_of_line(text, headers[number - 1])
            following = _HEADER.search(text, _offset_of_line(text, headers[number - 1] + 1))
            end = following.start() if following else len(text)
            lines[""] = headers[number - 1]
            for key in entry:
                found = _key_line(text, start, end, key)
                if found:
                    lines[key] = found
        label = entry.get("name", entry.get("common_name"))
        where = _Where(table, number, lines, label if isinstance(label, str) else "")
        unknown = sorted(set(entry) - set(allowed))
        if unknown:
            raise AuthFileError(
                f"{path}: {where.at(unknown[0])} unknown key {unknown[0]!r} "
                f"(a {table} entry has exactly {', '.join(allowed)})"
            )
        missing = [key for key in allowed if key not in entry]
        if missing:
            raise AuthFileError(
                f"{path}: {where.at()} missing {', '.join(missing)} "
                f"(a {table} entry has exactly {', '.join(allowed)})"
            )
        entries.append((where, dict(entry)))
    return entries


def _text_value(path: str, where: _Where, entry: Mapping[str, object], key: str) -> str:
    """A name or CN: it is written to logs, so it must be one printable line."""
    value = entry[key]
    if not isinstance(value, str) or not value.strip() or not value.isprintable():
        raise AuthFileError(
            f"{path}: {where.at(key)} {key} must be a non-empty string of printable characters"
        )
    return value


def _role(path: str, where: _Where, entry: Mapping[str, object]) -> str:
    role = entry["role"]
    if not isinstance(role, str) or role not in ROLES:
        shown = repr(role) if isinstance(role, str) else "not a string"
        raise AuthFileError(
            f"{path}: {where.at('role')} role {shown} is not one of {', '.join(ROLES)}"
        )
    return role


def _header_lines(text: str, table: str) -> list[int]:
    pattern = re.compile(rf"^[ \t]*\[\[[ \t]*\"?{table}\"?[ \t]*\]\]", re.MULTILINE)
    return [text.count("\n", 0, m.start()) + 1 for m in pattern.finditer(text)]


def _table_line(text: str, table: str) -> int | None:
    """Where `[table]` or `table = ...` is written (the wrong way to give entries)."""
    pattern = re.compile(rf"^[ \t]*(\[[ \t]*\"?{table}\"?[ \t]*\]|{table}[ \t]*=)", re.MULTILINE)
    found = pattern.search(text)
    return None if found is None else text.count("\n", 0, found.start()) + 1


def _key_line(text: str, start: int, end: int, key: str) -> int | None:
    pattern = re.compile(rf"^[ \t]*[\"']?{re.escape(key)}[\"']?[ \t]*=", re.MULTILINE)
    found = pattern.search(text, start, end)
    return None if found is None else text.count("\n", 0, found.start()) + 1


def _offset_of_line(text: str, line: int) -> int:
    offset = 0
    for _ in range(line - 1):
        offset = text.find("\n", offset)
        if offset < 0:
            return len(text)
        offset += 1
    return offset


# --- secure by default -----------------------------------------------------------------


def listen_host(listen: str) -> str:
    """The host part of HOST:PORT ("[::1]:50051" → "::1"; ":50051" → "", every address)."""
    host, _, _ = listen.rpartition(":")
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and "localhost": addresses that only this machine can reach."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name other than localhost, or "" (every address)
    if isinstance(address, ipaddress.IPv6Address):
        return address == ipaddress.IPv6Address("::1")
    return address in ipaddress.IPv4Network("127.0.0.0/8")


@dataclass(frozen=True, slots=True)
class Security:
    """How the server authenticates callers and encrypts calls, checked before it starts."""

    auth: AuthFile | None
    credentials: grpc.ServerCredentials | None  # None: plaintext
    client_certificates: bool
    loopback: bool

    def note(self) -> str:
        """What the start line says after `ledger listening on port N`."""
        if self.auth is None:
            parts = [
                "no auth file: loopback only, every caller has every role"
                if self.loopback
                else "no auth file, --insecure: every caller that reaches the port has every role"
            ]
        else:
            parts = [
                f"auth file {self.auth.path}: {_count(len(self.auth.tokens), 'token')}, "
                f"{_count(len(self.auth.certificates), 'certificate')}"
            ]
        if self.client_certificates:
            parts.append("TLS, client certificates required")
        elif self.credentials is not None:
            parts.append("TLS")
        return "; ".join(parts)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def security(
    *,
    listen: str,
    auth_file: str = "",
    tls_cert: str = "",
    tls_key: str = "",
    tls_client_ca: str = "",
    insecure: bool = False,
) -> Security:
    """Load the auth file and the TLS files, and refuse what must not start.

    Without an auth file every caller has every role, which is safe only where nobody
    else can reach the port: so the server then listens on loopback only, unless the
    operator says with --insecure that the network is trusted.
    """
    auth = load_auth_file(auth_file) if auth_file else None
    host = listen_host(listen)
    loopback = is_loopback(host)
    if auth is None and not loopback and not insecure:
        shown = host or "every address"
        raise StartupError(
            f"refusing to listen on {shown} ({listen}) without an auth file: every caller "
            "that reaches the port would have every role, and could withdraw the fund, post "
            "liquidations and close cycles. Give --auth-file PATH (env LEDGER_AUTH_FILE) "
            "with the callers' tokens, listen on a loopback address (127.0.0.1, ::1, "
            "localhost), or pass --insecure to accept this on a network you trust"
        )
    if bool(tls_cert) != bool(tls_key):
        raise StartupError("TLS needs both --tls-cert and --tls-key (got only one)")
    if tls_client_ca and not tls_cert:
        raise StartupError(
            "--tls-client-ca needs --tls-cert and --tls-key: client certificates are only "
            "asked for over TLS"
        )
    if auth is not None and not loopback and not tls_cert:
        log.warning(
            "listening on %s without TLS: bearer tokens cross the network in plaintext, "
            "where anyone on the path can read and reuse them; give --tls-cert and --tls-key",
            listen,
        )
    if auth is not None and auth.certificates and not tls_client_ca:
        log.warning(
            "%s lists [[certificates]], but without --tls-client-ca no client certificate "
            "is asked for: those entries give nobody a role",
            auth.path,
        )
    credentials = None
    if tls_cert:
        certificate = _pem(tls_cert, "--tls-cert")
        key = _pem(tls_key, "--tls-key")
        root = _pem(tls_client_ca, "--tls-client-ca") if tls_client_ca else None
        _check_tls_files(tls_cert, tls_key, tls_client_ca)
        credentials = grpc.ssl_server_credentials(
            [(key, certificate)], root_certificates=root, require_client_auth=root is not None
        )
    return Security(auth, credentials, bool(tls_client_ca), loopback)


def _check_tls_files(cert: str, key: str, client_ca: str) -> None:
    """Load the files as OpenSSL would, so that a key that is not the certificate's, or a CA
    file without a certificate, stops the start with a reason (grpc would only fail to bind
    the port, after the database was opened)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An encrypted key gets an empty password (grpc could not use it either) instead of
        # a prompt on the terminal.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as error:
        raise StartupError(
            f"--tls-cert {cert} and --tls-key {key} are not a certificate chain and its "
            f"unencrypted private key: {error}"
        ) from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as error:
            raise StartupError(
                f"--tls-client-ca {client_ca}: not CA certificates: {error}"
            ) from None


def _pem(path: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise StartupError(f"{flag} {path}: cannot read it: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise StartupError(f"{flag} {path}: not a PEM file (no -----BEGIN line)")
    return data


# --- the interceptor -------------------------------------------------------------------


def service_of(method: str) -> str:
    """ "/insurance.v1.Clearing/RecordLiquidation" → "insurance.v1.Clearing"."""
    return method.rpartition("/")[0].lstrip("/")


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the call's `authorization: Bearer <token>`; "" when the header is there
    but is not one bearer token (another scheme, nothing after Bearer, two headers); None
    when there is no authorization header at all.

    The scheme is case-insensitive, as in RFC 6750; a malformed header is refused rather
    than ignored, so that a client that meant to send a token never falls back silently to
    its certificate.
    """
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        return None
    if len(values) != 1 or not isinstance(values[0], str):
        return ""
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return ""
    return token


def refusal(identity: Identity | None, service: str) -> tuple[grpc.StatusCode, str] | None:
    """None when the identity may call the service; else the status and why."""
    if service in OPEN_SERVICES:
        return None
    if identity is None:
        return grpc.StatusCode.UNAUTHENTICATED, "unknown caller"
    if service in ROLES[identity.role]:
        return None
    allowed = " and ".join(sorted(ROLES[identity.role]))
    return (
        grpc.StatusCode.PERMISSION_DENIED,
        f"{identity.name} has role {identity.role}, which may call {allowed}, not {service}",
    )


_NO_TOKEN = "no credentials: send the metadata 'authorization: Bearer <token>'"
_NO_TOKEN_OR_CERTIFICATE = (
    "no credentials: send the metadata 'authorization: Bearer <token>', or use a client "
    "certificate whose common name is listed in the server's auth file"
)
_MALFORMED = "the authorization metadata must be 'Bearer <token>', once"
_UNKNOWN_TOKEN = "unknown token"  # which part of it was wrong is not said


class AuthInterceptor(_ServerInterceptor):
    """Refuses each call that its caller's role does not allow, before its handler runs.

    The decision on a token is made here, from the call's metadata: the call gets either the
    method's own handler (the same object each time, so the interceptors outside keep their
    caches) or one of the same kind that only aborts. A call without a token on a server
    that requires client certificates is judged by its certificate, which grpc only shows
    to the handler's context (context.auth_context()): it gets a gated handler that checks
    the certificate first, and only then runs the method's own.

    `reload` swaps in a new AuthFile at once (one assignment, read once per call), so a
    SIGHUP's new token works, and a removed one is refused, from the next call on.
    """

    def __init__(self, auth: AuthFile, *, client_certificates: bool = False) -> None:
        self._auth = auth
        self._client_certificates = client_certificates
        # method → (the handler as registered, the same gated by the certificate check)
        self._gated: dict[str, tuple[_Handler, _Handler]] = {}

    @property
    def auth(self) -> AuthFile:
        return self._auth

    def reload(self) -> bool:
        """Read the auth file again (SIGHUP); if it is malformed the one in force stays in
        force, and why is logged."""
        path = self._auth.path
        try:
            auth = load_auth_file(path)
        except AuthFileError as error:
            log.error("auth file not reloaded, the previous one stays in force: %s", error)
            return False
        self._auth = auth
        log.info(
            "auth file %s reloaded: %s, %s",
            path,
            _count(len(auth.tokens), "token"),
            _count(len(auth.certificates), "certificate"),
        )
        return True

    async def intercept_service(  # type: ignore[override]  # None: no such method
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED, as without the interceptor
        method = handler_call_details.method
        service = service_of(method)
        if service in OPEN_SERVICES:
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None and self._client_certificates:
            return self._gate(method, handler)
        if token is None:
            return _refused(handler, method, None, grpc.StatusCode.UNAUTHENTICATED, _NO_TOKEN)
        if not token:
            return _refused(handler, method, None, grpc.StatusCode.UNAUTHENTICATED, _MALFORMED)
        identity = self._auth.identify_token(token)
        if identity is None:
            code = grpc.StatusCode.UNAUTHENTICATED
            return _refused(handler, method, None, code, _UNKNOWN_TOKEN)
        refused = refusal(identity, service)
        if refused is not None:
            return _refused(handler, method, identity, *refused)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("method=%s identity=%s role=%s", method, identity.name, identity.role)
        return handler

    def _check_certificate(self, method: str, auth_context: Mapping[str, Iterable[bytes]]) -> None:
        """Raise Aborted unless the peer's certificate is listed with a role that may call
        the method. A certificate with other than one CN is refused: which one counts would
        be a guess."""
        names = list(auth_context.get("x509_common_name") or ())
        identity = None
        if len(names) == 1:
            identity = self._auth.identify_certificate(names[0].decode("utf-8", "replace"))
        if identity is None:
            shown = ", ".join(repr(n.decode("utf-8", "replace")) for n in names) or "none"
            log.warning(
                "refused method=%s code=UNAUTHENTICATED certificate common name %s is not "
                "listed in the auth file",
                method,
                shown,
            )
            raise Aborted(grpc.StatusCode.UNAUTHENTICATED, _NO_TOKEN_OR_CERTIFICATE)
        refused = refusal(identity, service_of(method))
        if refused is not None:
            _log_refusal(method, identity, *refused)
            raise Aborted(*refused)

    def _gate(self, method: str, handler: _Handler) -> _Handler:
        cached = self._gated.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, _same_kind(handler, self._gated_behavior(method, handler)))
            self._gated[method] = cached
        return cached[1]

    def _gated_behavior(self, method: str, handler: _Handler) -> Callable[..., Any]:
        """The method's behavior behind the certificate check, of the same kind (coroutine,
        async generator or blocking function), so that the interceptors outside run it
        where they would run the method's own: a blocking one on a thread of their pool."""
        behavior = _behavior(handler)
        check = self._check_certificate
        if inspect.isasyncgenfunction(behavior):

            async def gated_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                # The call interceptor passes an async generator through as it is: this one
                # aborts the aio context itself.
                try:
                    check(method, context.auth_context())
                except Aborted as refused:
                    await context.abort(refused.code, refused.details)
                async for response in behavior(request, context):
                    yield response

            return gated_stream
        if inspect.iscoroutinefunction(behavior):

            async def gated_call(request: Any, context: Any) -> Any:
                check(method, context.auth_context())
                return await behavior(request, context)

            return gated_call

        def gated_blocking(request: Any, context: Any) -> Any:
            # Checked when called, before a generator or a request stream is touched.
            check(method, _auth_context_from_thread(context))
            return behavior(request, context)

        return gated_blocking


def _auth_context_from_thread(context: Any) -> Mapping[str, Iterable[bytes]]:
    """The call's auth context, from a blocking handler's thread (its ThreadContext reads it
    on the loop). Anything else seen here counts as no certificate (refused)."""
    own = getattr(context, "auth_context", None)
    if not callable(own):
        return {}
    result: Mapping[str, Iterable[bytes]] = own()
    return result


def _behavior(handler: _Handler) -> Callable[..., Any]:
    behavior = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    assert behavior is not None, "a method handler without a behavior"
    return behavior


def _same_kind(
    handler: _Handler, behavior: Callable[..., Any], *, serialized: bool = True
) -> _Handler:
    """A handler of the same kind as `handler`, running `behavior`; with its serialization,
    or (serialized=False) with none, so that no request is ever decoded."""
    serdes: dict[str, Any] = {"request_deserializer": None, "response_serializer": None}
    if serialized:
        serdes = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behavior, **serdes)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behavior, **serdes)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behavior, **serdes)
    return grpc.unary_unary_rpc_method_handler(behavior, **serdes)


def _refused(
    handler: _Handler,
    method: str,
    identity: Identity | None,
    code: grpc.StatusCode,
    details: str,
) -> _Handler:
    """A handler of the method's kind that only ends the call with `code`: it decodes no
    request (no deserializer) and reads none of a request stream.

    It raises Aborted, which the call interceptor outside turns into the status (as every
    handler here does); a bidirectional method, which that interceptor passes through as it
    is, aborts the aio context itself.
    """
    _log_refusal(method, identity, code, details)
    if handler.request_streaming and handler.response_streaming:

        async def abort(request: Any, context: Any) -> Any:
            await context.abort(code, details)

        return _same_kind(handler, abort, serialized=False)

    async def refuse(request: Any, context: Any) -> Any:
        raise Aborted(code, details)

    return _same_kind(handler, refuse, serialized=False)


def _log_refusal(
    method: str, identity: Identity | None, code: grpc.StatusCode, details: str
) -> None:
    who = f"identity={identity.name} role={identity.role}" if identity else "identity=none"
    log.warning("refused method=%s code=%s %s: %s", method, code.name, who, details)
