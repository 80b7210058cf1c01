"""Hostile peers against a live server: each bad connection is closed, nothing runs, and a
well-behaved client connected alongside keeps working (issue 2 "Done when", zeo-facts §1.6, §8).

Cases where the real ZEO 6.2 server behaves the same (it closes) also run against it, as a check
that we test the protocol and not our reading of it.  Pickled REDUCE payloads run only against
ours: the real server executes them (zeo-facts §8).
"""

from __future__ import annotations

import itertools
import struct
import sys
import time

import pytest

from support.rawclient import ConnectionClosed, RawClient, RemoteError
from support.servers import ServerProcess, filestorage_conf, start_server, write_config
from ZEO.protocol import MsgpackCodec, PickleCodec, encode_frame

Z64 = b"\0" * 8
MAXTID = b"\x7f\xff\xff\xff\xff\xff\xff\xff"
RECORD = b"\x80\x03cpersistent.mapping\nPersistentMapping\nq\x00.}q\x01."
_txn_ids = itertools.count(1_000_000)


@pytest.fixture(scope="module", params=["ours", "ref"])
def server(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"hostile-{request.param}")
    srv = start_server(request.param, d, filestorage_conf(d / "Data.fs"))
    srv.kind = request.param
    yield srv
    srv.stop(timeout=5)  # ZEO 6.2 now and then ignores SIGTERM (zeo-facts §11): then SIGKILL


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-ours-only")
    srv = start_server("ours", d, filestorage_conf(d / "Data.fs"))
    srv.kind = "ours"
    yield srv
    srv.stop()


@pytest.fixture
def good(request):
    """A registered, well-behaved client on the server under test, open during the attack."""
    srv = request.getfixturevalue("ours" if "ours" in request.fixturenames else "server")
    c = RawClient(srv.addr)
    c.handshake()
    c.register("1", False)
    yield c
    c.close()


def registered(addr, letter: bytes | None = None) -> RawClient:
    """A raw client, handshaken (``letter``: its encoding) and registered on storage 1."""
    c = RawClient(addr)
    if letter is None:
        c.handshake()
    else:
        c.handshake(letter)
    c.register("1", False)
    return c


def commit_one(c: RawClient) -> tuple[bytes, bytes]:
    """Commit one new object through raw calls; return (oid, tid)."""
    txn_id = next(_txn_ids)
    [oid] = c.call("new_oids", 1)
    c.oneway("tpc_begin", txn_id, b"", b"hostile test", {}, None, " ")
    c.oneway("storea", oid, Z64, RECORD, txn_id)
    assert tuple(c.call("vote", txn_id)) == ()
    tid = c.call("tpc_finish", txn_id)
    assert isinstance(tid, bytes) and len(tid) == 8
    return oid, tid


def assert_still_serving(srv, good: RawClient) -> None:
    """The other client, and a brand-new one, can still ping, commit and load."""
    assert srv.proc.poll() is None, "server died"
    assert good.call("ping") is None
    oid, tid = commit_one(good)
    data, start, end = good.call("loadBefore", oid, MAXTID)
    assert (data, start, end) == (RECORD, tid, None)
    with RawClient(srv.addr) as fresh:
        fresh.handshake()
        assert fresh.register("1", True) == tid
        assert fresh.call("loadBefore", oid, MAXTID)[0] == RECORD


def assert_closed(c: RawClient) -> None:
    assert c.is_closed_by_peer(timeout=10), "the server did not close the hostile connection"


def assert_refused(c: RawClient, msgid=None) -> None:
    """The frame was refused: the connection closed, or (ours, when the call's msgid and
    flags survived) an error reply to it."""
    try:
        reply = c.recv_message()
    except (ConnectionClosed, OSError):
        return
    assert reply[1] == 2 and reply[2] == ".reply", reply
    assert reply[3][0] == "builtins.ValueError" and "undecodable" in reply[3][1][0], reply
    if msgid is not None:
        assert reply[0] == msgid


def log_mark(srv) -> int:
    return len(srv.log())


def log_since(srv, mark: int, text: str) -> None:
    deadline = time.monotonic() + 10
    while text not in srv.log()[mark:]:
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged:\n{srv.log()[mark:][-3000:]}")
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# Pickles that try to run code (ours only)


