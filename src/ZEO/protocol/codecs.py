"""Message codecs: pickle (``Z``) and msgpack (``M``).

A message is the 4-tuple ``(msgid, flags, name, args)`` (see :mod:`ZEO.protocol.messages`).
Both codecs turn it into a frame payload and back.  Decoders are *data only*: a pickle may
name a global only when it is in the decoder's explicit allow-list, so a peer can never make
us import or call anything else (ZEO's own server allows all of ``builtins``; we do not).
"""

from __future__ import annotations

import functools
import importlib
import io
import pickle
from collections.abc import Callable
from typing import Any

from .errors import LocalProtocolError, RemoteProtocolError
from .framing import HEADER, encode_frame

_NO_HEADER = bytes(HEADER.size)

Message = tuple[Any, Any, str, Any]

#: Deepest nesting of containers a decoded message may have.  Hashing or comparing a nested
#: tuple recurses in C without a guard: 300,000 levels (a 300 KB pickle) crash the process.
#: ZEO's own messages nest four deep; transaction extensions add what the application put in.
MAX_DEPTH = 100


def _data_only(kind: type, accepted: tuple[type, ...]) -> Callable[..., Any]:
    """A constructor for ``kind`` that accepts data of the ``accepted`` types only.

    ``set(N)`` would fail, but ``bytes(N)`` or ``tuple("x" * N)`` turns a small frame into a
    large object: every allow-listed constructor only copies a container that the frame
    itself held.
    """
    def construct(*args: Any) -> Any:
        if not args:
            return kind()
        if len(args) != 1 or type(args[0]) not in accepted:
            raise RemoteProtocolError(f"{kind.__name__}() of something that is not data")
        return kind(args[0])

    construct.__name__ = kind.__name__
    return construct


def _binary(*args: Any) -> bytes:
    """``zodbpickle.binary`` from bytes (or str and an encoding), never from a number: a
    REDUCE of ``binary(10**10)`` would allocate 10 GB."""
    from zodbpickle import binary

    if not args:
        return binary()
    if type(args[0]) is str and len(args) <= 2 and all(type(a) is str for a in args):
        return binary(*args)
    if len(args) == 1 and isinstance(args[0], bytes):
        return binary(args[0])
    raise RemoteProtocolError("zodbpickle.binary() of something that is not bytes")


def _zopeundo_prefix() -> Any:
    from ZopeUndo.Prefix import Prefix  # an optional dependency: refused when absent

    return Prefix


_SEQUENCES = (tuple, list)
#: Globals a request from a ZEO client may carry, each mapped to what the decoder calls.
#: ZEO 6.2's client sends a transaction extension that is a dict subclass as a
#: ``builtins.dict`` REDUCE; the other containers are allowed in the same spirit.
SERVER_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("zodbpickle", "binary"): lambda: _binary,
    ("ZopeUndo.Prefix", "Prefix"): _zopeundo_prefix,
    ("builtins", "dict"): lambda: _data_only(dict, (dict, list, tuple)),
    ("builtins", "list"): lambda: _data_only(list, _SEQUENCES),
    ("builtins", "tuple"): lambda: _data_only(tuple, _SEQUENCES),
    ("builtins", "set"): lambda: _data_only(set, _SEQUENCES),
    ("builtins", "frozenset"): lambda: _data_only(frozenset, _SEQUENCES),
}
# Replies and server calls carry plain data, and error replies may nest exceptions (ZEO 6.2
# pickles the ``_errs`` of MultipleUndoErrors with ZODB.POSException._recon): see
# client_allowed_globals().
CLIENT_ALLOWED_GLOBALS = frozenset({("zodbpickle", "binary")})


@functools.cache
def client_allowed_globals() -> frozenset[tuple[str, str]]:
    """What a client's pickle decoder accepts: plain data, exception classes and ``_recon``.

    ``_recon(class, state)`` on an (allowed) exception class only builds an instance and sets
    its ``__dict__``; building an exception runs no code of consequence.
    """
    import builtins

    import transaction.interfaces
    import ZODB.POSException

    import ZEO.Exceptions

    names = set(CLIENT_ALLOWED_GLOBALS) | {("ZODB.POSException", "_recon")}
    for module in (builtins, ZODB.POSException, ZEO.Exceptions, transaction.interfaces):
        for name, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, Exception):
                names.add((module.__name__, name))
    names.add(("BTrees.Interfaces", "BTreesConflictError"))
    return frozenset(names)


