"""ZODB's racetest checks with their workers spread over a fleet (issue 24).

Three of our servers serve one RelStorage database; each worker's client connects to the
next server in turn, so every invalidation a worker depends on was made through another
server and reached it through that server's relay.  The checks assert their model invariant
on every read: a stale object, or an invalidation out of order, breaks it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import unittest
from pathlib import Path

import pytest
from ZODB.tests import racetest

from support import postgres
from support.servers import start_server
from ZEO.client.storage import ClientStorage

pytestmark = pytest.mark.timeout(300)


class FleetRaces(racetest.RaceTests, unittest.TestCase):
    servers = 3

    def setUp(self) -> None:
        if postgres.MISSING_REASON is not None:
            if os.environ.get("CI") == "true":
                self.fail(f"PostgreSQL tests cannot run under CI: {postgres.MISSING_REASON}")
            self.skipTest(postgres.MISSING_REASON)
        dsn = postgres.shared_cluster().create_database("race")
        self._dir = Path(tempfile.mkdtemp(prefix="zeo-fleet-race-"))
        self._servers = []
        self.addCleanup(self._stop)
        for i in range(self.servers):
            # racetest's model objects are ZODB.tests' MinPO: allowed for resolution here.
            self._servers.append(start_server("ours", self._dir / f"s{i}",
                                              postgres.relstorage_section(dsn),
                                              "conflict-resolution-class ZODB.tests.*"))
        self._next = 0
        self._clients: list[ClientStorage] = []
        self._storage = self._new_storage_client()

    def _new_storage_client(self) -> ClientStorage:
        srv = self._servers[self._next % len(self._servers)]
        self._next += 1
        st = ClientStorage(srv.addr, wait_timeout=90)
        self._clients.append(st)
        return st

    def _stop(self) -> None:
        for st in self._clients:
            try:
                st.close()
            except Exception:
                pass
        for srv in self._servers:
            srv.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
