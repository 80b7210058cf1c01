"""Serving an MVCC storage (``IMVCCStorage``: RelStorage) as one storage to the server.

An MVCC storage instance belongs to one thread and reads from a database snapshot that moves
only when it is synced.  :class:`MVCCStorage` gives the server the storage API it uses for
FileStorage, backed by one instance per thread (``new_instance()``), and keeps ZEO's
guarantees on top:

* **Reads** run off the loop (database round trips).  :meth:`MVCCStorage.load_before` first
  brings the thread's instance up to the tid the server has published (never a snapshot
  older than what a client has been told), then answers from the instance's cache
  (``load``) when the current revision answers the question, and asks the database
  (``loadBefore``) only when it does not.  It returns the snapshot it read, so the server
  can close the record's validity at any commit it published meanwhile
  (``StorageState.load_done``).
* **Commits** run on the commit worker's own instance, synced to the database's newest state
  at ``tpc_begin``.  Conflicts are found at ``store`` (as FileStorage does) and resolved by
  the server's allow-listed resolver, so the MVCC storage's vote sees none: RelStorage's own
  resolution reads the base revision from its instance's snapshot, which a server shares
  between clients with different views (it would raise ``CacheConsistencyError``).
* ``len()`` opens a database connection per call in RelStorage: the length and size are
  measured at most every :data:`SIZE_INTERVAL` seconds, on the commit worker.
* :meth:`MVCCStorage.changes_since` answers "which objects changed after tid X" with one
  indexed query (RelStorage's poller) instead of an iteration, for cache verification.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import zope.interface
from ZODB.interfaces import IMVCCStorage
from ZODB.POSException import ConflictError, POSKeyError, ReadConflictError, StorageError
from ZODB.utils import p64, u64, z64

logger = logging.getLogger("ZEO.StorageServer")

#: Seconds between two measures of the storage's length and size.
SIZE_INTERVAL = 10.0
#: Most transactions the relay reads in one query.
RELAY_BATCH = 1000


class VoteRaced(ConflictError):
    """The storage's vote met a conflict the server's store-time check did not see: another
    server committed in between.  The commit path votes again once (ZEO.server.commit)."""


class UnservableStorage(ValueError):
    """A storage configuration the server cannot serve with ZEO's guarantees."""


def is_mvcc(storage: Any) -> bool:
    return IMVCCStorage.providedBy(storage)


def plain_error(exc: BaseException, oid: bytes | None = None) -> BaseException:
    """ZODB's own exception for a storage-specific one (RelStorage's subclasses, whose text
    names the database, its DSN, pids and threads): what a client can decode and a peer may
    read.  Anything else from the storage's own modules becomes a ``StorageError`` naming
    its class only (the server logs the original)."""
    if isinstance(exc, VoteRaced):
        return exc  # ours: the commit path turns it into a ConflictError if it must
    if type(exc).__name__ == "CacheConsistencyError":
        # RelStorage's vote met a conflict its own resolution could not place (the server
        # resolves real ones first): a conflict to the client.
        return ConflictError(oid=oid)
    if isinstance(exc, POSKeyError):
        return POSKeyError(oid if oid is not None else (exc.args[0] if exc.args else None))
    if isinstance(exc, ConflictError) and type(exc) not in (ConflictError, ReadConflictError):
        kind = ReadConflictError if isinstance(exc, ReadConflictError) else ConflictError
        serials = exc.serials if getattr(exc, "serials", None) else None
        return kind(oid=exc.oid, serials=serials)
    if type(exc).__module__.split(".")[0] in _DATABASE_MODULES:
        logger.error("storage error: %s", exc, exc_info=exc)
        return StorageError(f"{type(exc).__name__} in the storage (see the server's log)")
    return exc


#: Where the exceptions of an MVCC storage and its database drivers come from.
_DATABASE_MODULES = frozenset(("relstorage", "psycopg2", "psycopg2cffi", "pg8000"))


def _refuse_storage_resolution() -> None:
    """Make RelStorage's own conflict resolution (inside its vote) refuse every conflict.

    It unpickles records with ZODB's ``find_global``, which imports any module a record
    names: a client must never reach it (docs/security.rst).  The server resolves conflicts
    itself before RelStorage votes (:meth:`MVCCStorage.store`), so RelStorage only meets one
    that a client forced (a store claiming an existing object is new) or a commit made
    elsewhere in between: a ConflictError is the answer to both.
    """
    try:
        from relstorage.storage.tpc import vote
    except ImportError:
        return
    resolver = getattr(vote, "_CachedConflictResolver", None)
    if resolver is None or getattr(resolver, "_zeo_refuses", False):
        return

    def refuse(self: Any, oid: bytes, committedSerial: bytes, oldSerial: bytes,  # noqa: N803
               newpickle: bytes, committedData: bytes = b"") -> bytes:
        raise ConflictError(oid=oid, serials=(committedSerial, oldSerial), data=newpickle)

    resolver.tryToResolveConflict = refuse
    resolver._zeo_refuses = True