# How to step over each pickle opcode's argument without decoding it: a byte count, or how
# to find its end.  Written out from the pickle format (protocols 0-5) rather than built from
# pickletools at import: that module weighs ~0.8 MiB in every server.  A test checks the table
# against pickletools' own.
(_NEST, _DUP, _NEWLINE, _TWO_NEWLINES, _LEN1, _LEN4, _LEN8, _MEMO_NEWLINE, _MEMO1, _MEMO4,
 _MEMOIZE, _STOP, _UNKNOWN) = range(-13, 0)
OPCODE_STEPS: dict[bytes, int] = {
    b"(": 0, b")": 0, b".": _STOP, b"0": 0, b"1": 0, b"2": 0, b"B": _LEN4, b"C": _LEN1,
    b"F": _NEWLINE, b"G": 8, b"I": _NEWLINE, b"J": 4, b"K": 1, b"L": _NEWLINE, b"M": 2,
    b"N": 0, b"P": _NEWLINE, b"Q": 0, b"R": 0, b"S": _NEWLINE, b"T": _LEN4, b"U": _LEN1,
    b"V": _NEWLINE, b"X": _LEN4, b"]": 0, b"a": 0, b"b": 0, b"c": _TWO_NEWLINES, b"d": 0,
    b"e": 0, b"g": _MEMO_NEWLINE, b"h": _MEMO1, b"i": _TWO_NEWLINES, b"j": _MEMO4, b"l": 0,
    b"o": 0, b"p": _MEMO_NEWLINE, b"q": _MEMO1, b"r": _MEMO4, b"s": 0, b"t": 0, b"u": 0,
    b"}": 0, b"\x80": 1, b"\x81": 0, b"\x82": 1, b"\x83": 2, b"\x84": 4, b"\x85": 0,
    b"\x86": 0, b"\x87": 0, b"\x88": 0, b"\x89": 0, b"\x8a": _LEN1, b"\x8b": _LEN4,
    b"\x8c": _LEN1, b"\x8d": _LEN8, b"\x8e": _LEN8, b"\x8f": 0, b"\x90": 0, b"\x91": 0,
    b"\x92": 0, b"\x93": 0, b"\x94": _MEMOIZE, b"\x95": 8, b"\x96": _LEN8, b"\x97": 0,
    b"\x98": 0,
}
# Opcodes that name a global or call something (or look up an extension or persistent id):
# a pickle without any of them is plain data, which ``pickle.loads`` may decode unrestricted.
_CALL_OPCODES = b"ciRbo\x81\x92\x93PQ\x82\x83\x84"
_CALL = -1000  # added to the step of a call opcode in _STEPS, so the walker notices it
# Opcodes that build a container without calling anything: a structure can nest no deeper
# than the number of them (calls build containers too, and are counted with them).
_NEST_OPCODES = b")]}\x8f\x85\x86\x87tld\x91"
_STEPS = [_UNKNOWN] * 256
for _code, _step in OPCODE_STEPS.items():
    _STEPS[_code[0]] = _step + _CALL if _code in _CALL_OPCODES else _step
for _nest in _NEST_OPCODES:
    _STEPS[_nest] = _NEST
_STEPS[ord("2")] = _DUP  # no pickler writes DUP; a message may not share a stack item
del _code, _step, _nest


