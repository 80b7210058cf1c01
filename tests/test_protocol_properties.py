"""Property tests (hypothesis) of the protocol core: codec round trips and hostile byte streams."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ZEO.protocol import (
    HEARTBEAT,
    SERVER_ALLOWED_GLOBALS,
    ClientConnection,
    FrameDecoder,
    MsgpackCodec,
    PickleCodec,
    ProtocolViolation,
    ServerConnection,
    encode_frame,
)

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Plain data as ZEO messages carry it.  Keys: msgpack (strict_map_key) allows str and bytes only.
_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
            | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=40))
_keys = st.text(max_size=10) | st.binary(max_size=10)
plain = st.recursive(
    _scalars,
    lambda inner: (st.lists(inner, max_size=5) | st.lists(inner, max_size=5).map(tuple)
                   | st.dictionaries(_keys, inner, max_size=5)),
    max_leaves=30,
)
msgids = st.integers(-(2**63), 2**64 - 1) | st.tuples(st.binary(min_size=8, max_size=8),
                                                      st.binary(min_size=8, max_size=8))
messages = st.tuples(msgids, st.sampled_from([False, True, 0, 2]), st.text(max_size=30),
                     st.lists(plain, max_size=4).map(tuple))


def _same(a, b, lists_as_tuples: bool) -> bool:
    """Structural equality that also compares types (``True != 1``, ``1.0 != 1``)."""
    if lists_as_tuples and isinstance(a, list):
        a = tuple(a)
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, lists_as_tuples) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], lists_as_tuples) for k in a)
    return a == b


@SETTINGS
@given(messages)
def test_pickle_round_trip(msg):
    codec = PickleCodec(SERVER_ALLOWED_GLOBALS)
    assert _same(msg, codec.decode(codec.encode(msg)), lists_as_tuples=False)
    assert _same(msg, PickleCodec().decode(codec.encode(msg)), lists_as_tuples=False)


@SETTINGS
@given(messages)
def test_msgpack_round_trip(msg):
    codec = MsgpackCodec()
    assert _same(msg, codec.decode(codec.encode(msg)), lists_as_tuples=True)


@SETTINGS
@given(st.sampled_from([b"Z", b"M"]), st.lists(messages, max_size=6), st.data())
def test_connections_round_trip_in_random_splits(letter, msgs, data):
    """Client calls reach the server intact, whatever the TCP segmentation."""
    client = ClientConnection()
    server = ServerConnection(letter + b"5")
    list(client.receive_data(server.greeting()))
    stream = client.handshake_reply + b"".join(
        client.send_call(m[0], m[2], m[3], bool(m[1])) for m in msgs
    ) + client.send_heartbeat()
    events = []
    for chunk in _split(stream, data):
        events += server.receive_data(chunk)
    assert server.protocol == letter + b"5"
    expected = [(m[0], bool(m[1]), m[2], m[3]) for m in msgs if m[0] != -1]
    calls = events[1:]
    assert len(calls) == len(expected)
    for want, got in zip(expected, calls):
        assert _same(want, got, lists_as_tuples=letter == b"M")


def _split(stream: bytes, data) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    pieces, last = [], 0
    for c in cuts + [len(stream)]:
        pieces.append(stream[last:c])
        last = c
    return pieces


def _valid_payloads(letter: bytes) -> st.SearchStrategy[bytes]:
    codec = PickleCodec() if letter == b"Z" else MsgpackCodec()
    return messages.map(codec.encode)


def _mutate(payload: bytes, data) -> bytes:
    """Flip, insert or delete a few bytes of a valid payload."""
    b = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(len(b) - 1, 0)))
        if op == "flip" and b:
            b[pos] = data.draw(st.integers(0, 255))
        elif op == "insert":
            b[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and b:
            del b[pos]
        elif op == "truncate":
            del b[pos:]
    return bytes(b)


def _feed_until_violation(conn, stream: bytes, data) -> None:
    """Feed ``stream`` in random pieces; a ProtocolViolation ends the connection (as a server
    would close it); any other exception propagates and fails the test."""
    try:
        for chunk in _split(stream, data):
            for _event in conn.receive_data(chunk):
                pass
    except ProtocolViolation:
        pass


@pytest.mark.timeout(120)
@SETTINGS
@given(st.binary(max_size=400), st.sampled_from([b"", b"Z5", b"M5"]),
       st.sampled_from([64, 1024, 2**20]), st.data())
def test_random_bytes_to_server(garbage, handshake, max_size, data):
    conn = ServerConnection(b"Z5", max_message_size=max_size)
    stream = (encode_frame(handshake) if handshake else b"") + garbage
    _feed_until_violation(conn, stream, data)


@pytest.mark.timeout(120)
@SETTINGS
@given(st.sampled_from([b"Z", b"M"]), st.lists(st.binary(max_size=120), max_size=5), st.data())
def test_random_frames_to_server(letter, payloads, data):
    """Well-framed random payloads: every decoder path sees them."""
    conn = ServerConnection(b"Z5")
    stream = encode_frame(letter + b"5") + b"".join(encode_frame(p) for p in payloads)
    _feed_until_violation(conn, stream, data)


@pytest.mark.timeout(120)
@SETTINGS
@given(st.sampled_from([b"Z", b"M"]), st.data())
def test_mutated_messages_to_server(letter, data):
    payloads = [_mutate(p, data) for p in data.draw(st.lists(_valid_payloads(letter),
                                                             min_size=1, max_size=4))]
    conn = ServerConnection(b"Z5")
    stream = encode_frame(letter + b"5") + b"".join(encode_frame(p) for p in payloads)
    _feed_until_violation(conn, stream, data)


@pytest.mark.timeout(120)
@SETTINGS
@given(st.binary(max_size=400), st.sampled_from([b"", b"Z5", b"M5", b"Z6"]), st.data())
def test_random_bytes_to_client(garbage, greeting, data):
    conn = ClientConnection(max_message_size=4096)
    stream = (encode_frame(greeting) if greeting else b"") + garbage
    _feed_until_violation(conn, stream, data)


@SETTINGS
@given(st.lists(st.binary(max_size=50), max_size=10), st.data())
def test_frame_decoder_reassembles_any_split(payloads, data):
    stream = b"".join(encode_frame(p) for p in payloads)
    dec = FrameDecoder()
    out = []
    for chunk in _split(stream, data):
        out += dec.feed(chunk)
    assert out == payloads
    assert dec.buffered == 0


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(0, 1000))
def test_frame_decoder_limit(length, max_size):
    dec = FrameDecoder(max_size=max_size)
    header = struct.pack(">I", length)
    if length > max_size:
        with pytest.raises(ProtocolViolation):
            dec.feed(header)
    else:
        assert dec.feed(header) == ([b""] if length == 0 else [])


def test_heartbeat_constant():
    assert HEARTBEAT == (-1, 0, ".reply", None)
