"""heap.settle: the objects alive at start-up are left out of every later collection.

Run in a child interpreter, so that this test process's own collector is left as it is.
"""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import gc
import ledger.server.app  # the server's modules, as a server process has them loaded
from ledger.server import heap

before = len(gc.get_objects())
heap.settle()
after = len(gc.get_objects())
print(before, after, gc.get_freeze_count())
"""


def test_settle_freezes_what_start_up_made() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    before, after, frozen = (int(value) for value in out)
    # Tens of thousands of objects tracked after the imports; all but a handful frozen.
    assert before > 10_000
    assert frozen >= before // 2
    assert after < before // 10