def _walk_pickle(payload: bytes, memo_limit: int | None, one: bool) -> int:
    """Step over the opcodes of ``payload`` without decoding (or copying) their arguments.

    Return -1 if it names a global or calls something (an opcode of ``_CALL_OPCODES``),
    else the number of container-building opcodes (an upper bound of its nesting depth).
    With ``memo_limit`` None any memo opcode and DUP raise ``RemoteProtocolError``: without
    them no part of the decoded structure can be shared, so it has at most one object per
    opcode.  Else a memo index must be below ``memo_limit``.  With ``one``, stop at the
    first STOP (a message); else walk to the end (a ZODB record holds two pickles).  Lengths
    are read unsigned, so a bad one only ends the walk early, and the unpickler then reports
    the truncation.
    """
    steps = _STEPS
    plain = True
    nest = 0
    i = 0
    n = len(payload)
    try:
        while i < n:
            step = steps[payload[i]]
            i += 1
            if step >= 0:
                i += step
                continue
            if step == _NEST:
                nest += 1
                continue
            if step < _CALL // 2:  # a call opcode (its step + _CALL): note it, step over it
                plain = False
                step -= _CALL
                if step >= 0:
                    i += step
                    continue
            if step == _LEN1:
                i += 1 + payload[i]
            elif step == _LEN4:
                i += 4 + int.from_bytes(payload[i:i + 4], "little")
            elif step == _LEN8:
                i += 8 + int.from_bytes(payload[i:i + 8], "little")
            elif step == _STOP:
                if one:
                    return nest if plain else -1
            elif step == _NEWLINE or step == _TWO_NEWLINES:
                i = payload.index(b"\n", i) + 1
                if step == _TWO_NEWLINES:
                    i = payload.index(b"\n", i) + 1
            elif step == _UNKNOWN:
                raise RemoteProtocolError(f"undecodable pickle: opcode {payload[i - 1]}")
            elif step == _DUP:
                if memo_limit is None:
                    raise RemoteProtocolError("pickle message duplicates a stack item (DUP)")
            elif memo_limit is None:
                raise RemoteProtocolError("pickle message uses the memo (shared references)")
            elif step != _MEMOIZE:
                if step == _MEMO1:
                    index, i = payload[i], i + 1
                elif step == _MEMO4:
                    index, i = int.from_bytes(payload[i:i + 4], "little"), i + 4
                else:
                    end = payload.index(b"\n", i)
                    index, i = int(payload[i:end]), end + 1
                if index >= memo_limit:
                    raise RemoteProtocolError(f"pickle memo index {index} out of range")
    except (IndexError, ValueError):
        raise RemoteProtocolError("undecodable pickle: truncated") from None
    if one:
        raise RemoteProtocolError("undecodable pickle message: no STOP")
    return nest if plain else -1


def check_no_memo(payload: bytes) -> bool:
    """Raise ``RemoteProtocolError`` if the pickle message in ``payload`` touches the memo;
    return whether it is plain data (no global, call, extension or persistent id).

    ZEO writes messages without a memo.  The unpickler grows its memo to any index a PUT
    names *before* we could look at the result: ``LONG_BINPUT 0x7fffffff`` in a 20-byte
    message would make it allocate and clear 16 GiB.  So the opcodes are checked first.
    """
    return _walk_pickle(payload, None, True) >= 0


def check_record_memo(record: bytes, class_only: bool = False) -> None:
    """Raise ``RemoteProtocolError`` if a ZODB record's memo indices could not be genuine.

    Records use the memo; a pickler numbers its entries from 0, one per memo opcode, so an
    index is never as large as the record.  Checked before the server unpickles a record
    (conflict resolution), for the same reason as :func:`check_no_memo`.  With
    ``class_only``, only the record's first pickle (its class) is walked.
    """
    _walk_pickle(record, len(record), class_only)


class ForbiddenGlobal(RemoteProtocolError):
    """A pickle named a global outside the decoder's allow-list."""


class _DataUnpickler(pickle.Unpickler):
    allowed: dict[tuple[str, str], Callable[[], Any]] = {}

    def find_class(self, module: str, name: str) -> Any:
        get = self.allowed.get((module, name))
        if get is None:
            raise ForbiddenGlobal(f"forbidden global in pickle: {module:.60}.{name:.60}")
        try:
            return get()
        except (ImportError, AttributeError) as e:
            raise ForbiddenGlobal(f"unavailable global in pickle: {module}.{name}") from e

    def persistent_load(self, pid: Any) -> Any:
        raise ForbiddenGlobal("persistent ids are not allowed in messages")


def _importer(module: str, name: str) -> Callable[[], Any]:
    return lambda: getattr(importlib.import_module(module), name)


