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


def peer_repr(value: object, limit: int = 200) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for log lines and error texts that
    name what a peer sent (a 10 MB label must not be written on every line)."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} long)"
    try:
        text = repr(value)
    except Exception as e:  # a decoded value never fails; anything else may
        return f"<unprintable {type(value).__name__}: {type(e).__name__}>"
    if len(text) > limit:
        return f"{text[:limit]}... ({len(text)} characters)"
    return text
