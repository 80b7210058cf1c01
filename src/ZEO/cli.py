"""``zeo``: a command-line client for ZEO servers (ours or the real ZEO 5/6).

Usage::

    zeo ADDRESS                      list the server's methods
    zeo ADDRESS METHOD [ARGS...]     call a read-only method, or pack
    zeo ADDRESS ping [-n COUNT]      round-trip times
    zeo ADDRESS status               per-storage statistics
    zeo --admin SOCKET COMMAND       talk to a zeo-ng server's admin socket

ADDRESS is ``host:port``, ``port``, ``[v6]:port`` or a Unix socket path.  Exit status: 0 on
success, 1 when the server answered with an error, 2 for a usage error, 3 when the server
cannot be reached or closed the connection, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from ZODB.utils import p64

from . import address
from ._usage import UsageError
from .wire import ConnectionClosed, RemoteError, WireClient, ruok

EXIT_OK = 0
EXIT_REMOTE_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

MAXTID = b"\x7f\xff\xff\xff\xff\xff\xff\xff"


# --- argument types ------------------------------------------------------------------------


def _to_8bytes(value: Any, what: str) -> bytes:
    """An oid or tid: an int, 16 hex digits, or ``max`` (tids)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return p64(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if what == "tid" and text == "max":
            return MAXTID
        if text.startswith("0x"):
            return p64(int(text, 16))
        if len(text) == 16:
            try:
                return bytes.fromhex(text)
            except ValueError:
                pass
        if text.isdigit():
            return p64(int(text))
    raise UsageError(f"bad {what} {value!r}: give an integer or 16 hex digits")


def _to_int(value: Any, what: str) -> int:
    try:
        if isinstance(value, str):
            return int(value, 0)
        if isinstance(value, bool):
            return int(value)
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"bad {what} {value!r}: not an integer")


def _to_float(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"bad {what} {value!r}: not a number")