def _binunicode(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _reduce_call(module: str, name: str, arg: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n" + _binunicode(arg) + b"\x85R"


def _register_with(first_arg: bytes) -> bytes:
    """A pickled ``(1, False, 'register', (<first_arg>, 0))``."""
    return b"\x80\x03(K\x01\x89" + _binunicode("register") + b"(" + first_arg + b"K\x00tt."


def _call_with(name: str, first_arg: bytes, msgid: int = 5) -> bytes:
    return (b"\x80\x03(K" + bytes([msgid]) + b"\x89" + _binunicode(name) + b"(" + first_arg
            + b"tt.")


@pytest.mark.parametrize("when", ["before-register", "after-register"])
@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "builtins.exec"])
def test_reduce_runs_nothing_and_gets_an_error_reply(ours, good, tmp_path, when, target):
    marker = tmp_path / f"ran-{target}-{when}"
    module, name = target.split(".")
    code = f"touch {marker}" if target == "os.system" else \
        f"open({str(marker)!r}, 'w').write('x')"
    mark = log_mark(ours)
    with RawClient(ours.addr) as evil:
        evil.handshake(b"Z")
        if when == "after-register":
            evil.register("1", False)
            evil.send_frame(_call_with("history", _reduce_call(module, name, code)))
            msgid = 5
        else:
            evil.send_frame(_register_with(_reduce_call(module, name, code)))
            msgid = 1
        # The call's head survived: its client is told why, and may go on.
        reply = evil.recv_message()
        assert reply[:3] == (msgid, 2, ".reply")
        assert reply[3][0] == "builtins.ValueError"
        assert f"forbidden global in pickle: {module}.{name}" in reply[3][1][0]
        if when == "after-register":
            assert evil.call("ping") is None
        else:
            assert len(evil.register("1", False)) == 8
    log_since(ours, mark, f"{module}.{name}")
    assert not marker.exists(), "the server ran code from a pickle"
    assert_still_serving(ours, good)


def test_persistent_id_refused(ours, good):
    mark = log_mark(ours)
    with RawClient(ours.addr) as evil:
        evil.handshake(b"Z")
        evil.send_frame(_register_with(_binunicode("oid") + b"Q"))
        assert_refused(evil, 1)
    log_since(ours, mark, "persistent")
    assert_still_serving(ours, good)


# --------------------------------------------------------------------------------------------
# Framing and decoding (ours: our size limit; both: undecodable frames)


def test_frame_over_size_limit_closes_before_buffering(ours, good):
    mark = log_mark(ours)
    with RawClient(ours.addr) as evil:
        evil.handshake()
        evil.send_raw(struct.pack(">I", 0xFFFFFFF0) + b"x" * 1000)
        assert_closed(evil)
    log_since(ours, mark, "exceeds the limit")
    assert_still_serving(ours, good)


def test_frame_over_size_limit_in_handshake(ours, good):
    with RawClient(ours.addr) as evil:
        evil.read_greeting()
        evil.send_raw(struct.pack(">I", 0x7FFFFFFF))
        assert_closed(evil)
    assert_still_serving(ours, good)


def test_http_request_instead_of_zeo(ours, good):
    # "GET " read as a length is ~1.1 GB: over our default limit, refused at once.
    with RawClient(ours.addr) as evil:
        evil.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert_closed(evil)
    assert_still_serving(ours, good)


@pytest.mark.parametrize("letter", [b"Z", b"M"])
@pytest.mark.parametrize("payload", [b"garbage", b"", b"\x80\x03(K\x01", b"\xc1\xc1",
                                     b"\x94\x01\xc2"])
def test_garbage_after_handshake(server, good, letter, payload):
    with RawClient(server.addr) as evil:
        evil.handshake(letter)
        evil.send_frame(payload)
        if server.kind == "ours" and payload == b"\x94\x01\xc2" and letter == b"M":
            assert_refused(evil, 1)  # msgid 1, two-way: told, not dropped
        else:
            assert_closed(evil)
    assert_still_serving(server, good)


@pytest.mark.parametrize("letter", [b"Z", b"M"])
def test_garbage_after_register(server, good, letter):
    with RawClient(server.addr) as evil:
        evil.handshake(letter)
        evil.register("1", False)
        evil.send_frame(b"\xff" * 37)
        assert_closed(evil)
    assert_still_serving(server, good)


@pytest.mark.parametrize("first", [b"Z4", b"Z3101", b"M4", b"Z55"])
def test_bad_handshake_closes(server, good, first):
    with RawClient(server.addr) as evil:
        evil.read_greeting()
        evil.send_frame(first)
        assert_closed(evil)
    assert_still_serving(server, good)


def test_unknown_letter_closes(server, good):
    # Real ZEO logs an AssertionError and only closes at the next frame (zeo-facts §1.2);
    # ours closes at once.  Both must be closed once a message follows.
    with RawClient(server.addr) as evil:
        evil.read_greeting()
        evil.send_frame(b"X5")
        if server.kind == "ref":
            evil.send_frame(PickleCodec().encode((1, False, "register", ("1", 0))))
        assert_closed(evil)
    assert_still_serving(server, good)


@pytest.mark.parametrize("first", [b"X5", b""])
def test_bad_first_frame_closes_at_once_on_ours(ours, good, first):
    # Real ZEO 6.2 leaves both open (an empty first frame: no close at all, observed).
    with RawClient(ours.addr) as evil:
        evil.read_greeting()
        evil.send_frame(first)
        assert_closed(evil)
    assert_still_serving(ours, good)


