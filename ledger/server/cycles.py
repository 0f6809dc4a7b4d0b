"""CloseCycle and PreviewCycle: the stream arrives as raw bytes and goes straight to Rust.

grpcio hands these handlers each CycleInput message undeserialised (the method is registered
without a request deserializer), so millions of positions never become Python objects. At
most `streams_max` of these streams are open at once in a process: each holds a cycle's
columns in memory and a thread of the pool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ledger import cycle, statement
from ledger.alloc import CycleInputDecoder, PositionLimitError
from ledger.api.v1 import insurance_pb2 as pb
from ledger.db import closes
from ledger.db.session import Database
from ledger.errors import InvalidArgument, ResourceExhausted
from ledger.server import convert
from ledger.server.interceptors import ThreadContext

CloseReport = Callable[[str, float, int, int], None]  # currency, seconds, positions, participants


class CycleService:
    def __init__(
        self,
        database: Database,
        positions_max: int,
        streams_max: int,
        on_close: CloseReport | None = None,
        keeper: statement.Keeper | None = None,
    ) -> None:
        self._db = database
        self._keeper = keeper
        self._positions_max = positions_max
        self._streams_max = streams_max
        self._on_close = on_close
        self._streams_open = 0
        self._lock = threading.Lock()

    @property
    def streams_open(self) -> int:
        """CloseCycle/PreviewCycle streams whose handler holds a place now."""
        return self._streams_open

    def recover(self) -> None:
        """At start: remove what closes that did not finish left behind."""
        closes.remove_abandoned(self._db)

    def close(self, messages: Iterator[bytes], context: ThreadContext) -> pb.CycleSummary:
        started = time.perf_counter()
        with self._stream():
            key, positions, digest = self._receive(messages)
            summary = cycle.close(self._db, key, positions, digest, context.is_active)
            kept = statement.Close(key, summary.version, summary.input_digest)
            if self._keeper is not None:  # after the reply, on the keeper's thread
                self._keeper.submit(kept, positions.columns())
            else:
                statement.keep(self._db, kept, positions.columns())
        if self._on_close is not None:
            self._on_close(
                key.currency,
                time.perf_counter() - started,
                summary.positions_total,
                summary.participant_count,
            )
        return convert.cycle_summary(summary)

    def preview(self, messages: Iterator[bytes], context: ThreadContext) -> pb.CycleSummary:
        with self._stream():
            key, positions, digest = self._receive(messages)
            with self._db.read() as session:
                summary = cycle.preview(session, key, positions, digest)
        return convert.cycle_summary(summary)

    @contextmanager
    def _stream(self) -> Iterator[None]:
        with self._lock:
            if self._streams_open >= self._streams_max:
                raise ResourceExhausted(
                    f"{self._streams_open} CloseCycle/PreviewCycle streams are already open "
                    f"(at most {self._streams_max} per server process, --streams-max); "
                    "retry when one has finished"
                )
            self._streams_open += 1
        try:
            yield
        finally:
            with self._lock:
                self._streams_open -= 1

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
