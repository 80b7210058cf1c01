"""Exceptions raised by ZEO clients and servers (ZEO's historical module path)."""

import transaction.interfaces
from ZODB.POSException import StorageError


class ClientStorageError(StorageError):
    """An error in the ZEO client storage."""


class UnrecognizedResult(ClientStorageError):
    """A server call returned an unrecognized result."""


class ClientDisconnected(ClientStorageError, transaction.interfaces.TransientError):
    """The client is not connected to a server, or lost its connection mid-call."""


class ProtocolError(ClientStorageError):
    """The peer speaks a protocol we cannot use."""


class ServerException(ClientStorageError):
    """The server raised an exception the client cannot rebuild: ``(class name, args)``."""


class AuthError(StorageError):
    """Kept for import compatibility; ZEO 5+ has no authentication protocol."""
