"""A fleet: several of our servers over one PostgreSQL database (issue 24).

Three ``runzeo`` processes serve the same RelStorage database; each relays the others'
commits to its clients (ZEO.server.relay).  Checked: a commit through one server reaches the
clients of the others, with NOTIFY and by polling alone; a client registering anywhere sees
every commit made before; a server publishes the other servers' earlier commits before its
own (even when its relay is slow); conflicts across servers are ConflictErrors and resolvable
ones resolve; every client sees each writer's counter only go up.
"""

from __future__ import annotations

import threading
import time

import pytest
import transaction
from BTrees.Length import Length
from persistent.mapping import PersistentMapping
from ZODB.POSException import ConflictError

import ZEO
from support.contention import bump_lengths
from support.postgres import relstorage_section
from support.servers import start_server
from support.waiting import wait_until

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def fleet(postgres, tmp_path):
    """``fleet(n=3, zeo_extra="" or a list, one per server)``: servers over one database."""
    servers = []

    def make(n: int = 3, zeo_extra: str | list[str] = ""):
        dsn = postgres.create_database("fleet")
        extras = zeo_extra if isinstance(zeo_extra, list) else [zeo_extra] * n
        for i, extra in enumerate(extras):
            servers.append(start_server("ours", tmp_path / f"s{i}", relstorage_section(dsn),
                                        extra))
        return servers

    yield make
    for srv in servers:
        srv.stop()


def _value(db, key: str, field: str = "n"):
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        tm.begin()
        root = conn.root()
        return root[key][field] if key in root else None
    finally:
        tm.abort()
        conn.close()


@pytest.mark.parametrize("notify", [True, False], ids=["notify", "polling"])
def test_a_commit_reaches_the_clients_of_every_server(fleet, closing, notify):
    extra = "relay-notify true" if notify else "relay-notify false\nrelay-poll-interval 0.2"
    a, b, c = fleet(3, extra)
    dbs = [closing(ZEO.DB(s.addr)) for s in (a, b, c)]
    with dbs[0].transaction() as conn:
        conn.root()["x"] = PersistentMapping(n=1)
    for db in dbs[1:]:
        wait_until(lambda db=db: _value(db, "x") == 1, timeout=10)
    with dbs[2].transaction() as conn:
        conn.root()["x"]["n"] = 2
    for db in dbs[:2]:
        wait_until(lambda db=db: _value(db, "x") == 2, timeout=10)


def test_registering_anywhere_sees_every_earlier_commit(fleet, closing):
    # No NOTIFY and a slow poll: only the catch-up at registration can show the commit.
    a, b = fleet(2, "relay-notify false\nrelay-poll-interval 30")
    db_a = closing(ZEO.DB(a.addr))
    for n in range(1, 4):
        with db_a.transaction() as conn:
            conn.root()["x"] = PersistentMapping(n=n)
        db_b = ZEO.DB(b.addr)
        try:
            with db_b.transaction() as conn:
                assert conn.root()["x"]["n"] == n
        finally:
            db_b.close()


def test_a_server_publishes_earlier_commits_before_its_own(fleet, closing):
    """Server b's relay is slow (no NOTIFY, 30 s polls): its client commits after a's client
    did; before b's reply to that commit, b's client has a's change (ZEO's rule: every
    invalidation below T before the reply to tpc_finish(T))."""
    a, b = fleet(2, ["", "relay-notify false\nrelay-poll-interval 30"])
    db_a = closing(ZEO.DB(a.addr))
    with db_a.transaction() as conn:
        conn.root()["other"] = PersistentMapping(n=0)
        conn.root()["mine"] = PersistentMapping(n=0)
    db_b = closing(ZEO.DB(b.addr))  # registered after that commit: it knows both objects
    tm = transaction.TransactionManager()
    conn_b = db_b.open(tm)
    tm.begin()
    assert conn_b.root()["other"]["n"] == 0
    with db_a.transaction() as conn:
        conn.root()["other"]["n"] = 1
    # b has not relayed a's commit (its relay sleeps 30 s).  b's client commits:
    conn_b.root()["mine"]["n"] = 1
    tm.commit()
    tm.begin()
    assert conn_b.root()["other"]["n"] == 1
    conn_b.close()


