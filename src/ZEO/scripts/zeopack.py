"""``zeopack``: pack storages of running ZEO servers.

    zeopack [-d DAYS] [-t HH[:MM[:SS]]] [-u PATH[:NAME]]... [HOST:PORT[:NAME]]...

Each server is given as ``host:port``, ``[ipv6]:port`` or ``port`` (on 127.0.0.1), or with
``-u`` as a Unix socket path; ``:NAME`` picks the storage (default ``1``).  The old options
``-h HOST -p PORT -U PATH -S NAME`` still work.  Exit status 1 when a server could not be
reached or a pack failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from .. import address
from .._usage import UsageError

logger = logging.getLogger("ZEO.scripts.zeopack")


def parse_server(text: str) -> tuple[Any, str]:
    """``host:port[:name]``, ``[v6]:port[:name]`` or ``port[:name]`` -> (address, name)."""
    head, sep, name = text.rpartition(":")
    if sep and name and not name.isdigit() and not name.endswith("]"):
        candidates = [(head, name), (text, "1")]  # "h:8100:main", or "8100:main"
    else:
        candidates = [(text, "1")]
    for addr_text, storage in candidates:
        try:
            addr = address.parse(addr_text)
        except ValueError:
            continue
        if not isinstance(addr, str):
            return addr, storage
    raise UsageError(f"bad server address {text!r}: use host:port[:name]")


def parse_unix(text: str) -> tuple[str, str]:
    """``path[:name]`` -> (path, name)."""
    path, sep, name = text.rpartition(":")
    if sep and path and "/" not in name:
        return path, name or "1"
    return text, "1"


def pack_time(days: float, time_of_day: str | None, now: float | None = None) -> float:
    """The pack time: ``days`` before now, or before the last HH:MM:SS (local time)."""
    if now is None:
        now = time.time()
    t = now
    if time_of_day:
        try:
            fields = [int(f) for f in time_of_day.split(":")]
            if not 1 <= len(fields) <= 3:
                raise ValueError
        except ValueError:
            raise UsageError(f"bad time {time_of_day!r}: use HH[:MM[:SS]]")
        fields += [0] * (3 - len(fields))
        h, m, s = fields
        if not (0 <= h < 24 and 0 <= m < 60 and 0 <= s < 60):
            raise UsageError(f"bad time {time_of_day!r}: use HH[:MM[:SS]]")
        lt = time.localtime(now)
        t = time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday, h, m, s, 0, 0, -1))
        if t > now:
            t -= 86400
    return t - days * 86400


def pack_one(addr: Any, name: str, t: float, timeout: float) -> str | None:
    """Pack storage ``name`` at ``addr`` to time ``t``; return an error message or None."""
    from ZEO.ClientStorage import ClientStorage

    where = f"{address.format(addr)} (storage {name!r})"
    try:
        cs = ClientStorage(addr, storage=name, read_only=True, wait=False)
    except Exception as e:
        return f"cannot open a client for {where}: {e}"
    spinner = None
    if sys.stderr.isatty():  # progress a user can see, on one line
        from ZEO.cli import Spinner

        spinner = Spinner(sys.stderr, f"connecting to {where}")
    try:
        deadline = time.monotonic() + timeout
        while not cs.is_connected():
            if time.monotonic() > deadline:
                if spinner is not None:
                    spinner.done("no answer")
                return f"no server answered at {where} within {timeout:g}s"
            if spinner is not None:
                spinner.tick()
            time.sleep(0.1)
        if spinner is not None:
            spinner.done("connected")
            spinner = Spinner(sys.stderr, f"packing {where}")
        _with_spinner(spinner, lambda: cs.pack(t, wait=True))
    except Exception as e:
        return f"packing {where} failed: {type(e).__name__}: {e}"
    finally:
        cs.close()
    logger.info("packed %s", where)
    return None


def _with_spinner(spinner: Any, work: Any) -> None:
    """Run ``work()``; meanwhile tick ``spinner`` (if any) from a thread."""
    if spinner is None:
        work()
        return
    import threading

    stop = threading.Event()

    def spin() -> None:
        while not stop.wait(0.2):
            spinner.tick()

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        work()
    except BaseException:
        stop.set()
        thread.join()
        spinner.done("failed")
        raise
    stop.set()
    thread.join()
    spinner.done("done")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="zeopack", add_help=False, description="Pack storages of ZEO servers.")
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument("servers", nargs="*", metavar="HOST:PORT[:NAME]")
    p.add_argument("-d", "--days", type=float, default=0.0,
                   help="keep the history of the last DAYS days (default 0)")
    p.add_argument("-t", "--time", metavar="HH[:MM[:SS]]",
                   help="pack to this time of day (the last one before now)")
    p.add_argument("-u", "--unix", action="append", default=[], metavar="PATH[:NAME]",
                   help="a Unix socket server (repeatable)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for each server (default 60)")
    p.add_argument("-h", dest="host", help=argparse.SUPPRESS)
    p.add_argument("-p", dest="port", type=int, help=argparse.SUPPRESS)
    p.add_argument("-U", dest="old_unix", help=argparse.SUPPRESS)
    p.add_argument("-S", dest="storage", default="1", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    """Console script; exits 0 when every pack succeeded, 1 otherwise, 2 on bad usage."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    try:
        args = _parser().parse_args(argv)
        targets: list[tuple[Any, str]] = [parse_server(s) for s in args.servers]
        targets += [parse_unix(u) for u in args.unix]
        if args.port is not None:
            targets.append(((args.host or "127.0.0.1", args.port), args.storage))
        elif args.host:
            raise UsageError("-h needs -p")
        if args.old_unix:
            targets.append((args.old_unix, args.storage))
        if not targets:
            raise UsageError("no server given; use HOST:PORT[:NAME] or -u PATH[:NAME]")
        t = pack_time(args.days, args.time)
    except UsageError as e:
        print(f"zeopack: error: {e}", file=sys.stderr)
        sys.exit(2)
    failed = False
    for addr, name in targets:
        error = pack_one(addr, name, t, args.timeout)
        if error:
            print(f"zeopack: error: {error}", file=sys.stderr)
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
