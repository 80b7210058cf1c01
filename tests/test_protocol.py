"""Unit tests of the sans-I/O protocol core (``ZEO.protocol``): no sockets, no threads.

Byte-exact expectations come from zeo-facts §1.2-§1.5 and Appendix A (captured from a real ZEO 6.2).
"""

from __future__ import annotations

import copyreg
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from ZODB.POSException import (
    ConflictError,
    POSKeyError,
    ReadOnlyError,
    StorageTransactionError,
)

from ZEO.Exceptions import ServerException
from ZEO.protocol import (
    CLIENT_ALLOWED_GLOBALS,
    DEFAULT_MAX_MESSAGE_SIZE,
    HEARTBEAT,
    SERVER_ALLOWED_GLOBALS,
    ClientConnection,
    ForbiddenGlobal,
    FrameDecoder,
    FrameTooLarge,
    Greeting,
    Handshake,
    LocalProtocolError,
    MsgpackCodec,
    PickleCodec,
    ProtocolViolation,
    RemoteProtocolError,
    RuokRequest,
    ServerConnection,
    UndecodableCall,
    codec_for_letter,
    encode_frame,
    exception_to_payload,
    payload_to_exception,
)

Z64 = b"\0" * 8
P1 = b"\0" * 7 + b"\x01"


def h(text: str) -> bytes:
    """Hex with arbitrary spaces to bytes."""
    return bytes.fromhex(text.replace(" ", ""))


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


# --------------------------------------------------------------------------------------------
# Framing


def test_encode_frame_header():
    assert encode_frame(b"Z5") == h("00 00 00 02 5a 35")
    assert encode_frame(b"") == b"\0\0\0\0"
    assert encode_frame(b"x" * 300) == b"\0\0\x01\x2c" + b"x" * 300


def test_encode_frame_limit_is_inclusive():
    assert encode_frame(b"abcd", max_size=4) == b"\0\0\0\x04abcd"
    with pytest.raises(LocalProtocolError):
        encode_frame(b"abcde", max_size=4)


@pytest.mark.parametrize("codec", [PickleCodec(), MsgpackCodec()], ids=["pickle", "msgpack"])
def test_codec_encode_frame_is_the_header_then_the_payload(codec):
    for msg in [(1, 0, "ping", ()), (2, 1, "storea", (Z64, Z64, b"x" * 300_000, 7))]:
        payload = codec.encode(msg)
        assert codec.encode_frame(msg, DEFAULT_MAX_MESSAGE_SIZE) == encode_frame(payload)
        assert codec.encode_frame(msg, len(payload)) == encode_frame(payload)  # inclusive
        with pytest.raises(LocalProtocolError):
            codec.encode_frame(msg, len(payload) - 1)


def test_decoder_joined_frames_in_one_feed():
    payloads = [b"Z5", b"", b"hello", b"x" * 1000]
    data = b"".join(frame(p) for p in payloads)
    dec = FrameDecoder()
    assert dec.feed(data) == payloads
    assert dec.buffered == 0


def test_decoder_byte_by_byte():
    payloads = [b"Z5", b"", b"hello", bytes(range(256))]
    data = b"".join(frame(p) for p in payloads)
    dec = FrameDecoder()
    out = []
    for i in range(len(data)):
        out += dec.feed(data[i : i + 1])
    assert out == payloads
    assert dec.buffered == 0


def test_decoder_every_two_way_split():
    payloads = [b"ab", b"", b"cdefg"]
    data = b"".join(frame(p) for p in payloads)
    for cut in range(len(data) + 1):
        dec = FrameDecoder()
        out = dec.feed(data[:cut])
        assert dec.buffered == cut - sum(len(frame(p)) for p in out)
        out += dec.feed(data[cut:])
        assert out == payloads, cut
        assert dec.buffered == 0


def test_decoder_partial_header_and_payload_stay_buffered():
    dec = FrameDecoder()
    assert dec.feed(b"\0\0") == []
    assert dec.buffered == 2
    assert dec.feed(b"\0\x03ab") == []
    assert dec.buffered == 6
    assert dec.feed(b"c\0\0\0\x01") == [b"abc"]
    assert dec.buffered == 4
    assert dec.feed(b"!") == [b"!"]
    assert dec.buffered == 0


def test_decoder_empty_feed():
    dec = FrameDecoder()
    assert dec.feed(b"") == []
    assert dec.buffered == 0


def test_decoder_accepts_exactly_max_size():
    dec = FrameDecoder(max_size=5)
    assert dec.feed(frame(b"12345")) == [b"12345"]


def test_frame_too_large_raised_on_header_alone():
    # Only the 4-byte header: the decoder must refuse before any payload byte arrives.
    dec = FrameDecoder(max_size=5)
    with pytest.raises(FrameTooLarge):
        dec.feed(struct.pack(">I", 6))
    assert issubclass(FrameTooLarge, RemoteProtocolError)