def test_conflicts_across_servers(fleet, closing):
    a, b = fleet(2)
    db_a = closing(ZEO.DB(a.addr))
    db_b = closing(ZEO.DB(b.addr))
    with db_a.transaction() as conn:
        conn.root()["x"] = PersistentMapping(n=0)
        conn.root()["len"] = Length()
    wait_until(lambda: _value(db_b, "x") == 0, timeout=10)
    tm_a, tm_b = transaction.TransactionManager(), transaction.TransactionManager()
    ca, cb = db_a.open(tm_a), db_b.open(tm_b)
    tm_a.begin()
    tm_b.begin()
    ca.root()["x"]["n"] = 1
    cb.root()["x"]["n"] = 2
    tm_a.commit()
    with pytest.raises(ConflictError):
        tm_b.commit()
    tm_b.abort()
    ca.close()
    cb.close()

    errors = bump_lengths([db_a, db_b, db_a, db_b], "len", 20)
    assert not errors
    # Every one of the 80 increments counted, as seen through either server (the last ones
    # reach a client of the other server when relayed: soon).
    for db in (db_a, db_b):
        wait_until(lambda db=db: _length(db) == 80, timeout=10,
                   what=f"80 increments (last seen {_length(db)})")


def _length(db) -> int:
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        tm.begin()
        return conn.root()["len"]()
    finally:
        tm.abort()
        conn.close()


