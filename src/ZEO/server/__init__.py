"""The ZEO server: :class:`StorageServer` and its sessions."""

from .storage_server import Closed, Serving, StorageServer

__all__ = ["StorageServer", "Serving", "Closed"]
