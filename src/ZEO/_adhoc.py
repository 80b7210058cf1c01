"""``ZEO.server()``: an ad hoc server for tests and scripts, built by the runzeo machinery."""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from . import runzeo

logger = logging.getLogger("ZEO.server")

_ZEO_KEYS = ("read_only", "invalidation_queue_size", "invalidation_age", "transaction_timeout",
             "pid_filename", "msgpack", "client_conflict_resolution")


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _address_text(port: Any) -> str:
    if isinstance(port, str):
        return port
    if isinstance(port, int):
        return f"127.0.0.1:{port}"
    raise TypeError(f"port must be an int (TCP on 127.0.0.1) or a str (Unix socket): {port!r}")


def build_config(path: str | None = None, blob_dir: str | None = None,
                 storage_conf: str | None = None, zeo_conf: Any = None, port: Any = 0,
                 log: str | None = None, loglevel: str | None = None) -> str:
    """The runzeo configuration text ZEO.server() serves (see :func:`server`)."""
    if storage_conf is None:
        if path is None:
            storage_conf = "<mappingstorage 1>\n</mappingstorage>"
        else:
            storage_conf = f"<filestorage 1>\n  path {path}\n</filestorage>"
        if blob_dir is not None:
            inner = storage_conf.replace(" 1>", ">", 1)
            storage_conf = f"<blobstorage 1>\n  blob-dir {blob_dir}\n{inner}\n</blobstorage>"
    address = _address_text(port)
    if isinstance(zeo_conf, str):
        zeo_text = zeo_conf
        if "address" not in zeo_text:
            zeo_text = zeo_text.replace("</zeo>", f"  address {address}\n</zeo>")
    else:
        options = dict(zeo_conf or {})
        log = options.pop("log", log)
        loglevel = options.pop("loglevel", loglevel)
        lines = [f"  address {options.pop('address', address)}"]
        for key, value in options.items():
            if key not in _ZEO_KEYS and key.replace("-", "_") not in _ZEO_KEYS:
                raise TypeError(f"unknown <zeo> option {key!r}")
            if value is not None:
                lines.append(f"  {key.replace('_', '-')} {_value(value)}")
        zeo_text = "<zeo>\n" + "\n".join(lines) + "\n</zeo>"
    eventlog = ""
    if log:
        level = loglevel or "INFO"
        eventlog = (f"<eventlog>\n  level {level}\n  <logfile>\n    path {log}\n"
                    f"    level {level}\n  </logfile>\n</eventlog>\n")
    return f"{zeo_text}\n{storage_conf}\n{eventlog}"


def _options(config_text: str) -> runzeo.ServerOptions:
    return runzeo.options_from_config(runzeo.load_config(io.StringIO(config_text)))


def _child_main(config_text: str, conn: Any) -> None:
    """Body of the multiprocessing child: serve until SIGTERM, report the address first."""
    try:
        options = _options(config_text)
        if options.eventlog is not None:
            options.eventlog()
        zeo = runzeo.ZEOServer(options)
        zeo.open()
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        conn.close()
        return
    conn.send(("ok", zeo.server.addresses[0]))
    conn.close()
    os._exit(zeo.serve())


def server(path: str | None = None, blob_dir: str | None = None,
           storage_conf: str | None = None, zeo_conf: Any = None, port: Any = 0,
           threaded: bool = True, *, name: str | None = None, log: str | None = None,
           show_config: bool = False, debug: bool = False, start_timeout: float = 33,
           protocol: Any = None) -> tuple[Any, Callable[..., None]]:
    """Start a server; return ``(address, stop)``; ``stop(stop_timeout=99)`` shuts it down.

    The storage is a MappingStorage, or a FileStorage at ``path``, wrapped in a BlobStorage
    when ``blob_dir`` is given; ``storage_conf`` (storage sections) replaces both.
    ``zeo_conf`` is a dict of ``<zeo>`` options (``read_only=True``..., plus ``log`` and
    ``loglevel``) or a whole ``<zeo>`` section.  ``port``: an int binds 127.0.0.1 (0: the
    kernel picks), a str is a Unix socket path.  ``threaded`` serves from a thread of this
    process, otherwise from a child process.  ``address`` is the bound address.
    """
    if protocol is not None:
        raise TypeError("zeo-ng servers always announce protocol 5; 'protocol' is not supported")
    config_text = build_config(path, blob_dir, storage_conf, zeo_conf, port, log,
                               "DEBUG" if debug else None)
    if show_config:
        print(config_text)
    if threaded:
        options = _options(config_text)
        if options.eventlog is not None:
            options.eventlog()
        zeo = runzeo.ZEOServer(options)
        zeo.open()
        thread = threading.Thread(target=zeo.serve, name=f"ZEO server {name or ''}".strip(),
                                  daemon=True)
        thread.start()

        def stop(stop_timeout: float = 99) -> None:
            zeo.close()
            thread.join(stop_timeout)
            if thread.is_alive():
                raise RuntimeError("the ZEO server thread did not stop")

        return zeo.server.addresses[0], stop

    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child_main, args=(config_text, child_conn),
                          name=f"ZEO server {name or ''}".strip(), daemon=True)
    process.start()
    child_conn.close()
    if not parent_conn.poll(start_timeout):
        process.kill()
        process.join()
        raise RuntimeError(f"the ZEO server did not start in {start_timeout}s")
    status, value = parent_conn.recv()
    parent_conn.close()
    if status != "ok":
        process.join(start_timeout)
        raise RuntimeError(f"the ZEO server failed to start: {value}")

    def stop_process(stop_timeout: float = 99) -> None:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
        process.join(stop_timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise RuntimeError("the ZEO server process did not stop; killed it")

    return value, stop_process
