"""CloseCycle and PreviewCycle: the stream arrives as raw bytes and goes straight to Rust.

grpcio hands these handlers each CycleInput message undeserialised (the method is registered
without a request deserializer), so millions of positions never become Python objects.
"""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy.orm import Session

from ledger import cycle
from ledger.alloc import CycleInputDecoder, PositionLimitError
from ledger.api.v1 import insurance_pb2 as pb
from ledger.db.session import Database
from ledger.db.store import reserve_entry_ids
from ledger.errors import InvalidArgument, ResourceExhausted
from ledger.server import convert
from ledger.server.interceptors import CallCancelled, ThreadContext


class CycleService:
    def __init__(self, database: Database, positions_max: int) -> None:
        self._db = database
        self._positions_max = positions_max

    def close(self, messages: Iterator[bytes], context: ThreadContext) -> pb.CycleSummary:
        key, positions, digest = self._receive(messages)
        with self._db.write() as session:
            summary = cycle.close(session, key, positions, digest, self._reserve_ids)
            # A client that gave up (cancel, deadline) gets no close: grpcio may even end the
            # request stream early as if complete when a cancel races the last read, so the
            # check is here, after the work and before the commit, and it rolls all back.
            if not context.is_active():
                raise CallCancelled(f"close of cycle {key.cycle_id!r} cancelled by the client")
        return convert.cycle_summary(summary)

    def preview(self, messages: Iterator[bytes], context: ThreadContext) -> pb.CycleSummary:
        key, positions, digest = self._receive(messages)
        with self._db.read() as session:
            summary = cycle.preview(session, key, positions, digest)
        return convert.cycle_summary(summary)

    def _receive(self, messages: Iterator[bytes]) -> tuple[cycle.CycleKey, CycleInputDecoder, str]:
        """Read the whole stream: the header first and once, then the position chunks."""
        decoder = CycleInputDecoder(self._positions_max)
        key: cycle.CycleKey | None = None
        for index, message in enumerate(messages):
            if not message:
                raise InvalidArgument("item", f"message {index}", "neither header nor positions")
            try:
                header = decoder.feed(message)
            except PositionLimitError as error:
                raise ResourceExhausted(
                    f"the cycle has more than {self._positions_max} positions: {error}"
                ) from error
            if header is not None:
                if key is not None:
                    raise InvalidArgument("header", f"message {index}", "a second header")
                key = cycle.check_header(header.cycle_id, header.currency)
                with self._db.read() as session:
                    cycle.check_currency(session, key)  # NOT_FOUND before the rest arrives
            elif key is None:
                raise InvalidArgument(
                    "positions", f"message {index}", "positions before the header"
                )
        if key is None:
            raise InvalidArgument("header", "none", "the stream must start with a header")
        return key, decoder, decoder.input_digest()

    def _reserve_ids(self, session: Session, count: int) -> int:
        """Entry ids for the close. On PostgreSQL they are taken in a transaction of their own,
        committed at once, so the id counter is not held through the bulk write (liquidation
        batches of other currencies keep going); unused ids after a failure are only a gap."""
        if self._db.is_sqlite:
            return reserve_entry_ids(session, count)
        with self._db.write() as own:
            return reserve_entry_ids(own, count)
