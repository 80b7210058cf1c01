"""Benchmark a fleet of our servers over one PostgreSQL database (docs/fleet.rst).

    python3 benchmarks/fleet.py [--seconds 5] [--readers 6] [--commits 200] [--json out.json]

Starts a throw-away PostgreSQL cluster (tests/support/postgres.py) and, for each fleet size
1, 2 and 3, that many ``runzeo`` processes over one RelStorage database, then measures:

* **read throughput**: ``--readers`` client processes spread over the servers
  (``address_policy="random"``), each loading random objects with a cache too small to hold
  them, for ``--seconds``; loads per second in total, and the servers' CPU per load (on a
  2-core machine the machine is the ceiling, so CPU per load is what says how many clients a
  server holds);
* **invalidation latency** (2 and 3 servers): a client of server 0 commits, a client of
  server 1 waits for the invalidation; median and p99 over ``--commits`` commits, with NOTIFY
  and with polling alone (``relay-poll-interval 0.1``);
* **failover time**: a client committing in a loop on server 0 of 2; server 0 is SIGKILLed;
  the time until the client's next successful commit on server 1.

Run it from a checkout with this machine's Python (ZEO from ``src/``, RelStorage and
psycopg2-binary installed: ``pip install -e '.[relstorage]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "src"))

from support.postgres import Cluster, relstorage_section  # noqa: E402
from support.servers import ServerProcess, free_port  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
OBJECTS = 5000

READER = r"""
import json, random, sys, time
import ZEO
addrs = [tuple(a) for a in json.loads(sys.argv[1])]
oids = [bytes.fromhex(h) for h in json.loads(sys.argv[2])]
seconds = float(sys.argv[3])
st = ZEO.client(addrs, address_policy="random", cache_size=64 * 1024, wait_timeout=60,
                prefetch_references=0, read_ahead=0)
rng = random.Random()
print("READY", flush=True)
sys.stdin.readline()
n = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    st.load(rng.choice(oids))
    n += 1
print(json.dumps({"loads": n, "server": list(st._server_addr)}), flush=True)
st.close()
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def start_fleet(cluster: Cluster, n: int, tmp: Path, extra: str = "") -> list[ServerProcess]:
    dsn = cluster.create_database("fleet")
    conf = tmp / f"fleet-{dsn.split()[0].split('=')[1]}.conf"
    conf.write_text(relstorage_section(dsn) + f"<zeo>\n  address 127.0.0.1:0\n{extra}\n</zeo>\n")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    servers = []
    for i in range(n):
        port = free_port()
        servers.append(ServerProcess(
            [sys.executable, "-m", "ZEO.runzeo", "-C", str(conf), "-a", f"127.0.0.1:{port}"],
            ("127.0.0.1", port), tmp / f"{conf.stem}-{i}.log", env=env))
    return servers


def populate(addr) -> list[str]:
    import transaction
    from BTrees.OOBTree import OOBTree
    from persistent.mapping import PersistentMapping

    import ZEO

    db = ZEO.DB(addr)
    oids = []
    with db.transaction() as conn:
        tree = conn.root()["tree"] = OOBTree()
        for i in range(OBJECTS):
            tree[i] = PersistentMapping(v=i, s="item-%08d" % i)
    with db.transaction() as conn:
        tree = conn.root()["tree"]
        oids = [tree[i]._p_oid.hex() for i in range(OBJECTS)]
    db.close()
    transaction.abort()
    return oids


