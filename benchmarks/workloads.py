"""Benchmark workloads, one client process per invocation.

This file runs unchanged under our ZEO and under the reference ZEO 6.2: it uses only the public
client API (``ZEO.client``, ``ZEO.DB``, ``ClientStorage.load``/``ping``/``server_status``,
``transaction``, ``ZODB.blob.Blob``) and classes every ZODB install has (``PersistentMapping``,
``OOBTree``), so records written by one client library read back under the other.

Usage (driven by ``run.py``)::

    python workloads.py WORKLOAD --addr HOST:PORT --data-dir DIR --params JSON \
        [--index K --nprocs N]

``--addr relstorage:DSN`` runs the workload on RelStorage used directly (no ZEO server): the
alternative to our server in front of PostgreSQL (``run.py --storage relstorage``).

Protocol on stdout, one line each: the worker connects and prepares, prints ``READY``, then waits
for ``GO <start> <deadline>`` (wall-clock seconds) on stdin, sleeps until ``start``, runs until
``deadline`` or its fixed count, and prints ``RESULT <json>``.  A failure prints ``ERROR <json>``
and exits 1.  Every loop is bounded by a count or the deadline, so a worker always stops.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

MiB = 1 << 20

# Shared layout of the database each round builds (by ``bulk_add``):
#   root["tree"]      OOBTree int -> PersistentMapping(v=int, s=str): the small objects
#   root["counters"]  OOBTree int -> PersistentMapping(n=int): 20 per commit process (8 procs)
#   root["heavy"]     OOBTree int -> PersistentMapping: 20 per large-transaction writer (8 procs)
COUNTERS_PER_PROC = 20
MAX_PROCS = 8
OIDS_FILE = "tree-oids.json"


class Context:
    """What a workload gets: where the server is, its parameters, and the start barrier."""

    def __init__(self, addr: tuple[str, int] | str, data_dir: str, params: dict[str, Any],
                 index: int, nprocs: int) -> None:
        self.addr = addr
        #: RelStorage used directly: the DSN of its PostgreSQL database (else None).
        self.dsn = addr[len("relstorage:"):] if isinstance(addr, str) else None
        self.data_dir = data_dir
        self.params = params
        self.index = index
        self.nprocs = nprocs
        self.start = 0.0
        self.deadline = 0.0

    def ready(self) -> None:
        """Report readiness, block until the runner says go, then sleep until the common start."""
        print("READY", flush=True)
        line = sys.stdin.readline().split()
        if not line or line[0] != "GO":
            raise SystemExit("runner went away before GO")
        self.start, self.deadline = float(line[1]), float(line[2])
        delay = self.start - time.time()
        if delay > 0:
            time.sleep(delay)

    def expired(self) -> bool:
        return time.time() >= self.deadline

    def _relstorage(self):
        import ZODB.config

        return ZODB.config.storageFromString(
            f"%import relstorage\n<relstorage>\n  <postgresql>\n    dsn {self.dsn}\n"
            "  </postgresql>\n</relstorage>\n")

    def storage(self, **kw: Any):
        if self.dsn is not None:
            return self._relstorage()
        import ZEO

        return ZEO.client(self.addr, wait_timeout=60, **kw)

    def db(self, **kw: Any):
        if self.dsn is not None:
            import ZODB

            return ZODB.DB(self._relstorage())
        import ZEO

        return ZEO.DB(self.addr, wait_timeout=60, **kw)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def latency_summary(prefix: str, ns: list[int]) -> dict[str, float]:
    us = sorted(v / 1000.0 for v in ns)
    if not us:
        return {}
    return {
        f"{prefix}_p50_us": percentile(us, 50),
        f"{prefix}_p99_us": percentile(us, 99),
        f"{prefix}_mean_us": sum(us) / len(us),
        f"{prefix}_count": len(us),
    }


def _new_tm():
    import transaction

    return transaction.TransactionManager()


def _open(db):
    tm = _new_tm()
    return tm, db.open(tm)


# --------------------------------------------------------------------------- workloads


def w_info(ctx: Context) -> dict[str, Any]:
    """Versions of the libraries this interpreter imports (no server needed)."""
    import importlib.metadata as md
    import platform

    import ZODB

    import ZEO

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = None
    ctx.ready()
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "zeo_file": ZEO.__file__,
        "zeo_version": version("ZEO") or version("zeo-ng"),
        "zodb_version": getattr(ZODB, "__version__", None) or version("ZODB"),
        "uvloop": uv,
    }


def w_ping(ctx: Context) -> dict[str, Any]:
    """Round trips of ``ping`` from one client, one at a time."""
    n = int(ctx.params["pings"])
    st = ctx.storage()
    try:
        for _ in range(min(200, n)):
            st.ping()
        ctx.ready()
        lat = []
        clock = time.perf_counter_ns
        t0 = time.perf_counter()
        for _ in range(n):
            a = clock()
            st.ping()
            lat.append(clock() - a)
        elapsed = time.perf_counter() - t0
    finally:
        st.close()
    return {"ops": n, "elapsed": elapsed, **latency_summary("ping", lat)}


def w_bulk_add(ctx: Context) -> dict[str, Any]:
    """Add ``objects`` small objects to a BTree in transactions of ``batch``; build the layout."""
    from BTrees.OOBTree import OOBTree
    from persistent.mapping import PersistentMapping

    n = int(ctx.params["objects"])
    batch = int(ctx.params.get("batch", 1000))
    db = ctx.db()
    try:
        tm, conn = _open(db)
        root = conn.root()
        ctx.ready()
        t0 = time.perf_counter()
        tm.begin()
        tree = root["tree"] = OOBTree()
        for i in range(n):
            tree[i] = PersistentMapping({"v": i, "s": "item-%08d" % i})
            if (i + 1) % batch == 0:
                tm.commit()
                tm.begin()
        tm.commit()
        elapsed = time.perf_counter() - t0
        # Untimed: the objects the other workloads change.
        tm.begin()
        for name in ("counters", "heavy"):
            t = root[name] = OOBTree()
            for i in range(COUNTERS_PER_PROC * MAX_PROCS):
                t[i] = PersistentMapping({"n": 0})
        tm.commit()
        oids = [tree[i]._p_oid.hex() for i in range(n)]
        conn.close()
    finally:
        db.close()
    with open(os.path.join(ctx.data_dir, OIDS_FILE), "w") as f:
        json.dump(oids, f)
    return {"ops": n, "elapsed": elapsed, "objs_per_s": n / elapsed}


def _tree_oids(ctx: Context) -> list[bytes]:
    with open(os.path.join(ctx.data_dir, OIDS_FILE)) as f:
        return [bytes.fromhex(h) for h in json.load(f)]


def w_cold_load(ctx: Context) -> dict[str, Any]:
    """``storage.load`` of every small object once, in oid order, from an empty client cache."""
    return _load_each(ctx, _tree_oids(ctx))


def _load_each(ctx: Context, oids: list[bytes]) -> dict[str, Any]:
    """``storage.load`` of each of ``oids`` in turn through a fresh client."""
    st = ctx.storage()
    try:
        ctx.ready()
        t0 = time.perf_counter()
        size = 0
        for oid in oids:
            size += len(st.load(oid)[0])
        elapsed = time.perf_counter() - t0
    finally:
        st.close()
    return {"ops": len(oids), "elapsed": elapsed, "objs_per_s": len(oids) / elapsed,
            "bytes": size}


def w_cold_load_random(ctx: Context) -> dict[str, Any]:
    """``storage.load`` of 5,000 of those objects in a fixed random order, empty client cache.

    No sequence to read ahead: one round trip per object on both sides.
    """
    oids = _tree_oids(ctx)
    return _load_each(ctx, random.Random(20261201).sample(oids, min(5000, len(oids))))


def w_cold_traversal(ctx: Context) -> dict[str, Any]:
    """Walk the whole BTree through a fresh ZODB connection, touching every value."""
    db = ctx.db()
    try:
        tm, conn = _open(db)
        ctx.ready()
        t0 = time.perf_counter()
        tree = conn.root()["tree"]
        count = total = 0
        for _key, value in tree.items():
            total += value["v"]
            count += 1
        elapsed = time.perf_counter() - t0
        tm.abort()
        conn.close()
    finally:
        db.close()
    return {"ops": count, "elapsed": elapsed, "objs_per_s": count / elapsed}


def w_commit(ctx: Context) -> dict[str, Any]:
    """Commit transactions changing 5 objects of this process's own slice, until the deadline."""
    max_txns = int(ctx.params.get("max_txns", 100000))
    db = ctx.db()
    try:
        tm, conn = _open(db)
        counters = conn.root()["counters"]
        base = ctx.index * COUNTERS_PER_PROC
        mine = [counters[base + j] for j in range(COUNTERS_PER_PROC)]
        for pm in mine:
            pm["n"]  # load now, not in the timed loop
        tm.abort()
        ctx.ready()
        count = 0
        t0 = time.perf_counter()
        while count < max_txns and not ctx.expired():
            tm.begin()
            for j in range(5):
                pm = mine[(count * 5 + j) % COUNTERS_PER_PROC]
                pm["n"] += 1
            tm.commit()
            count += 1
        elapsed = time.perf_counter() - t0
        conn.close()
    finally:
        db.close()
    return {"ops": count, "elapsed": elapsed, "txn_per_s": count / elapsed}


