"""The benchmark helper scripts run and print what they promise (not how fast: see benchmarks/)."""

from __future__ import annotations

import os
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


def test_floor_page_cache_probe_times_each_write_and_cleans_up(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "floor.py"), "--page-cache", "12"],
        capture_output=True, text=True, timeout=120, check=True, env=env).stdout
    summary, in_order = out.splitlines()
    assert summary.startswith("write 10 MiB into the page cache, 12 times, ms: min ")
    times = [float(t) for t in in_order.removeprefix("in order: ").split()]
    assert len(times) == 12 and all(t > 0 for t in times)
    assert list(tmp_path.iterdir()) == []  # every file and the directory removed
