"""Per-transaction server state and the per-storage commit lock.

Both live on the server's event loop thread: no thread locks.  The commit lock is granted in
FIFO order and held from the start of a vote to the end of tpc_finish/tpc_abort.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import marshal
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError, StorageTransactionError
from ZODB.utils import z64

from .mvcc import VoteRaced
from .relay import CHANNEL as RELAY_CHANNEL

if TYPE_CHECKING:
    from .session import PendingReply
    from .storage_server import StorageState
    from .zeostorage import ZEOStorage

logger = logging.getLogger("ZEO.StorageServer")
timeout_logger = logger

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
        assert self.lock is not None  # enabled
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
        assert self.lock is not None  # enabled
        with self.lock:
            counter = storage._oid
            for before, after in reversed(raises):
                if after != counter:
                    break
                counter = before
            storage._oid = counter
        raises.clear()


class OnewaysThenReply:
    """A deferred result that sends one-way calls to the caller just before the reply."""

    __slots__ = ("oneways", "value")

    def __init__(self, oneways: tuple[tuple[str, tuple], ...], value: Any) -> None:
        self.oneways = oneways
        self.value = value

class CommitPath:
    """The commit path of one served storage: its commit lock, its commit worker thread and
    the steps that take a :class:`ServerTransaction` from its vote to its end.

    Everything here runs on the server's loop thread except what :meth:`_on_worker` hands to
    the worker (the vote replay of large transactions, ``tpc_finish``, ``tpc_abort``, loads
    queued behind a finish).  ``state`` is the :class:`~ZEO.server.storage_server.StorageState`
    it belongs to (statistics, and the invalidations a commit publishes).
    """

    def __init__(self, state: StorageState, counter_storage: Any) -> None:
        self.state = state
        self.server = state.server
        self.storage = state.storage
        self.loop = state.loop
        #: How the transaction timeout is scheduled (the loop's; a test gives a fake clock's).
        self.call_later: Callable[..., Any] = state.loop.call_later
        self.lock = CommitLock()
        # The oid counter lives on the base storage (BlobStorage only forwards reads to it).
        self.oid_guard = OidCounterGuard(counter_storage)
        self.worker = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"zeo-commit-{state.storage_id}")
        #: A tpc_finish is running on the commit worker (loads queue behind it).
        self.finishing = False
        self.lock_granted_at = 0.0
        self.lock_wait_seconds = 0.0  # summed over all granted votes
        self.lock_hold_seconds = 0.0

    def vote(self, api: ZEOStorage, txn: ServerTransaction, reply: PendingReply) -> None:
        """Queue ``txn`` for the commit lock; its vote runs when the lock is granted."""
        txn.move_to(TxnPhase.WAITING)
        txn.vote_started_at = time.monotonic()
        if not self.lock.acquire(txn, lambda t: self._run_vote(api, t, reply)):
            waiting = self.lock.waiting
            level = logging.CRITICAL if waiting > 9 else (
                logging.WARNING if waiting > 3 else logging.DEBUG)
            logger.log(level, "(%s) waiting for the commit lock of %r, %d waiting",
                       api.label, self.state.storage_id, waiting)

    def _run_vote(self, api: ZEOStorage, txn: ServerTransaction, reply: PendingReply) -> None:
        """The lock is ``txn``'s: vote on the loop (small) or on the commit worker."""
        if txn.aborted or txn.phase is not TxnPhase.WAITING:
            self._release(txn)
            return
        txn.move_to(TxnPhase.VOTING)
        txn.locked_at = time.time()
        self.lock_granted_at = time.monotonic()
        self.lock_wait_seconds += self.lock_granted_at - (txn.vote_started_at
                                                          or self.lock_granted_at)
        timeout = self.server.transaction_timeout
        if timeout:
            txn.timeout_handle = self.call_later(timeout, self._timed_out, api, txn,
                                                 timeout)
        if not self._votes_inline(txn):
            self._on_worker(self._vote_body, (txn,),
                            lambda ok, result: self._voted(api, txn, reply, ok, result))
            return
        try:
            result = self._vote_body(txn)
        except BaseException as exc:
            self._voted(api, txn, reply, False, exc)
        else:
            self._voted(api, txn, reply, True, result)

    def _voted(self, api: ZEOStorage, txn: ServerTransaction, reply: PendingReply, ok: bool,
               result: Any) -> None:
        """On the loop, when the vote body returned (``ok``) or raised ``result``."""
        if not ok:
            if isinstance(result, ConflictError):
                self.state.stats_conflicts += 1
            self._end(api, txn, aborted=True)
            reply.fail(result)
            return
        outcome, value = result
        if outcome == "conflicts":
            # The storage transaction was aborted; the client resolves and votes again.
            self.state.stats_conflicts += len(value)
            self._release(txn)
            txn.move_to(TxnPhase.OPEN)
            if txn.aborted:
                self._end(api, txn, aborted=True)
            reply.resolve(value)
            return
        if txn.aborted:  # the client went away while we voted
            txn.move_to(TxnPhase.VOTED)  # the storage voted: abort() tells it, on the worker
            self.abort(api, txn, None)
            reply.resolve(None)
            return
        txn.move_to(TxnPhase.VOTED)
        reply.resolve(value)

    def load_behind_finish(self, oid: bytes, tid: bytes, reply: PendingReply) -> None:
        """``loadBefore`` on the commit worker, after the tpc_finish running there.

        FileStorage blocks its readers for the whole of ``tpc_finish``, fsync included; on the
        loop that would stall every client.  Queued behind the finish, the load reads the new
        state and its reply leaves after the commit's invalidations (the worker's callbacks
        reach the loop in order), which zeo-facts 4.4 allows: the reply names its tids.
        """
        self.state.stats_loads_behind_finish += 1
        self._on_worker(self.storage.loadBefore, (oid, tid),
                        lambda ok, result: reply.resolve(result) if ok else reply.fail(result))

    def _on_worker(self, func: Callable[..., Any], args: tuple,
                   done: Callable[[bool, Any], None]) -> None:
        """Run ``func(*args)`` on the commit worker, then ``done(ok, result or exception)``
        on the loop: one hop each way, no future in between."""
        loop = self.loop

        def run() -> None:
            try:
                result = func(*args)
            except BaseException as exc:
                loop.call_soon_threadsafe(done, False, exc)
            else:
                loop.call_soon_threadsafe(done, True, result)

        try:
            self.worker.submit(run)
        except RuntimeError as exc:  # the worker is shut down: the server is closing
            done(False, exc)

    def _votes_inline(self, txn: ServerTransaction) -> bool:
        """Whether ``txn`` is small enough to vote on the loop thread.

        A thread round trip costs more than replaying a few small records; the storage's
        ``tpc_vote`` writes but does not fsync (``tpc_finish`` does, on the worker).  Blobs,
        undo and large transactions go to the commit worker so the loop never waits on them.
        """
        return (
            not self.state.mvcc  # every call of an MVCC storage may be a database round trip
            and not txn.blobs
            and txn.spool is None
            and txn.nbytes <= self.server.inline_vote_bytes
            and len(txn.records) <= 1000
            and not any(rec[0] == UNDO for rec in txn.records)
        )

    def _vote_body(self, txn: ServerTransaction) -> tuple[str, Any]:
        """On the commit worker: replay the buffered records into the storage and vote.

        On an MVCC storage a conflict can appear between the store-time check and the
        storage's own vote (another server committed in between): the whole vote runs once
        more, from a fresh snapshot, where the conflict is seen (and resolved) at store.
        """
        attempts = 2 if self.state.mvcc and not txn.blobs else 1  # blobs are consumed
        for attempt in range(1, attempts + 1):
            try:
                return self._vote_once(txn)
            except VoteRaced as e:
                if attempt == attempts:
                    raise ConflictError(oid=e.oid, serials=e.serials) from None
                self.state.stats_vote_retries += 1
        raise AssertionError("unreachable")

    def _vote_once(self, txn: ServerTransaction) -> tuple[str, Any]:
        """One replay of the buffered records and the storage's vote."""
        storage = self.storage
        meta = txn.meta = TransactionMetaData(txn.user, txn.description, txn.extension)
        if txn.tid is not None and txn.tid <= (storage.lastTransaction() or z64):
            # Checked at tpc_begin too; another commit may have passed it since.
            raise StorageTransactionError(
                f"transaction id {txn.tid.hex()} is not after the last committed one")
        if txn.tid is not None or txn.status != " ":
            storage.tpc_begin(meta, txn.tid, txn.status)
        else:
            storage.tpc_begin(meta)
        guard = self.oid_guard
        raises = txn.oid_raises
        try:
            client_resolution = self.server.client_conflict_resolution
            conflicts: dict[bytes, dict] = {}
            invalidated: list[bytes] = []
            returned: list[bytes] = []
            for rec in txn.all_records():
                kind = rec[0]
                if kind == STORE:
                    oid = rec[1]
                    data = rec[3]
                    try:
                        guard.write(raises, oid, storage.store, oid, rec[2], data, "", meta)
                    except ConflictError as e:
                        if not client_resolution or e.oid is None:
                            raise
                        conflicts[oid] = {"oid": oid, "serials": e.serials, "data": data}
                        continue
                    conflicts.pop(oid, None)
                    invalidated.append(oid)
                elif kind == CHECK:
                    storage.checkCurrentSerialInTransaction(rec[1], rec[2], meta)
                elif kind == RESTORE:
                    guard.write(raises, rec[1], storage.restore, rec[1], rec[2], rec[3], "",
                                rec[4], meta)
                elif kind == DELETE:
                    storage.deleteObject(rec[1], rec[2], meta)
                elif kind == UNDO:
                    result = storage.undo(rec[1], meta)
                    if result:
                        undone = list(result[1])
                        invalidated.extend(undone)
                        returned.extend(undone)
            blobs, txn.blobs = txn.blobs, []
            try:
                while blobs:
                    oid, serial, data, path = blobs.pop(0)
                    guard.write(raises, oid, storage.storeBlob, oid, serial, data, path, "",
                                meta)
                    invalidated.append(oid)
            finally:
                txn.blobs = blobs  # whatever was not consumed is removed at the end
            if conflicts:
                storage.tpc_abort(meta)
                guard.undo(raises)
                return "conflicts", list(conflicts.values())
            resolved = storage.tpc_vote(meta)
            if resolved:
                returned.extend(resolved)
                self.state.stats_conflicts_resolved += len(resolved)
            txn.invalidated = invalidated
            return "ok", returned
        except BaseException:
            storage.tpc_abort(meta)
            guard.undo(raises)
            raise

    def finish(self, api: ZEOStorage, txn: ServerTransaction, reply: PendingReply) -> None:
        """Finish ``txn`` on the commit worker (tpc_finish fsyncs), then publish it."""
        txn.move_to(TxnPhase.FINISHING)
        self.finishing = True
        storage = self.storage
        mvcc = self.state.mvcc
        published = self.state.published_tid
        notify = self.server.relay_notify

        def tpc_finish() -> Any:  # on the commit worker
            reported: list[bytes] = []
            tid = storage.tpc_finish(txn.meta, reported.append)
            # ZODB 5 storages return the tid; older ones only pass it to the callback.
            tid = tid or (reported[0] if reported else storage.lastTransaction())
            if not mvcc:
                return tid
            # Commits other servers made before ours are published before it (ZEO.server.relay).
            before = storage.transactions_between(published, tid)
            if notify:
                storage.notify(RELAY_CHANNEL, tid)
            return tid, before

        self._on_worker(tpc_finish, (),
                        lambda ok, result: self._finished(api, txn, reply, ok, result))

    def _finished(self, api: ZEOStorage, txn: ServerTransaction, reply: PendingReply,
                  ok: bool, result: Any) -> None:
        """On the loop, after the storage's tpc_finish returned ``tid`` or raised."""
        if not ok:
            self.finishing = False
            logger.critical("(%s) tpc_finish failed on %r", api.label, self.state.storage_id,
                            exc_info=result)
            self._end(api, txn, aborted=True)
            reply.fail(result)
            if self.state.mvcc:
                self.state.publish_found(())
            return
        if self.state.mvcc:
            tid, before = result
            self.state.publish_found(before, below=tid)
        else:
            tid = result
        self.finishing = False
        oids: list[bytes] | None = list(dict.fromkeys(txn.invalidated))
        if not self.state.record(tid, oids):  # type: ignore[arg-type]
            oids = None  # a tid not after the last one: not broadcast (record() logged it)
        self.state.stats_commits += 1
        # Release first: the next vote runs now and its reply leaves before the broadcast
        # below, so the next committer's round trip overlaps it.  Nothing in between can
        # show a client this tid, so the rules of zeo-facts 4.4 still hold: invalidations
        # go out in commit order, before the committer's reply and before this loop turn
        # ends (no load reply can come between).
        self._end(api, txn, aborted=False)
        if oids is not None:
            self.state.broadcast(tid, oids, api.session)
            self.state.release_held_loads()
        # The committer gets `info` just before its reply, in the same write.  Computed after
        # the release (``len`` walks the index), out of the lock hold: the next transaction
        # has at most voted, and a vote changes neither the length nor the size a storage
        # reports until its tpc_finish.
        info = {"length": len(self.storage), "size": self.storage.getSize()}
        reply.resolve(OnewaysThenReply((("info", (info,)),), tid))
        if self.state.mvcc:
            # What the relay found meanwhile: newer than tid, so after the committer's reply
            # (a client must not hear of a tid above its commit's before the commit's reply).
            self.state.publish_found(())

    def abort(self, api: ZEOStorage, txn: ServerTransaction,
              reply: PendingReply | None) -> None:
        """Abort ``txn`` in whatever phase it is; answer ``reply`` (if any) once it is done."""
        phase = txn.phase
        txn.aborted = True
        if phase is TxnPhase.VOTED:
            txn.move_to(TxnPhase.ABORTING)  # no second abort or finish

            def aborted(ok: bool, result: Any) -> None:
                self._end(api, txn, aborted=True)
                if reply is not None:
                    reply.resolve(None) if ok else reply.fail(result)

            def tpc_abort() -> None:  # on the commit worker
                self.storage.tpc_abort(txn.meta)
                self.oid_guard.undo(txn.oid_raises)

            self._on_worker(tpc_abort, (), aborted)
            return
        if phase is TxnPhase.WAITING:
            self.lock.cancel(txn)
        if phase in (TxnPhase.OPEN, TxnPhase.WAITING):
            self._end(api, txn, aborted=True)
        # VOTING: _voted sees ``aborted`` and aborts when the replay returns.
        # FINISHING: the commit is completing; it cannot be taken back.  ABORTING: under way.
        if reply is not None:
            reply.resolve(None)

    def _release(self, txn: ServerTransaction) -> None:
        if txn.timeout_handle is not None:
            txn.timeout_handle.cancel()
            txn.timeout_handle = None
        txn.locked_at = None
        if self.lock.holder is txn:
            now = time.monotonic()
            wait = self.lock_granted_at - (txn.vote_started_at or self.lock_granted_at)
            hold = now - self.lock_granted_at
            self.lock_hold_seconds += hold
            observer = self.server.observer
            if observer is not None:
                observer.lock_released(self.state.storage_id, wait, hold)
        self.lock.release(txn)

    def _end(self, api: ZEOStorage, txn: ServerTransaction, aborted: bool) -> None:
        if txn.phase is TxnPhase.ENDED:
            return
        self._release(txn)
        txn.discard()
        self.state.stats_active_txns -= 1
        if aborted:
            self.state.stats_aborts += 1
        api.transaction_ended(txn)

    def _timed_out(self, api: ZEOStorage, txn: ServerTransaction, timeout: float) -> None:
        if txn.phase is TxnPhase.ENDED or self.lock.holder is not txn:
            return
        timeout_logger.critical("(%s) Transaction timeout after %s seconds", api.label,
                                timeout)
        api.close()
