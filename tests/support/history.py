"""A history checker for fault tests: every read checked against the committed history.

Clients (threads, or a separate process via ``python history.py ADDR CID SECONDS OUT``) run
:func:`run_client`: each transaction reads some objects, half of them forced to reload from
the storage and half through the ZODB object cache, and records ``(oid, snapshot, value)``;
then it writes unique values ``"<cid>:<seq>"`` to one or two objects and, when ``commit()``
returns, records the tid it got and what it wrote.

:func:`check` then opens the FileStorage itself (the server stopped) and counts

* *stale* reads: the value read in a snapshot ``before`` is not the value of the last record
  committed before ``before`` (``FileStorage.loadBefore``: the ground truth);
* *lost* commits: an acknowledged ``(tid, oid, value)`` is not in the file.
"""

from __future__ import annotations

import io
import json
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import transaction
from persistent.mapping import PersistentMapping
from ZODB.POSException import ConflictError, POSKeyError, StorageError

OBJECTS = 8


def key(i: int) -> str:
    return f"o{i}"


def populate(db: Any, objects: int = OBJECTS) -> None:
    """Create the objects the clients read and write."""
    with db.transaction() as conn:
        for i in range(objects):
            conn.root()[key(i)] = PersistentMapping(v=f"init:{i}")


@dataclass
class Record:
    """What one client saw and had acknowledged."""

    cid: str
    reads: list[tuple[bytes, bytes, str]] = field(default_factory=list)  # oid, before, value
    commits: list[tuple[bytes, dict[bytes, str]]] = field(default_factory=list)
    in_doubt: list[dict[bytes, str]] = field(default_factory=list)  # commit() raised
    errors: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({
            "cid": self.cid,
            "reads": [(o.hex(), b.hex(), v) for o, b, v in self.reads],
            "commits": [(t.hex(), {o.hex(): v for o, v in w.items()}) for t, w in self.commits],
            "in_doubt": [{o.hex(): v for o, v in w.items()} for w in self.in_doubt],
            "errors": self.errors, "unexpected": self.unexpected,
        })

    @classmethod
    def from_json(cls, text: str) -> Record:
        d = json.loads(text)
        r = cls(d["cid"], errors=d["errors"], unexpected=d["unexpected"])
        r.reads = [(bytes.fromhex(o), bytes.fromhex(b), v) for o, b, v in d["reads"]]
        r.commits = [(bytes.fromhex(t), {bytes.fromhex(o): v for o, v in w.items()})
                     for t, w in d["commits"]]
        r.in_doubt = [{bytes.fromhex(o): v for o, v in w.items()} for w in d["in_doubt"]]
        return r


def run_client(addr: Any, cid: str, stop: threading.Event | float, rec: Record,
               objects: int = OBJECTS, seed: int | None = None, **storage_kw: Any) -> None:
    """Read and write until ``stop`` is set (or for ``stop`` seconds); fill ``rec``."""
    import ZEO

    rnd = random.Random(seed)
    deadline = time.monotonic() + stop if isinstance(stop, (int, float)) else None

    def stopped() -> bool:
        if deadline is not None:
            return time.monotonic() >= deadline
        return stop.is_set()  # type: ignore[union-attr]

    storage_kw.setdefault("wait_timeout", 30)
    for _attempt in range(20):  # DB() loads the root: a fault may hit that too
        try:
            db = ZEO.DB(addr, **storage_kw)
            break
        except StorageError as e:
            rec.errors[type(e).__name__] = rec.errors.get(type(e).__name__, 0) + 1
            time.sleep(0.1)
    else:
        raise RuntimeError(f"{cid} could not open its DB")
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    seq = 0
    try:
        while not stopped():
            writes: dict[bytes, str] = {}
            committing = False
            try:
                tm.begin()
                before = conn._storage._start
                root = conn.root()
                names = rnd.sample(range(objects), rnd.randint(1, objects))
                for i in names:
                    obj = root[key(i)]
                    if rnd.random() < 0.5:
                        obj._p_invalidate()  # load from the storage, not the object cache
                    value = obj["v"]
                    rec.reads.append((obj._p_oid, before, value))
                written = [root[key(i)] for i in rnd.sample(range(objects), rnd.randint(1, 2))]
                for obj in written:
                    seq += 1
                    obj["v"] = f"{cid}:{seq}"
                    writes[obj._p_oid] = obj["v"]
                committing = True
                tm.commit()
                tids = {obj._p_serial for obj in written}
                assert len(tids) == 1, tids
                rec.commits.append((tids.pop(), writes))
            except (ConflictError, StorageError) as e:  # ClientDisconnected is a StorageError
                name = type(e).__name__
                rec.errors[name] = rec.errors.get(name, 0) + 1
                if committing and isinstance(e, StorageError) and not isinstance(
                        e, ConflictError):
                    rec.in_doubt.append(writes)  # lost connection: committed or not
                tm.abort()
                if name == "ClientDisconnected":
                    time.sleep(0.01)
            except Exception as e:
                rec.unexpected.append(f"{type(e).__name__}: {e}")
                tm.abort()
                time.sleep(0.05)
    finally:
        try:
            conn.close()
        except Exception:
            pass
        db.close()


def _value(data: bytes) -> str | None:
    """The ``v`` of a PersistentMapping record."""
    from zodbpickle import pickle

    u = pickle.Unpickler(io.BytesIO(data))
    u.persistent_load = lambda ref: ref
    u.load()  # the class
    state = u.load()
    data = state.get("data") or state.get("_container") or {}
    return data.get("v")  # None for the root


def check(data_fs: str, records: list[Record]) -> dict[str, int]:
    """Compare ``records`` with the FileStorage at ``data_fs``; return the counts."""
    from ZODB.FileStorage import FileStorage

    fs = FileStorage(data_fs, read_only=True)
    try:
        stale = lost = landed = 0
        reads = commits = 0
        examples: list[str] = []
        for rec in records:
            for oid, before, value in rec.reads:
                reads += 1
                r = fs.loadBefore(oid, before)
                truth = _value(r[0]) if r is not None else None
                if truth != value:
                    stale += 1
                    if len(examples) < 5:
                        examples.append(f"{rec.cid} read {value!r} of {oid.hex()} before "
                                        f"{before.hex()}, committed: {truth!r}")
            for tid, writes in rec.commits:
                commits += 1
                for oid, value in writes.items():
                    try:
                        ok = _value(fs.loadSerial(oid, tid)) == value
                    except POSKeyError:
                        ok = False
                    if not ok:
                        lost += 1
                        if len(examples) < 10:
                            examples.append(f"{rec.cid} lost {tid.hex()} {oid.hex()}={value}")
        if any(rec.in_doubt for rec in records):
            written = {_value(r.data) for t in fs.iterator() for r in t if r.data}
            landed = sum(1 for rec in records for w in rec.in_doubt
                         if next(iter(w.values())) in written)
        return {"reads": reads, "commits": commits, "stale": stale, "lost": lost,
                "in_doubt": sum(len(r.in_doubt) for r in records),
                "in_doubt_landed": landed, "examples": examples}  # type: ignore[dict-item]
    finally:
        fs.close()


def main(argv: list[str]) -> None:
    """``ADDR CID SECONDS OUT``: run a client in this process, write its record to OUT."""
    host, port = argv[0].rsplit(":", 1)
    rec = Record(argv[1])
    run_client((host, int(port)), argv[1], float(argv[2]), rec, seed=int(port))
    with open(argv[3], "w") as f:
        f.write(rec.to_json())


if __name__ == "__main__":
    main(sys.argv[1:])
