"""How a CLI command reaches the server: the target, the caller's token and TLS.

The token (env LEDGER_TOKEN) is sent as `authorization: Bearer <token>` metadata on every
call, as the server's auth interceptor reads it; the TLS options mirror the server's: a CA to
trust (--tls-ca) and, for mutual TLS, the client's own certificate and key. Calls go through
multi-callables made from the method's path and the generated message classes (the generated
*_pb2_grpc stubs are untyped), and may take and give bytes where a command encodes or
decodes the messages itself (the columnar CycleInput and AllocationChunk streams).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from ledger.limits import MESSAGE_BYTES_MAX

DEFAULT_TARGET = "127.0.0.1:50051"
PACKAGE = "insurance.v1"

M = TypeVar("M", bound=Message)


class UsageProblem(Exception):
    """A problem with what the operator asked for, found before anything is sent (a missing
    file, a TLS key without its certificate, an amount finer than the currency's scale):
    exit code 2, like a malformed argument."""


def method_path(service: str, method: str) -> str:
    return f"/{PACKAGE}.{service}/{method}"


def status_name(code: int) -> str:
    """The name of a gRPC status code given as a number (a batch item's outcome)."""
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return str(code)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and as whom to call; read from the global options (and their env variables)."""

    target: str = DEFAULT_TARGET
    token: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""
    timeout_s: float = 60.0

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert or self.tls_key or self.tls_server_name)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials from the PEM files, or None for plaintext. A certificate without
        its key (or the reverse) is refused here: the handshake would fail less clearly."""
        if not self.tls:
            return None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise UsageProblem("--tls-cert and --tls-key go together (mutual TLS needs both)")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "--tls-ca") if self.tls_ca else None,
            private_key=_read(self.tls_key, "--tls-key") if self.tls_key else None,
            certificate_chain=_read(self.tls_cert, "--tls-cert") if self.tls_cert else None,
        )

    def options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
        ]
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return options

    def channel(self) -> grpc.Channel:
        credentials = self.credentials()
        if credentials is None:
            return grpc.insecure_channel(self.target, options=self.options())
        return grpc.secure_channel(self.target, credentials, options=self.options())

    def aio_channel(self, extra_options: Iterable[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """A grpc.aio channel, for the load-test callers (one event loop per process)."""
        options = [*self.options(), *extra_options]
        credentials = self.credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        return grpc.aio.secure_channel(self.target, credentials, options=options)


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UsageProblem(f"{flag}: cannot read {path}: {error.strerror}") from None


class Client:
    """One channel to the server; each call sends the token and has the deadline.

    Unary calls take a generated request and give the generated reply; the streaming ones
    take or give serialized bytes or messages as the caller encodes them.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._channel = endpoint.channel()
        self._metadata = endpoint.metadata()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def unary(self, service: str, method: str, request: Message, reply: type[M]) -> M:
        call = self._channel.unary_unary(
            method_path(service, method),
            request_serializer=_serialize,
            response_deserializer=reply.FromString,
        )
        result: M = call(request, metadata=self._metadata, timeout=self.endpoint.timeout_s)
        return result

    def stream_unary_raw(
        self, service: str, method: str, requests: Iterator[bytes], reply: type[M]
    ) -> M:
        """A client stream of already-serialized messages; no deadline (a large cycle takes
        as long as it takes; the server ends a stream that stays silent)."""
        call = self._channel.stream_unary(
            method_path(service, method),
            request_serializer=None,
            response_deserializer=reply.FromString,
        )
        result: M = call(requests, metadata=self._metadata)
        return result

    def unary_stream(
        self, service: str, method: str, request: Message, reply: type[M]
    ) -> Iterator[M]:
        call = self._channel.unary_stream(
            method_path(service, method),
            request_serializer=_serialize,
            response_deserializer=reply.FromString,
        )
        replies: Iterator[M] = iter(call(request, metadata=self._metadata))
        return replies


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
