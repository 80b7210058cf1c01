"""One client process of the restart benchmark (benchmarks/restart.py).

Runs under any interpreter that has ZEO and ZODB: ours, or the reference ZEO 6.2 venv.  It
commits in a loop until the stop file exists: each commit bumps this worker's own counter
object, appends to one PersistentList every worker conflicts on, and every 5th commit rewrites
this worker's blob.  A ConflictError is retried after a random pause of up to 4 ms times the
conflicts in a row (at most 10).  Every event is a JSON line in the output file:

* ``commit``: ``n`` (this worker's counter, now acknowledged), ``t0`` (transaction start),
  ``t`` (acknowledged at), ``seen`` (the other workers' counters this transaction read),
  ``conflicts`` (retried before it);
* ``conflict``, ``disconnected`` (``ClientDisconnected`` or another transient error; an
  interrupted ``tpc_finish`` may or may not have committed), ``error``;
* ``stats``: the client storage's ``statistics()`` at the end, where it has them (ours).

``RESTART_CLIENT_OPTS`` (JSON) adds keyword arguments to ``ZEO.DB``, for experiments:
``'{"prefetch_references": 0}'`` for our client without reference prefetch.

``--init N`` creates the objects for N workers and exits.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import transaction
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.POSException import ConflictError

import ZEO


def _addr(text: str):
    if "/" in text:
        return text
    host, port = text.rsplit(":", 1)
    return (host, int(port))


def init(addr: str, workers: int, blob_dir: str) -> None:
    db = ZEO.DB(_addr(addr), blob_dir=blob_dir, wait_timeout=60)
    with db.transaction() as conn:
        root = conn.root()
        root["shared"] = PersistentList()
        for w in range(workers):
            root[f"c{w}"] = PersistentMapping(n=0)
            root[f"b{w}"] = Blob(b"")
    db.close()


def main(addr: str, wid: int, workers: int, stop_file: str, out_path: str,
         blob_dir: str) -> None:
    from ZEO.Exceptions import ClientDisconnected

    rng = random.Random(wid * 7919 + os.getpid())
    extra = json.loads(os.environ.get("RESTART_CLIENT_OPTS", "{}"))
    db = ZEO.DB(_addr(addr), blob_dir=blob_dir, wait_timeout=120, **extra)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    out = open(out_path, "a", buffering=1)

    def event(kind: str, **data) -> None:
        out.write(json.dumps(dict(ev=kind, w=wid, t=time.time(), **data)) + "\n")

    in_a_row = 0
    while not os.path.exists(stop_file):
        t0 = t_read = time.time()
        try:
            tm.begin()
            root = conn.root()
            seen = {str(w): root[f"c{w}"]["n"] for w in range(workers) if w != wid}
            mine = root[f"c{wid}"]
            n = mine["n"] + 1
            mine["n"] = n
            shared = root["shared"]
            shared.append((wid, n))
            t_read = time.time()
            if n % 5 == 0:
                with root[f"b{wid}"].open("w") as f:
                    f.write(os.urandom(4096))
            tm.commit()
        except ConflictError as e:
            tm.abort()
            in_a_row += 1
            serials = [s.hex() for s in (getattr(e, "serials", None) or ()) if s]
            oid = getattr(e, "oid", None)
            event("conflict", oid=oid.hex() if oid else None, serials=serials, t0=t0,
                  t_read=t_read)
            time.sleep(rng.random() * 0.004 * min(in_a_row, 10))
        except (ClientDisconnected, transaction.interfaces.TransientError) as e:
            tm.abort()
            event("disconnected", error=type(e).__name__)
            time.sleep(0.05)
        except Exception as e:  # noqa: BLE001 - logged and retried: the driver counts them
            try:
                tm.abort()
            except Exception:
                pass
            event("error", error=f"{type(e).__name__}: {e}"[:300])
            time.sleep(0.1)
        else:
            event("commit", n=n, t0=t0, seen=seen, conflicts=in_a_row,
                  tid=shared._p_serial.hex(), t_read=t_read)
            in_a_row = 0
    if hasattr(db.storage, "statistics"):
        event("stats", stats=json.loads(json.dumps(db.storage.statistics(), default=str)))
    conn.close()
    db.close()


if __name__ == "__main__":
    if sys.argv[1] == "--init":
        init(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        a = sys.argv[1:]
        main(a[0], int(a[1]), int(a[2]), a[3], a[4], a[5])