def read_throughput(servers: list[ServerProcess], oids: list[str], readers: int,
                    seconds: float) -> dict:
    addrs = json.dumps([list(s.addr) for s in servers])
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    procs = [subprocess.Popen([sys.executable, "-c", READER, addrs, json.dumps(oids),
                               str(seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(readers)]
    for p in procs:
        assert p.stdout.readline().strip() == "READY"
    cpu0 = sum(cpu_seconds(s.proc.pid) for s in servers)
    t0 = time.monotonic()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.stdout.readline()) for p in procs]
    elapsed = time.monotonic() - t0
    cpu = sum(cpu_seconds(s.proc.pid) for s in servers) - cpu0
    for p in procs:
        p.wait(30)
    loads = sum(r["loads"] for r in results)
    spread = {}
    for r in results:
        key = f"{r['server'][0]}:{r['server'][1]}"
        spread[key] = spread.get(key, 0) + 1
    return {"loads_per_s": loads / elapsed, "server_cpu_us_per_load": cpu / loads * 1e6,
            "clients_per_server": sorted(spread.values())}


def invalidation_latency(servers: list[ServerProcess], commits: int) -> dict:
    import transaction
    from persistent.mapping import PersistentMapping

    import ZEO

    writer = ZEO.DB(servers[0].addr)
    reader = ZEO.client(servers[1].addr)
    try:
        with writer.transaction() as conn:
            conn.root()["lat"] = PersistentMapping(n=0)
        latencies = []
        tm = transaction.TransactionManager()
        conn = writer.open(tm)
        for i in range(commits):
            tm.begin()
            conn.root()["lat"]["n"] = i
            tm.commit()
            t0 = time.perf_counter()
            tid = writer.storage.lastTransaction()
            while reader.lastTransaction() < tid:
                time.sleep(0.0002)
            latencies.append(time.perf_counter() - t0)
            time.sleep(random.uniform(0.005, 0.02))
        conn.close()
    finally:
        writer.close()
        reader.close()
    latencies.sort()
    return {"median_ms": statistics.median(latencies) * 1e3,
            "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1e3}


def failover(servers: list[ServerProcess]) -> dict:
    import transaction
    from persistent.mapping import PersistentMapping

    import ZEO

    db = ZEO.DB([s.addr for s in servers], wait_timeout=60)
    try:
        with db.transaction() as conn:
            conn.root()["f"] = PersistentMapping(n=0)
        first = tuple(db.storage._server_addr)
        victim = next(s for s in servers if tuple(s.addr) == first)
        done = threading.Event()
        result: dict = {}

        def commit_loop() -> None:
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            killed_at = None
            while not done.is_set():
                try:
                    tm.begin()
                    conn.root()["f"]["n"] += 1
                    tm.commit()
                    if killed_at is None and result.get("killed_at"):
                        killed_at = result["killed_at"]
                    if killed_at is not None and tuple(db.storage._server_addr) != first:
                        result["seconds"] = time.monotonic() - killed_at
                        done.set()
                except Exception:
                    tm.abort()
                    time.sleep(0.01)
            conn.close()

        t = threading.Thread(target=commit_loop)
        t.start()
        time.sleep(1.0)
        result["killed_at"] = time.monotonic()
        os.kill(victim.proc.pid, signal.SIGKILL)
        done.wait(60)
        done.set()
        t.join(30)
        return {"failover_s": result.get("seconds")}
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--readers", type=int, default=6)
    p.add_argument("--commits", type=int, default=200)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="zeo-fleet-bench-"))
    cluster = Cluster("fleetbench")
    out: dict = {"machine": {"nproc": os.cpu_count(), "platform": platform.platform(),
                             "python": platform.python_version()},
                 "reads": {}, "latency": {}}
    try:
        for n in (1, 2, 3):
            servers = start_fleet(cluster, n, tmp)
            try:
                oids = populate(servers[0].addr)
                out["reads"][n] = read_throughput(servers, oids, a.readers, a.seconds)
                print(f"{n} server(s): {out['reads'][n]}", flush=True)
            finally:
                for s in servers:
                    s.stop()
        for label, extra in (("notify", "relay-notify true"),
                             ("polling 0.1 s", "relay-notify false\nrelay-poll-interval 0.1")):
            servers = start_fleet(cluster, 2, tmp, extra)
            try:
                out["latency"][label] = invalidation_latency(servers, a.commits)
                print(f"invalidation latency, {label}: {out['latency'][label]}", flush=True)
            finally:
                for s in servers:
                    s.stop()
        servers = start_fleet(cluster, 2, tmp)
        try:
            out["failover"] = failover(servers)
            print(f"failover: {out['failover']}", flush=True)
        finally:
            for s in servers:
                s.stop()
    finally:
        cluster.stop()
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
