"""Per-transaction server state and the per-storage commit lock.

Both live on the server's event loop thread: no thread locks.  The commit lock is granted in
FIFO order and held from the start of a vote to the end of tpc_finish/tpc_abort.
"""

from __future__ import annotations

import asyncio
import enum
import os
import tempfile
from collections import deque
from collections.abc import Callable
from typing import Any

# Buffered record kinds (first item of each buffered tuple).
STORE, CHECK, RESTORE, DELETE, UNDO = "store", "check", "restore", "delete", "undo"


class SpooledData:
    """Where a record's data went in the transaction's spool file."""

    __slots__ = ("offset", "length")

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length


class Spool:
    """A temporary file for record data beyond a transaction's memory budget.

    Written on the loop thread as stores arrive, read back on the commit worker at vote;
    the two never overlap because a vote starts only after the last buffered write.
    """

    def __init__(self, directory: str | None = None) -> None:
        self.file = tempfile.TemporaryFile(dir=directory, prefix="zeo-txn-")
        self.size = 0

    def put(self, data: bytes) -> SpooledData:
        f = self.file
        f.seek(self.size)
        f.write(data)
        ref = SpooledData(self.size, len(data))
        self.size += len(data)
        return ref

    def get(self, ref: SpooledData) -> bytes:
        self.file.seek(ref.offset)
        data = self.file.read(ref.length)
        if len(data) != ref.length:
            raise OSError("transaction spool file is truncated")
        return data

    def close(self) -> None:
        self.file.close()


class TxnPhase(enum.Enum):
    OPEN = "open"  # buffering writes
    WAITING = "waiting"  # vote queued for the commit lock
    VOTING = "voting"  # vote replay running on the commit worker (lock held)
    VOTED = "voted"  # vote succeeded; lock held until finish or abort
    FINISHING = "finishing"  # tpc_finish running on the commit worker
    ENDED = "ended"


class ServerTransaction:
    """One client transaction as the server sees it, from tpc_begin to its end.

    ``records`` holds the buffered writes as tuples, in arrival order; the record data stay the
    ``bytes`` objects that arrived (no pickling round trip).  ``blobs`` lists
    ``(oid, serial, data, path)`` of uploaded blob files, consumed at vote.
    """

    __slots__ = (
        "txn_id", "user", "description", "extension", "tid", "status", "records",
        "blobs", "phase", "meta", "aborted", "timeout_handle",
        "locked_at", "nbytes", "invalidated", "vote_started_at", "spool",
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

    @property
    def holds_lock(self) -> bool:
        return self.phase in (TxnPhase.VOTING, TxnPhase.VOTED, TxnPhase.FINISHING)

    def data(self, data: Any) -> Any:
        """The bytes of a buffered record's data, read back from the spool if it went there."""
        if type(data) is SpooledData:
            return self.spool.get(data)  # type: ignore[union-attr]
        return data

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