def w_mix(ctx: Context) -> dict[str, Any]:
    """90% read transactions (10 random objects), 10% write transactions (5 of our own objects)."""
    from ZODB.POSException import ConflictError

    n = int(ctx.params["objects"])
    max_ops = int(ctx.params.get("max_ops", 1000000))
    rng = random.Random(1000 + ctx.index)
    mine = [k for k in range(n) if k % ctx.nprocs == ctx.index]
    db = ctx.db()
    reads = writes = conflicts = 0
    try:
        tm, conn = _open(db)
        tree = conn.root()["tree"]
        tm.abort()
        ctx.ready()
        t0 = time.perf_counter()
        while reads + writes < max_ops and not ctx.expired():
            tm.begin()
            if rng.random() < 0.1:
                for key in rng.sample(mine, 5):
                    tree[key]["v"] += 1
                try:
                    tm.commit()
                except ConflictError:
                    tm.abort()
                    conflicts += 1
                writes += 1
            else:
                for key in rng.sample(range(n), 10):
                    tree[key]["v"]
                tm.abort()
                reads += 1
        elapsed = time.perf_counter() - t0
        conn.close()
    finally:
        db.close()
    ops = reads + writes
    return {"ops": ops, "elapsed": elapsed, "ops_per_s": ops / elapsed, "reads": reads,
            "writes": writes, "conflicts": conflicts}