# --------------------------------------------------------------------------------------------
# Dispatch rules (both servers close)


@pytest.mark.parametrize("letter", [b"Z", b"M"])
@pytest.mark.parametrize("name", ["ping", "loadBefore", "tpc_begin", "get_info"])
def test_call_before_register_closes(server, good, letter, name):
    mark = log_mark(server)
    with RawClient(server.addr) as evil:
        evil.handshake(letter)
        evil.send_message((1, False, name, (Z64, MAXTID) if name == "loadBefore" else ()))
        assert_closed(evil)
    if server.kind == "ours":
        log_since(server, mark, repr(name))
    assert_still_serving(server, good)


def test_failed_register_keeps_connection(server, good):
    # zeo-facts Appendix A: an unknown storage is an error reply; the connection stays usable.
    with RawClient(server.addr) as c:
        c.handshake()
        with pytest.raises(RemoteError) as info:
            c.register("nope", False)
        assert info.value.args == ("builtins.ValueError", ("unknown storage: nope",))
        assert c.register("1", True) is not None
        assert c.call("ping") is None
    assert_still_serving(server, good)


@pytest.mark.parametrize("letter", [b"Z", b"M"])
def test_second_register_closes(server, good, letter):
    with RawClient(server.addr) as evil:
        evil.handshake(letter)
        evil.register("1", False)
        evil.send_message((2, False, "register", ("1", False)))
        assert_closed(evil)
    assert_still_serving(server, good)


@pytest.mark.parametrize("letter", [b"Z", b"M"])
@pytest.mark.parametrize("name", ["no_such_method", "load", "undo", "__init__", "_commit",
                                  "close", "ruok", ".reply"])
def test_unknown_method_closes(server, good, letter, name):
    with RawClient(server.addr) as evil:
        evil.handshake(letter)
        evil.register("1", False)
        evil.send_message((2, False, name, ()))
        assert_closed(evil)
    assert_still_serving(server, good)


@pytest.mark.parametrize("letter", [b"Z", b"M"])
@pytest.mark.parametrize("call", [
    ("storea", (Z64, Z64, RECORD, 42)),
    ("deleteObject", (Z64, Z64, 42)),
    ("checkCurrentSerialInTransaction", (Z64, Z64, 42)),
    ("undoa", (b"AAAAAAAAAAA=", 42)),
    ("storea", ()),  # wrong arity
])
def test_failing_oneway_closes(server, good, letter, call):
    name, args = call
    with RawClient(server.addr) as evil:
        evil.handshake(letter)
        evil.register("1", False)
        evil.oneway(name, *args)
        assert_closed(evil)
    assert_still_serving(server, good)


def test_oneway_write_on_read_only_connection_closes(server, good):
    with RawClient(server.addr) as evil:
        evil.handshake()
        evil.register("1", True)
        evil.oneway("tpc_begin", 7, b"", b"", {}, None, " ")
        assert_closed(evil)
    assert_still_serving(server, good)


def test_failed_twoway_call_keeps_connection(server, good):
    with RawClient(server.addr) as c:
        c.handshake()
        c.register("1", False)
        with pytest.raises(RemoteError) as info:
            c.call("loadBefore", b"\0" * 7 + b"\x99", MAXTID)
        assert info.value.args[0] == "ZODB.POSException.POSKeyError"
        with pytest.raises(RemoteError) as info:
            c.call("vote", 123)
        assert info.value.args == ("ZODB.POSException.StorageTransactionError", (None, 123))
        assert c.call("ping") is None
    assert_still_serving(server, good)


def test_disconnect_mid_transaction_releases_lock(server, good):
    """A client that voted (holds the commit lock) and vanishes must not block the others."""
    c = RawClient(server.addr)
    c.handshake()
    c.register("1", False)
    [oid] = c.call("new_oids", 1)
    c.oneway("tpc_begin", 77, b"", b"", {}, None, " ")
    c.oneway("storea", oid, Z64, RECORD, 77)
    assert tuple(c.call("vote", 77)) == ()
    c.close()
    assert_still_serving(server, good)


# --------------------------------------------------------------------------------------------
# Memory and CPU bombs (ours)


def _laughs(depth: int, fanout: int = 10, tuples: bool = False) -> bytes:
    """Pickle ops leaving on the stack a DAG of ``fanout**depth`` leaves in ~``depth*fanout*2``
    bytes, through memo references (BINPUT/BINGET)."""
    out = bytearray(b"N" + b"q\x00")
    for k in range(1, depth + 1):
        refs = (b"h" + bytes([k - 1])) * fanout
        out += (b"(" + refs + b"t" if tuples else b"](" + refs + b"e") + b"q" + bytes([k])
    return bytes(out)


