"""Protocol errors, split the h11 way.

``RemoteProtocolError``: the peer broke the protocol (bad frame, bad handshake, undecodable or
forbidden payload).  The only sane reaction is to close that one connection.

``LocalProtocolError``: this side misused the core (e.g. encoding a frame above the size limit).
"""


class ProtocolViolation(Exception):
    """Base class of the two protocol error kinds."""


class RemoteProtocolError(ProtocolViolation):
    """The peer sent something the protocol does not allow."""


class LocalProtocolError(ProtocolViolation):
    """We were asked to send something the protocol does not allow."""


class FrameTooLarge(RemoteProtocolError):
    """A frame header announced more bytes than the configured maximum message size."""
