"""zeo-ng: a ZEO-compatible object storage server and client for ZODB.

The top-level helpers match ZEO's: :func:`client`, :func:`DB`, :func:`connection` and
:func:`server`.
"""

from __future__ import annotations

from typing import Any


def client(*args: Any, **kw: Any):
    """Open a :class:`~ZEO.ClientStorage.ClientStorage` (same arguments)."""
    from .client.storage import ClientStorage

    return ClientStorage(*args, **kw)


def DB(*args: Any, **kw: Any):
    """Open a ``ZODB.DB`` on a new ClientStorage; the storage is closed if that fails."""
    import ZODB

    s = client(*args, **kw)
    try:
        return ZODB.DB(s)
    except Exception:
        s.close()
        raise


def connection(*args: Any, **kw: Any):
    """Open a ZODB connection whose database closes when the connection does."""
    db = DB(*args, **kw)
    try:
        return db.open_then_close_db_when_connection_closes()
    except Exception:
        db.close()
        raise


def server(
    path: str | None = None,
    blob_dir: str | None = None,
    storage_conf: str | None = None,
    zeo_conf: Any = None,
    port: Any = 0,
    threaded: bool = True,
    **kw: Any,
):
    """Start an ad hoc server; return ``(address, stop)``.

    The storage is a MappingStorage, or a FileStorage at ``path``, wrapped in a BlobStorage
    when ``blob_dir`` is given; ``storage_conf`` (storage sections of a configuration file)
    replaces both.  ``zeo_conf`` is a dict of ``<zeo>`` options (``read_only=True``...,
    plus ``log`` and ``loglevel``) or a whole ``<zeo>`` section.  ``port``: an int binds
    127.0.0.1 (0: the kernel picks), a str is a Unix socket path.  ``threaded`` serves from
    a thread of this process, otherwise from a child process.  ``stop(stop_timeout=99)``
    shuts the server down.  Keyword-only: ``name``, ``log`` (a log file), ``show_config``
    (print the configuration), ``debug`` (log at DEBUG), ``start_timeout``.
    """
    from ._adhoc import server as _server

    return _server(
        path=path,
        blob_dir=blob_dir,
        storage_conf=storage_conf,
        zeo_conf=zeo_conf,
        port=port,
        threaded=threaded,
        **kw,
    )
