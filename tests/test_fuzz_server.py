"""Live-server fuzz (issue 8): at least 10,000 random and mutated frames against our server.

The server must never crash, never run peer-supplied code, and a client connected alongside
keeps working.  Deterministic (fixed seed); ``ZEO_FUZZ_FRAMES`` and ``ZEO_FUZZ_SEED`` change it.
"""

from __future__ import annotations

import os
import random
import struct

import pytest

from support.rawclient import ConnectionClosed, RawClient
from support.servers import filestorage_conf, start_server
from ZEO.protocol import MsgpackCodec, PickleCodec, encode_frame

Z64 = b"\0" * 8
MAXTID = b"\x7f\xff\xff\xff\xff\xff\xff\xff"
METHODS = ["get_info", "lastTransaction", "getInvalidations", "new_oids", "pack", "loadBefore",
           "storea", "checkCurrentSerialInTransaction", "restorea", "storeBlobStart",
           "storeBlobChunk", "storeBlobEnd", "storeBlobShared", "deleteObject", "tpc_begin",
           "vote", "tpc_finish", "tpc_abort", "history", "record_iternext", "sendBlob", "getTid",
           "loadSerial", "new_oid", "undoa", "undoLog", "undoInfo", "iterator_start",
           "iterator_next", "iterator_record_start", "iterator_record_next", "iterator_gc",
           "server_status", "set_client_label", "ping", "register", "nonsense"]


def _rand_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 2**31, 2**63 - 1, rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.randbytes(rng.choice([0, 1, 8, 8, 8, 30]))
    if kind == 4:
        return rng.choice(["", "1", "x" * rng.randrange(50), "\u00e9"])
    if kind == 5:
        return rng.random()
    if kind == 6:
        return tuple(_rand_value(rng, depth + 1) for _ in range(rng.randrange(4)))
    if kind == 7:
        return [_rand_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["a", "b", "length"]): _rand_value(rng, depth + 1)}


def _valid_call(rng: random.Random, msgid: int) -> tuple:
    return rng.choice([
        (msgid, False, "ping", ()),
        (msgid, False, "get_info", ()),
        (msgid, False, "lastTransaction", ()),
        (msgid, False, "loadBefore", (rng.randbytes(8), MAXTID)),
        (msgid, False, "history", (Z64, 1)),
        (msgid, False, "server_status", ()),
        (msgid, False, "new_oids", (rng.randrange(-2, 200),)),
    ])


def _mutate(rng: random.Random, payload: bytes) -> bytes:
    b = bytearray(payload)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(4)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == 1:
            b[pos:pos] = rng.randbytes(rng.randrange(1, 5))
        elif op == 2 and b:
            del b[min(pos, len(b) - 1)]
        else:
            del b[pos:]
    return bytes(b)


def _missing_bytes(stream: bytes, limit: int) -> int | None:
    """Bytes the server still waits for at the end of ``stream`` (its frame header said so),
    or None when a header is over ``limit`` (the server closes)."""
    pos = 0
    while pos + 4 <= len(stream):
        (n,) = struct.unpack_from(">I", stream, pos)
        if n > limit:
            return None
        pos += 4 + n
    if pos < len(stream):  # a partial header: how much follows it is unknown
        return 2**32
    return pos - len(stream)


def _reduce_payload(marker: str) -> bytes:
    cmd = f"touch {marker}".encode()
    return (b"\x80\x03(K\x07\x89X\x04\x00\x00\x00ping(cos\nsystem\nX"
            + struct.pack("<I", len(cmd)) + cmd + b"\x85Rtt.")


def _hostile_payload(rng: random.Random, msgid: int) -> bytes:
    """Issue 19's generators: deep nesting, DUP/memo sharing, constructors that would allocate
    from a number, oversized fields; each wrapped as a call with a readable head."""
    name = rng.choice(["register", "history", "iterator_next", "loadBefore", "ping",
                       "set_client_label", "getTid"])
    kind = rng.randrange(6)
    if kind == 0:  # deep nesting
        arg = b"N" + rng.choice([b"\x85", b"](e", b"}"]) * rng.choice([101, 1000, 50_000])
        arg = arg if arg[1:2] == b"\x85" else b"N" + b"\x85" * 5000
    elif kind == 1:  # DUP sharing
        arg = b"N" + b"2\x86" * rng.randrange(10, 64)
    elif kind == 2:  # memo sharing
        arg = b"Nq\x00" + b"h\x00h\x00\x86q\x00" * rng.randrange(10, 64)
    elif kind == 3:  # a constructor given a large number
        ctor = rng.choice([b"czodbpickle\nbinary\n", b"cbuiltins\nbytes\n",
                           b"cbuiltins\nlist\n", b"cbuiltins\nbytearray\n"])
        arg = ctor + b"\x8a\x05\x00\x00\x00\x00\x02\x85R"
    elif kind == 4:  # an oversized field
        big = rng.choice([70_000, 300_000])
        arg = (b"X" + struct.pack("<I", big) + b"x" * big) if rng.random() < 0.5 else (
            b"B" + struct.pack("<I", big) + b"\xff" * big)
    else:  # huge ints and long lengths that lie
        arg = rng.choice([b"\x8b\xff\xff\x00\x00" + b"\x01" * 100,
                          b"\x8a\xff" + b"\x01" * 255, b"X\xff\xff\xff\x7fabc"])
    return (b"\x80\x03(K" + bytes([msgid % 256]) + b"\x89X" + struct.pack("<I", len(name))
            + name.encode() + b"(" + arg + b"tt.")


