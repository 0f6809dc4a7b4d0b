"""The liquidation benchmark runs end to end (both load generators, unary and batches).

Speed is not asserted here (that is the benchmark's job, on a quiet machine); this proves the
script, its Rust load generator and its Python clients work against a real server, and that
what they print is a table of calls that succeeded.
"""

from __future__ import annotations

import re
import subprocess
import sys

from bench.common import ROOT


def test_liquidation_benchmark_runs() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_liquidations.py"),
            "--seconds",
            "1",
            "--backends",
            "sqlite",
            "--client",
            "rust,python",
            "--batch-size",
            "100",
            "--rounds",
            "1",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    empty = re.findall(r"^\(none\)\s+(rust|python)\s+empty server\s+(\d+)\s", out, re.M)
    assert sorted(client for client, _ in empty) == ["python", "rust"], out
    assert all(int(rate) > 0 for _, rate in empty), out
    unary = re.findall(
        r"^sqlite\s+(rust|python)\s+unary\s+(\d+)\s+\d+\s.*\s(\d+\.\d\d)x$", out, re.M
    )
    assert sorted(client for client, _, _ in unary) == ["python", "rust"], out
    assert all(int(rate) > 0 and float(ratio) > 0 for _, rate, ratio in unary), out
    batch = re.findall(r"^sqlite\s+(rust|python)\s+batch of 100\s+(\d+)\s+(\d+)\s", out, re.M)
    assert sorted(client for client, _, _ in batch) == ["python", "rust"], out
    # Items are the calls' items, 100 a call (both columns rounded to whole numbers).
    assert all(
        int(calls) > 0 and int(items) >= 100 * int(calls) - 51 for _, calls, items in batch
    ), out
    medians = re.findall(r"^sqlite\s+(rust|python)\s+unary / empty, median of 1 rounds", out, re.M)
    assert sorted(medians) == ["python", "rust"], out
    batch_medians = re.findall(
        r"^sqlite\s+(rust|python)\s+batch items/s, median of 1 rounds: [1-9]", out, re.M
    )
    assert sorted(batch_medians) == ["python", "rust"], out
