"""The RecordLiquidation benchmark runs end to end (both load generators, both modes).

Speed is not asserted here (that is the benchmark's job, on a quiet machine); this proves the
script, its Rust load generator and its Python clients work against a real server, and that
what they print is a table of calls that succeeded.
"""

from __future__ import annotations

import re
import subprocess
import sys

from bench.bench_liquidations import MODES
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
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    modes = "|".join(re.escape(mode) for mode in MODES)
    rows = re.findall(rf"^sqlite\s+(rust|python)\s+({modes})\s+(\d+)\s", out, re.M)
    assert sorted((client, mode) for client, mode, _ in rows) == sorted(
        (client, mode) for client in ("rust", "python") for mode in MODES
    ), out
    assert all(int(rate) > 0 for _, _, rate in rows), out
    assert len(re.findall(r"^sqlite\s+(rust|python)\s+gain\s+\d+\.\dx$", out, re.M)) == 2, out
    empty = re.findall(r"^\(none\)\s+(rust|python)\s+empty server\s+(\d+)\s", out, re.M)
    assert sorted(client for client, _ in empty) == ["python", "rust"], out
    assert all(int(rate) > 0 for _, rate in empty), out