def _to_time(value: Any, what: str) -> float:
    """A pack time: seconds since the epoch, ``now``, or ``-Nd`` (N days ago)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "now":
            return time.time()
        if text.startswith("-") and text.endswith("d"):
            return time.time() - 86400 * _to_float(text[1:-1], what)
    return _to_float(value, what)


def _to_bool(value: Any, what: str) -> bool:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"bad {what} {value!r}: not a boolean")
    return bool(value)


def _to_any(value: Any, what: str) -> Any:
    return value


_CONVERTERS: dict[str, Callable[[Any, str], Any]] = {
    "oid": _to_8bytes, "tid": _to_8bytes, "int": _to_int, "float": _to_float,
    "time": _to_time, "bool": _to_bool, "any": _to_any,
}


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # a key of _CONVERTERS
    default: Any = None
    required: bool = True

    def __str__(self) -> str:
        return self.name if self.required else f"{self.name}={self.default!r}"


@dataclass(frozen=True)
class Method:
    """One server method: its parameters, a one-line doc, and how the CLI may use it."""

    name: str
    params: tuple[Param, ...]
    doc: str
    callable: bool  # read-only methods and pack; the rest change state or need a session

    @property
    def signature(self) -> str:
        return f"{self.name}({', '.join(map(str, self.params))})"


def _p(name: str, kind: str, default: Any = None, required: bool = True) -> Param:
    return Param(name, kind, default, required)


def _opt(name: str, kind: str, default: Any) -> Param:
    return Param(name, kind, default, False)


#: The methods of a registered ZEO 5/6 connection (plus register), in a useful order.
METHODS: tuple[Method, ...] = (
    Method("register", (_p("storage_id", "any"), _p("read_only", "bool")),
           "Join a storage (the CLI does this for you); returns its last tid.", False),
    Method("get_info", (), "Storage facts: length, size, name, undo support, interfaces.", True),
    Method("lastTransaction", (), "The id of the storage's last committed transaction.", True),
    Method("server_status", (), "Statistics of the storage (loads, stores, commits...).", True),
    Method("ping", (), "Do nothing; a round trip.", True),
    Method("loadBefore", (_p("oid", "oid"), _p("tid", "tid")),
           "(data, start_tid, end_tid) of the newest revision older than tid.", True),
    Method("loadSerial", (_p("oid", "oid"), _p("serial", "tid")),
           "The data of one revision of an object.", True),
    Method("getTid", (_p("oid", "oid"),), "The tid of an object's current revision.", True),
    Method("history", (_p("oid", "oid"), _opt("size", "int", 1)),
           "Revision history of an object, newest first.", True),
    Method("getInvalidations", (_p("tid", "tid"),),
           "(latest tid, oids changed after tid), or None when the queue cannot tell.", True),
    Method("record_iternext", (_opt("next", "oid", None),),
           "(oid, tid, data, next) of the record after `next` (start with None).", True),
    Method("undoLog", (_opt("first", "int", 0), _opt("last", "int", -20)),
           "Descriptions of undoable transactions, newest first.", True),
    Method("undoInfo", (_opt("first", "int", 0), _opt("last", "int", -20),
                        _opt("spec", "any", None)),
           "Like undoLog, filtered by a spec dict.", True),
    Method("pack", (_opt("t", "time", "now"), _opt("wait", "bool", True)),
           "Pack the storage to time t (epoch seconds, 'now' or '-Nd').", True),
    Method("new_oids", (_opt("n", "int", 100),), "Allocate up to 100 new oids.", False),
    Method("new_oid", (), "Registered by ZEO but not implemented (always an error).", False),
    Method("iterator_start", (_opt("start", "tid", None), _opt("stop", "tid", None)),
           "Start a transaction iterator; returns its id (per connection).", False),
    Method("iterator_next", (_p("iid", "int"),),
           "(tid, status, user, description, extension) of the next transaction.", False),
    Method("iterator_record_start", (_p("txn_iid", "int"), _p("tid", "tid")),
           "Start iterating over the records of the last transaction returned.", False),
    Method("iterator_record_next", (_p("riid", "int"),),
           "(oid, tid, data, data_txn) of the next record.", False),
    Method("iterator_gc", (_p("iids", "any"),), "One-way: forget iterators.", False),
    Method("tpc_begin", (_p("txn_id", "int"), _p("user", "any"), _p("description", "any"),
                         _p("extension", "any"), _opt("tid", "tid", None),
                         _opt("status", "any", " ")),
           "One-way: start a transaction.", False),
    Method("storea", (_p("oid", "oid"), _p("serial", "tid"), _p("data", "any"),
                      _p("txn_id", "int")), "One-way: buffer a store.", False),
    Method("checkCurrentSerialInTransaction", (_p("oid", "oid"), _p("serial", "tid"),
                                               _p("txn_id", "int")),
           "One-way: buffer a read-currency check.", False),
    Method("restorea", (_p("oid", "oid"), _p("serial", "tid"), _p("data", "any"),
                        _p("prev_txn", "tid"), _p("txn_id", "int")),
           "One-way: buffer a restore.", False),
    Method("deleteObject", (_p("oid", "oid"), _p("serial", "tid"), _p("txn_id", "int")),
           "One-way: buffer a delete.", False),
    Method("undoa", (_p("undone_tid", "any"), _p("txn_id", "int")),
           "One-way: buffer an undo.", False),
    Method("storeBlobStart", (), "One-way: open a blob upload.", False),
    Method("storeBlobChunk", (_p("chunk", "any"),), "One-way: append to the upload.", False),
    Method("storeBlobEnd", (_p("oid", "oid"), _p("serial", "tid"), _p("data", "any"),
                            _p("txn_id", "int")), "One-way: finish a blob store.", False),
    Method("storeBlobShared", (_p("oid", "oid"), _p("serial", "tid"), _p("data", "any"),
                               _p("filename", "any"), _p("txn_id", "int")),
           "One-way: store a blob from a shared blob directory.", False),
    Method("vote", (_p("txn_id", "int"),), "Vote: take the commit lock and prepare.", False),
    Method("tpc_finish", (_p("txn_id", "int"),), "Commit; returns the tid.", False),
    Method("tpc_abort", (_p("txn_id", "int"),), "Abort the transaction.", False),
    Method("sendBlob", (_p("oid", "oid"), _p("serial", "tid")),
           "Stream a blob's file to the client.", False),
    Method("set_client_label", (_p("label", "any"),),
           "One-way: name this connection in the server's log.", False),
)
METHODS_BY_NAME = {m.name: m for m in METHODS}


# --- output --------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """Plain JSON data: bytes become hex strings, tuples lists, dict keys strings."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {(k.hex() if isinstance(k, bytes) else str(k)): to_jsonable(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, (dict, list, tuple))


