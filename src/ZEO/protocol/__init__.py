"""Sans-I/O core of the ZEO 5 protocol: framing, handshake, codecs, messages.

Nothing in this package does I/O.  See ``docs/design.rst`` for the contracts.
"""

from .codecs import (
    CLIENT_ALLOWED_GLOBALS,
    SERVER_ALLOWED_GLOBALS,
    ForbiddenGlobal,
    MsgpackCodec,
    PickleCodec,
    codec_for_letter,
    exception_to_payload,
)
from .connection import (
    ClientConnection,
    Greeting,
    Handshake,
    RuokRequest,
    ServerConnection,
    UndecodableCall,
)
from .errors import FrameTooLarge, LocalProtocolError, ProtocolViolation, RemoteProtocolError
from .framing import DEFAULT_MAX_MESSAGE_SIZE, FrameDecoder, encode_frame
from .messages import HEARTBEAT, REPLY, payload_to_exception

__all__ = [
    "CLIENT_ALLOWED_GLOBALS",
    "SERVER_ALLOWED_GLOBALS",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "HEARTBEAT",
    "REPLY",
    "ClientConnection",
    "ForbiddenGlobal",
    "FrameDecoder",
    "FrameTooLarge",
    "Greeting",
    "Handshake",
    "LocalProtocolError",
    "MsgpackCodec",
    "PickleCodec",
    "ProtocolViolation",
    "RemoteProtocolError",
    "RuokRequest",
    "ServerConnection",
    "UndecodableCall",
    "codec_for_letter",
    "encode_frame",
    "exception_to_payload",
    "payload_to_exception",
]
