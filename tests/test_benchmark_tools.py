"""The benchmark helper scripts run and print what they promise (not how fast: see benchmarks/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_floor_prints_each_round_trip_row() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "floor.py"), "--pings", "50", "--no-ref"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    rows = {line.split()[0] + (" " + line.split()[1] if line.split()[1].isalpha() else ""):
            line.split()[-2:] for line in out.splitlines()[1:]}
    assert set(rows) == {"echo", "echo+thread", "raw ours", "client ours"}
    for p50, p99 in rows.values():
        assert 0 < float(p50) <= float(p99)