def w_txn_start(ctx: Context) -> dict[str, Any]:
    """Transactions that read 10 objects already in the connection's cache, until the deadline:
    the cost of starting a transaction (RelStorage used directly polls the database at each
    start; a ZEO client learns of changes from the invalidations the server pushes)."""
    n = int(ctx.params["objects"])
    max_ops = int(ctx.params.get("max_ops", 1000000))
    db = ctx.db()
    try:
        tm, conn = _open(db)
        tree = conn.root()["tree"]
        keys = list(range(0, n, max(1, n // 100)))[:100]
        values = [tree[k] for k in keys]
        for v in values:
            v["v"]  # loaded now, not in the timed loop
        tm.abort()
        ctx.ready()
        count = 0
        t0 = time.perf_counter()
        while count < max_ops and not ctx.expired():
            tm.begin()
            for j in range(10):
                values[(count + j) % len(values)]["v"]
            tm.abort()
            count += 1
        elapsed = time.perf_counter() - t0
        conn.close()
    finally:
        db.close()
    return {"ops": count, "elapsed": elapsed, "txn_per_s": count / elapsed}


def w_load_under_commit(ctx: Context) -> dict[str, Any]:
    """Index 0 times cold loads; the others commit ~1 MiB transactions until the deadline."""
    if ctx.index == 0:
        oids = _tree_oids(ctx)
        random.Random(7).shuffle(oids)
        st = ctx.storage()
        lat = []
        try:
            ctx.ready()
            clock = time.perf_counter_ns
            t0 = time.perf_counter()
            for oid in oids:
                if ctx.expired():
                    break
                a = clock()
                st.load(oid)
                lat.append(clock() - a)
            elapsed = time.perf_counter() - t0
        finally:
            st.close()
        return {"role": "probe", "ops": len(lat), "elapsed": elapsed,
                **latency_summary("load", lat)}
    size = int(ctx.params.get("heavy_record", 50000))
    max_txns = int(ctx.params.get("max_txns", 100000))
    rng = random.Random(ctx.index)
    payloads = [rng.randbytes(size) for _ in range(COUNTERS_PER_PROC + 7)]
    db = ctx.db()
    try:
        tm, conn = _open(db)
        heavy = conn.root()["heavy"]
        base = (ctx.index - 1) * COUNTERS_PER_PROC
        mine = [heavy[base + j] for j in range(COUNTERS_PER_PROC)]
        for pm in mine:
            pm["n"]
        tm.abort()
        ctx.ready()
        count = 0
        t0 = time.perf_counter()
        while count < max_txns and not ctx.expired():
            tm.begin()
            for j, pm in enumerate(mine):
                pm["d"] = payloads[(count + j) % len(payloads)]
            tm.commit()
            count += 1
        elapsed = time.perf_counter() - t0
        conn.close()
    finally:
        db.close()
    return {"role": "writer", "ops": count, "elapsed": elapsed, "txn_per_s": count / elapsed,
            "mb_per_s": count * size * COUNTERS_PER_PROC / MiB / elapsed}


def w_records(ctx: Context) -> dict[str, Any]:
    """Write ``txns`` transactions of ``per_txn`` 1 MiB records, then read them cold."""
    from BTrees.OOBTree import OOBTree
    from persistent.mapping import PersistentMapping

    txns = int(ctx.params["record_txns"])
    per_txn = int(ctx.params.get("records_per_txn", 4))
    rng = random.Random(3)
    payloads = [rng.randbytes(MiB) for _ in range(per_txn * 2)]
    db = ctx.db()
    try:
        tm, conn = _open(db)
        root = conn.root()
        tm.begin()
        container = root["records"] = OOBTree()
        tm.commit()
        ctx.ready()
        objs = []
        t0 = time.perf_counter()
        for t in range(txns):
            tm.begin()
            for j in range(per_txn):
                pm = PersistentMapping({"d": payloads[(t + j) % len(payloads)]})
                container[t * per_txn + j] = pm
                objs.append(pm)
            tm.commit()
        write_elapsed = time.perf_counter() - t0
        oids = [pm._p_oid for pm in objs]
        conn.close()
    finally:
        db.close()
    st = ctx.storage()
    try:
        size = 0
        t0 = time.perf_counter()
        for oid in oids:
            size += len(st.load(oid)[0])
        read_elapsed = time.perf_counter() - t0
    finally:
        st.close()
    mib = size / MiB
    return {"ops": len(oids), "elapsed": write_elapsed + read_elapsed, "mib": mib,
            "write_mb_per_s": mib / write_elapsed, "read_mb_per_s": mib / read_elapsed}


def w_blobs(ctx: Context) -> dict[str, Any]:
    """Commit ``blobs`` 10 MiB blobs one per transaction, then read them from a fresh client."""
    from BTrees.OOBTree import OOBTree
    from ZODB.blob import Blob

    count = int(ctx.params["blobs"])
    size = int(ctx.params.get("blob_size", 10 * MiB))
    payload = random.Random(5).randbytes(size)
    storage = ctx.params.get("blob_storage", "blob")
    db = ctx.db(storage=storage, blob_dir=os.path.join(ctx.data_dir, f"blobs-w-{os.getpid()}"))
    try:
        tm, conn = _open(db)
        root = conn.root()
        tm.begin()
        container = root["blobs"] = OOBTree()
        tm.commit()
        ctx.ready()
        # Each blob is timed from a written-back disk (the sync is not timed): writeback of
        # the previous blob's 20 MiB (the client's file and the server's, the same bytes for
        # either server) otherwise lands at random in the next one's time, which moved this
        # row 0.84-3.98x between rounds.  ``local`` is ZODB writing the blob's file (the same
        # code on either side: what this machine's page cache costs right then); the commit
        # is the rest.
        write_elapsed = local_elapsed = 0.0
        for i in range(count):
            os.sync()
            t0 = time.perf_counter()
            tm.begin()
            blob = Blob()
            with blob.open("w") as f:
                f.write(payload)
            local_elapsed += time.perf_counter() - t0
            container[i] = blob
            tm.commit()
            write_elapsed += time.perf_counter() - t0
        conn.close()
    finally:
        db.close()
    # The reads below download into a fresh blob cache: start them with the writes above on
    # disk, not in the middle of their writeback, which would throttle the downloads.
    os.sync()
    db = ctx.db(storage=storage, blob_dir=os.path.join(ctx.data_dir, f"blobs-r-{os.getpid()}"))
    try:
        tm, conn = _open(db)
        container = conn.root()["blobs"]
        total = 0
        t0 = time.perf_counter()
        for i in range(count):
            with container[i].open("r") as f:
                while chunk := f.read(MiB):
                    total += len(chunk)
        read_elapsed = time.perf_counter() - t0
        tm.abort()
        conn.close()
    finally:
        db.close()
    if total != count * size:
        raise AssertionError(f"read {total} blob bytes, wrote {count * size}")
    mib = total / MiB
    return {"ops": count, "elapsed": write_elapsed + read_elapsed, "mib": mib,
            "write_mb_per_s": mib / write_elapsed, "read_mb_per_s": mib / read_elapsed,
            "local_write_ms": local_elapsed / count * 1e3,
            "commit_ms": (write_elapsed - local_elapsed) / count * 1e3}


def w_connections(ctx: Context) -> dict[str, Any]:
    """Open ``conns`` clients one after the other, then ping from all of them until the deadline."""
    m = int(ctx.params["conns_per_proc"])
    ctx.ready()
    storages = []
    connect_ns = []
    lat: list[int] = []
    lock = threading.Lock()
    try:
        t0 = time.perf_counter()
        for _ in range(m):
            a = time.perf_counter_ns()
            storages.append(ctx.storage())
            connect_ns.append(time.perf_counter_ns() - a)
        all_connected = time.perf_counter() - t0
        ping_until = max(ctx.deadline, time.time() + 0.5)

        def pinger(st) -> None:
            mine = []
            clock = time.perf_counter_ns
            while time.time() < ping_until:
                a = clock()
                st.ping()
                mine.append(clock() - a)
            with lock:
                lat.extend(mine)

        t1 = time.perf_counter()
        threads = [threading.Thread(target=pinger, args=(st,)) for st in storages]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        ping_elapsed = time.perf_counter() - t1
    finally:
        for st in storages:
            st.close()
    connect_ms = sorted(v / 1e6 for v in connect_ns)
    return {"ops": len(lat) + m, "elapsed": all_connected + ping_elapsed,
            "connect_p50_ms": percentile(connect_ms, 50), "connect_max_ms": connect_ms[-1],
            "all_connected_s": all_connected, "pings_per_s": len(lat) / ping_elapsed,
            **latency_summary("ping", lat)}


WORKLOADS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "info": w_info,
    "ping": w_ping,
    "bulk_add": w_bulk_add,
    "cold_load": w_cold_load,
    "cold_load_random": w_cold_load_random,
    "cold_traversal": w_cold_traversal,
    "commit": w_commit,
    "mix": w_mix,
    "txn_start": w_txn_start,
    "load_under_commit": w_load_under_commit,
    "records": w_records,
    "blobs": w_blobs,
    "connections": w_connections,
}


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("workload", choices=sorted(WORKLOADS))
    p.add_argument("--addr", default="127.0.0.1:0")
    p.add_argument("--data-dir", default=".")
    p.add_argument("--params", default="{}")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--nprocs", type=int, default=1)
    a = p.parse_args(argv)
    if a.addr.startswith("relstorage:"):
        addr: tuple[str, int] | str = a.addr
    else:
        host, _, port = a.addr.rpartition(":")
        addr = (host, int(port))
    ctx = Context(addr, a.data_dir, json.loads(a.params), a.index, a.nprocs)
    try:
        result = WORKLOADS[a.workload](ctx)
    except BaseException as e:  # report everything to the runner, then fail
        print("ERROR " + json.dumps({"error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()}), flush=True)
        return 1
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
