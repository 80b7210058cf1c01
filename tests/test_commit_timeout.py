"""The transaction timeout of the commit path under a fake clock: no sockets, no waiting.

A real StorageServer (not serving) over a MappingStorage; the test plays the session and
the clock.  The timeout starts when the vote takes the commit lock and stops when the lock
is released (zeo-facts 4.5); when it fires, the holder's connection is closed.
"""

from __future__ import annotations

import asyncio

import pytest
from ZODB.MappingStorage import MappingStorage
from ZODB.utils import z64

from ZEO.server import StorageServer
from ZEO.server.commit import STORE, ServerTransaction, TxnPhase

RECORD = b"\x80\x03cpersistent.mapping\nPersistentMapping\nq\x00.}q\x01."


class FakeClock:
    """Stands for ``loop.call_later``: keeps the timers; :meth:`advance` fires the due ones."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[FakeTimer] = []

    def call_later(self, delay, callback, *args):
        timer = FakeTimer(self.now + delay, callback, args)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for timer in list(self.timers):
            if not timer.cancelled and timer.when <= self.now:
                self.timers.remove(timer)
                timer.callback(*timer.args)

    @property
    def pending(self):
        return [t for t in self.timers if not t.cancelled]


class FakeTimer:
    def __init__(self, when, callback, args) -> None:
        self.when, self.callback, self.args = when, callback, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeAPI:
    """What the commit path uses of a ZEOStorage."""

    label = "fake"

    def __init__(self) -> None:
        self.closed = False
        self.txn = None

    def close(self) -> None:
        self.closed = True

    def transaction_ended(self, txn) -> None:
        self.txn = None
        txn.move_to(TxnPhase.ENDED)


class Reply:
    def __init__(self) -> None:
        self.value = self.error = None

    def resolve(self, value) -> None:
        self.value = value

    def fail(self, exc) -> None:
        self.error = exc


@pytest.fixture
def commits():
    server = StorageServer(("127.0.0.1", 0), {"1": MappingStorage()}, transaction_timeout=30)
    commits = server.states["1"].commits
    clock = FakeClock()
    commits.call_later = clock.call_later
    commits.clock = clock
    yield commits
    holder = commits.lock.holder
    if holder is not None:  # what the closed connection's abort would do, so close is quick
        commits.storage.tpc_abort(holder.meta)
        commits.lock.waiters.clear()
        commits.lock.release(holder)
    server.close()


def voted_transaction(commits, txn_id=1):
    session = FakeAPI()
    txn = ServerTransaction(txn_id, b"", b"", {}, None, " ")
    [oid] = [commits.storage.new_oid()]
    txn.add((STORE, oid, z64, RECORD), len(RECORD), 1 << 20, None)
    session.txn = txn
    reply = Reply()
    commits.vote(session, txn, reply)  # small: votes inline, now
    assert reply.value == [] and txn.phase is TxnPhase.VOTED
    return session, txn


def test_the_timeout_closes_the_lock_holder(commits):
    session, txn = voted_transaction(commits)
    [timer] = commits.clock.pending
    assert timer.when == 30
    commits.clock.advance(29.9)
    assert not session.closed
    commits.clock.advance(0.2)
    assert session.closed  # connection_lost then aborts and frees the lock
    assert commits.lock.holder is txn


def test_the_timeout_stops_with_the_lock(commits):
    session, txn = voted_transaction(commits)
    [timer] = commits.clock.pending
    commits.abort(session, txn, None)  # tpc_abort runs on the commit worker
    loop = commits.loop
    loop.run_until_complete(asyncio.sleep(0.2))
    assert txn.phase is TxnPhase.ENDED and commits.lock.holder is None
    assert timer.cancelled and commits.clock.pending == []
    commits.clock.advance(60)
    assert not session.closed


def test_a_waiting_vote_is_not_timed(commits):
    first_session, first = voted_transaction(commits, 1)
    second_session = FakeAPI()
    second = ServerTransaction(2, b"", b"", {}, None, " ")
    second.add((STORE, commits.storage.new_oid(), z64, RECORD), len(RECORD), 1 << 20, None)
    reply = Reply()
    commits.vote(second_session, second, reply)
    assert second.phase is TxnPhase.WAITING
    assert len(commits.clock.pending) == 1  # only the holder's clock runs
    commits.clock.advance(31)  # the holder times out; the waiter is untouched
    assert first_session.closed and not second_session.closed
