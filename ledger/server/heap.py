"""The cyclic garbage collector of a long-running server process, settled once at its start.

Why: with its modules, grpc and SQLAlchemy loaded, a server process tracks about 100,000
objects that live as long as it does, and every full collection walks them all. Measured
under batched RecordLiquidations on PostgreSQL: the writer ran one about every 2 s, 48-103 ms
each, and freed nothing; the server process one every few seconds, 58-102 ms. Each such
pause stops every call that process holds, and it showed in the p99 per call. Frozen once
start-up is done, those objects are left out of every later collection, which then walks
only what the process made since (CPython's gc.freeze, made for long-lived servers).
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Collect once, then move every object alive now out of the collector's reach. Call in
    the process itself once it has finished starting."""
    gc.collect()
    gc.freeze()
