"""The domain's exception tree; the server maps each class to one gRPC status, in one table."""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every error the domain raises on purpose; the message is shown to the caller."""


class InvalidArgument(LedgerError):
    """A malformed or out-of-range field: names the field and the value."""

    def __init__(self, field: str, value: object, problem: str) -> None:
        super().__init__(f"{field}: {problem} (got {shown(value)})")
        self.field = field
        self.value = value


SHOWN_CHARACTERS_MAX = 512  # of a bad value quoted back in a message (it goes in the trailers)


def shown(value: object) -> str:
    """repr(value), cut short when long: a message naming a 5,000-character value three
    times (message, status, field violation) would pass the client's metadata limit."""
    text = repr(value)
    if len(text) <= SHOWN_CHARACTERS_MAX:
        return text
    length = f", {len(value)} characters" if isinstance(value, str | bytes) else ""
    return f"{text[: SHOWN_CHARACTERS_MAX - 1]}…{length}"


class NotFound(LedgerError):
    """An unknown currency, contract or cycle."""


class AlreadyExists(LedgerError):
    """An id reused with other content, or a currency re-created with another scale."""


class FailedPrecondition(LedgerError):
    """A rule of the ledger's state: a balance, a closed cycle, a contract's currency.

    `type` names the rule for a client program (google.rpc.PreconditionFailure's type) and
    `subject` what it is about."""

    def __init__(self, message: str, *, type: str = "LEDGER_STATE", subject: str = "") -> None:
        super().__init__(message)
        self.type = type
        self.subject = subject


class ResourceExhausted(LedgerError):
    """A request above a configured limit: positions in a cycle, liquidations waiting, open
    cycle streams; the message says whether to retry."""


class Unavailable(LedgerError):
    """The database kept refusing a write (lost, restarting, locked): nothing was written;
    retry."""


class DeadlineExceeded(LedgerError):
    """The caller's deadline passed before the work was done (nothing of it was written), or
    a stream stayed idle for too long."""


class Cancelled(LedgerError):
    """The caller went away before the work was done; nothing of it was written."""