def _unpickler_class(allowed: Any) -> type[_DataUnpickler]:
    """An unpickler for ``allowed``: a mapping ``(module, name) -> getter``, or an iterable
    of ``(module, name)`` resolved by import (``zodbpickle.binary`` always by ``_binary``)."""
    if not isinstance(allowed, dict):
        allowed = {key: SERVER_ALLOWED_GLOBALS.get(key) or _importer(*key) for key in allowed}
    return type("DataUnpickler", (_DataUnpickler,), {"allowed": dict(allowed)})


_CONTAINERS = frozenset({tuple, list, dict, set, frozenset})


def check_depth(obj: Any, limit: int = MAX_DEPTH) -> None:
    """Raise ``RemoteProtocolError`` if containers in ``obj`` nest deeper than ``limit``.

    Iterative, and linear in the number of containers: callers only hand it structures in
    which nothing is shared (one object per opcode or msgpack item).
    """
    todo = [(obj, 1)]
    pop, push = todo.pop, todo.append
    containers = _CONTAINERS
    while todo:
        o, depth = pop()
        if depth > limit:
            raise RemoteProtocolError(f"message nests deeper than {limit} levels")
        depth += 1
        if type(o) is dict:
            for k, v in o.items():
                if type(k) in containers:
                    push((k, depth))
                if type(v) in containers:
                    push((v, depth))
        else:
            for item in o:
                if type(item) in containers:
                    push((item, depth))


def _check_message(msg: Any) -> Message:
    # Never format peer data here: its repr may be huge.
    if type(msg) is not tuple or len(msg) != 4 or type(msg[2]) is not str:
        kind = f"tuple of {len(msg)}" if type(msg) is tuple else type(msg).__name__
        raise RemoteProtocolError(f"not a (msgid, flags, name, args) message: {kind}")
    return msg


class PickleCodec:
    """ZEO's ``Z`` encoding: one protocol-3 pickle per message, written without a memo."""

    letter = b"Z"
    name = "pickle"

    def __init__(self, allowed_globals: Any = CLIENT_ALLOWED_GLOBALS):
        self._unpickler = _unpickler_class(allowed_globals)

    def encode(self, msg: Message) -> bytes:
        f = io.BytesIO()
        p = pickle.Pickler(f, 3)
        p.fast = True  # no memo: matches ZEO byte for byte and costs less
        p.dump(msg)
        return f.getvalue()

    def encode_frame(self, msg: Message, max_size: int) -> bytes:
        """``msg`` as a whole frame (header and payload); refuse payloads above ``max_size``."""
        # Pickled behind a placeholder header that is then filled in: the payload is never
        # copied to prepend the header (for a 1 MiB store that copy, a fresh 1 MiB block,
        # cost 35 times the pickling).
        f = io.BytesIO()
        f.write(_NO_HEADER)
        p = pickle.Pickler(f, 3)
        p.fast = True
        p.dump(msg)
        n = f.tell() - HEADER.size
        if n > max_size:
            raise LocalProtocolError(f"message of {n} bytes exceeds the limit of {max_size}")
        f.seek(0)
        f.write(HEADER.pack(n))
        return f.getvalue()

    def decode(self, payload: bytes) -> Message:
        # No memo and no DUP: besides the allocation (check_no_memo), sharing lets a small
        # pickle describe a structure whose walk (repr, hash, re-encoding) is exponential.
        # Plain data (nearly every message) needs no allow-list, and pickle.loads is 5x
        # cheaper than an Unpickler.  Only a message with many containers needs its depth
        # measured after decoding.
        nest = _walk_pickle(payload, None, True)
        try:
            if nest >= 0:
                msg = pickle.loads(payload)
            else:
                msg = self._unpickler(io.BytesIO(payload)).load()
        except RemoteProtocolError:
            raise
        except Exception as e:  # any malformed pickle is the peer's fault
            raise RemoteProtocolError(f"undecodable pickle message: {type(e).__name__}") from e
        if nest < 0 or nest > MAX_DEPTH:
            check_depth(msg)
        return _check_message(msg)

    @staticmethod
    def recover_call(payload: bytes) -> tuple[int, bool] | None:
        """``(msgid, oneway)`` read from the head of an undecodable message, or None.

        ZEO writes ``PROTO 3, MARK, <int msgid>, <bool flags>, ...``; an error reply can be
        sent to a two-way call whose head survived, whatever broke later in the frame.
        """
        head = payload[2:] if payload[:1] == b"\x80" else payload
        if head[:1] != b"(":
            return None
        op, i = head[1:2], 2
        if op == b"K":
            msgid, i = head[i], i + 1
        elif op == b"M":
            msgid, i = int.from_bytes(head[i:i + 2], "little"), i + 2
        elif op == b"J":
            msgid, i = int.from_bytes(head[i:i + 4], "little", signed=True), i + 4
        elif op == b"\x8a" and 0 < len(head) - 3 and head[2] <= 9:
            n = head[2]
            msgid, i = int.from_bytes(head[3:3 + n], "little", signed=True), 3 + n
        else:
            return None
        flag = head[i:i + 1]
        if flag in (b"\x88", b"\x89"):
            return msgid, flag == b"\x88"
        if flag == b"K" and len(head) > i + 1:
            return msgid, bool(head[i + 1])
        return None