def _scalar_text(value: Any, max_bytes: int) -> str:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value)
        if len(value) > max_bytes:
            return f"{value[:max_bytes].hex()}… ({len(value)} bytes)"
        return value.hex() if value else "b''"
    return str(value)


def _lines(value: Any, max_bytes: int) -> list[str]:
    if _is_scalar(value):
        return [_scalar_text(value, max_bytes)]
    if isinstance(value, dict):
        if not value:
            return ["{}"]
        lines = []
        for k, v in value.items():
            key = _scalar_text(k, max_bytes)
            sub = _lines(v, max_bytes)
            if _is_scalar(v) or not v or (not isinstance(v, dict) and all(map(_is_scalar, v))):
                lines.append(f"{key}: {sub[0]}")
            else:
                lines.append(f"{key}:")
                lines.extend("  " + line for line in sub)
        return lines
    if not value:
        return ["[]"]
    if all(map(_is_scalar, value)):
        return ["[" + ", ".join(_scalar_text(v, max_bytes) for v in value) + "]"]
    lines = []
    for v in value:
        sub = _lines(v, max_bytes)
        lines.append("- " + sub[0])
        lines.extend("  " + line for line in sub[1:])
    return lines


def format_value(value: Any, max_bytes: int = 64) -> str:
    """Readable text: bytes as hex (long ones cut), one dict key or list item per line.

    Not YAML (PyYAML would print bytes as base64 and need a dependency): ``--json`` gives
    machine-readable output.
    """
    return "\n".join(_lines(value, max_bytes))


def format_error(e: RemoteError) -> str:
    """``class name: detail`` of an error reply, bytes as hex."""
    payload = e.payload
    if isinstance(payload, dict) and "message" in payload:
        detail = dict(payload)
        message = detail.pop("message")
        extra = ", ".join(f"{k}={format_value(v)}" for k, v in detail.items() if v is not None)
        return f"{e.class_name}: {message}" + (f" ({extra})" if extra else "")
    if isinstance(payload, (tuple, list)):
        return f"{e.class_name}: " + ", ".join(format_value(v) for v in payload)
    return f"{e.class_name}: {format_value(payload)}"


def methods_table() -> str:
    """The method listing printed by ``zeo ADDRESS``."""
    width = max(len(m.signature) for m in METHODS)
    lines = []
    for m in METHODS:
        mark = " " if m.callable else "*"
        lines.append(f"{mark} {m.signature:<{width}}  {m.doc}")
    lines.append("")
    lines.append("* not callable from the command line (changes data or needs a session)")
    lines.append("  also: ping [-n COUNT] (round-trip times), status (statistics table)")
    return "\n".join(lines)


STATUS_COLUMNS = ("connections", "loads", "stores", "commits", "aborts", "conflicts",
                  "active_txns", "waiting", "last-transaction")


def table(rows: Sequence[tuple[str, ...]], numeric: bool = False) -> list[str]:
    """``rows`` (the first one the headers) as aligned text lines, two spaces apart; with
    ``numeric``, every column but the first is aligned right.

    Hand-written on purpose: two small tables do not justify a dependency (tabulate, rich)
    in every server's environment.
    """
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if numeric and i else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def status_table(status: dict) -> str:
    """One row per storage of a ``ruok`` status dict."""
    rows = [("storage",) + STATUS_COLUMNS]
    for sid in sorted(status):
        st = status[sid]
        rows.append((sid,) + tuple(str(st.get(c, "")) for c in STATUS_COLUMNS))
    out = table(rows, numeric=True)
    starts = {status[sid].get("start") for sid in status}
    if len(starts) == 1 and None not in starts:
        out.append(f"serving since {starts.pop()}")
    return "\n".join(out)