def test_frame_too_large_on_buffered_path():
    # Header arrives split, so the decoder is on its buffering path when it sees the length.
    dec = FrameDecoder(max_size=5)
    assert dec.feed(b"\0\0") == []
    with pytest.raises(FrameTooLarge):
        dec.feed(b"\xff\xff")


def test_frame_too_large_does_not_buffer_the_payload():
    dec = FrameDecoder(max_size=1000)
    hostile = struct.pack(">I", 0xFFFFFFFF) + b"x" * 10_000
    with pytest.raises(FrameTooLarge):
        dec.feed(hostile)
    assert dec.buffered < 10_000


def test_frame_too_large_after_good_frames_in_same_feed():
    dec = FrameDecoder(max_size=10)
    with pytest.raises(FrameTooLarge):
        dec.feed(frame(b"ok") + struct.pack(">I", 11))


def test_default_max_message_size():
    assert DEFAULT_MAX_MESSAGE_SIZE == 256 * 1024 * 1024
    dec = FrameDecoder()
    with pytest.raises(FrameTooLarge):
        dec.feed(struct.pack(">I", DEFAULT_MAX_MESSAGE_SIZE + 1))


# --------------------------------------------------------------------------------------------
# Codecs: byte-exact examples of zeo-facts §1.4, §1.5 and Appendix A

REPLY_NAME_Z = "58 06 00 00 00 2e 72 65 70 6c 79"
ROE = "5a4f44422e504f53457863657074696f6e2e526561644f6e6c794572726f72"  # ZODB...ReadOnlyError
INVAL = "696e76616c69646174655472616e73616374696f6e"  # invalidateTransaction

EXAMPLES = [
    # (message as sent, pickle bytes, msgpack bytes)
    (
        (1, False, "register", ("1", 0)),
        "80 03 28 4b 01 89 58 08 00 00 00 72 65 67 69 73 74 65 72 58 01 00 00 00 31 4b 00 86 74 2e",
        "94 01 c2 a8 72 65 67 69 73 74 65 72 92 a1 31 00",
    ),
    (
        HEARTBEAT,
        f"80 03 28 4a ff ff ff ff 4b 00 {REPLY_NAME_Z} 4e 74 2e",
        "94 ff 00 a6 2e 72 65 70 6c 79 c0",
    ),
    (
        (0, True, "ping", ()),
        "80 03 28 4b 00 88 58 04 00 00 00 70 69 6e 67 29 74 2e",
        "94 00 c3 a4 70 69 6e 67 90",
    ),
    (
        (7, 0, ".reply", []),
        f"80 03 28 4b 07 4b 00 {REPLY_NAME_Z} 5d 74 2e",
        "94 07 00 a6 2e 72 65 70 6c 79 90",
    ),
    (
        (3, 2, ".reply", ("ZODB.POSException.ReadOnlyError", ())),
        f"80 03 28 4b 03 4b 02 {REPLY_NAME_Z} 58 1f 00 00 00 {ROE} 29 86 74 2e",
        f"94 03 02 a6 2e7265706c79 92 bf {ROE} 90",
    ),
    (
        (0, True, "invalidateTransaction", (b"TTTTTTTT", [P1])),
        f"80 03 28 4b 00 88 58 15 00 00 00 {INVAL} 43 08 5454545454545454 5d 43 08"
        " 0000000000000001 61 86 74 2e",
        f"94 00 c3 b5 {INVAL} 92 c4 08 5454545454545454 91 c4 08 0000000000000001",
    ),
    (
        (1, 0, ".reply", Z64),
        f"80 03 28 4b 01 4b 00 {REPLY_NAME_Z} 43 08 0000000000000000 74 2e",
        "94 01 00 a6 2e 72 65 70 6c 79 c4 08 0000000000000000",
    ),
]


