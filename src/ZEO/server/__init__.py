"""The ZEO server: :class:`StorageServer` and its sessions."""

from .. import server as _adhoc_server  # ZEO's function: the package is bound after this runs
from .._callable import make_callable
from .storage_server import Closed, Serving, StorageServer

__all__ = ["StorageServer", "Serving", "Closed"]

make_callable(__name__, _adhoc_server)
