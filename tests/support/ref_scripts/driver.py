"""Run by the reference venv's python: real ZEO 6.2 clients driven by JSON commands.

Protocol: one JSON object per line on stdin, e.g. ``{"op": "open", "name": "a", "addr": [h, p]}``;
one JSON object per line on stdout: ``{"ok": result}`` or ``{"error": "pkg.Class", "msg": str}``.
Bytes travel as hex strings.  Each client ``name`` owns a ClientStorage, a DB, a transaction
manager and one open connection, so it behaves like one application process.
"""

import json
import sys
import time
import traceback

import transaction
import ZODB
from BTrees.Length import Length
from ZODB.utils import p64, u64

import ZEO.ClientStorage

assert "site-packages" in ZEO.__file__, ZEO.__file__  # the reference ZEO, never ours

clients = {}


def _addr(a):
    return a if isinstance(a, str) else tuple(a)


def _root(c):
    return c["conn"].root()


def _hex(b):
    return None if b is None else b.hex()


def op_open(name, addr, storage="1", **options):
    options.setdefault("wait_timeout", 30)
    cs = ZEO.ClientStorage.ClientStorage(_addr(addr), storage=storage, **options)
    db = ZODB.DB(cs)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    clients[name] = {"cs": cs, "db": db, "tm": tm, "conn": conn}
    proto = getattr(cs, "protocol_version", None)
    return {"protocol": proto.decode() if isinstance(proto, bytes) else proto,
            "last_tid": _hex(cs.lastTransaction()), "interfaces": sorted(
                i.__name__ for i in __import__("zope.interface").interface.providedBy(cs))}


def op_close(name):
    c = clients.pop(name)
    c["conn"].close()
    c["db"].close()


def op_set(name, items, description=""):
    """Set root keys to JSON values and commit; returns the tid."""
    c = clients[name]
    c["tm"].begin()
    root = _root(c)
    for k, v in items.items():
        root[k] = v
    txn = c["tm"].get()
    if description:
        txn.note(description)
    c["tm"].commit()
    return _hex(c["cs"].lastTransaction())


def op_get(name, keys):
    """Start a new transaction (as an application would) and read root keys."""
    c = clients[name]
    c["tm"].begin()
    root = _root(c)
    out = {}
    for k in keys:
        v = root.get(k)
        out[k] = v() if isinstance(v, Length) else v
    return out


def op_last_tid(name):
    return _hex(clients[name]["cs"].lastTransaction())


def op_wait_tid(name, tid, timeout=20):
    """Wait until this client has processed the invalidation for ``tid``."""
    cs = clients[name]["cs"]
    deadline = time.monotonic() + timeout
    while cs.lastTransaction() < bytes.fromhex(tid):
        if time.monotonic() > deadline:
            raise AssertionError(f"no invalidation for {tid} after {timeout}s")
        time.sleep(0.01)
    return _hex(cs.lastTransaction())


def op_make_length(name, key):
    c = clients[name]
    c["tm"].begin()
    _root(c)[key] = Length()
    c["tm"].commit()
    return _hex(c["cs"].lastTransaction())


def op_begin(name):
    clients[name]["tm"].begin()


def op_length_change(name, key, delta):
    """Change a BTrees.Length in the current transaction without committing."""
    _root(clients[name])[key].change(delta)


def op_commit(name):
    c = clients[name]
    try:
        c["tm"].commit()
    except Exception:
        c["tm"].abort()
        raise
    return _hex(c["cs"].lastTransaction())


def op_set_nocommit(name, items):
    root = _root(clients[name])
    for k, v in items.items():
        root[k] = v


def op_undo_log(name, first=0, last=20):
    return [{"id": d["id"].decode("ascii"), "description": d["description"].decode()
             if isinstance(d["description"], bytes) else d["description"]}
            for d in clients[name]["db"].undoLog(first, last)]


def op_undo(name, undo_id):
    c = clients[name]
    c["db"].undo(undo_id.encode("ascii"), c["tm"].get())
    c["tm"].commit()
    return _hex(c["cs"].lastTransaction())


def op_iterate(name, start=None, stop=None):
    out = []
    cs = clients[name]["cs"]
    it = cs.iterator(start and bytes.fromhex(start), stop and bytes.fromhex(stop))
    for txn in it:
        desc = txn.description
        out.append({"tid": txn.tid.hex(), "status": txn.status,
                    "description": desc.decode() if isinstance(desc, bytes) else desc,
                    "records": [[r.oid.hex(), r.tid.hex(), r.data is not None] for r in txn]})
    return out


def op_history(name, oid="0000000000000000", size=100):
    return [{"tid": h["tid"].hex(), "size": h["size"]}
            for h in clients[name]["cs"].history(bytes.fromhex(oid), size=size)]


def op_pack(name, days=0):
    clients[name]["db"].pack(days=days)


def op_load_before(name, oid, tid):
    r = clients[name]["cs"].loadBefore(bytes.fromhex(oid), bytes.fromhex(tid))
    return None if r is None else [r[0].hex(), r[1].hex(), _hex(r[2])]


def op_new_oid(name):
    return clients[name]["cs"].new_oid().hex()


def op_server_status(name):
    return clients[name]["cs"].server_status()


def op_info(name):
    cs = clients[name]["cs"]
    return {"len": len(cs), "size": cs.getSize(), "name": cs.getName(),
            "supportsUndo": bool(cs.supportsUndo()), "read_only": bool(cs.isReadOnly())}


def op_tid_int(tid):
    return u64(bytes.fromhex(tid))


def op_p64(n):
    return p64(n).hex()


def main():
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            result = {"ok": globals()["op_" + op](**cmd)}
        except Exception as e:
            cls = type(e)
            result = {"error": f"{cls.__module__}.{cls.__qualname__}", "msg": str(e)[:500],
                      "tb": traceback.format_exc()[-2000:]}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    for c in list(clients):
        op_close(c)


if __name__ == "__main__":
    main()
