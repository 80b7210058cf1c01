"""Differential wire test: the same raw session against the real ZEO 6.2 server and ours must
get the same replies (tids and times normalised), in pickle and msgpack."""

from __future__ import annotations

import itertools
import re

import pytest

from support.rawclient import RawClient, RemoteError
from support.servers import filestorage_conf, start_server

Z64 = b"\0" * 8
MAXTID = b"\x7f\xff\xff\xff\xff\xff\xff\xff"
RECORD = b"\x80\x03cpersistent.mapping\nPersistentMapping\nq\x00.}q\x01."


def _session(addr, letter: bytes) -> list:
    """A scripted raw session; every reply (or error reply) in order."""
    out: list = []
    counter = itertools.count(1000)

    def call(c: RawClient, name: str, *args):
        try:
            out.append((name, c.call(name, *args)))
        except RemoteError as e:
            out.append((name, "error", e.args[0], e.args[1]))
        return out[-1][1]

    with RawClient(addr) as a, RawClient(addr) as b:
        out.append(("greeting", a.handshake(letter)))
        b.handshake(letter)
        call(a, "register", "nope", False)
        call(a, "register", "1", False)
        call(b, "register", "1", True)
        call(a, "get_info")
        call(a, "lastTransaction")
        call(a, "getInvalidations", Z64)
        call(a, "ping")
        call(a, "new_oid")
        oids = call(a, "new_oids", 3)
        call(a, "new_oids", 0)
        call(a, "loadBefore", Z64, MAXTID)
        call(a, "vote", 123)
        call(a, "tpc_finish", 123)
        call(a, "tpc_abort", 123)
        call(b, "new_oids")
        for data in (RECORD, RECORD + b" "):
            txn = next(counter)
            a.oneway("tpc_begin", txn, b"user", b"desc", {"k": "v"}, None, " ")
            a.oneway("storea", Z64, call(a, "lastTransaction"), data, txn)
            a.oneway("storea", oids[0], Z64, data, txn)
            call(a, "vote", txn)
            call(a, "tpc_finish", txn)
        out.append(("info-to-committer", a.oneways))
        out.append(("invalidations-to-b", _drain(b)))
        call(a, "loadBefore", Z64, MAXTID)
        call(a, "loadSerial", Z64, call(a, "lastTransaction"))
        call(a, "history", Z64, 5)
        call(a, "getTid", Z64)
        call(a, "getInvalidations", Z64)
        call(a, "undoLog", 0, 10)
        call(a, "undoInfo", 0, 10, {})
        it = call(a, "iterator_start", None, None)
        while True:
            t = call(a, "iterator_next", it)
            if t is None:
                break
            rit = call(a, "iterator_record_start", it, t[0])
            while call(a, "iterator_record_next", rit) is not None:
                pass
        call(a, "iterator_next", it)
        call(a, "record_iternext", None)
        status = call(a, "server_status")
        out[-1] = ("server_status", sorted(status))
        call(b, "pack", 4_000_000_000.0, True)  # read-only connections may pack
        call(a, "ping")
    return out


def _drain(c: RawClient) -> list:
    c.call("ping")  # invalidations for earlier commits were written before this reply
    got, c.oneways = c.oneways, []
    return got


_TIDISH = re.compile(rb"^\x03[\x00-\xff]{7}$|^\x04[\x00-\xff]{7}$")


def _normalise(obj, tids: dict):
    """Replace tids (8-byte values starting 03/04: 1900-2100 timestamps) by T0, T1...,
    floats by 'F', and lists by tuples (msgpack has no lists)."""
    if isinstance(obj, bytes) and len(obj) == 8 and _TIDISH.match(obj):
        return tids.setdefault(obj, f"T{len(tids)}")
    if isinstance(obj, float):
        return "F"
    if isinstance(obj, (list, tuple)):
        return tuple(_normalise(x, tids) for x in obj)
    if isinstance(obj, dict):
        skip = {"size", "name", "id"}  # file sizes and paths differ; undo ids are base64 tids
        return {k: ("?" if k in skip else _normalise(v, tids)) for k, v in obj.items()}
    return obj


@pytest.mark.parametrize("letter", [b"Z", b"M"])
def test_same_replies_as_real_zeo(tmp_path, letter):
    results = {}
    for kind in ("ref", "ours"):
        d = tmp_path / kind
        srv = start_server(kind, d, filestorage_conf(d / "Data.fs"))
        try:
            tids: dict = {}
            results[kind] = [_normalise(x, tids) for x in _session(srv.addr, letter)]
        finally:
            srv.stop(timeout=5)
    ref, ours = results["ref"], results["ours"]
    assert len(ref) == len(ours)
    for i, (r, o) in enumerate(zip(ref, ours)):
        if r[0] == "new_oid":
            # Known difference (reported): same class, our message names our class, not
            # 'ZEOStorage'.  Clients see ServerException('builtins.AttributeError', ...) either way.
            assert r[:3] == o[:3] == ("new_oid", "error", "builtins.AttributeError")
            ours[i] = r
        elif r == ("getInvalidations", None) and o != r:
            # Known difference (reported): ZEO 6.2 seeds its invalidation queue from
            # FileStorage.lastInvalidations(), empty for a new file, so it cannot cover a client
            # at z64 and answers None (the client drops its cache).  Ours knows the storage was
            # empty and answers with every oid committed since: valid, and cheaper.
            name, (tid, oids) = o
            committed = {oid for entry in ours[:i] if entry[0] == "invalidations-to-b"
                         for _name, (_tid, inv_oids) in entry[1] for oid in inv_oids}
            if tid == Z64:  # nothing committed yet
                assert oids == ()
            else:
                assert committed and tid.startswith("T") and set(oids) == committed
            ours[i] = r
    diffs = [(i, r, o) for i, (r, o) in enumerate(zip(ref, ours)) if r != o]
    assert not diffs, "\n".join(f"#{i}\n  ref:  {r!r:.400}\n  ours: {o!r:.400}"
                                for i, r, o in diffs)
    assert len(ref) == len(ours)
