"""Historical import path: ``from ZEO.StorageServer import StorageServer``."""

from .server.storage_server import Closed, Serving, StorageServer

__all__ = ["StorageServer", "Serving", "Closed"]
