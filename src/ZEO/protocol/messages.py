"""The message layer: names, flags, and how exceptions travel.

Every frame after the handshake is ``(msgid, flags, name, args)``:

* call: ``flags`` false (two-way, the peer replies with the same msgid) or true (one-way);
* reply: ``name == ".reply"``, ``flags`` 0 (``args`` is the return value) or 2 (``args`` is
  ``(dotted class name, __dict__ or args)`` of the exception);
* heartbeat: ``(-1, 0, ".reply", None)``, dropped by the receiver.
"""

from __future__ import annotations

from typing import Any

from .codecs import exception_to_payload

REPLY = ".reply"
FLAG_ONEWAY = True
FLAG_REPLY = 0
FLAG_EXCEPTION = 2
HEARTBEAT_MSGID = -1
HEARTBEAT = (HEARTBEAT_MSGID, 0, REPLY, None)
#: The only protocol version spoken; ZEO 5 and 6 both announce it.
PROTOCOL_VERSION = b"5"
RUOK = b"ruok"

__all__ = [
    "REPLY",
    "FLAG_ONEWAY",
    "FLAG_REPLY",
    "FLAG_EXCEPTION",
    "HEARTBEAT",
    "HEARTBEAT_MSGID",
    "PROTOCOL_VERSION",
    "RUOK",
    "exception_to_payload",
    "payload_to_exception",
]


def _posexception(name: str) -> Any:
    import ZODB.POSException

    return getattr(ZODB.POSException, name)


def payload_to_exception(class_name: str, payload: Any) -> BaseException:
    """Rebuild the exception a server reported, as a ZEO client does.

    ConflictError-like errors are rebuilt from their ``__dict__``; a short list of known classes
    from their args; anything else becomes :class:`ZEO.Exceptions.ServerException`.
    """
    from ZEO.Exceptions import ServerException

    module, _, name = class_name.rpartition(".")
    if module == "ZODB.POSException" and name in ("ConflictError", "ReadConflictError"):
        cls = _posexception(name)
        exc = cls.__new__(cls)
        if isinstance(payload, dict):
            exc.__dict__.update(payload)
            exc.args = (payload.get("message", ""),)
        else:
            exc.args = tuple(payload or ())
            exc.message = str(exc.args[0]) if exc.args else ""
            exc.oid = exc.serials = exc.class_name = None
        for attr in ("message", "oid", "serials", "class_name"):
            if not hasattr(exc, attr):
                setattr(exc, attr, None)
        if getattr(exc, "message", None) is None:
            exc.message = "database conflict error"
        return exc
    if class_name == "BTrees.Interfaces.BTreesConflictError":
        try:
            from BTrees.Interfaces import BTreesConflictError

            if isinstance(payload, dict):
                return BTreesConflictError(
                    payload.get("p1", -1), payload.get("p2", -1), payload.get("p3", -1),
                    payload.get("reason", 0),
                )
            return BTreesConflictError(*payload)
        except Exception:
            pass
    if class_name == "ZODB.POSException.MultipleUndoErrors" and isinstance(payload, dict):
        cls = _posexception("MultipleUndoErrors")
        return cls(payload.get("_errs", ()))
    simple = {
        "ZODB.POSException.POSKeyError": lambda: _posexception("POSKeyError"),
        "ZODB.POSException.ReadOnlyError": lambda: _posexception("ReadOnlyError"),
        "ZODB.POSException.StorageTransactionError": lambda: _posexception(
            "StorageTransactionError"
        ),
        "ZODB.POSException.UndoError": lambda: _posexception("UndoError"),
        "builtins.KeyError": lambda: KeyError,
        "builtins.TypeError": lambda: TypeError,
        "exceptions.KeyError": lambda: KeyError,
        "exceptions.TypeError": lambda: TypeError,
    }
    factory = simple.get(class_name)
    args = tuple(payload) if isinstance(payload, (tuple, list)) else (payload,)
    if factory is not None:
        cls = factory()
        if isinstance(payload, dict):
            exc = cls.__new__(cls)
            exc.__dict__.update(payload)
            return exc
        return cls(*args)
    return ServerException(class_name, args)
