"""Kill-and-restart recovery (issue 21): 4 client processes commit on a contended list while
the server is SIGKILLed and restarted on the same files and port.  The correctness part is
asserted here; the timings are benchmark figures (benchmarks/restart.py, docs/performance.rst).

After every restart every client commits again, nothing acknowledged is lost (counters and
the shared list), fstest is clean, and no transaction begun on a reconnected client reads
another client's counter older than one acknowledged before the restart.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import restart  # noqa: E402


@pytest.mark.timeout(600)
@pytest.mark.parametrize("pair", ["ours/ours", "ref/ours"])
def test_clients_recover_after_each_restart(tmp_path, pair):
    client, server = pair.split("/")
    result = restart.run(client, server, tmp_path / "run", restarts=3, workers=4, seed=3)
    assert result.problems == []
    assert len(result.restarts) == 3
    for r in result.restarts:
        assert sorted(r.first_commit) == [0, 1, 2, 3]
    summary = result.summary()
    assert summary["commits"] > 0
    print(f"\nrestart recovery {pair}: {summary}")
