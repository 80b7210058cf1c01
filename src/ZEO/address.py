"""Server addresses: one form, one set of rules, for the server, the client and every tool.

An :data:`Address` is ``(host, port)`` for TCP or a ``str`` path for a Unix socket.

* From Python (``ClientStorage(addr)``, ``StorageServer(addr)``, ``ZEO.client``):
  :func:`normalize` takes a port number, a ``(host, port)`` pair, a socket path, or a list of
  those.  An empty host means 127.0.0.1 to a client and every interface to a server.
* From a command line (``zeo``, ``zeo-nagios``, ``zeopack``): :func:`parse` takes
  ``host:port``, ``[v6]:port``, a bare port (127.0.0.1), or a Unix socket path, which is
  text with a ``/`` in it.  Anything else (``localhost`` alone, say) is refused with the
  forms it could have been, rather than guessed.
* From a ZConfig file (``address`` keys, ``runzeo -a``): ZConfig's own socket-address
  datatypes, turned into an :data:`Address` by :func:`from_zconfig`.
"""

from __future__ import annotations

import socket
from typing import Any

Address = tuple[str, int] | str

LOCALHOST = "127.0.0.1"
FORMS = "host:port, [v6]:port, a port, or a Unix socket path (with a /)"


def parse(text: str) -> Address:
    """A command-line address; ``ValueError`` naming the accepted forms when it is none."""
    if "/" in text:
        return text
    try:
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if sep and host and port.isdigit():
                return (host, _port(port))
        elif text.isdigit():
            return (LOCALHOST, _port(text))
        else:
            host, sep, port = text.rpartition(":")
            if sep and port.isdigit() and ":" not in host:
                return (host or LOCALHOST, _port(port))
    except ValueError:
        pass
    hint = f" (did you mean {text}:PORT?)" if text and ":" not in text else ""
    raise ValueError(f"bad address {text!r}{hint}: use {FORMS}")


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return port


def normalize(value: Any, *, binding: bool = False) -> list[Address]:
    """The addresses ``value`` names from Python: one or a list of ports, ``(host, port)``
    pairs and socket paths.  An empty host is every interface when ``binding`` (a server),
    127.0.0.1 otherwise.  ``ValueError`` for anything else, or for an empty list."""
    items = value if isinstance(value, list) else [value]
    out: list[Address] = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"bad ZEO address {item!r}")
        if isinstance(item, int):
            out.append((LOCALHOST, item))
        elif isinstance(item, str):
            out.append(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            host, port = item
            if not isinstance(host, str):
                raise ValueError(f"bad ZEO address {item!r}")
            out.append((host if binding else host or LOCALHOST, int(port)))
        else:
            raise ValueError(f"bad ZEO address {item!r}")
    if not out:
        raise ValueError("no ZEO address given")
    return out


def from_zconfig(value: Any) -> Address:
    """The :data:`Address` of a ZConfig socket-address value."""
    if value.family == getattr(socket, "AF_UNIX", None):
        return value.address
    host, port = value.address[:2]
    return (host, port)


def format(addr: Any) -> str:  # noqa: A001 (the module's verb, used as address.format)
    """``host:port`` (``[v6]:port``) for a TCP address, the path for a Unix socket."""
    if isinstance(addr, str):
        return addr
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