def _plain_errors(method: Any) -> Any:
    """Raise :func:`plain_error` of what ``method`` raises (its first argument is the oid)."""

    def call(self: Any, *args: Any, **kw: Any) -> Any:
        try:
            return method(self, *args, **kw)
        except Exception as e:
            plain = plain_error(e, args[0] if args and type(args[0]) is bytes else None)
            if plain is e:
                raise
            if type(plain) is StorageError:
                # The database connection may be gone (a PostgreSQL restart): this thread
                # starts over with a new instance next time.
                self._discard_instance()
            raise plain from None

    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


class MVCCStorage:
    """The storage API the server uses, over one ``IMVCCStorage`` instance per thread.

    Thread contract: every method may be called from any thread; each thread uses its own
    instance.  The commit path calls ``tpc_*`` and the writes from its single worker thread.
    """

    def __init__(self, base: Any, storage_id: str = "1") -> None:
        if getattr(base, "keep_history", True) is False:
            raise UnservableStorage(
                f"storage {storage_id!r}: a history-free RelStorage (keep-history false) keeps no "
                "old revisions, and ZEO clients read them (loadBefore at their snapshot): "
                "set keep-history true in the <relstorage> section")
        _refuse_storage_resolution()
        self.base = base
        self._local = threading.local()
        self._instances: list[Any] = []
        self._poll_connections: list[tuple[Any, Any]] = []
        #: Backends our NOTIFYs come from: the relay ignores them (we published those).
        self._notifying_pids: set[int] = set()
        self._listen_failed = False
        self._instances_lock = threading.Lock()
        self._resolved: list[bytes] = []
        #: The server's allow-listed resolver (StorageState sets it).
        self.tryToResolveConflict: Any = None
        self._length = len(base)
        self._size = base.getSize()
        self._sized_at = time.monotonic()
        #: Raised by a pack: every instance moves its snapshot past it before reading again.
        self._generation = 0
        self.loads_from_cache = 0
        self.loads_from_database = 0
        self.syncs = 0
        provided = [i for i in zope.interface.providedBy(base) if i is not IMVCCStorage]
        zope.interface.directlyProvides(self, *provided)
        helper = getattr(base, "blobhelper", None)
        if helper is not None and getattr(helper, "shared_blob_helper", False):
            self.fshelper = helper.fshelper

    # -- instances -----------------------------------------------------------------------

    def _instance(self) -> Any:
        """This thread's instance (made on first use)."""
        inst = getattr(self._local, "instance", None)
        if inst is None:
            inst = self._local.instance = self.base.new_instance()
            with self._instances_lock:
                self._instances.append(inst)
        return inst

    def _discard_instance(self) -> None:
        """Forget this thread's instance (after a database error); a new one is made on next
        use.  An open transaction on it is lost: its commit fails, and the client retries."""
        inst = getattr(self._local, "instance", None)
        self._local.instance = None
        self._local.generation = -1
        if inst is not None:
            with self._instances_lock:
                if inst in self._instances:
                    self._instances.remove(inst)
            try:
                inst.release()
            except Exception:
                logger.debug("releasing a broken instance", exc_info=True)
        self._drop_poll_connection()

    def _synced(self, at_least: bytes | None = None) -> Any:
        """This thread's instance, its snapshot moved to the database's newest state when it
        is older than ``at_least`` (always, when None)."""
        inst = self._instance()
        local = self._local
        if (at_least is None or getattr(local, "generation", -1) != self._generation
                or (inst.lastTransaction() or z64) < at_least):
            local.generation = self._generation
            inst.sync()
            inst.poll_invalidations()
            self.syncs += 1
        return inst

    def snapshot_tid(self) -> bytes:
        """The tid this thread's instance reads at."""
        return self._instance().lastTransaction() or z64

    # -- reads (any thread but the loop's) -------------------------------------------------

    @_plain_errors
    def load_before(self, oid: bytes, tid: bytes, at_least: bytes
                    ) -> tuple[tuple[bytes, bytes, bytes | None] | None, bytes]:
        """``(loadBefore(oid, tid), snapshot)`` read at a snapshot of at least ``at_least``.

        A record whose end is None is current as of ``snapshot``; the caller closes it at
        any later commit of ``oid`` it has published.
        """
        inst = self._synced(at_least)
        return self._load_at(inst, oid, tid), inst.lastTransaction() or z64

    @_plain_errors
    def load_many(self, requests: list[tuple[bytes, bytes]], at_least: bytes
                  ) -> tuple[list[Any], bytes]:
        """:meth:`load_before` of each ``(oid, tid)`` at one snapshot: ``(results,
        snapshot)``, a result being the record, None, or the exception to answer with.
        The current revisions come from the database in one query (``prefetch``)."""
        inst = self._synced(at_least)
        if len(requests) > 1:
            inst.prefetch([oid for oid, _tid in requests])
        results: list[Any] = []
        for oid, tid in requests:
            try:
                results.append(self._load_at(inst, oid, tid))
            except Exception as e:
                plain = plain_error(e, oid)
                results.append(plain)
                if type(plain) is StorageError:  # the connection is gone: the rest fail too
                    self._discard_instance()
                    results.extend([plain] * (len(requests) - len(results)))
                    break
        return results, inst.lastTransaction() or z64

    def _load_at(self, inst: Any, oid: bytes, tid: bytes
                 ) -> tuple[bytes, bytes, bytes | None] | None:
        try:
            data, serial = inst.load(oid)
        except POSKeyError:
            data = serial = None
        if serial is not None and serial < tid:
            self.loads_from_cache += 1
            return (data, serial, None)
        self.loads_from_database += 1
        return inst.loadBefore(oid, tid)

    def loadBefore(self, oid: bytes, tid: bytes) -> Any:
        return self.load_before(oid, tid, tid)[0]

    @_plain_errors
    def load(self, oid: bytes, version: str = "") -> tuple[bytes, bytes]:
        return self._synced().load(oid)

    @_plain_errors
    def loadSerial(self, oid: bytes, serial: bytes) -> bytes:
        inst = self._synced(z64)  # after a pack, past it
        if serial <= (inst.lastTransaction() or z64):
            return inst.loadSerial(oid, serial)
        return self._synced().loadSerial(oid, serial)  # newer than this snapshot

    @_plain_errors
    def getTid(self, oid: bytes) -> bytes:
        return self._synced().getTid(oid)

    @_plain_errors
    def history(self, oid: bytes, size: int = 1) -> Any:
        return self._synced().history(oid, size=size)

    @_plain_errors
    def record_iternext(self, next: Any = None) -> Any:
        return self._instance().record_iternext(next)

    @_plain_errors
    def iterator(self, start: bytes | None = None, stop: bytes | None = None) -> Any:
        return self._synced().iterator(start, stop)

    @_plain_errors
    def undoLog(self, first: int = 0, last: int = -20) -> Any:
        return self._synced().undoLog(first, last)

    @_plain_errors
    def undoInfo(self, first: int = 0, last: int = -20, specification: Any = None) -> Any:
        return self._synced().undoInfo(first, last, specification)

    @_plain_errors
    def loadBlob(self, oid: bytes, serial: bytes) -> str:
        return self._synced().loadBlob(oid, serial)

    @_plain_errors
    def openCommittedBlobFile(self, oid: bytes, serial: bytes, blob: Any = None) -> Any:
        return self._synced().openCommittedBlobFile(oid, serial, blob)

    def changes_since(self, tid: bytes) -> tuple[bytes, list[bytes]] | None:
        """``(newest tid, oids changed after tid)`` from one indexed query, or None when the
        storage cannot say (not RelStorage, or ``tid`` is before what it keeps)."""
        adapter: Any = getattr(self.base, "_adapter", None)
        poller = getattr(adapter, "poller", None)
        if adapter is None or poller is None:
            return None
        conn, cursor = adapter.connmanager.open_for_load()
        try:
            changes, newest = poller.poll_invalidations(conn, cursor, u64(tid))
            if changes is None:
                return None
            oids = list(dict.fromkeys(p64(oid_int) for oid_int, _tid in changes))
        finally:
            adapter.connmanager.close(conn, cursor)
        return p64(newest), oids

    # -- the relay (ZEO.server.relay): commits made through other servers -------------------

    def _poll_cursor(self) -> tuple[Any, Any] | None:
        """This thread's connection for the relay's queries and notifications (read
        committed, its own transactions), or None when the storage is not RelStorage."""
        adapter: Any = getattr(self.base, "_adapter", None)
        if adapter is None or not hasattr(adapter, "connmanager"):
            return None
        pair = getattr(self._local, "poll", None)
        if pair is None:
            pair = self._local.poll = adapter.connmanager.open()
            with self._instances_lock:
                self._poll_connections.append(pair)
            backend_pid = getattr(pair[0], "get_backend_pid", None)
            if backend_pid is not None:
                self._notifying_pids.add(backend_pid())
        return pair

    def transactions_between(self, lo: bytes, hi: bytes | None
                             ) -> list[tuple[bytes, list[bytes]]]:
        """The committed transactions after ``lo`` (and before ``hi``), oldest first, each
        with the oids it changed: at most :data:`RELAY_BATCH` of them (the rest next time).

        Every commit before a visible one is visible too (RelStorage chooses tids and
        commits under one lock), so the list has no gaps.
        """
        pair = self._poll_cursor()
        if pair is None:
            return []
        conn, cursor = pair
        params: tuple = (u64(lo),) if hi is None else (u64(lo), u64(hi))
        try:
            cursor.execute(
                "SELECT tid FROM transaction WHERE tid > %s"
                + ("" if hi is None else " AND tid < %s")
                + f" ORDER BY tid LIMIT {RELAY_BATCH}", params)
            tids = [row[0] for row in cursor.fetchall()]
            oids: dict[int, list[bytes]] = {tid: [] for tid in tids}
            if tids:
                cursor.execute("SELECT tid, zoid FROM object_state WHERE tid >= %s AND "
                               "tid <= %s", (tids[0], tids[-1]))
                for tid, zoid in cursor.fetchall():
                    if tid in oids:
                        oids[tid].append(p64(zoid))
            conn.rollback()
        except Exception:
            self._drop_poll_connection()
            raise
        return [(p64(tid), oids[tid]) for tid in tids]

    def newest_committed(self) -> bytes | None:
        """The database's newest committed tid (None when the storage cannot say)."""
        pair = self._poll_cursor()
        if pair is None:
            return None
        conn, cursor = pair
        try:
            cursor.execute("SELECT max(tid) FROM transaction")
            row = cursor.fetchone()
            conn.rollback()
        except Exception:
            self._drop_poll_connection()
            raise
        return p64(row[0] or 0)

    def _drop_poll_connection(self) -> None:
        pair = getattr(self._local, "poll", None)
        self._local.poll = None
        if pair is not None:
            with self._instances_lock:
                if pair in self._poll_connections:
                    self._poll_connections.remove(pair)
            try:
                self.base._adapter.connmanager.close(*pair)
            except Exception:
                pass

    def notify(self, channel: str, tid: bytes) -> None:
        """Wake the other servers' relays (a hint: they poll anyway)."""
        pair = self._poll_cursor()
        if pair is None:
            return
        conn, cursor = pair
        try:
            cursor.execute("SELECT pg_notify(%s, %s)", (channel, tid.hex()))
            conn.commit()
        except Exception:
            logger.debug("NOTIFY failed", exc_info=True)
            self._drop_poll_connection()

    def listen(self, channel: str) -> Any:
        """A connection listening on ``channel`` (psycopg2 only), or None."""
        adapter: Any = getattr(self.base, "_adapter", None)
        if adapter is None or not hasattr(adapter, "connmanager"):
            return None
        try:
            conn, cursor = adapter.connmanager.open()
            if not hasattr(conn, "notifies") or not hasattr(conn, "poll"):
                adapter.connmanager.close(conn, cursor)
                return None  # not psycopg2: poll only
            conn.rollback()
            conn.autocommit = True
            cursor.execute(f"LISTEN {channel}")
            cursor.close()
        except Exception:
            # Logged once until it works again (the database may be down for a while).
            if not self._listen_failed:
                self._listen_failed = True
                logger.warning("cannot LISTEN on %s: polling only", channel, exc_info=True)
            return None
        self._listen_failed = False
        return conn

    def drain_notifications(self, conn: Any) -> int:
        """How many commits of other servers ``conn`` heard of (ours are not counted)."""
        conn.poll()
        ours = self._notifying_pids
        n = sum(1 for note in conn.notifies if getattr(note, "pid", None) not in ours)
        del conn.notifies[:]
        return n

    # -- what the server asks of any storage ----------------------------------------------

    def lastTransaction(self) -> bytes:
        return self._instance().lastTransaction() or z64

    def newest_tid(self) -> bytes:
        """The database's newest tid (a sync of this thread's instance)."""
        return self._synced().lastTransaction() or z64

    def __len__(self) -> int:
        return self._length

    def getSize(self) -> int:
        return self._size

    def _measure(self, inst: Any) -> None:
        now = time.monotonic()
        if now - self._sized_at >= SIZE_INTERVAL:
            self._sized_at = now
            try:
                self._length = len(inst)
                self._size = inst.getSize()
            except Exception:
                logger.exception("measuring %s", self.getName())

    def getName(self) -> str:
        return self.base.getName()

    def sortKey(self) -> str:
        return self.base.sortKey()

    def isReadOnly(self) -> bool:
        return self.base.isReadOnly()

    def supportsUndo(self) -> bool:
        supports = getattr(self.base, "supportsUndo", None)
        return bool(supports()) if supports is not None else False

    def temporaryDirectory(self) -> str:
        return self.base.temporaryDirectory()

    @_plain_errors
    def new_oid(self) -> bytes:
        return self._instance().new_oid()

    @_plain_errors
    def pack(self, t: float, referencesf: Any) -> None:
        self._synced().pack(t, referencesf)
        self._generation += 1

    def registerDB(self, db: Any) -> None:
        pass  # the server publishes what it commits; other writers are polled for

    def close(self) -> None:
        with self._instances_lock:
            instances, self._instances = self._instances, []
            polls, self._poll_connections = self._poll_connections, []
        for pair in polls:
            try:
                self.base._adapter.connmanager.close(*pair)
            except Exception:
                pass
        for inst in instances:
            try:
                inst.release()
            except Exception:
                logger.exception("releasing an instance of %s", self.getName())
        self.base.close()

    # -- the commit path (its worker thread) ---------------------------------------------------

    @_plain_errors
    def tpc_begin(self, txn: Any, tid: bytes | None = None, status: str = " ") -> None:
        inst = self._synced()  # conflicts are judged against the newest state
        self._resolved = []
        if tid is None and status == " ":
            inst.tpc_begin(txn)
        else:
            inst.tpc_begin(txn, tid, status)

    def _current_serial(self, inst: Any, oid: bytes) -> bytes | None:
        try:
            return inst.load(oid)[1]
        except POSKeyError:
            return None

    @_plain_errors
    def store(self, oid: bytes, serial: bytes, data: bytes, version: str, txn: Any) -> None:
        inst = self._instance()
        # A new object (serial z64) has nothing to conflict with; one that exists after all
        # is refused by RelStorage's vote (_refuse_storage_resolution).  Checking costs a
        # query per object the cache does not hold: a bulk import would pay one per record.
        committed = None if serial == z64 else self._current_serial(inst, oid)
        if committed is not None and committed != serial:
            resolve = self.tryToResolveConflict
            if resolve is None:
                raise ConflictError(oid=oid, serials=(committed, serial), data=data)
            data = resolve(oid, committed, serial, data)  # raises ConflictError
            serial = committed
            self._resolved.append(oid)
        inst.store(oid, serial, data, version, txn)

    @_plain_errors
    def storeBlob(self, oid: bytes, serial: bytes, data: bytes, blobfilename: str,
                  version: str, txn: Any) -> None:
        inst = self._instance()
        committed = self._current_serial(inst, oid)
        if committed is not None and committed != serial:
            raise ConflictError(oid=oid, serials=(committed, serial), data=data)
        inst.storeBlob(oid, serial, data, blobfilename, version, txn)

    @_plain_errors
    def restore(self, oid: bytes, serial: bytes, data: bytes | None, version: str,
                prev_txn: bytes | None, txn: Any) -> None:
        self._instance().restore(oid, serial, data, version, prev_txn, txn)

    @_plain_errors
    def restoreBlob(self, *args: Any) -> None:
        self._instance().restoreBlob(*args)

    @_plain_errors
    def deleteObject(self, oid: bytes, serial: bytes, txn: Any) -> None:
        self._instance().deleteObject(oid, serial, txn)

    @_plain_errors
    def checkCurrentSerialInTransaction(self, oid: bytes, serial: bytes, txn: Any) -> None:
        self._instance().checkCurrentSerialInTransaction(oid, serial, txn)

    @_plain_errors
    def undo(self, transaction_id: bytes, txn: Any) -> Any:
        return self._instance().undo(transaction_id, txn)

    @_plain_errors
    def tpc_vote(self, txn: Any) -> list[bytes]:
        try:
            voted = self._instance().tpc_vote(txn) or ()
        except Exception as e:
            plain = plain_error(e)
            if isinstance(plain, ConflictError) and not isinstance(plain, VoteRaced):
                raise VoteRaced(oid=plain.oid, serials=getattr(plain, "serials", None)) from None
            raise
        return list(dict.fromkeys([*self._resolved, *voted]))

    @_plain_errors
    def tpc_finish(self, txn: Any, f: Any = None) -> bytes:
        inst = self._instance()
        tid = inst.tpc_finish(txn, f)
        self._measure(inst)
        return tid

    def tpc_abort(self, txn: Any) -> None:
        self._resolved = []
        self._instance().tpc_abort(txn)
