"""``runzeo``: run a ZEO server from a ZConfig file (``-C zeo.conf``) or from options.

Exit status: 0 after SIGTERM/SIGINT (clean shutdown), 1 after SIGHUP (so a supervisor
restarts the server), 2 for a configuration, option or startup error (one line on stderr).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ZConfig

from . import address, zconfig
from ._usage import UsageError

logger = logging.getLogger("ZEO.runzeo")

LOG_FORMAT = "------\n%(asctime)s %(levelname)s %(name)s %(message)s"
LOG_DATEFMT = "%Y-%m-%dT%H:%M:%S"

EXIT_OK = 0
EXIT_RESTART = 1
EXIT_USAGE = 2

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)


class StartupError(UsageError):
    """The server cannot start (address in use, storage locked...): status 2 as well."""


def version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("zeo-ng")
    except Exception:
        return "unknown"


@dataclass
class StorageSpec:
    """A storage to open: its id, something with ``open()``, and its FileStorage paths."""

    storage_id: str
    opener: Any
    paths: list[str] = field(default_factory=list)


class _FileStorageOpener:
    """Stands for a ``<filestorage>`` section given with ``-f``."""

    def __init__(self, path: str):
        self.path = path

    def open(self):
        from ZODB.FileStorage import FileStorage

        return FileStorage(self.path)


@dataclass
class ServerOptions:
    """Everything runzeo needs to build and run a server."""

    addresses: list
    storages: list[StorageSpec]
    read_only: bool = False
    invalidation_queue_size: int = 100
    invalidation_age: float | None = None
    relay_poll_interval: float = 1.0
    relay_notify: bool = True
    transaction_timeout: float | None = 30.0
    pid_filename: str | None = None
    client_conflict_resolution: bool = False
    msgpack: bool = False
    admin_socket: str | None = None
    metrics_address: tuple[str, int] | None = None
    ssl_context: Any = None
    authorization: Any = None  # ZEO.server.auth.Authorization
    limits: dict = field(default_factory=dict)  # StorageServer resource options
    eventlog: Any = None  # a ZConfig logger factory, or None
    test: bool = False


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="runzeo",
        description="Run a ZEO storage server.",
        epilog="Without -C, both -a and -f are required. Exit status: 0 after SIGTERM or "
               "SIGINT, 1 after SIGHUP, 2 on a configuration or startup error.",
    )
    p.add_argument("-C", "--configure", metavar="FILE_OR_URL", dest="config",
                   help="ZConfig configuration file")
    p.add_argument("-X", metavar="SECTION/KEY=VALUE", dest="overrides", action="append",
                   default=[], help="override a configuration value, e.g. zeo/read-only=true")
    p.add_argument("-a", "--address", action="append", default=[], metavar="ADDRESS",
                   help="PORT, HOST:PORT, [IPV6]:PORT or a Unix socket PATH (repeatable)")
    p.add_argument("-f", "--filename", action="append", default=[], metavar="FILE",
                   help="serve a FileStorage; repeated ones are named 1, 2, ...")
    p.add_argument("-t", "--timeout", type=float, metavar="SECONDS",
                   help="transaction timeout")
    p.add_argument("--pid-file", metavar="PATH", help="write the server's pid here")
    p.add_argument("--test", action="store_true",
                   help="open the storages and bind the addresses, then exit")
    p.add_argument("--version", action="version", version=f"%(prog)s (zeo-ng) {version()}")
    return p


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def load_config(source: str | io.IOBase, overrides: Sequence[str] = (),
                schema_path: str = zconfig.SCHEMA_PATH):
    """Parse a server config (a path/URL or a file object); raise UsageError on errors."""
    try:
        schema = zconfig.load_schema(schema_path)
        if isinstance(source, str):
            root, _ = ZConfig.loadConfig(schema, source, list(overrides))
        else:
            root, _ = ZConfig.loadConfigFile(schema, source, None, list(overrides))
    except (ZConfig.ConfigurationError, OSError, ValueError) as e:
        raise UsageError(f"configuration error: {_one_line(e)}")
    return root


def options_from_config(root) -> ServerOptions:
    """ServerOptions from a parsed configuration root (schema.xml)."""
    z = root.zeo
    storages = []
    seen: set[str] = set()
    for section in root.storages:
        sid = zconfig.storage_id(section)
        if sid in seen:
            raise UsageError(f"configuration error: two storages named {sid!r}"
                             + (" (an unnamed storage is named '1')" if sid == "1" else ""))
        seen.add(sid)
        storages.append(StorageSpec(sid, section, list(zconfig.storage_open_paths(section))))
    msgpack = z.msgpack
    if msgpack is None:
        msgpack = bool(os.environ.get("ZEO_MSGPACK"))
    return ServerOptions(
        addresses=list(z.addresses),
        storages=storages,
        read_only=z.read_only,
        invalidation_queue_size=z.invalidation_queue_size,
        invalidation_age=z.invalidation_age,
        relay_poll_interval=z.relay_poll_interval,
        relay_notify=z.relay_notify,
        transaction_timeout=z.transaction_timeout or None,
        pid_filename=z.pid_filename,
        client_conflict_resolution=z.client_conflict_resolution,
        msgpack=msgpack,
        ssl_context=z.ssl_context,
        authorization=getattr(z, "authorization", None),
        admin_socket=z.admin_socket,
        metrics_address=tuple(z.metrics.address) if z.metrics is not None else None,
        limits=_limits(z),
        eventlog=root.eventlog,
    )


_LIMIT_KEYS = ("max_message_size", "max_connections", "register_timeout", "max_output_buffer",
               "max_transaction_size", "transaction_memory", "tcp_keepalive",
               "max_calls_in_flight", "max_iterators", "max_open_iterators", "max_buffered")


def _limits(z: Any) -> dict:
    """The <zeo> resource keys as StorageServer options."""
    limits = {key: getattr(z, key) for key in _LIMIT_KEYS if getattr(z, key, None) is not None}
    mode = getattr(z, "unix_socket_mode", None)
    if mode is not None:
        try:
            limits["unix_socket_mode"] = int(mode, 8)
        except ValueError:
            raise UsageError(f"configuration error: unix-socket-mode {mode!r} is not octal")
    for key in ("register_timeout", "max_transaction_size"):
        if limits.get(key) == 0:
            limits[key] = None
    classes = getattr(z, "conflict_resolution_classes", None)
    if classes:
        limits["conflict_resolution_classes"] = list(classes)
    return limits


def _listen_address(text: str):
    """An ``-a`` value in our address form; raise UsageError when it is not one."""
    from ZConfig.datatypes import SocketBindingAddress

    try:
        return address.from_zconfig(SocketBindingAddress(text))
    except ValueError as e:
        raise UsageError(f"bad address {text!r}: {_one_line(e)}")


def parse_options(argv: list[str]) -> ServerOptions:
    """Command line -> ServerOptions (command-line values override the config file's)."""
    args = _parser().parse_args(argv)
    if args.config:
        options = options_from_config(load_config(args.config, args.overrides))
    else:
        if args.overrides:
            raise UsageError("-X needs a configuration file (-C)")
        if not args.address:
            raise UsageError("no server address specified; use -a or -C")
        if not args.filename:
            raise UsageError("no storages specified; use -f or -C")
        options = ServerOptions(addresses=[], storages=[],
                                msgpack=bool(os.environ.get("ZEO_MSGPACK")))
    if args.address:
        options.addresses = [_listen_address(a) for a in args.address]
    if args.filename:
        options.storages = [
            StorageSpec(str(i), _FileStorageOpener(path), [path])
            for i, path in enumerate(args.filename, 1)
        ]
    if args.timeout is not None:
        options.transaction_timeout = args.timeout or None
    if args.pid_file:
        options.pid_filename = args.pid_file
    if options.pid_filename is None and os.environ.get("INSTANCE_HOME"):
        options.pid_filename = os.path.join(os.environ["INSTANCE_HOME"], "var", "ZEO.pid")
    options.test = args.test
    return options


def configure_logging(options: ServerOptions) -> None:
    """The config's ``<eventlog>``, or INFO and above on stderr."""
    if options.eventlog is not None:
        options.eventlog()
        return
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def reopen_logs() -> None:
    """Reopen the file handlers ZConfig made (after log rotation)."""
    from ZConfig.components.logger import loghandler

    loghandler.reopenFiles()
    logger.info("Log files reopened successfully")


# --- process checks ------------------------------------------------------------------------


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _command_line(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def _describe_process(pid: int) -> str:
    cmd = _command_line(pid)
    return f"process {pid} ({cmd})" if cmd else f"process {pid}"


def check_pid_file(path: str) -> None:
    """Refuse a pid file naming another live server; take over a stale one with a warning."""
    pid = _read_pid(path)
    if pid is None or pid == os.getpid():
        return
    if _process_alive(pid):
        cmd = _command_line(pid)
        if cmd is None or "zeo" in cmd.lower():
            raise StartupError(
                f"pid file {path} names running {_describe_process(pid)}; "
                f"is another server running with this configuration?")
        # The pid was reused by an unrelated program: the file is stale.
    logger.warning("taking over stale pid file %s of process %d, which is gone", path, pid)


def check_lock_files(spec: StorageSpec) -> None:
    """Warn about FileStorage lock files left by a dead process (an unclean shutdown).

    A clean shutdown empties the lock file first (see :func:`release_lock_files`), so a pid
    left in it means that process died holding the storage."""
    for path in spec.paths:
        lock_path = path + ".lock"
        pid = _read_pid(lock_path)
        if pid is not None and pid != os.getpid() and not _process_alive(pid):
            logger.warning("storage %r: taking over lock file %s of process %d, which is gone",
                           spec.storage_id, lock_path, pid)


def release_lock_files(spec: StorageSpec) -> None:
    """Empty the lock files of a storage we still hold (before closing it), so that the next
    start can tell a clean shutdown from a crash.  zc.lockfile uses flock(), which is held by
    the storage's own open file, so opening and closing another descriptor keeps the lock."""
    for path in spec.paths:
        try:
            with open(path + ".lock", "r+") as f:
                if _read_pid(path + ".lock") == os.getpid():
                    f.truncate(0)
        except OSError:
            pass


def _lock_error_message(spec: StorageSpec, exc: BaseException) -> str:
    for path in spec.paths:
        pid = _read_pid(path + ".lock")
        if pid is not None and pid != os.getpid() and _process_alive(pid):
            return (f"storage {spec.storage_id!r}: {path} is locked by "
                    f"{_describe_process(pid)}; is another server using it?")
    return f"storage {spec.storage_id!r}: {_one_line(exc)} (locked by another process)"


def check_address(addr) -> None:
    """Refuse an address another server answers on; remove a stale Unix socket file."""
    if isinstance(addr, str):
        if not os.path.exists(addr):
            return
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            try:
                s.connect(addr)
            except OSError:
                logger.warning("removing stale socket file %s", addr)
                try:
                    os.unlink(addr)
                except OSError as e:
                    raise StartupError(f"cannot remove stale socket {addr}: {_one_line(e)}")
                return
        raise StartupError(f"address {addr} already in use")
    host, port = addr
    if not port:
        return
    try:
        infos = socket.getaddrinfo(host or "127.0.0.1", port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise StartupError(f"bad address {address.format(addr)}: {_one_line(e)}")
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(sockaddr)
        except OSError:
            return
    raise StartupError(f"address {address.format(addr)} already in use")


# --- the server -----------------------------------------------------------------------------


class ZEOServer:
    """Build a StorageServer from ServerOptions, serve, and clean up.

    ``open()`` checks the addresses and pid file, opens the storages and binds; ``serve()``
    runs the loop in the calling thread (with signal handlers when that is the main thread)
    and returns the exit status; ``close()`` may be called from any thread.
    """

    def __init__(self, options: ServerOptions):
        self.options = options
        self.server: Any = None
        self.storages: dict[str, Any] = {}
        self.exit_status = EXIT_OK
        self._pid_written = False
        self._closed = threading.Event()
        self._close_lock = threading.Lock()
        self._early_signals: list[int] = []

    def open(self) -> None:
        o = self.options
        if o.metrics_address:  # before anything is opened: a one-line error, exit 2
            try:
                import prometheus_client  # noqa: F401
            except ImportError:
                raise StartupError("the <metrics> section needs prometheus_client: "
                                   "pip install prometheus_client (or zeo-ng[metrics])")
        for addr in o.addresses:
            check_address(addr)
        pid_filename = o.pid_filename
        write_pid = pid_filename and not o.read_only
        if pid_filename and write_pid:
            check_pid_file(pid_filename)
            # Written before binding: whoever sees the server answer can read its pid.
            try:
                with open(pid_filename, "w") as f:
                    f.write(f"{os.getpid()}\n")
            except OSError as e:
                raise StartupError(f"cannot write pid file: {_one_line(e)}")
            self._pid_written = True
        try:
            for spec in o.storages:
                self.storages[spec.storage_id] = self._open_storage(spec)
            self.server = self._make_server()
        except BaseException:
            self._close_storages()
            self._remove_pid_file()
            raise
        logger.info("%s", self.start_message())

    def _open_storage(self, spec: StorageSpec):
        import zc.lockfile

        check_lock_files(spec)
        logger.info("(%d) opening storage %r", os.getpid(), spec.storage_id)
        try:
            return spec.opener.open()
        except zc.lockfile.LockError as e:
            raise StartupError(_lock_error_message(spec, e))
        except Exception as e:
            raise StartupError(f"cannot open storage {spec.storage_id!r}: {_one_line(e)}")

    def _make_server(self):
        from .server.storage_server import StorageServer

        o = self.options
        try:
            return StorageServer(
                o.addresses,
                self.storages,
                read_only=o.read_only,
                invalidation_queue_size=o.invalidation_queue_size,
                invalidation_age=o.invalidation_age,
                relay_poll_interval=o.relay_poll_interval,
                relay_notify=o.relay_notify,
                transaction_timeout=o.transaction_timeout,
                ssl=o.ssl_context,
                authorization=o.authorization,
                client_conflict_resolution=o.client_conflict_resolution,
                msgpack=o.msgpack,
                admin_socket=o.admin_socket,
                metrics_address=o.metrics_address,
                **o.limits,
            )
        except OSError as e:
            raise StartupError(f"cannot listen: {_one_line(e)}")
        except ValueError as e:
            raise StartupError(f"configuration error: {_one_line(e)}")

    def start_message(self) -> str:
        o = self.options
        parts = []
        for sid, storage in self.storages.items():
            ro = o.read_only or storage.isReadOnly()
            parts.append(f"{sid} ({type(storage).__name__} {storage.getName()}, "
                         f"{'RO' if ro else 'RW'})")
        addresses = ", ".join(address.format(a) for a in self.server.addresses)
        timeout = o.transaction_timeout
        return (
            f"zeo-ng {version()} serving {', '.join(parts)} on {addresses}; "
            f"{'read-only' if o.read_only else 'read-write'}, "
            f"{'msgpack (M5)' if o.msgpack else 'pickle (Z5)'}"
            f"{', TLS' if o.ssl_context is not None else ''}, "
            f"transaction timeout {timeout if timeout is not None else 'none'}"
        )

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGUSR2:
            if self.options.eventlog is None:
                logger.warning("received SIGUSR2, but no <eventlog> files to reopen")
            else:
                reopen_logs()
            return
        if signum == signal.SIGHUP:
            logger.info("restarted by SIGHUP")
            self.exit_status = EXIT_RESTART
        else:
            logger.info("terminated by %s", name)
            self.exit_status = EXIT_OK
        # close() waits for the loop; never block the loop itself.
        threading.Thread(target=self.close, name="runzeo shutdown", daemon=True).start()

    def catch_early_signals(self) -> None:
        """Hold signals that arrive before the loop runs (during startup, the socket may
        already accept connections); serve() handles them once the loop runs."""
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, lambda signum, frame: self._early_signals.append(signum))
        if hasattr(signal, "SIGXFSZ"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def install_signal_handlers(self) -> None:
        loop = self.server.event_loop
        for signum in HANDLED_SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        for early in self._early_signals:
            loop.call_soon(self._on_signal, early)
        self._early_signals.clear()

    def serve(self) -> int:
        """Run the server until close() (or a signal); return the exit status."""
        if threading.current_thread() is threading.main_thread():
            self.install_signal_handlers()
        try:
            self.server.loop()
        finally:
            self.close()
        return self.exit_status

    def close(self) -> None:
        """Stop serving, close the storages, remove the pid file. Idempotent."""
        with self._close_lock:
            if self._closed.is_set():
                return
            for spec in self.options.storages:
                if spec.storage_id in self.storages:
                    release_lock_files(spec)
            if self.server is not None:
                self.server.close()
            else:
                self._close_storages()
            self._remove_pid_file()
            self._closed.set()
            logger.info("server stopped")

    def _remove_pid_file(self) -> None:
        if self._pid_written and self.options.pid_filename:
            self._pid_written = False
            try:
                os.remove(self.options.pid_filename)
            except OSError:
                pass

    def _close_storages(self) -> None:
        for storage in self.storages.values():
            try:
                storage.close()
            except Exception:
                logger.exception("error closing storage %r", storage)


def main(argv: list[str] | None = None) -> None:
    """Console script: ``runzeo [options]``; exits with the status documented above."""
    if argv is None:
        argv = sys.argv[1:]
    from ._installed import warning

    mixed = warning()
    if mixed:
        print(f"runzeo: {mixed}", file=sys.stderr)
    try:
        options = parse_options(argv)
        configure_logging(options)
        zeo = ZEOServer(options)
        zeo.catch_early_signals()
        zeo.open()
    except UsageError as e:
        print(f"runzeo: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if options.test:
        print("testing exit immediately")
        zeo.close()
        sys.exit(EXIT_OK)
    sys.exit(zeo.serve())


if __name__ == "__main__":
    main()
