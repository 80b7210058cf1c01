"""``zeo-nagios``: a Nagios check of a ZEO server through its ``ruok`` status probe.

Exit status (Nagios): 0 OK, 1 WARNING (no storages, or an empty storage), 2 CRITICAL (no
answer), 3 UNKNOWN (bad command line).  With ``-m`` the storages' metrics follow as perfdata;
with ``-s FILE`` rates since the previous run are added.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from typing import Any

from . import address

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3

LEVEL_METRICS = ("active_txns", "connections", "waiting")
RATE_METRICS = ("aborts", "commits", "conflicts", "conflicts_resolved", "loads", "stores")
UNITS = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400}
EMPTY_TID = "0" * 16


def fetch_status(addr: Any, timeout: float = 10.0) -> dict:
    """The server's ``{storage_id: status}`` from the ``ruok`` handshake."""
    from .wire import ruok  # the same probe as ``zeo ADDRESS status``

    return ruok(addr, timeout=timeout)[1]


def _prefix(storage_id: str) -> str:
    return "" if storage_id == "1" else f"{storage_id}:"


def _rates(status: dict, status_path: str, units: str, now: float) -> list[str]:
    """Rate metrics since the sample saved in ``status_path``; saves the new sample."""
    metrics: list[str] = []
    try:
        with open(status_path) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        previous = None
    if isinstance(previous, dict) and isinstance(previous.get("sample-time"), (int, float)):
        elapsed = now - previous["sample-time"]
        old_storages = previous.get("storages") or {}
        if elapsed > 0:
            for sid, st in status.items():
                old = old_storages.get(sid)
                if not isinstance(old, dict):
                    continue
                for name in RATE_METRICS:
                    if name in st and name in old:
                        rate = (st[name] - old[name]) * UNITS[units] / elapsed
                        metrics.append(f"{_prefix(sid)}{name}={rate}")
    tmp = f"{status_path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"sample-time": now, "storages": status}, f)
    os.replace(tmp, status_path)
    return metrics


def format_output(messages: list[str], metrics: list[str]) -> str:
    """Nagios plugin output: the first message and first metric on line one, the other
    messages next, then ``| `` and the other metrics one per line."""
    if not metrics:
        return "\n".join(messages)
    out = f"{messages[0]}|{metrics[0]}"
    if messages[1:]:
        out += "\n" + "\n".join(messages[1:])
    if metrics[1:]:
        out += "\n| " + "\n ".join(metrics[1:])
    return out


def check(addr: Any, output_metrics: bool = False, status_path: str | None = None,
          time_units: str = "minutes", timeout: float = 10.0) -> int:
    """Probe the server at ``addr``, print the Nagios result and return the exit status."""
    if time_units not in UNITS:
        raise ValueError(f"time units must be one of {', '.join(UNITS)}")
    try:
        status = fetch_status(addr, timeout)
    except (OSError, ValueError, struct.error) as e:
        print(f"Can't connect {e}")
        return CRITICAL
    now = time.time()
    level = OK
    messages = []
    if not status:
        messages.append("No storages")
        level = WARNING
    for sid, st in status.items():
        if st.get("last-transaction") == EMPTY_TID:
            messages.append(f"Empty storage {sid!r}")
            level = max(level, WARNING)
    if not messages:
        messages.append("OK")
    metrics: list[str] = []
    if output_metrics:
        for sid, st in status.items():
            metrics.extend(f"{_prefix(sid)}{name}={st[name]}" for name in LEVEL_METRICS
                           if name in st)
    if status_path:
        rates = _rates(status, status_path, time_units, now)
        if output_metrics:
            metrics.extend(rates)
    print(format_output(messages, metrics))
    return level


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(UNKNOWN)


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(
        prog="zeo-nagios",
        description="Check a ZEO server for Nagios. ADDRESS is [ipv6]:port, host:port or "
                    "a Unix socket path.",
        epilog="Exit status: 0 OK, 1 warning, 2 critical (no answer), 3 bad usage.",
    )
    parser.add_argument("address")
    parser.add_argument("-m", "--output-metrics", action="store_true", help="output metrics")
    parser.add_argument("-s", "--status-path", help="status file, needed for rate metrics")
    parser.add_argument("-u", "--time-units", choices=list(UNITS), default="minutes",
                        help="time unit of rate metrics (default: minutes)")
    parser.add_argument("-t", "--timeout", type=float, default=10.0,
                        help="seconds to wait for the server's answer (default: 10)")
    args = parser.parse_args(argv)
    try:
        addr = address.parse(args.address)
    except ValueError as e:
        parser.error(str(e))
    sys.exit(check(addr, args.output_metrics, args.status_path, args.time_units,
                   args.timeout))


if __name__ == "__main__":
    main()