class Spinner:
    """A progress indicator on a terminal: spinner and elapsed seconds, on one line."""

    FRAMES = "|/-\\"

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self.started = time.monotonic()
        self.n = 0

    def tick(self) -> None:
        frame = self.FRAMES[self.n % len(self.FRAMES)]
        self.n += 1
        elapsed = time.monotonic() - self.started
        self.stream.write(f"\r{self.label} {frame} {elapsed:6.1f}s")
        self.stream.flush()

    def done(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        self.stream.write(f"\r{self.label} {message} in {elapsed:.1f}s\n")
        self.stream.flush()


# --- commands ------------------------------------------------------------------------------


def convert_args(method: Method, raw: list[str], as_json: bool) -> tuple:
    """Command-line words -> call arguments, by the method's parameter kinds."""
    params = method.params
    if len(raw) > len(params):
        raise UsageError(f"{method.name} takes at most {len(params)} arguments: "
                         f"{method.signature}")
    missing = [p.name for p in params[len(raw):] if p.required]
    if missing:
        raise UsageError(f"{method.name}: missing {', '.join(missing)}: {method.signature}")
    out: list[Any] = []
    for param, word in zip(params, raw):
        value: Any = word
        if as_json:
            try:
                value = json.loads(word)
            except ValueError as e:
                raise UsageError(f"{param.name}: not JSON: {word!r} ({e})")
            if value is None:
                out.append(None)
                continue
        out.append(_CONVERTERS[param.kind](value, param.name))
    if method.name == "pack":
        if not out:
            out.append(time.time())
        if len(out) < 2:
            out.append(True)
    return tuple(out)


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.ssl_ca or args.ssl_cert):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.ssl_ca)
    if args.ssl_cert:
        ctx.load_cert_chain(args.ssl_cert, args.ssl_key)
    if args.server_hostname is None and args.no_check_hostname:
        ctx.check_hostname = False
    return ctx


def _client(args: argparse.Namespace, addr: Any) -> WireClient:
    protocol = args.protocol.encode() + b"5" if args.protocol else None
    client = WireClient(addr, protocol=protocol, timeout=args.timeout, ssl=_ssl_context(args),
                        server_hostname=args.server_hostname)
    try:
        client.register(args.storage, True)
    except BaseException:
        client.close()
        raise
    return client


def cmd_list(args: argparse.Namespace, addr: Any, out: TextIO) -> int:
    greeting, status = ruok(addr, args.timeout, _ssl_context(args), args.server_hostname)
    storages = ", ".join(sorted(status)) or "none"
    protocol = greeting.decode("ascii", "replace")
    out.write(f"ZEO server at {address.format(addr)}: protocol {protocol}, "
              f"storages: {storages}\n\n")
    out.write(methods_table() + "\n")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, addr: Any, out: TextIO) -> int:
    _, status = ruok(addr, args.timeout, _ssl_context(args), args.server_hostname)
    if args.json:
        out.write(json.dumps(status, indent=2, sort_keys=True) + "\n")
    else:
        out.write(status_table(status) + "\n")
    return EXIT_OK


def cmd_ping(args: argparse.Namespace, addr: Any, out: TextIO, count: int) -> int:
    t0 = time.perf_counter()
    client = _client(args, addr)
    connect_ms = (time.perf_counter() - t0) * 1000
    times = []
    with client:
        for _ in range(count):
            t = time.perf_counter()
            client.call("ping")
            times.append((time.perf_counter() - t) * 1000)
    if args.json:
        out.write(json.dumps({"connect_ms": connect_ms, "rtt_ms": times}) + "\n")
        return EXIT_OK
    out.write(f"connected to {address.format(addr)} ({client.protocol.decode()}) "  # type: ignore[union-attr]
              f"in {connect_ms:.3f} ms\n")
    for i, ms in enumerate(times, 1):
        out.write(f"ping {i}: {ms:.3f} ms\n")
    mean = sum(times) / len(times)
    out.write(f"{len(times)} pings: min {min(times):.3f} ms, avg {mean:.3f} ms, "
              f"max {max(times):.3f} ms\n")
    return EXIT_OK


def cmd_call(args: argparse.Namespace, addr: Any, out: TextIO, err: TextIO) -> int:
    method = METHODS_BY_NAME.get(args.method)
    if method is None:
        raise UsageError(f"unknown method {args.method!r}; run 'zeo ADDRESS' for the list")
    if not method.callable:
        raise UsageError(f"{method.name} is not callable from the command line "
                         "(it changes data or needs a session)")
    call_args = convert_args(method, args.args, args.json)
    with _client(args, addr) as client:
        tick = None
        spinner = None
        if method.name == "pack" and call_args[1] and err.isatty():
            spinner = Spinner(err, f"packing storage {args.storage}")
            tick = spinner.tick
        try:
            result = client.call(method.name, *call_args, tick=tick)
        except RemoteError:
            if spinner is not None:
                spinner.done("failed")
            raise
        if spinner is not None:
            spinner.done("done")
    if args.json:
        out.write(json.dumps(to_jsonable(result), indent=2) + "\n")
    elif method.name == "pack":
        out.write(f"packed storage {args.storage} at {address.format(addr)}\n")
    else:
        out.write(format_value(result) + "\n")
    return EXIT_OK