def test_counters_only_go_up_for_every_client(fleet, closing):
    """Writers on each server bump their own counter; readers on every server check that no
    counter ever goes back (no stale read, no tid going backwards)."""
    servers = fleet(3)
    dbs = [closing(ZEO.DB(s.addr)) for s in servers]
    with dbs[0].transaction() as conn:
        for i in range(3):
            conn.root()[f"c{i}"] = PersistentMapping(n=0)
    for db in dbs:
        wait_until(lambda db=db: _value(db, "c2") == 0, timeout=10)
    stop = time.monotonic() + 4
    problems: list[str] = []

    finals = [0, 0, 0]

    def writer(i: int) -> None:
        tm = transaction.TransactionManager()
        conn = dbs[i].open(tm)
        try:
            while time.monotonic() < stop:
                tm.begin()
                conn.root()[f"c{i}"]["n"] += 1
                tm.commit()
                finals[i] = conn.root()[f"c{i}"]["n"]
        finally:
            conn.close()

    def reader(i: int) -> None:
        tm = transaction.TransactionManager()
        conn = dbs[i].open(tm)
        seen = [0, 0, 0]
        try:
            while time.monotonic() < stop:
                tm.begin()
                for j in range(3):
                    n = conn.root()[f"c{j}"]["n"]
                    if n < seen[j]:
                        problems.append(f"reader on server {i} saw c{j} go {seen[j]} -> {n}")
                    seen[j] = n
                tm.abort()
        finally:
            conn.close()

    threads = [threading.Thread(target=f, args=(i,)) for i in range(3) for f in (writer, reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not problems, problems[:5]
    for db in dbs:  # every client ends with every writer's last value
        wait_until(lambda db=db: [_value(db, f"c{i}") for i in range(3)] == finals, timeout=10)


def test_real_zeo_clients_on_two_fleet_servers(fleet, closing):
    """ZEO 6.2 clients, each given one server's address, see each other's commits."""
    from support.ref_scripts import RefDriver

    a, b = fleet(2)
    with RefDriver() as real:
        real("open", name="ra", addr=list(a.addr))
        real("open", name="rb", addr=list(b.addr))
        tid = real("set", name="ra", items={"x": 1})
        real("wait_tid", name="rb", tid=tid)
        assert real("get", name="rb", keys=["x"]) == {"x": 1}
        tid = real("set", name="rb", items={"x": 2})
        real("wait_tid", name="ra", tid=tid)
        assert real("get", name="ra", keys=["x"]) == {"x": 2}


def test_clients_spread_over_the_fleet_and_fail_over(fleet, closing, tmp_path):
    """With address_policy='random' clients spread over the servers; when a server dies its
    clients move to another one, keep their caches, and see every commit."""
    servers = fleet(3)
    addrs = [s.addr for s in servers]
    dbs = [closing(ZEO.DB(addrs, address_policy="random", wait_timeout=30,
                          cache=str(tmp_path / f"c{i}.zec"))) for i in range(12)]
    used = {tuple(db.storage._server_addr) for db in dbs}
    assert len(used) >= 2, used  # 12 clients over 3 servers: all on one has p = 3e-6
    with dbs[0].transaction() as conn:
        conn.root()["x"] = PersistentMapping(n=1)
    for db in dbs:
        wait_until(lambda db=db: _value(db, "x") == 1, timeout=10)
    victim = servers[0]
    victim.proc.kill()
    victim.stop()
    survivor_db = next(db for db in dbs
                       if tuple(db.storage._server_addr) != tuple(victim.addr))
    with survivor_db.transaction() as conn:
        conn.root()["x"]["n"] = 2
    for db in dbs:
        wait_until(lambda db=db: _value(db, "x") == 2, timeout=30)
        assert tuple(db.storage._server_addr) != tuple(victim.addr)


def test_relay_metrics(fleet, closing, tmp_path):
    pytest.importorskip("prometheus_client", reason="the metrics endpoint needs it")
    import urllib.request

    from support.servers import free_port

    port = free_port()
    a, b = fleet(2, ["", f"<metrics>\n  address 127.0.0.1:{port}\n</metrics>"])
    db_a = closing(ZEO.DB(a.addr))
    db_b = closing(ZEO.DB(b.addr))
    with db_a.transaction() as conn:
        conn.root()["x"] = 1
    wait_until(lambda: _value_raw(db_b, "x") == 1, timeout=10)

    def metrics() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return r.read().decode()

    wait_until(lambda: 'zeo_relay_commits_total{storage="1"} 0.0' not in metrics(),
               timeout=10)
    text = metrics()
    for name in ("zeo_relay_polls_total", "zeo_relay_notifications_total",
                 "zeo_relay_errors_total", "zeo_relay_lag_seconds",
                 "zeo_relay_lag_transactions"):
        assert f'{name}{{storage="1"}}' in text, name


def _value_raw(db, key: str):
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        tm.begin()
        return conn.root().get(key)
    finally:
        tm.abort()
        conn.close()


def _run_with_fault(dbs, fault, seconds: float = 6.0) -> tuple[list[int], list[str]]:
    """Writers (one per db) bump their own counter, retrying whatever fails; ``fault()``
    runs halfway.  Returns each writer's last acknowledged value and any problem seen by the
    readers (a counter going back)."""
    from ZEO.Exceptions import ClientDisconnected

    acked = [0] * len(dbs)
    problems: list[str] = []
    stop = time.monotonic() + seconds

    def writer(i: int) -> None:
        tm = transaction.TransactionManager()
        conn = dbs[i].open(tm)
        try:
            while time.monotonic() < stop:
                try:
                    tm.begin()
                    conn.root()[f"c{i}"]["n"] += 1
                    value = conn.root()[f"c{i}"]["n"]
                    tm.commit()
                    acked[i] = value
                except (ConflictError, ClientDisconnected, Exception):  # noqa: B014
                    tm.abort()
                    time.sleep(0.05)
        finally:
            conn.close()

    def reader(i: int) -> None:
        tm = transaction.TransactionManager()
        conn = dbs[i].open(tm)
        seen = [0] * len(dbs)
        try:
            while time.monotonic() < stop:
                try:
                    tm.begin()
                    for j in range(len(dbs)):
                        n = conn.root()[f"c{j}"]["n"]
                        if n < seen[j]:
                            problems.append(f"client {i} saw c{j} go {seen[j]} -> {n}")
                        seen[j] = n
                    tm.abort()
                except Exception:
                    tm.abort()
                    time.sleep(0.05)
        finally:
            conn.close()

    threads = [threading.Thread(target=f, args=(i,)) for i in range(len(dbs))
               for f in (writer, reader)]
    for t in threads:
        t.start()
    time.sleep(seconds / 2)
    fault()
    for t in threads:
        t.join()
    return acked, problems


def _prepare_counters(dbs) -> None:
    with dbs[0].transaction() as conn:
        for i in range(len(dbs)):
            conn.root()[f"c{i}"] = PersistentMapping(n=0)
    for db in dbs:
        wait_until(lambda db=db: _value(db, f"c{len(dbs) - 1}") == 0, timeout=10)


def _check_after_fault(dbs, acked: list[int], problems: list[str]) -> None:
    assert not problems, problems[:5]
    assert all(n > 0 for n in acked), acked
    # No acknowledged commit lost: every client ends with at least each writer's last
    # acknowledged value (more only if a commit's reply was lost with its server).
    for db in dbs:
        wait_until(lambda db=db: all((_value(db, f"c{i}") or 0) >= n
                                     for i, n in enumerate(acked)), timeout=30,
                   what=f"acknowledged values {acked}")


def test_a_server_killed_mid_commit_loses_nothing(fleet, closing):
    servers = fleet(3)
    addrs = [s.addr for s in servers]
    # Clients 0 and 1 use server 0 first (then fail over); client 2 uses server 2.
    dbs = [closing(ZEO.DB([addrs[0], addrs[1]], wait_timeout=30)),
           closing(ZEO.DB([addrs[0], addrs[1]], wait_timeout=30)),
           closing(ZEO.DB(addrs[2], wait_timeout=30))]
    _prepare_counters(dbs)
    acked, problems = _run_with_fault(dbs, lambda: servers[0].proc.kill())
    _check_after_fault(dbs, acked, problems)


def test_postgresql_restart_mid_run_loses_nothing(fleet, closing, postgres):
    servers = fleet(2)
    dbs = [closing(ZEO.DB(s.addr, wait_timeout=30)) for s in servers]
    _prepare_counters(dbs)
    acked, problems = _run_with_fault(dbs, postgres.restart, seconds=8.0)
    _check_after_fault(dbs, acked, problems)
    # The servers stayed up and their relays came back (a commit through one reaches the
    # other's client).
    assert all(s.proc.poll() is None for s in servers)
    with dbs[0].transaction() as conn:
        conn.root()["after"] = 1
    wait_until(lambda: _value_raw(dbs[1], "after") == 1, timeout=15)


def test_a_database_behind_what_clients_were_told_is_refused(fleet, closing, postgres):
    """A standby promoted before it caught up, or a restored backup, is older than what the
    server told its clients: the server stops serving the storage rather than go back."""
    from ZODB.utils import u64

    from ZEO.Exceptions import ClientDisconnected

    (srv,) = fleet(1, "relay-poll-interval 0.2")
    db = closing(ZEO.DB(srv.addr))
    with db.transaction() as conn:
        conn.root()["x"] = 1
    keep = u64(db.storage.lastTransaction())
    with db.transaction() as conn:
        conn.root()["x"] = 2
    dbname = srv_dbname(srv)
    postgres.sql(dbname, f"DELETE FROM current_object WHERE tid > {keep}; "
                         f"DELETE FROM object_state WHERE tid > {keep}; "
                         f"DELETE FROM transaction WHERE tid > {keep}")
    wait_until(lambda: "refusing to serve it" in srv.log(), timeout=15)
    with pytest.raises(ClientDisconnected):
        ZEO.client(srv.addr, wait_timeout=2)


def srv_dbname(srv) -> str:
    conf = (srv.log_path.parent / "zeo.conf").read_text()
    return conf.split("dbname=", 1)[1].split()[0]


def test_a_server_killed_holding_the_database_locks(fleet, closing):
    """A server SIGKILLed after a vote (RelStorage then holds the database's commit lock and
    the object's row lock): PostgreSQL ends its sessions, the vote is rolled back, and a client
    of another server commits the same object at once."""
    from support.wire import WireClient

    a, b = fleet(2)
    db_b = closing(ZEO.DB(b.addr))
    with db_b.transaction() as conn:
        conn.root()["x"] = PersistentMapping(n=0)
    db_a = closing(ZEO.DB(a.addr))
    oid = _oid_of(db_a, "x")
    data, serial = db_a.storage.load(oid)
    with WireClient(a.addr, timeout=30) as c:
        c.call("register", "1", False)
        c.async_call("tpc_begin", 1, b"", b"", {}, None, " ")
        c.async_call("storea", oid, serial, data, 1)
        c.call("vote", 1)  # locks held in the database now
        a.proc.kill()
        a.proc.wait(10)
    # Locks left behind would make this commit wait for RelStorage's lock timeout, then fail.
    with db_b.transaction() as conn:
        conn.root()["x"]["n"] = 1
    assert _value(db_b, "x") == 1


def _oid_of(db, key: str) -> bytes:
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        tm.begin()
        return conn.root()[key]._p_oid
    finally:
        tm.abort()
        conn.close()
