"""Per-transaction server state and the per-storage commit lock.

Both live on the server's event loop thread: no thread locks.  The commit lock is granted in
FIFO order and held from the start of a vote to the end of tpc_finish/tpc_abort.
"""

from __future__ import annotations

import asyncio
import enum
import marshal
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

# Buffered record kinds (first item of each buffered tuple).
STORE, CHECK, RESTORE, DELETE, UNDO = "store", "check", "restore", "delete", "undo"


#: What one buffered record costs in memory besides its data (tuple, bytes headers, list
#: slot): counted toward the budgets, so a million empty records are not free.
RECORD_OVERHEAD = 160


class Spool:
    """A temporary file for the records of a transaction beyond its memory budget.

    Written on the loop thread as stores arrive, read back on the commit worker at vote;
    the two never overlap because a vote starts only after the last buffered write.
    Records are plain tuples of str, bytes, int and None, so :mod:`marshal` (no code, no
    globals) writes and reads them.
    """

    def __init__(self, directory: str | None = None) -> None:
        self.file = tempfile.TemporaryFile(dir=directory, prefix="zeo-txn-")
        self.count = 0

    def put(self, record: tuple) -> None:
        marshal.dump(record, self.file)
        self.count += 1

    def __iter__(self) -> Iterator[tuple]:
        f = self.file
        f.flush()
        f.seek(0)
        for _ in range(self.count):
            try:
                yield marshal.load(f)
            except (EOFError, ValueError, TypeError):
                raise OSError("transaction spool file is truncated") from None
        f.seek(0, os.SEEK_END)

    def close(self) -> None:
        self.file.close()


class TxnPhase(enum.Enum):
    OPEN = "open"  # buffering writes
    WAITING = "waiting"  # vote queued for the commit lock
    VOTING = "voting"  # vote replay running on the commit worker (lock held)
    VOTED = "voted"  # vote succeeded; lock held until finish or abort
    FINISHING = "finishing"  # tpc_finish running on the commit worker
    ABORTING = "aborting"  # tpc_abort of a voted transaction running on the commit worker
    ENDED = "ended"


#: Every phase a transaction may move to from each phase; :meth:`ServerTransaction.move_to`
#: refuses anything else.  A vote that returns conflicts for the client to resolve reopens
#: the transaction (VOTING -> OPEN); an abort while the vote runs is carried out when it
#: returns.
TRANSITIONS: dict[TxnPhase, frozenset[TxnPhase]] = {
    TxnPhase.OPEN: frozenset({TxnPhase.WAITING, TxnPhase.ENDED}),
    TxnPhase.WAITING: frozenset({TxnPhase.VOTING, TxnPhase.ENDED}),
    TxnPhase.VOTING: frozenset({TxnPhase.OPEN, TxnPhase.VOTED, TxnPhase.ENDED}),
    TxnPhase.VOTED: frozenset({TxnPhase.FINISHING, TxnPhase.ABORTING}),
    TxnPhase.FINISHING: frozenset({TxnPhase.ENDED}),
    TxnPhase.ABORTING: frozenset({TxnPhase.ENDED}),
    TxnPhase.ENDED: frozenset(),
}
#: The phases in which the transaction holds its storage's commit lock.
LOCKED_PHASES = frozenset({TxnPhase.VOTING, TxnPhase.VOTED, TxnPhase.FINISHING,
                           TxnPhase.ABORTING})


class IllegalTransition(RuntimeError):
    """A transaction was asked to move between phases that TRANSITIONS does not link."""


class ServerTransaction:
    """One client transaction as the server sees it, from tpc_begin to its end.

    ``records`` holds the buffered writes as tuples, in arrival order, up to the memory budget;
    the rest go to ``spool`` (:meth:`all_records` gives both, in order).  The record data stay
    the ``bytes`` objects that arrived (no pickling round trip).  ``blobs`` lists
    ``(oid, serial, data, path)`` of uploaded blob files, consumed at vote.
    """

    __slots__ = (
        "txn_id", "user", "description", "extension", "tid", "status", "records",
        "blobs", "phase", "meta", "aborted", "timeout_handle",
        "locked_at", "nbytes", "invalidated", "vote_started_at", "spool", "oid_raises",
    )

    def __init__(self, txn_id: Any, user: bytes, description: bytes, extension: dict,
                 tid: bytes | None, status: str) -> None:
        self.txn_id = txn_id
        self.user = user
        self.description = description
        self.extension = extension
        self.tid = tid
        self.status = status
        self.records: list[tuple] = []
        self.blobs: list[tuple[bytes, bytes, bytes, str]] = []
        self.phase = TxnPhase.OPEN
        self.meta: Any = None  # the TransactionMetaData handed to the storage
        self.aborted = False
        self.timeout_handle: asyncio.TimerHandle | None = None
        self.locked_at: float | None = None
        self.vote_started_at: float | None = None
        self.spool: Spool | None = None
        self.nbytes = 0
        self.invalidated: list[bytes] = []  # oids to broadcast, set by a successful vote
        #: (before, after) of each time a write of this transaction raised the storage's oid
        #: counter: an abort takes them back (see OidCounterGuard).
        self.oid_raises: list[tuple[bytes, bytes]] = []

    @property
    def holds_lock(self) -> bool:
        return self.phase in LOCKED_PHASES

    def move_to(self, phase: TxnPhase) -> None:
        """Enter ``phase``; raise :class:`IllegalTransition` unless TRANSITIONS allows it."""
        if phase not in TRANSITIONS[self.phase]:
            raise IllegalTransition(f"transaction {self.txn_id!r}: {self.phase.value} -> "
                                    f"{phase.value}")
        self.phase = phase

    def add(self, record: tuple, size: int, memory: int, spool_dir: str | None) -> None:
        """Buffer ``record`` (``size`` bytes, overhead included); once the transaction holds
        more than ``memory`` bytes, it and every later record go to the spool file."""
        self.nbytes += size
        spool = self.spool
        if spool is None:
            if self.nbytes <= memory:
                self.records.append(record)
                return
            spool = self.spool = Spool(spool_dir)
        spool.put(record)

    def all_records(self) -> Iterator[tuple]:
        """Every buffered record, in arrival order (the spooled ones read back from disk)."""
        yield from self.records
        if self.spool is not None:
            yield from self.spool

    def discard(self) -> None:
        """Free what the transaction buffered: spool file and unconsumed blob files."""
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        self.records = []
        self.discard_blobs()

    def discard_blobs(self) -> None:
        """Remove uploaded blob files the storage did not take."""
        for _oid, _serial, _data, path in self.blobs:
            try:
                os.remove(path)
            except OSError:
                pass
        self.blobs.clear()