def cmd_admin(args: argparse.Namespace, out: TextIO) -> int:
    from .server.admin import AdminError, admin_request

    if args.method is None:
        raise UsageError("--admin needs a command: status, clients, disconnect CLIENT, "
                         "reopen-logs, stop")
    try:
        reply = admin_request(args.address, args.method, *args.args, timeout=args.timeout)
    except AdminError as e:
        print(f"zeo: {e}", file=sys.stderr)
        return EXIT_REMOTE_ERROR
    if args.json or not isinstance(reply, (dict, list)):
        out.write(json.dumps(reply, indent=2, sort_keys=True) + "\n")
    elif args.method == "clients":
        out.write(clients_table(reply) + "\n")  # type: ignore[arg-type]
    else:
        out.write(format_value(reply) + "\n")
    return EXIT_OK


def clients_table(clients: list[dict]) -> str:
    headers = ("id", "label", "peer", "storage", "read_only", "protocol", "calls")
    return "\n".join(table([headers] + [tuple(str(c.get(h, "")) for h in headers)
                                        for c in clients]))


# --- main ----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="zeo",
        description="Command-line client for ZEO servers: list methods, call read-only "
                    "ones, pack, ping, status.",
        epilog="Exit status: 0 success, 1 error reply from the server, 2 usage error, "
               "3 server unreachable.",
    )
    p.add_argument("address", help="host:port, port, [v6]:port or a Unix socket path")
    p.add_argument("method", nargs="?", help="a method name, 'ping' or 'status'")
    p.add_argument("args", nargs="*", help="arguments of the method")
    p.add_argument("-s", "--storage", default="1", help="storage id (default: 1)")
    p.add_argument("--json", action="store_true",
                   help="arguments are JSON values; print results as JSON (bytes as hex)")
    p.add_argument("-n", "--count", type=int, default=4, help="ping count (default 4)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    p.add_argument("--protocol", choices=("Z", "M"),
                   help="encoding to answer with (default: the server's)")
    p.add_argument("--admin", action="store_true",
                   help="ADDRESS is a zeo-ng admin socket; METHOD is an admin command")
    p.add_argument("--ssl-ca", help="TLS: CA file to verify the server with")
    p.add_argument("--ssl-cert", help="TLS: client certificate (PEM)")
    p.add_argument("--ssl-key", help="TLS: client key, when not in the certificate file")
    p.add_argument("--server-hostname", help="TLS: the name to check the certificate against")
    p.add_argument("--no-check-hostname", action="store_true",
                   help="TLS: do not check the server's host name")
    return p


def run(argv: list[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run the command; return the exit status (errors are printed on ``err``)."""
    try:
        args = build_parser().parse_intermixed_args(argv)
        if args.admin:
            return cmd_admin(args, out)
        try:
            addr = address.parse(args.address)
        except ValueError as e:
            raise UsageError(str(e))
        if args.method is None:
            return cmd_list(args, addr, out)
        if args.method == "status":
            return cmd_status(args, addr, out)
        if args.method == "ping":
            if args.count < 1:
                raise UsageError("--count must be at least 1")
            return cmd_ping(args, addr, out, args.count)
        return cmd_call(args, addr, out, err)
    except UsageError as e:
        print(f"zeo: error: {e}", file=err)
        return EXIT_USAGE
    except RemoteError as e:
        print(f"zeo: server error: {format_error(e)}", file=err)
        return EXIT_REMOTE_ERROR
    except KeyboardInterrupt:
        print("zeo: interrupted", file=err)
        return 130
    except (OSError, ConnectionClosed, ssl.SSLError) as e:
        what = "connection closed by the server" if isinstance(e, ConnectionClosed) else str(e)
        where = getattr(args, "address", "?") if "args" in locals() else "?"
        print(f"zeo: cannot talk to {where}: {what or type(e).__name__}", file=err)
        return EXIT_UNREACHABLE


def main(argv: list[str] | None = None) -> None:
    """Console script entry point."""
    from ._installed import warning

    mixed = warning()
    if mixed:
        print(f"zeo: {mixed}", file=sys.stderr)
    status = run(sys.argv[1:] if argv is None else argv)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(status)


if __name__ == "__main__":
    main()