def _tuplify(obj):
    """What msgpack gives back: every array is a tuple."""
    if isinstance(obj, (list, tuple)):
        return tuple(_tuplify(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _tuplify(v) for k, v in obj.items()}
    return obj


@pytest.mark.parametrize("msg,z,m", EXAMPLES, ids=[str(e[0][2]) + str(e[0][0]) for e in EXAMPLES])
def test_pickle_codec_byte_exact(msg, z, m):
    codec = PickleCodec(SERVER_ALLOWED_GLOBALS)
    assert codec.encode(msg) == h(z)
    assert codec.decode(h(z)) == msg
    assert PickleCodec().decode(h(z)) == msg  # the client's stricter decoder too


@pytest.mark.parametrize("msg,z,m", EXAMPLES, ids=[str(e[0][2]) + str(e[0][0]) for e in EXAMPLES])
def test_msgpack_codec_byte_exact(msg, z, m):
    codec = MsgpackCodec()
    assert codec.encode(msg) == h(m)
    decoded = codec.decode(h(m))
    assert decoded == _tuplify(msg)
    assert type(decoded[0]) is type(msg[0])


def test_pickle_encoder_writes_no_memo_opcodes():
    import pickletools

    codec = PickleCodec()
    msg = (5, False, "tpc_begin", (140469645750032, b"u", b"d", {"k": [1, 2]}, None, " "))
    ops = {op.name for op, _, _ in pickletools.genops(codec.encode(msg))}
    assert not ops & {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
    assert "LONG1" in ops  # id(txn) is a long, as ZEO sends it
    assert codec.decode(codec.encode(msg)) == msg


def test_msgpack_loadbefore_with_tuple_msgid():
    oid, tid = b"\0" * 7 + b"\x05", b"\x03" * 8
    msg = ((oid, tid), False, "loadBefore", (oid, tid))
    expect = h(f"94 92 c4 08 {oid.hex()} c4 08 {tid.hex()} c2 aa 6c6f61644265666f7265 92"
               f" c4 08 {oid.hex()} c4 08 {tid.hex()}")
    codec = MsgpackCodec()
    assert codec.encode(msg) == expect
    decoded = codec.decode(expect)
    assert decoded == msg
    assert type(decoded[0]) is tuple  # msgid must come back hashable for the reply table
    # and the reply echoes it byte-for-byte in the same array form
    conn = ServerConnection(b"M5")
    list(conn.receive_data(frame(b"M5")))
    reply = conn.send_reply(decoded[0], (b"data", tid, None))
    assert reply[4:].startswith(h(f"94 92 c4 08 {oid.hex()} c4 08 {tid.hex()} 00 a6"))


def test_msgpack_string_msgid_echoed():
    conn = ServerConnection(b"M5")
    list(conn.receive_data(frame(b"M5")))
    [msg] = conn.receive_data(frame(MsgpackCodec().encode(("anything", False, "ping", ()))))
    assert msg[0] == "anything"
    out = FrameDecoder().feed(conn.send_reply(msg[0], None))
    assert MsgpackCodec().decode(out[0]) == ("anything", 0, ".reply", None)


def test_codec_for_letter():
    assert isinstance(codec_for_letter(b"Z", server=True), PickleCodec)
    assert isinstance(codec_for_letter(b"M", server=False), MsgpackCodec)
    for bad in (b"X", b"", b"z", b"m"):
        with pytest.raises(RemoteProtocolError):
            codec_for_letter(bad, server=True)


@pytest.mark.parametrize("codec", [PickleCodec(SERVER_ALLOWED_GLOBALS), MsgpackCodec()],
                         ids=["pickle", "msgpack"])
@pytest.mark.parametrize("bad", [None, 1, (1, 2, 3), (1, False, b"bytesname", ()),
                                 (1, False, 7, ()), (1, False, "ping", (), "extra")])
def test_decode_refuses_non_messages(codec, bad):
    with pytest.raises(RemoteProtocolError):
        codec.decode(codec.encode(bad))


def test_pickled_list_is_not_a_message():
    # msgpack cannot tell lists from tuples, pickle can: a pickled list is refused.
    codec = PickleCodec(SERVER_ALLOWED_GLOBALS)
    with pytest.raises(RemoteProtocolError):
        codec.decode(codec.encode([1, False, "ping", ()]))


@pytest.mark.parametrize("payload", [b"", b"\x80", b"\x80\x03(K\x01", b"garbage", b"\xff" * 9])
def test_decode_garbage(payload):
    with pytest.raises(RemoteProtocolError):
        PickleCodec(SERVER_ALLOWED_GLOBALS).decode(payload)
    with pytest.raises(RemoteProtocolError):
        MsgpackCodec().decode(payload)


def test_msgpack_ext_types_stay_inert_data():
    # ZEO never sends ext types; if a peer does, the decoder must not call any hook with them.
    import msgpack

    ext = h("94 01 c2 a4 70696e67 91 d4 05 00")  # fixext1 inside args
    try:
        msg = MsgpackCodec().decode(ext)
    except RemoteProtocolError:
        return
    assert msg[3] == (msgpack.ExtType(5, b"\0"),)


# --------------------------------------------------------------------------------------------
# The safe decoders: hostile pickles are refused and nothing runs


def _binunicode(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _message_around(call: bytes) -> bytes:
    """A pickled ``(1, False, 'register', (<call>, 0))`` whose first arg is the raw ``call``."""
    return (b"\x80\x03(K\x01\x89" + _binunicode("register") + b"(" + call + b"K\x00t" + b"t.")


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _stack_global(module: str, name: str) -> bytes:
    return b"\x8c" + bytes([len(module)]) + module.encode() + b"\x8c" + bytes([len(name)]) \
        + name.encode() + b"\x93"


def _hostile_pickles(marker: Path) -> dict[str, bytes]:
    touch = f"open({str(marker)!r}, 'w').write('ran')"
    sh = f"touch {marker}"
    return {
        "GLOBAL os.system REDUCE": _message_around(_global("os", "system") + _binunicode(sh)
                                                   + b"\x85R"),
        "STACK_GLOBAL os.system REDUCE": _message_around(_stack_global("os", "system")
                                                         + _binunicode(sh) + b"\x85R"),
        "GLOBAL builtins.eval REDUCE": _message_around(_global("builtins", "eval")
                                                       + _binunicode(touch) + b"\x85R"),
        "STACK_GLOBAL builtins.exec REDUCE": _message_around(_stack_global("builtins", "exec")
                                                             + _binunicode(touch) + b"\x85R"),
        "py2 __builtin__.eval REDUCE": _message_around(_global("__builtin__", "eval")
                                                       + _binunicode(touch) + b"\x85R"),
        "builtins.getattr REDUCE": _message_around(
            _global("builtins", "getattr") + _global("os", "path") + _binunicode("join")
            + b"\x86R"),
        "subprocess.Popen REDUCE": _message_around(
            _global("subprocess", "Popen") + b"(" + _binunicode("touch")
            + _binunicode(str(marker)) + b"l\x85R"),
        "INST os.system": _message_around(b"(" + _binunicode(sh) + b"ios\nsystem\n"),
        "OBJ os.system": _message_around(b"(" + _global("os", "system") + _binunicode(sh)
                                         + b"o"),
        "NEWOBJ subprocess.Popen": _message_around(
            _global("subprocess", "Popen") + b"(" + _binunicode("touch")
            + _binunicode(str(marker)) + b"l\x85\x81"),
        "copyreg._reconstructor": _message_around(
            _global("copyreg", "_reconstructor") + _global("os", "system")
            + _global("builtins", "object") + b"N\x87R"),
        "BINPERSID": _message_around(_binunicode("oid") + b"Q"),
        "PERSID": _message_around(b"Ppid\n"),
        "zodbpickle global not in allow-list": _message_around(_global("zodbpickle", "pickle")),
    }


@pytest.mark.parametrize("allowed", [SERVER_ALLOWED_GLOBALS, CLIENT_ALLOWED_GLOBALS],
                         ids=["server", "client"])
def test_hostile_pickles_refused_and_nothing_runs(tmp_path, allowed):
    marker = tmp_path / "side-effect"
    codec = PickleCodec(allowed)
    for name, payload in _hostile_pickles(marker).items():
        with pytest.raises(ForbiddenGlobal):
            codec.decode(payload)
        assert not marker.exists(), f"{name} ran code in the decoder"
    # Sanity of the fixture: the same bytes do run with an unrestricted unpickler
    import pickle

    pickle.loads(_hostile_pickles(marker)["GLOBAL builtins.eval REDUCE"])
    assert marker.exists()


def test_hostile_pickle_refused_through_server_connection(tmp_path):
    marker = tmp_path / "side-effect"
    conn = ServerConnection(b"Z5")
    assert isinstance(next(conn.receive_data(frame(b"Z5"))), Handshake)
    payload = _hostile_pickles(marker)["GLOBAL os.system REDUCE"]
    [event] = conn.receive_data(frame(payload))  # a two-way call: answered with an error
    assert isinstance(event, UndecodableCall) and isinstance(event.error, ForbiddenGlobal)
    assert not marker.exists()
    # the same as a one-way call cannot be answered: the connection is closed
    oneway = payload.replace(b"\x89", b"\x88", 1)
    assert oneway != payload
    with pytest.raises(ForbiddenGlobal):
        list(conn.receive_data(frame(oneway)))
    assert not marker.exists()


def test_ext_opcodes_refused(tmp_path):
    marker = tmp_path / "side-effect"
    codec = PickleCodec(SERVER_ALLOWED_GLOBALS)
    sh = _binunicode(f"touch {marker}")
    # Unregistered extension codes: undecodable.
    for ext in (b"\x82\xf0", b"\x83\xf0\x00", b"\x84\xf0\x00\x00\x00"):
        with pytest.raises(RemoteProtocolError):
            codec.decode(_message_around(ext + sh + b"\x85R"))
    # A code registered in this process (copyreg) must still go through the allow-list.
    copyreg.add_extension("os", "system", 0xF0)
    try:
        for ext in (b"\x82\xf0", b"\x83\xf0\x00", b"\x84\xf0\x00\x00\x00"):
            with pytest.raises(ForbiddenGlobal):
                codec.decode(_message_around(ext + sh + b"\x85R"))
    finally:
        copyreg.remove_extension("os", "system", 0xF0)
    assert not marker.exists()


def test_allowed_global_zodbpickle_binary():
    from zodbpickle import binary

    payload = _message_around(_global("zodbpickle", "binary") + b"C\x03abc\x85R")
    msg = PickleCodec(SERVER_ALLOWED_GLOBALS).decode(payload)
    assert msg[3][0] == b"abc" and type(msg[3][0]) is binary
    assert PickleCodec(CLIENT_ALLOWED_GLOBALS).decode(payload)[3][0] == b"abc"


def test_zopeundo_prefix_only_on_server_side():
    payload = _message_around(_global("ZopeUndo.Prefix", "Prefix") + _binunicode("x") + b"\x85R")
    with pytest.raises(ForbiddenGlobal):
        PickleCodec(CLIENT_ALLOWED_GLOBALS).decode(payload)
    # On the server it is allowed by name; if ZopeUndo is not installed it is "unavailable",
    # still a refusal of the frame and never an ImportError escaping the codec.
    try:
        import ZopeUndo.Prefix  # noqa: F401
    except ImportError:
        with pytest.raises(ForbiddenGlobal):
            PickleCodec(SERVER_ALLOWED_GLOBALS).decode(payload)
    else:
        msg = PickleCodec(SERVER_ALLOWED_GLOBALS).decode(payload)
        assert type(msg[3][0]).__name__ == "Prefix"


_LAUGHS = textwrap.dedent(
    """
    import sys
    from ZEO.protocol import PickleCodec, SERVER_ALLOWED_GLOBALS, RemoteProtocolError
    # 1.2 KB pickle: 40 nested lists, each holding 10 memo references to the previous one.
    p = bytearray(b"\\x80\\x03N" + b"q\\x00")
    for k in range(1, 40):
        p += b"](" + (b"h" + bytes([k - 1])) * 10 + b"eq" + bytes([k])
    p += b"."
    try:
        PickleCodec(SERVER_ALLOWED_GLOBALS).decode(bytes(p))
    except RemoteProtocolError:
        print("refused")
    """
)


def test_billion_laughs_pickle_refused_quickly():
    # A non-message whose repr is exponential: the decoder must refuse it without walking it.
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    try:
        out = subprocess.run([sys.executable, "-c", _LAUGHS], capture_output=True, text=True,
                             timeout=5, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("decoder still busy after 5 s on a 1.2 KB payload")
    assert out.stdout.strip() == "refused", out.stderr


# --------------------------------------------------------------------------------------------
# Handshake: server side


def _handshaken_server(letter: bytes = b"Z", announce: bytes = b"Z5", **kw) -> ServerConnection:
    conn = ServerConnection(announce, **kw)
    [ev] = conn.receive_data(frame(letter + b"5"))
    assert isinstance(ev, Handshake)
    return conn


@pytest.mark.parametrize("announce", [b"Z5", b"M5"])
def test_server_greeting_bytes(announce):
    assert ServerConnection(announce).greeting() == b"\0\0\0\x02" + announce


def test_server_cannot_announce_other_versions():
    for bad in (b"Z4", b"X5", b"Z6", b"5"):
        with pytest.raises(LocalProtocolError):
            ServerConnection(bad)


@pytest.mark.parametrize("announce", [b"Z5", b"M5"])
@pytest.mark.parametrize("reply,codec_cls", [(b"Z5", PickleCodec), (b"M5", MsgpackCodec)])
def test_server_accepts_client_letter(announce, reply, codec_cls):
    conn = ServerConnection(announce)
    if announce == b"M5" and reply == b"Z5":
        # A server told to speak msgpack decodes no pickle (ZEO would: §1.2).
        with pytest.raises(RemoteProtocolError, match="msgpack-only"):
            list(conn.receive_data(frame(reply)))
        return
    [ev] = conn.receive_data(frame(reply))
    assert isinstance(ev, Handshake) and ev.protocol == reply
    assert conn.protocol == reply
    assert isinstance(conn.codec, codec_cls)  # chosen from the client's letter (§1.2)


@pytest.mark.parametrize("bad", [b"Z4", b"M4", b"X5", b"Z55", b"Z", b"", b"Z3101", b"RUOK",
                                 b"ruok\n"])
def test_server_rejects_bad_handshake(bad):
    conn = ServerConnection(b"Z5")
    with pytest.raises(RemoteProtocolError):
        list(conn.receive_data(frame(bad)))
    assert conn.codec is None


def test_server_ruok():
    conn = ServerConnection(b"Z5")
    [ev] = conn.receive_data(h("00 00 00 04 72 75 6f 6b"))
    assert isinstance(ev, RuokRequest)
    status = {"1": {"connections": 2, "last-transaction": "0000000000000000"}}
    out = conn.send_status(status)
    [payload] = FrameDecoder().feed(out)
    assert json.loads(payload.decode("ascii")) == status


def test_server_cannot_send_before_handshake():
    conn = ServerConnection(b"Z5")
    with pytest.raises(LocalProtocolError):
        conn.send_reply(1, None)
    with pytest.raises(LocalProtocolError):
        conn.send_oneway("info", ({},))


@pytest.mark.parametrize("letter", [b"Z", b"M"])
def test_server_yields_calls_and_swallows_heartbeats(letter):
    conn = _handshaken_server(letter)
    codec = PickleCodec() if letter == b"Z" else MsgpackCodec()
    data = (frame(codec.encode(HEARTBEAT))
            + frame(codec.encode((1, False, "register", ("1", 0))))
            + frame(codec.encode(HEARTBEAT))
            + frame(codec.encode((0, True, "ping", ()))))
    # in one feed and byte by byte, the same events
    assert list(conn.receive_data(data)) == [(1, False, "register", ("1", 0)),
                                              (0, True, "ping", ())]
    conn2 = _handshaken_server(letter)
    events = []
    for i in range(len(data)):
        events += conn2.receive_data(data[i : i + 1])
    assert events == [(1, False, "register", ("1", 0)), (0, True, "ping", ())]


def test_handshake_and_first_call_in_one_feed():
    conn = ServerConnection(b"Z5")
    data = frame(b"Z5") + frame(PickleCodec().encode((1, False, "register", ("1", 0))))
    events = list(conn.receive_data(data))
    assert isinstance(events[0], Handshake)
    assert events[1] == (1, False, "register", ("1", 0))


def test_good_frames_are_yielded_before_a_bad_one_raises():
    conn = _handshaken_server()
    data = frame(PickleCodec().encode((1, False, "ping", ()))) + frame(b"garbage")
    gen = conn.receive_data(data)
    assert next(gen) == (1, False, "ping", ())
    with pytest.raises(RemoteProtocolError):
        next(gen)


def test_server_replies_byte_exact():
    conn = _handshaken_server()
    assert conn.send_reply(7, []) == frame(h(EXAMPLES[3][1]))
    assert conn.send_error(3, ReadOnlyError()) == frame(h(EXAMPLES[4][1]))
    inval = conn.send_oneway("invalidateTransaction", (b"TTTTTTTT", [P1]))
    assert inval == frame(h(EXAMPLES[5][1]))
    mconn = _handshaken_server(b"M")
    assert mconn.send_reply(7, []) == frame(h(EXAMPLES[3][2]))
    assert mconn.send_error(3, ReadOnlyError()) == frame(h(EXAMPLES[4][2]))


def test_unencodable_reply_becomes_error_reply():
    for letter in (b"Z", b"M"):
        conn = _handshaken_server(letter)
        codec = conn.codec
        [payload] = FrameDecoder().feed(conn.send_reply(9, lambda: None))
        msgid, flags, name, args = codec.decode(payload)
        assert (msgid, flags, name) == (9, 2, ".reply")
        assert tuple(args) == ("builtins.ValueError", ("Couldn't pickle response",))


def test_msgpack_reply_converts_sets_and_exceptions():
    conn = _handshaken_server(b"M")
    [payload] = FrameDecoder().feed(conn.send_reply(1, {"s": {b"a"}, "e": KeyError("k")}))
    msg = MsgpackCodec().decode(payload)
    assert msg[3] == {"s": (b"a",), "e": ("builtins.KeyError", ("k",))}


def test_reply_above_max_message_size_is_local_error():
    conn = _handshaken_server(max_message_size=100)
    with pytest.raises(LocalProtocolError):
        conn.send_reply(1, b"x" * 200)


def test_server_frame_too_large_after_handshake():
    conn = _handshaken_server(max_message_size=64)
    with pytest.raises(FrameTooLarge):
        list(conn.receive_data(struct.pack(">I", 65)))


# --------------------------------------------------------------------------------------------
# Handshake: client side (§1.2: ZEO compares versions as bytes)


@pytest.mark.parametrize("greeting", [b"Z5", b"Z6", b"Z99999", b"M5", b"M6", b"M99999"])
def test_client_accepts_versions_at_least_5(greeting):
    conn = ClientConnection()
    [ev] = conn.receive_data(frame(greeting))
    assert isinstance(ev, Greeting) and ev.protocol == greeting
    assert conn.protocol == greeting[:1] + b"5"
    assert conn.handshake_reply == frame(greeting[:1] + b"5")
    assert isinstance(conn.codec, PickleCodec if greeting[:1] == b"Z" else MsgpackCodec)


@pytest.mark.parametrize("greeting", [b"Z4", b"Z10", b"Z200", b"Z3101", b"Z310", b"M4", b"Z",
                                      b"X5", b""])
def test_client_rejects(greeting):
    conn = ClientConnection()
    with pytest.raises(RemoteProtocolError):
        list(conn.receive_data(frame(greeting)))
    assert conn.handshake_reply is None


def test_client_cannot_send_before_greeting():
    with pytest.raises(LocalProtocolError):
        ClientConnection().send_call(1, "register", ("1", 0))


@pytest.mark.parametrize("greeting,idx", [(b"Z5", 1), (b"M5", 2)])
def test_client_messages_byte_exact(greeting, idx):
    conn = ClientConnection()
    list(conn.receive_data(frame(greeting)))
    assert conn.send_heartbeat() == frame(h(EXAMPLES[1][idx]))
    assert conn.send_call(1, "register", ("1", 0)) == frame(h(EXAMPLES[0][idx]))
    assert conn.send_call(0, "ping", (), oneway=True) == frame(h(EXAMPLES[2][idx]))


def test_client_swallows_heartbeats_and_yields_replies():
    conn = ClientConnection()
    data = (frame(b"Z5") + frame(h(EXAMPLES[1][1])) + frame(h(EXAMPLES[6][1]))
            + frame(h(EXAMPLES[5][1])))
    events = list(conn.receive_data(data))
    assert isinstance(events[0], Greeting)
    assert events[1:] == [(1, 0, ".reply", Z64),
                          (0, True, "invalidateTransaction", (b"TTTTTTTT", [P1]))]


def test_client_refuses_hostile_reply(tmp_path):
    marker = tmp_path / "side-effect"
    conn = ClientConnection()
    list(conn.receive_data(frame(b"Z5")))
    with pytest.raises(ForbiddenGlobal):
        list(conn.receive_data(frame(_hostile_pickles(marker)["GLOBAL builtins.eval REDUCE"])))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Exceptions on the wire


def test_exception_to_payload():
    oid = P1
    assert exception_to_payload(ReadOnlyError()) == ("ZODB.POSException.ReadOnlyError", ())
    assert exception_to_payload(POSKeyError(oid)) == ("ZODB.POSException.POSKeyError", (oid,))
    name, d = exception_to_payload(ConflictError(oid=oid, serials=(b"2" * 8, b"1" * 8)))
    assert name == "ZODB.POSException.ConflictError"
    assert d["oid"] == oid and d["serials"] == (b"2" * 8, b"1" * 8)
    assert exception_to_payload(ValueError("unknown storage: nope")) == (
        "builtins.ValueError", ("unknown storage: nope",))


def test_payload_to_conflict_error_from_dict():
    payload = {"message": "database conflict error", "oid": P1, "class_name": "pkg.Cls",
               "serials": (b"2" * 8, b"1" * 8)}
    exc = payload_to_exception("ZODB.POSException.ConflictError", payload)
    assert type(exc) is ConflictError
    assert exc.oid == P1 and exc.serials == (b"2" * 8, b"1" * 8)
    assert exc.class_name == "pkg.Cls"
    assert "database conflict error" in str(exc)
    # and a msgpack-decoded dict (serials as tuple, same thing)
    exc = payload_to_exception("ZODB.POSException.ConflictError", _tuplify(payload))
    assert exc.serials == (b"2" * 8, b"1" * 8)


def test_payload_to_known_exceptions():
    exc = payload_to_exception("ZODB.POSException.POSKeyError", (P1,))
    assert type(exc) is POSKeyError and exc.args == (P1,)
    exc = payload_to_exception("ZODB.POSException.ReadOnlyError", ())
    assert type(exc) is ReadOnlyError
    exc = payload_to_exception("ZODB.POSException.StorageTransactionError", (None, 123))
    assert type(exc) is StorageTransactionError and exc.args == (None, 123)
    assert type(payload_to_exception("builtins.KeyError", ("k",))) is KeyError
    assert type(payload_to_exception("exceptions.TypeError", ("t",))) is TypeError


def test_payload_to_unknown_exception_is_server_exception():
    exc = payload_to_exception("builtins.ValueError", ("unknown storage: nope",))
    assert type(exc) is ServerException
    assert exc.args == ("builtins.ValueError", ("unknown storage: nope",))
    exc = payload_to_exception("os.system", ("rm -rf /",))  # a name is never imported
    assert type(exc) is ServerException


def test_exception_round_trip_over_both_codecs():
    for letter in (b"Z", b"M"):
        server = _handshaken_server(letter)
        client = ClientConnection()
        list(client.receive_data(frame(letter + b"5")))
        exc = ConflictError(oid=P1, serials=(b"2" * 8, b"1" * 8))
        [(msgid, flags, name, args)] = client.receive_data(server.send_error(4, exc))
        assert (msgid, flags, name) == (4, 2, ".reply")
        rebuilt = payload_to_exception(*args)
        assert type(rebuilt) is ConflictError and rebuilt.oid == P1


def test_protocol_error_hierarchy():
    assert issubclass(ForbiddenGlobal, RemoteProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolViolation)
    assert issubclass(LocalProtocolError, ProtocolViolation)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)


def test_client_decoder_accepts_nested_exceptions_the_server_refuses():
    # ZEO 6.2 pickles MultipleUndoErrors' nested errors with ZODB.POSException._recon.
    from ZODB.POSException import UndoError, _recon

    from ZEO.protocol import codec_for_letter

    inner = UndoError("cannot undo", b"\0" * 8)
    payload = PickleCodec().encode(  # memo-less, as a ZEO server writes it
        (5, 2, ".reply", ("ZODB.POSException.MultipleUndoErrors", {"_errs": [inner]})))
    assert b"_recon" in payload
    msgid, flags, name, (cls, state) = codec_for_letter(b"Z", server=False).decode(payload)
    assert (msgid, flags, cls) == (5, 2, "ZODB.POSException.MultipleUndoErrors")
    assert isinstance(state["_errs"][0], UndoError) and _recon is not None
    with pytest.raises(RemoteProtocolError):
        codec_for_letter(b"Z", server=True).decode(payload)


def test_frame_decoder_mixed_sizes_random_splits():
    # Small and large frames (large ones are collected as pieces) in arbitrary chunkings.
    import random

    from ZEO.protocol.framing import FrameDecoder

    rng = random.Random(7)
    for _ in range(200):
        payloads = [bytes([rng.randrange(256)]) * rng.choice([0, 1, 3, 100, 70_000, 200_000])
                    for _ in range(rng.randrange(1, 8))]
        stream = b"".join(encode_frame(p) for p in payloads)
        decoder, got, i = FrameDecoder(), [], 0
        while i < len(stream):
            j = i + rng.choice([1, 2, 3, 5, 1000, 65536, 300_000])
            got += decoder.feed(stream[i:j])
            assert decoder.buffered == min(j, len(stream)) - sum(len(p) + 4 for p in got)
            i = j
        assert got == payloads
        assert decoder.buffered == 0


def test_opcode_steps_match_pickletools():
    """The walker's table of opcode argument sizes is pickletools' own, written out."""
    import pickletools

    from ZEO.protocol import codecs

    sizes = {pickletools.TAKEN_FROM_ARGUMENT1: codecs._LEN1,
             pickletools.TAKEN_FROM_ARGUMENT4: codecs._LEN4,
             pickletools.TAKEN_FROM_ARGUMENT4U: codecs._LEN4,
             pickletools.TAKEN_FROM_ARGUMENT8U: codecs._LEN8}
    memo = {"PUT": codecs._MEMO_NEWLINE, "GET": codecs._MEMO_NEWLINE,
            "BINPUT": codecs._MEMO1, "BINGET": codecs._MEMO1, "LONG_BINPUT": codecs._MEMO4,
            "LONG_BINGET": codecs._MEMO4, "MEMOIZE": codecs._MEMOIZE}
    expected = {}
    for op in pickletools.opcodes:
        if op.name in memo:
            step = memo[op.name]
        elif op.name == "STOP":
            step = codecs._STOP
        elif op.arg is None:
            step = 0
        elif op.arg.n == pickletools.UP_TO_NEWLINE:
            step = codecs._TWO_NEWLINES if op.arg.name.endswith("_pair") else codecs._NEWLINE
        elif op.arg.n >= 0:
            step = op.arg.n
        else:
            step = sizes[op.arg.n]
        expected[op.code.encode("latin-1")] = step
    assert codecs.OPCODE_STEPS == expected


def test_plain_messages_skip_the_allow_list_and_calls_do_not():
    """The walker tells plain data (decoded by pickle.loads) from pickles that name a global,
    call, extension or persistent id (decoded by the restricted unpickler)."""
    import pickletools

    from ZEO.protocol import codecs

    calls = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "BUILD", "NEWOBJ", "NEWOBJ_EX",
             "PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4"}
    assert set(codecs._CALL_OPCODES) == {
        ord(op.code) for op in pickletools.opcodes if op.name in calls}
    codec = codecs.PickleCodec()
    plain = (5, 1, "storea", (b"\0" * 8, b"\1" * 8, b"record", 17, None, True, 1.5, {"a": [1]}))
    assert codecs.check_no_memo(codec.encode(plain)) is True
    assert codec.decode(codec.encode(plain)) == plain
    args = {0: b"", 1: b"\x01", 2: b"\x01\x00", 4: b"\x01\x00\x00\x00",
            codecs._NEWLINE: b"x\n", codecs._TWO_NEWLINES: b"os\nsystem\n"}
    for code in codecs._CALL_OPCODES:
        op = bytes([code])
        payload = b"\x80\x03" + op + args[codecs.OPCODE_STEPS[op]] + b"."
        assert codecs.check_no_memo(payload) is False, op
    with pytest.raises(codecs.ForbiddenGlobal):
        codec.decode(b"\x80\x03cos\nsystem\n)R.")