_LIMITED_RUNZEO = (
    "import resource, runpy, sys; "
    "resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv.pop(1)),) * 2); "
    "sys.argv[0] = 'runzeo'; runpy.run_module('ZEO.runzeo', run_name='__main__')"
)


@pytest.fixture
def ours_limited(tmp_path):
    """Our server in its own process with a 1.5 GB address-space limit: a bomb that makes it
    allocate without bound fails there with MemoryError instead of eating the machine."""
    conf, addr = write_config(tmp_path, filestorage_conf(tmp_path / "Data.fs"))
    argv = [sys.executable, "-c", _LIMITED_RUNZEO, str(1536 * 2**20), "-C", str(conf)]
    srv = ServerProcess(argv, addr, tmp_path / "ours-server.log")
    srv.kind = "ours"
    yield srv
    srv.stop(timeout=5)


def assert_bomb_refused(srv, payload: bytes) -> None:
    """A registered client sends ``payload`` as a frame: it is closed, unanswered, and the
    server allocated nothing it could not (no MemoryError under its limit) and serves on."""
    good = registered(srv.addr)
    with registered(srv.addr, b"Z") as evil:
        evil.send_frame(payload)
        assert_refused(evil)  # not answered with a reply
    assert "MemoryError" not in srv.log()
    assert_still_serving(srv, good)
    good.close()


@pytest.mark.timeout(90)
def test_shared_reference_bomb_as_msgid(ours_limited):
    """A msgid the server must echo, whose pickled form is exponential without the memo."""
    payload = b"\x80\x03(" + _laughs(30, tuples=True) + b"\x89" + _binunicode("ping") + b")t."
    assert_bomb_refused(ours_limited, payload)


@pytest.mark.timeout(90)
def test_shared_reference_bomb_as_argument(ours_limited):
    srv = ours_limited
    good = registered(srv.addr)
    with RawClient(srv.addr) as evil:
        evil.handshake(b"Z")
        evil.send_frame(_register_with(_laughs(30)))
        assert_refused(evil, 1)
    assert "MemoryError" not in srv.log()
    assert_still_serving(srv, good)
    good.close()


def test_many_frames_in_one_segment_then_garbage(ours, good):
    """Good calls before a bad frame in the same TCP segment are answered, then it closes."""
    codec = PickleCodec()
    with RawClient(ours.addr) as evil:
        evil.handshake(b"Z")
        evil.send_raw(encode_frame(codec.encode((1, False, "register", ("1", False))))
                      + encode_frame(codec.encode((2, False, "ping", ())))
                      + encode_frame(b"garbage"))
        assert evil.recv_message()[:3] == (1, 0, ".reply")
        assert evil.recv_message() == (2, 0, ".reply", None)
        with pytest.raises(ConnectionClosed):
            while True:
                evil.recv_frame()
    assert_still_serving(ours, good)


def test_msgpack_client_on_pickle_server(server, good):
    """§1.2: the codec follows the client's letter, whatever the server announced."""
    with RawClient(server.addr) as c:
        assert c.handshake(b"M") == b"Z5"
        assert isinstance(c.codec, MsgpackCodec)
        assert len(c.register("1", True)) == 8
        assert c.call("ping") is None
        # string msgids are echoed unchanged
        c.send_message(("anything", False, "ping", ()))
        assert c.recv_message() == ("anything", 0, ".reply", None)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("memo_op", [
    b"r" + (2**31 - 1).to_bytes(4, "little"),  # LONG_BINPUT: the memo grows to that index
    b"p2147483647\n",  # PUT, the text form
])
def test_memo_index_bomb(ours_limited, memo_op):
    """A 20-byte frame whose memo index would make the unpickler allocate 16 GiB."""
    assert_bomb_refused(ours_limited, b"\x80\x03N" + memo_op + b".")


@pytest.mark.timeout(90)
def test_memo_index_bomb_in_a_record_meets_conflict_resolution(ours_limited):
    """A stored record is unpickled on the server only to resolve a conflict: still refused."""
    srv = ours_limited
    good = registered(srv.addr)
    oid, _tid = commit_one(good)
    bomb = b"\x80\x03N" + b"r" + (2**31 - 1).to_bytes(4, "little") + b"."
    with registered(srv.addr, b"Z") as evil:
        evil.oneway("tpc_begin", 901, b"", b"", {}, None, " ")
        evil.oneway("storea", oid, Z64, bomb + bomb, 901)  # a stale serial: a conflict
        with pytest.raises(RemoteError) as e:
            evil.call("vote", 901)
        assert "ConflictError" in e.value.args[0]
        evil.call("tpc_abort", 901)
    assert "MemoryError" not in srv.log()
    assert "left unresolved: pickle memo index" in srv.log()
    assert_still_serving(srv, good)
    good.close()