def _frames_for_connection(rng: random.Random, codec, marker: str) -> list[bytes]:
    frames = []
    for i in range(rng.randrange(1, 40)):
        r = rng.random()
        if codec.letter == b"Z" and r < 0.12:
            frames.append(encode_frame(_hostile_payload(rng, 100 + i)))
            continue
        r = rng.random()
        if r < 0.35:
            frames.append(encode_frame(codec.encode(_valid_call(rng, 100 + i))))
        elif r < 0.55:
            msg = (rng.choice([0, 100 + i]), rng.choice([True, False]), rng.choice(METHODS),
                   tuple(_rand_value(rng) for _ in range(rng.randrange(6))))
            frames.append(encode_frame(codec.encode(msg)))
        elif r < 0.75:
            frames.append(encode_frame(_mutate(rng, codec.encode(_valid_call(rng, 100 + i)))))
        elif r < 0.9:
            frames.append(encode_frame(rng.randbytes(rng.randrange(0, 120))))
        elif r < 0.97:
            frames.append(encode_frame(_reduce_payload(marker)))
        else:  # a raw header with a random (often absurd) length, then a few bytes
            frames.append(struct.pack(">I", rng.getrandbits(32)) + rng.randbytes(4))
    return frames


@pytest.mark.timeout(600)
def test_fuzz_live_server(tmp_path):
    total = int(os.environ.get("ZEO_FUZZ_FRAMES", "10000"))
    rng = random.Random(int(os.environ.get("ZEO_FUZZ_SEED", "20261123")))
    marker = tmp_path / "code-ran"
    srv = start_server("ours", tmp_path / "s", filestorage_conf(tmp_path / "Data.fs"))
    try:
        good = RawClient(srv.addr)
        good.handshake()
        good.register("1", False)
        sent = connections = closed_by_server = pending = 0
        while sent < total:
            letter = rng.choice([b"Z", b"M"])
            codec = PickleCodec() if letter == b"Z" else MsgpackCodec()
            frames = _frames_for_connection(rng, codec, str(marker))
            with RawClient(srv.addr, timeout=20) as c:
                c.handshake(letter)
                registered = rng.random() < 0.8
                if registered:
                    c.register("1", rng.random() < 0.3)
                stream = b"".join(frames)
                missing = _missing_bytes(stream, 256 * 2**20 if registered else 64 * 1024)
                if missing and missing > 2**20:  # the server waits for a frame: leave it
                    try:
                        c.send_raw(stream)
                    except (ConnectionClosed, ConnectionError):
                        pass
                    pending += 1
                    sent += len(frames)
                    connections += 1
                    continue
                if missing:
                    stream += b"\0" * missing
                try:
                    c.send_raw(stream)
                    # a final ping: either its reply comes back, or the server closed on us
                    c.send_message((99999, False, "ping", ()))
                    while True:
                        msg = c.recv_message()
                        if msg[0] == 99999 and msg[2] == ".reply":
                            break
                except (ConnectionClosed, ConnectionError):
                    closed_by_server += 1
                except Exception as e:  # our own decoder choking on a reply is a failure
                    raise AssertionError(f"unexpected {e!r} after frames {frames!r:.2000}")
            sent += len(frames)
            connections += 1
            if connections % 50 == 0:
                assert srv.proc.poll() is None, "server died"
                assert good.call("ping") is None
        print(f"fuzz: {sent} frames over {connections} connections, "
              f"{closed_by_server} closed by the server, {pending} left waiting for a frame")
        assert srv.proc.poll() is None, "server died"
        assert not marker.exists(), "peer-supplied code ran on the server"
        assert good.call("ping") is None
        assert len(good.call("new_oids", 1)) == 1
        good.close()
    finally:
        srv.stop(timeout=10)
