"""Crash safety: SIGKILL the server again and again while several clients commit.

Every transaction whose ``tpc_finish`` returned a tid must be in the database after the
restarts, the FileStorage must pass ZODB's own consistency check (fstest), and the clients must
reconnect and read the new state.
"""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ConflictError
from ZODB.scripts import fstest

import ZEO
from support.servers import filestorage_conf, free_port, start_server
from ZEO.Exceptions import ClientDisconnected

pytestmark = pytest.mark.timeout(240)

CLIENTS = 3
KILLS = 5


def test_sigkill_while_committing_loses_no_acknowledged_transaction(tmp_path):
    addr = ("127.0.0.1", free_port())
    data_fs = tmp_path / "Data.fs"
    conf = filestorage_conf(data_fs)
    server = start_server("ours", tmp_path / "srv", conf, addr=addr)

    # Create one counter per client before the chaos starts.
    db = ZEO.DB(addr, wait_timeout=30)
    with db.transaction() as conn:
        for i in range(CLIENTS):
            conn.root()[f"c{i}"] = PersistentMapping(n=0)
    db.close()

    acknowledged = [0] * CLIENTS  # the last value whose commit returned
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            db = ZEO.DB(addr, wait_timeout=60)
            tm = transaction.TransactionManager()
            conn = db.open(transaction_manager=tm)
            while not stop.is_set():
                try:
                    tm.begin()
                    counter = conn.root()[f"c{i}"]
                    value = counter["n"] + 1
                    counter["n"] = value
                    tm.commit()
                    acknowledged[i] = value
                except (ClientDisconnected, ConflictError, ConnectionError):
                    tm.abort()
                    time.sleep(0.05)
            conn.close()
            db.close()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        for _ in range(KILLS):
            time.sleep(random.uniform(0.3, 0.8))
            server.send_signal(signal.SIGKILL)
            server.stop()
            server = start_server("ours", tmp_path / "srv", conf, addr=addr)
        before = list(acknowledged)
        deadline = time.monotonic() + 60
        # The clients reconnect and keep committing after the last restart.
        while time.monotonic() < deadline and not all(
            acknowledged[i] > before[i] for i in range(CLIENTS)
        ):
            time.sleep(0.1)
        assert all(acknowledged[i] > before[i] for i in range(CLIENTS)), (before, acknowledged)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        server.stop()
    assert not errors, errors
    print("acknowledged commits per client:", acknowledged)

    fstest.check(str(data_fs))  # raises FormatError on any inconsistency
    storage = FileStorage(str(data_fs), read_only=True)
    try:
        db = ZODB.DB(storage)  # a plain ZODB.DB on the file itself
        with db.transaction() as conn:
            for i in range(CLIENTS):
                # A commit in doubt (killed after the data was durable but before the
                # reply) may have landed too: the value can only be higher, never lower.
                assert conn.root()[f"c{i}"]["n"] >= acknowledged[i] > 0
        db.close()
    finally:
        storage.close()