def exception_to_payload(exc: BaseException) -> tuple[str, Any]:
    """``(dotted class name, __dict__ or args)``: ZEO's wire form of an exception."""
    cls = type(exc)
    return (f"{cls.__module__}.{cls.__qualname__}", exc.__dict__ or exc.args)


def _msgpack_default(obj: Any) -> Any:
    if isinstance(obj, BaseException):
        return exception_to_payload(obj)
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__qualname__} with msgpack")


class MsgpackCodec:
    """ZEO's ``M`` encoding: ``use_bin_type=True``; arrays decode to tuples."""

    letter = b"M"
    name = "msgpack"

    def __init__(self, allowed_globals: Any = ()):  # no globals at all
        import msgpack  # here, not at import: a server that never speaks M5 does without it

        self._unpackb = msgpack.unpackb
        self._packb: Callable[[Any], bytes] = msgpack.Packer(
            use_bin_type=True, default=_msgpack_default
        ).pack

    def encode(self, msg: Message) -> bytes:
        return self._packb(msg)

    def encode_frame(self, msg: Message, max_size: int) -> bytes:
        """``msg`` as a whole frame (header and payload); refuse payloads above ``max_size``."""
        return encode_frame(self._packb(msg), max_size)

    def decode(self, payload: bytes) -> Message:
        try:
            msg = self._unpackb(payload, raw=False, use_list=False)
        except Exception as e:
            raise RemoteProtocolError(f"undecodable msgpack message: {type(e).__name__}") from e
        if len(payload) > MAX_DEPTH:  # each level costs at least a byte
            check_depth(msg)
        return _check_message(msg)

    @staticmethod
    def recover_call(payload: bytes) -> tuple[int, bool] | None:
        """``(msgid, oneway)`` read from the head of an undecodable message, or None."""
        if payload[:1] != b"\x94" or len(payload) < 3:
            return None
        b, i = payload[1], 2
        if b <= 0x7F:
            msgid = b
        elif b >= 0xE0:
            msgid = b - 0x100
        elif 0xCC <= b <= 0xD3:
            n = 1 << ((b - 0xCC) % 4)
            msgid = int.from_bytes(payload[2:2 + n], "big", signed=b >= 0xD0)
            i = 2 + n
        else:
            return None
        flag = payload[i:i + 1]
        if flag in (b"\xc2", b"\xc3"):
            return msgid, flag == b"\xc3"
        if flag in (b"\x00", b"\x01"):
            return msgid, flag == b"\x01"
        return None


Codec = PickleCodec | MsgpackCodec


def codec_for_letter(letter: bytes, *, server: bool) -> Codec:
    """The codec for a handshake letter (``b"Z"`` or ``b"M"``), set up for one side."""
    allowed = SERVER_ALLOWED_GLOBALS if server else client_allowed_globals()
    if letter == b"Z":
        return PickleCodec(allowed)
    if letter == b"M":
        return MsgpackCodec()
    raise RemoteProtocolError(f"unknown encoding letter {letter!r}")