class CommitLock:
    """FIFO commit lock of one storage, used from the loop thread only.

    A waiter is a callback, run synchronously when the lock passes to it: the next vote
    starts in the same loop turn as the release, not one or two turns later.
    """

    __slots__ = ("holder", "waiters", "_granting")

    def __init__(self) -> None:
        self.holder: ServerTransaction | None = None
        self.waiters: deque[tuple[ServerTransaction, Callable[[ServerTransaction], None]]] = (
            deque())
        self._granting = False

    def acquire(self, txn: ServerTransaction,
                granted: Callable[[ServerTransaction], None]) -> bool:
        """Call ``granted(txn)`` once ``txn`` holds the lock: now if it is free (and return
        True), else after the waiters before it (and return False)."""
        if self.holder is None and not self.waiters:
            self.holder = txn
            granted(txn)
            return True
        self.waiters.append((txn, granted))
        return False

    def cancel(self, txn: ServerTransaction) -> None:
        """Drop ``txn`` from the queue of waiters (it gave up before getting the lock)."""
        for item in self.waiters:
            if item[0] is txn:
                self.waiters.remove(item)
                return

    def release(self, txn: ServerTransaction) -> None:
        """Release the lock held by ``txn`` and grant it to the first waiter.

        A granted vote may end at once (a conflict) and release again; the outermost call
        does the granting in a loop, so a chain of such votes does not nest.
        """
        if self.holder is not txn:
            return
        self.holder = None
        if self._granting:
            return
        self._granting = True
        try:
            while self.holder is None and self.waiters:
                nxt, granted = self.waiters.popleft()
                self.holder = nxt
                granted(nxt)
        finally:
            self._granting = False

    @property
    def waiting(self) -> int:
        return len(self.waiters)


class OidCounterGuard:
    """Keeps an aborted transaction from moving a storage's oid counter.

    A store to an oid above the counter raises it (FileStorage and every ``BaseStorage``),
    and an abort does not lower it again: one aborted store to a huge oid would leave every
    later ``new_oid`` above it.  The guard records each raise (under the storage's lock, so no
    ``new_oid`` can slip in between) and :meth:`undo` takes back the raises that nothing
    handed out since, newest first.  Storages without a ``BaseStorage`` counter are left as
    they are.
    """

    def __init__(self, storage: Any) -> None:
        """``storage``: the one that holds the counter (the base, not a BlobStorage)."""
        self.storage = storage
        lock = getattr(storage, "_lock", None)
        self.enabled = type(vars(storage).get("_oid") if hasattr(storage, "__dict__")
                            else None) is bytes and lock is not None
        self.lock = lock

    def write(self, raises: list[tuple[bytes, bytes]], oid: bytes, call: Callable[..., Any],
              *args: Any) -> Any:
        """``call(*args)``, a write of ``oid``; record it in ``raises`` if it raised the
        counter."""
        storage = self.storage
        if not self.enabled or oid <= storage._oid:  # the counter only grows meanwhile
            return call(*args)
        with self.lock:
            before = storage._oid
            result = call(*args)
            after = storage._oid
        if after > before:
            raises.append((before, after))
        return result

    def undo(self, raises: list[tuple[bytes, bytes]]) -> None:
        """After an abort: lower the counter past the raises no ``new_oid`` built on."""
        if not raises or not self.enabled:
            return
        storage = self.storage
        with self.lock:
            counter = storage._oid
            for before, after in reversed(raises):
                if after != counter:
                    break
                counter = before
            storage._oid = counter
        raises.clear()
