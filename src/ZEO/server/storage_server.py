"""The StorageServer: serves named ZODB storages to ZEO 5/6 clients.

Threads (see docs/design.rst): one asyncio loop thread for all network I/O, dispatch and reads;
per storage one *commit worker* thread for the vote replay, ``tpc_vote``, ``tpc_finish`` and
``tpc_abort``; a small pool for reads that may wait on the storage lock, pack, undo logs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import socket
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import ZODB.event
from ZODB.POSException import ConflictError
from ZODB.serialize import referencesf
from ZODB.utils import p64, u64, z64
from zope.interface import providedBy

from .. import address
from ..protocol.framing import DEFAULT_MAX_MESSAGE_SIZE
from .commit import CommitPath
from .mvcc import MVCCStorage, is_mvcc
from .relay import Relay
from .resolve import ClassAllowList, ConflictResolver
from .session import Session

# ZEO 6's logger names, which operators' log monitoring greps for.
logger = logging.getLogger("ZEO.StorageServer")
timeout_logger = logger
listener_logger = logging.getLogger("ZEO.asyncio.server")


class Serving:
    """Event published when a server starts serving at ``address``."""

    def __init__(self, server: StorageServer, address: Any = None) -> None:
        self.server = server
        self.address = address


class Closed:
    """Event published when a server has closed."""

    def __init__(self, server: StorageServer) -> None:
        self.server = server


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An event loop for the server: uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _conflict_to_client(oid: bytes, committedSerial: bytes, oldSerial: bytes, newpickle: bytes,
                        committedData: bytes = b"") -> None:
    # client-conflict-resolution: conflicts go back to the client instead of being resolved here.
    raise ConflictError(oid=oid, serials=(committedSerial, oldSerial), data=newpickle)


def _wrapped_storages(storage: Any) -> list[Any]:
    """``storage`` and the storages it wraps: ZODB's ``BlobStorage`` (a plain wrapper since
    ZODB 5, which keeps the base in a private attribute) and zope.proxy proxies."""
    found = [storage]
    seen = {id(storage)}
    # No proxy can exist before zope.proxy is imported, and importing it costs memory.
    zope_proxy = sys.modules.get("zope.proxy")
    current = storage
    while True:
        inner = vars(current).get("_BlobStorage__storage") if hasattr(current, "__dict__") \
            else None
        if inner is None and zope_proxy is not None and zope_proxy.isProxy(current):
            inner = zope_proxy.getProxiedObject(current)
        if inner is None or id(inner) in seen:
            return found
        seen.add(id(inner))
        found.append(inner)
        current = inner


class _ServerDB:
    """What a served storage sees as its database: it relays external invalidations."""

    def __init__(self, state: StorageState) -> None:
        self._state = state

    def invalidate(self, tid: bytes, oids: Any, version: str = "") -> None:
        state = self._state
        state.server.event_loop.call_soon_threadsafe(state.publish, tid, list(oids), None)

    def invalidateCache(self) -> None:
        # The storage lost track of what changed: make every client reconnect and verify.
        state = self._state
        state.server.event_loop.call_soon_threadsafe(state.close_sessions)

    def transform_record_data(self, data: bytes) -> bytes:
        return data

    def untransform_record_data(self, data: bytes) -> bytes:
        return data

    references = staticmethod(referencesf)


#: Most MVCC loads answered from one snapshot and one query.
LOAD_BATCH = 256
#: Longest an MVCC load reply waits for the publication of the commit it read.
HOLD_LIMIT = 1.0


class StorageState:
    """Everything the server keeps for one served storage.

    ``sessions`` (the registered sessions, in registration order), the commit ``lock``,
    the invalidation queue ``invq`` (newest first), ``published_tid`` (the last tid whose
    invalidations the loop has sent) and the counters of ``status()``.
    """

    def __init__(self, server: StorageServer, storage_id: str, storage: Any) -> None:
        self.server = server
        self.storage_id = storage_id
        #: An MVCC storage (RelStorage) is served through ZEO.server.mvcc: reads off the
        #: loop at a snapshot no older than the published tid, conflicts found at store.
        self.mvcc = is_mvcc(storage)
        if self.mvcc:
            storage = MVCCStorage(storage, storage_id)
        self.storage = storage
        #: MVCC loads whose record is newer than the published tid, until it is published:
        #: (serial, oid, result, snapshot, reply).
        self._held_loads: list[tuple[bytes, bytes, Any, bytes, Any]] = []
        #: MVCC loads asked in this loop turn: (oid, tid, reply).
        self._load_queue: list[tuple[bytes, bytes, Any]] = []
        #: Commits the relay found while one of ours was finishing (publish_found).
        self._found: list[tuple[bytes, list[bytes]]] = []
        #: Commits made through other servers of the database (ZEO.server.relay), or None.
        self.relay: Relay | None = None
        #: Why this storage is no longer served (refuse_service), or None.
        self.refused: str | None = None
        self.loop = server.event_loop
        self.sessions: dict[Session, None] = {}
        self.invq: deque[tuple[bytes, Any]] = deque(maxlen=max(server.invalidation_queue_size, 1))
        last = storage.lastTransaction() or z64
        seeded = False
        if server.invalidation_queue_size > 0 and hasattr(storage, "lastInvalidations"):
            try:
                for tid, oids in storage.lastInvalidations(server.invalidation_queue_size):
                    self.invq.appendleft((tid, list(oids)))
                seeded = bool(self.invq)
            except Exception:
                logger.exception("could not read the last invalidations of %r", storage_id)
        if not seeded:
            self.invq.appendleft((last, None))
        self.published_tid: bytes = last
        self.start = time.ctime()
        self.stats_loads = 0
        self.stats_stores = 0
        self.stats_commits = 0
        self.stats_aborts = 0
        self.stats_conflicts = 0
        self.stats_conflicts_resolved = 0
        self.stats_active_txns = 0
        self.stats_loads_behind_finish = 0
        self.stats_vote_retries = 0  # MVCC votes run again after a cross-server race
        #: The commit path: lock, worker thread, vote, finish, abort (ZEO.server.commit).
        self.commits = CommitPath(self, _wrapped_storages(storage)[-1])
        self.supports_undo = _supports_undo(storage)
        self._interfaces = tuple(
            (iface.__module__, iface.__name__) for iface in providedBy(storage).__iro__
        )
        for s in _wrapped_storages(storage):
            if hasattr(s, "tryToResolveConflict"):
                s.tryToResolveConflict = (
                    _conflict_to_client if server.client_conflict_resolution
                    else ConflictResolver(s, server.conflict_classes))
        if hasattr(storage, "registerDB"):
            storage.registerDB(_ServerDB(self))

    # -- reads ---------------------------------------------------------------------------

    def info(self) -> dict:
        storage = self.storage
        return {
            "length": len(storage),
            "size": storage.getSize(),
            "name": storage.getName(),
            "supportsUndo": self.supports_undo,
            "supports_record_iternext": hasattr(storage, "record_iternext"),
            "interfaces": self._interfaces,
        }

    def status(self) -> dict:
        holder = self.commits.lock.holder
        return {
            "connections": len(self.sessions),
            "loads": self.stats_loads,
            "stores": self.stats_stores,
            "commits": self.stats_commits,
            "aborts": self.stats_aborts,
            "active_txns": self.stats_active_txns,
            "lock_time": holder.locked_at if holder is not None else None,
            "conflicts": self.stats_conflicts,
            "conflicts_resolved": self.stats_conflicts_resolved,
            "start": self.start,
            "waiting": self.commits.lock.waiting,
            "timeout-thread-is-alive": True if self.server.transaction_timeout else "stub",
            "last-transaction": self.published_tid.hex(),
        }

    def get_invalidations(self, tid: bytes) -> Any:
        invq = self.invq
        if invq and invq[-1][0] <= tid:
            latest = invq[0][0]
            oids: dict[bytes, None] = {}
            for qtid, qoids in invq:
                if qtid <= tid:
                    break
                if qoids:
                    oids.update(dict.fromkeys(qoids))
            return latest, list(oids)
        if self.mvcc:  # one indexed query, not an iteration
            return self.loop.run_in_executor(
                self.server.read_executor, self._changes_since, tid, self.published_tid)
        age = self.server.invalidation_age
        if age and time.time() - _tid_time(tid) < age:
            return self.loop.run_in_executor(
                self.server.read_executor, self._iterate_invalidations, tid
            )
        return None

    def _changes_since(self, tid: bytes, published: bytes) -> Any:
        """``(published, oids changed after tid)`` of an MVCC storage, or None.

        The database may be ahead of ``published`` (a commit not yet published): its oids
        are included too, which only costs the client a reload, and the client is told
        ``published``, the tid it has registered at.
        """
        found = self.storage.changes_since(tid)
        if found is None:
            return None
        return published, found[1]

    def _iterate_invalidations(self, tid: bytes) -> Any:
        oids: dict[bytes, None] = {}
        latest = None
        for txn in self.storage.iterator(p64(u64(tid) + 1)):
            oids.update(dict.fromkeys(rec.oid for rec in txn))
            latest = txn.tid
        if latest is None:
            return None
        return latest, list(oids)

    # -- invalidations -----------------------------------------------------------------

    def publish_found(self, found: Any, below: bytes | None = None) -> None:
        """On the loop: publish commits found in the database (made through other servers),
        oldest first, to every session.  While a commit of ours finishes they wait: it
        publishes the ones before its tid first (``below``: CommitPath._finished), its own,
        then, after its committer's reply, the rest."""
        if found:
            self._found.extend(found)
        if (self.commits.finishing and below is None) or not self._found:
            return
        found = sorted(self._found)
        if below is None:
            self._found = []
        else:
            self._found = [f for f in found if f[0] >= below]
            found = [f for f in found if f[0] < below]
        published = self.published_tid
        relayed = 0
        for tid, oids in found:
            if tid > published and self.record(tid, oids):
                published = tid
                relayed += 1
                self.broadcast(tid, oids, None)
        relay = self.relay
        if relay is not None:
            relay.relayed += relayed
            if published >= relay.seen_tid:
                relay.pending = 0
        self.release_held_loads()

    def refuse_service(self, why: str) -> None:
        """On the loop: close every session of this storage and refuse new registrations
        (``register`` raises), for a reason a restart must clear."""
        self.refused = why
        self.close_sessions()

    def catch_up(self) -> asyncio.Future:
        """Publish every commit the database holds now (``register``, ``lastTransaction``
        of an MVCC storage: a client is never told a tid older than the database's)."""
        fut = self.loop.run_in_executor(self.server.read_executor,
                                        self.storage.transactions_between,
                                        self.published_tid, None)

        def done(f: asyncio.Future) -> None:
            if not f.cancelled() and f.exception() is None:
                self.publish_found(f.result())

        fut.add_done_callback(done)
        return fut

    def publish(self, tid: bytes, oids: list, committer: Session | None) -> None:
        """On the loop: record ``tid`` and send its invalidations to every other session."""
        if self.record(tid, oids):
            self.broadcast(tid, oids, committer)
            self.release_held_loads()

    # -- MVCC reads ------------------------------------------------------------------------

    def load_mvcc(self, oid: bytes, tid: bytes, reply: Any) -> None:
        """``loadBefore`` on a read thread, at a snapshot no older than the published tid.

        The loads asked in one loop turn (a client's pipelined prefetches, several clients'
        misses) go to the read thread together: one snapshot, one query for their current
        revisions.  :meth:`_loads_done` answers each ``reply`` on the loop.
        """
        self._load_queue.append((oid, tid, reply))
        if len(self._load_queue) == 1:
            self.loop.call_soon(self._drain_loads)

    def _drain_loads(self) -> None:
        queue, self._load_queue = self._load_queue, []
        at_least = self.published_tid
        for i in range(0, len(queue), LOAD_BATCH):
            batch = queue[i:i + LOAD_BATCH]
            fut = self.loop.run_in_executor(
                self.server.read_executor, self.storage.load_many,
                [(oid, tid) for oid, tid, _reply in batch], at_least)
            fut.add_done_callback(functools.partial(self._loads_done, batch=batch))

    def _loads_done(self, fut: asyncio.Future, *, batch: list[tuple[bytes, bytes, Any]]
                    ) -> None:
        """On the loop: answer MVCC loads so that no client keeps a stale revision.

        A record newer than the published tid waits until it is published (its
        invalidation goes first).  A record current at the snapshot but changed by a commit
        published since is closed at that commit: the reply then says when it ended.
        """
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None or fut.cancelled():
            for _oid, _tid, reply in batch:
                reply.fail(exc or asyncio.CancelledError())
            return
        results, snapshot = fut.result()
        published = self.published_tid
        for (oid, _tid, reply), result in zip(batch, results):
            if isinstance(result, BaseException):
                reply.fail(result)
            elif result is None:
                reply.resolve(None)
            elif result[1] > published:
                if not self._held_loads:
                    self.loop.call_later(HOLD_LIMIT, self._release_stale_loads)
                self._held_loads.append((result[1], oid, result, snapshot, reply))
            else:
                reply.resolve(self._closed_at_publish(oid, result, snapshot))

    def _closed_at_publish(self, oid: bytes, result: tuple, snapshot: bytes) -> tuple:
        data, serial, end = result
        if self.published_tid <= snapshot:
            return result
        first = None
        for qtid, qoids in self.invq:  # newest first
            if qtid <= snapshot:
                break
            if qoids is None:  # not known: valid up to the snapshot, no further
                first = p64(u64(snapshot) + 1)
                break
            if oid in qoids:
                first = qtid
        else:  # the queue does not reach back to the snapshot
            first = p64(u64(snapshot) + 1)
        if first is not None and (end is None or end > first):
            return data, serial, first
        return result

    def _release_stale_loads(self) -> None:
        """Answer loads held for a commit this server has not published within
        :data:`HOLD_LIMIT` (one made by another writer of the database): a client's cache
        takes a record before its invalidation (zeo-facts §4.4), so waiting is an ordering
        nicety, never worth a hang."""
        held, self._held_loads = self._held_loads, []
        for _serial, oid, result, snapshot, reply in held:
            reply.resolve(self._closed_at_publish(oid, result, snapshot))

    def release_held_loads(self) -> None:
        held = self._held_loads
        if not held:
            return
        published = self.published_tid
        self._held_loads = [h for h in held if h[0] > published]
        for serial, oid, result, snapshot, reply in held:
            if serial <= published:
                reply.resolve(self._closed_at_publish(oid, result, snapshot))

    def record(self, tid: bytes, oids: list) -> bool:
        """Make ``tid`` the last published tid and queue its invalidations; False (and
        nothing recorded) when it is not after the last one."""
        if tid <= self.published_tid:
            # Only an external invalidation (a storage re-reporting a tid) can get here;
            # clients must never see tids go backwards (zeo-facts §4.4 rule 2).
            logger.warning("storage %r reported invalidations for %s, not after %s: ignored",
                           self.storage_id, tid.hex(), self.published_tid.hex())
            return False
        self.published_tid = tid
        self.invq.appendleft((tid, oids))
        return True

    def broadcast(self, tid: bytes, oids: list, committer: Session | None) -> None:
        """Send ``invalidateTransaction(tid, oids)`` to every session but the committer."""
        frames: dict[bytes, bytes] = {}
        args = (tid, oids)
        for session in self.sessions:
            if session is committer or session.closed:
                continue
            codec = session.core.codec
            letter = codec.letter  # type: ignore[union-attr]
            frame = frames.get(letter)
            if frame is None:
                frame = frames[letter] = session.core.send_oneway("invalidateTransaction", args)
            session.write(frame)

    def send_info(self, sessions: Any) -> None:
        info = {"length": len(self.storage), "size": self.storage.getSize()}
        for session in list(sessions):
            session.send_oneway("info", (info,))

    def close_sessions(self) -> None:
        for session in list(self.sessions):
            session.close()

    # -- pack ----------------------------------------------------------------------------

    def pack(self, t: float) -> asyncio.Future:
        fut = self.loop.run_in_executor(None, self._pack, t)
        fut.add_done_callback(self._packed)
        return fut

    def _packed(self, fut: asyncio.Future) -> None:
        if fut.exception() is None:  # the new length and size, to every client
            self.send_info(self.sessions)

    def _pack(self, t: float) -> None:
        logger.info("packing storage %r to %s", self.storage_id, t)
        self.storage.pack(t, referencesf)

    def statistics(self) -> dict:
        return dict(
            self.status(),
            storage_id=self.storage_id,
            invalidation_queue_length=len(self.invq),
            lock_wait_seconds=self.commits.lock_wait_seconds,
            lock_hold_seconds=self.commits.lock_hold_seconds,
            loads_behind_finish=self.stats_loads_behind_finish,
            vote_retries=self.stats_vote_retries,
            relay=self.relay.statistics() if self.relay is not None else None,
        )


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError, ImportError):  # not glibc
        return None


_malloc_trim = _find_malloc_trim()

#: File descriptors kept for everything but client connections: storage files, blob files,
#: logs, the admin socket, the metrics endpoint, connections being refused.
FD_RESERVE = 64


def file_limit() -> int:
    """The soft ``RLIMIT_NOFILE``, raised to the hard limit first when allowed."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def connection_limit(configured: int | None, files: int, open_iterators: int) -> int:
    """``max-connections``: as configured (10000 by default), but never more than the
    ``files`` descriptors left after the reserve and the iterators, so the server can always
    accept and refuse cleanly."""
    room = max(files - FD_RESERVE - open_iterators, 1)
    if configured is None:
        return min(room, 10000)
    if configured > room:
        logger.warning("max-connections %d is above what %d file descriptors allow: "
                       "using %d", configured, files, room)
    return min(configured, room)


def _supports_undo(storage: Any) -> bool:
    supports = getattr(storage, "supportsUndo", None)  # MappingStorage has none
    return bool(supports()) if supports is not None else False


def _tid_time(tid: bytes) -> float:
    from persistent.TimeStamp import TimeStamp

    return TimeStamp(tid).timeTime()


def remove_stale_unix_socket(path: str, what: str = "address") -> None:
    """Remove a Unix socket file left by a dead process; refuse one something listens on."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a leftover of a dead server
    else:
        raise OSError(f"{what} {path} already in use")
    finally:
        probe.close()


class StorageServer:
    """Serve ``storages`` (``{storage_id: storage}``) at ``addr`` (one address or a list).

    The constructor binds the listening sockets; :meth:`loop` (or :meth:`start_thread`)
    serves until :meth:`close`.  The keyword arguments are the ``<zeo>`` keys of
    :doc:`configuration` with underscores (``transaction_timeout``, ``max_connections``,
    ``max_buffered``, ``conflict_resolution_classes``...), with the same defaults;
    :doc:`security` explains the limits.  ``ssl`` is a server ``ssl.SSLContext``,
    ``authorization`` a ``ZEO.server.auth.Authorization``, ``admin_socket`` a path and
    ``metrics_address`` a ``(host, port)``.
    """

    def __init__(
        self,
        addr: Any,
        storages: dict[str, Any],
        read_only: bool = False,
        invalidation_queue_size: int = 100,
        invalidation_age: float | None = None,
        transaction_timeout: float | None = 30.0,
        relay_poll_interval: float = 1.0,
        relay_notify: bool = True,
        ssl: Any = None,
        authorization: Any = None,
        client_conflict_resolution: bool = False,
        msgpack: bool | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_transaction_size: int | None = 2 * 1024**3,
        inline_vote_bytes: int = 256 * 1024,
        transaction_memory: int = 32 * 1024 * 1024,
        spool_dir: str | None = None,
        max_connections: int | None = None,
        register_timeout: float | None = 60.0,
        max_output_buffer: int = 256 * 1024 * 1024,
        unix_socket_mode: int = 0o600,
        tcp_keepalive: float | None = 60.0,
        admin_socket: str | None = None,
        metrics_address: tuple[str, int] | None = None,
        max_calls_in_flight: int = 64,
        max_iterators: int = 16,
        max_open_iterators: int = 256,
        max_buffered: int = 1024**3,
        conflict_resolution_classes: Any = (),
        **ignored: Any,
    ) -> None:
        if not storages:
            raise ValueError("no storages to serve")
        if msgpack is None:
            msgpack = bool(os.environ.get("ZEO_MSGPACK"))
        self.read_only = bool(read_only)
        self.invalidation_queue_size = int(invalidation_queue_size)
        self.invalidation_age = invalidation_age
        #: MVCC storages: seconds between polls for other servers' commits (0: no relay),
        #: and whether our commits NOTIFY the other servers (ZEO.server.relay).
        self.relay_poll_interval = relay_poll_interval
        self.relay_notify = relay_notify
        self.transaction_timeout = transaction_timeout
        self.client_conflict_resolution = bool(client_conflict_resolution)
        #: What server-side conflict resolution may unpickle (ZEO.server.resolve).
        self.conflict_classes = ClassAllowList(conflict_resolution_classes)
        self.msgpack = bool(msgpack)
        self.announce = b"M5" if msgpack else b"Z5"
        self.max_message_size = max_message_size
        self.max_transaction_size = max_transaction_size  # bytes, memory + spool; None: any
        self.transaction_memory = transaction_memory  # per transaction, before spilling
        self.inline_vote_bytes = inline_vote_bytes  # smaller votes run on the loop thread
        self.spool_dir = spool_dir
        files = file_limit()
        # Server-wide, each may hold a file: at most a quarter of the descriptors.
        self.max_open_iterators = max(1, min(max_open_iterators, files // 4))
        self.max_connections = connection_limit(max_connections, files,
                                                self.max_open_iterators)
        self.max_calls_in_flight = max_calls_in_flight  # per connection, then it is not read
        self.max_iterators = max_iterators  # open storage iterators per connection
        self.max_buffered = max_buffered  # partial frames + unsent output of slow readers
        self.open_iterators = 0
        self._trim_scheduled = False
        self.buffered_input = 0
        #: Sessions whose transport paused writing (a backlog above 1 MiB).
        self.slow_readers: dict[Session, None] = {}
        self.register_timeout = register_timeout  # seconds to register after connecting
        self.max_output_buffer = max_output_buffer  # unsent bytes before a client is dropped
        self.unix_socket_mode = unix_socket_mode
        self.tcp_keepalive = tcp_keepalive  # seconds before a silent TCP peer counts as gone
        self.ssl = ssl
        #: ZEO.server.auth.Authorization (checked in Session.register), or None: all may.
        self.authorization = authorization
        #: Optional observer with ``lock_released(storage_id, wait_s, hold_s)`` (metrics).
        self.observer: Any = None
        self.event_loop = new_event_loop()
        self.read_executor = concurrent.futures.ThreadPoolExecutor(
            4, thread_name_prefix="zeo-read"
        )
        self.storages = dict(storages)
        self.states = {sid: StorageState(self, sid, s) for sid, s in self.storages.items()}
        # An MVCC storage is served (and closed) through its adapter.
        self.storages = {sid: state.storage for sid, state in self.states.items()}
        self.sessions: dict[Session, None] = {}
        self._listeners: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self.addresses: list[Any] = []
        self._closed = False
        self._stopped = threading.Event()
        self._loop_thread: int | None = None
        self.started_at = time.time()
        self.connections_total = 0
        self.closed_bytes_in = 0  # traffic of sessions that have closed
        self.closed_bytes_out = 0
        try:
            for a in address.normalize(addr, binding=True):
                self._listen(a)
        except BaseException:
            for listener in self._listeners:
                listener.close()
            self.event_loop.close()
            raise
        self.addr = self.addresses[0]
        for state in self.states.values():
            if state.mvcc and relay_poll_interval > 0:
                state.relay = Relay(state, relay_poll_interval, relay_notify)
                state.relay.start()
        self.admin: Any = None  # ZEO.server.admin.AdminServer
        self.metrics: Any = None  # ZEO.server.metrics.MetricsExporter
        self._start_operator_tools(admin_socket, metrics_address)
        modes = ", ".join(
            f"{sid}:{'RO' if (self.read_only or s.isReadOnly()) else 'RW'}:{s.getName()}"
            for sid, s in self.storages.items()
        )
        logger.info("StorageServer created %s with storages: %s",
                    "RO" if self.read_only else "RW", modes)

    def _listen(self, a: Any) -> None:
        loop = self.event_loop
        factory = lambda: Session(self)
        if isinstance(a, str):
            remove_stale_unix_socket(a)
            listener: asyncio.Server = loop.run_until_complete(
                loop.create_unix_server(factory, a, ssl=self.ssl)
            )
            self._unix_paths.append(a)
            os.chmod(a, self.unix_socket_mode)
            bound: Any = a
        else:
            host, port = a
            listener = self._tcp_listener(factory, host or None, port)
            name = listener.sockets[0].getsockname()
            bound = (host if host else name[0], name[1])
        self._listeners.append(listener)
        self.addresses.append(bound)
        if isinstance(bound, str):
            listener_logger.info("listening on %s", bound)
        for sock in listener.sockets if not isinstance(bound, str) else ():
            host, port = sock.getsockname()[:2]
            listener_logger.info("listening on %s", f"[{host}]:{port}" if ":" in host
                                 else f"{host}:{port}")

    def _tcp_listener(self, factory: Callable[[], Session], host: str | None,
                      port: int) -> asyncio.Server:
        """Listen on ``host:port``; with no host (every interface, IPv4 and IPv6) and port 0,
        on one port for both families: the kernel would pick a port for each."""
        loop = self.event_loop
        for _attempt in range(5):
            listener = loop.run_until_complete(
                loop.create_server(factory, host, port, ssl=self.ssl, reuse_address=True))
            ports = [sock.getsockname()[1] for sock in listener.sockets]
            if port or len(set(ports)) == 1:
                return listener
            listener.close()
            try:
                return loop.run_until_complete(
                    loop.create_server(factory, host, ports[0], ssl=self.ssl,
                                       reuse_address=True))
            except OSError:  # the port was free in one family only: pick again
                continue
        raise OSError("could not find one free port for IPv4 and IPv6")

    def _start_operator_tools(self, admin_socket: str | None, metrics_address: Any) -> None:
        """Open the admin socket and the metrics endpoint when configured."""
        try:
            if admin_socket:
                from .admin import AdminServer

                self.admin = AdminServer(self, admin_socket)
            if metrics_address:
                from .metrics import MetricsExporter

                self.metrics = MetricsExporter(self, tuple(metrics_address))
        except BaseException:
            self._stop_operator_tools()
            for listener in self._listeners:
                listener.close()
            for path in self._unix_paths:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            self.event_loop.close()
            raise

    def _stop_operator_tools(self) -> None:
        for tool in (self.admin, self.metrics):
            if tool is not None:
                tool.close()
        self.admin = self.metrics = None

    # -- sessions -------------------------------------------------------------------------

    def session_opened(self, session: Session) -> bool:
        """Admit a new session; False when the server is at ``max_connections``."""
        if self._closed:
            return False
        if len(self.sessions) >= self.max_connections and not self._evict_unregistered():
            return False
        self.sessions[session] = None
        self.connections_total += 1
        logger.debug("(%s) connected", session.peer)
        return True

    def _evict_unregistered(self) -> bool:
        """At ``max_connections``: close the oldest connection that has not registered after
        a second (a client registers at once), so idle connections cannot lock clients out."""
        cutoff = time.time() - 1.0
        for session in self.sessions:  # oldest first
            if session.state is None and not session.closed and session.connected_at < cutoff:
                logger.warning("(%s) closed unregistered after %.1f s: the server is at "
                               "max-connections (%d)", session.label,
                               time.time() - session.connected_at, self.max_connections)
                session.close()
                self.sessions.pop(session, None)
                return True
        return False

    def unsent_output(self) -> int:
        """Bytes queued for clients that are not reading (the only large backlogs)."""
        return sum(s.transport.get_write_buffer_size() for s in self.slow_readers
                   if s.transport is not None)

    def session_closed(self, session: Session) -> None:
        if self.sessions.pop(session, 0) is None:
            self.closed_bytes_in += session.bytes_in
            self.closed_bytes_out += session.bytes_out
        if session.held_memory and not self._trim_scheduled:
            self._trim_scheduled = True
            self.event_loop.call_later(1.0, self._return_memory)

    def _return_memory(self) -> None:
        """Give freed memory back to the system after a connection that held a large
        buffer closed: glibc keeps freed blocks in its arenas, so RSS would stay at the
        peak an attacker pushed it to."""
        self._trim_scheduled = False
        if _malloc_trim is not None:
            _malloc_trim(0)

    # -- status ---------------------------------------------------------------------------

    def server_status(self, storage_id: str) -> dict:
        return self.states[storage_id].status()

    def ruok(self) -> dict:
        return {sid: state.status() for sid, state in self.states.items()}

    def statistics(self) -> dict:
        return {
            "addresses": [a if isinstance(a, str) else list(a) for a in self.addresses],
            "connections": len(self.sessions),
            "connections_total": self.connections_total,
            "bytes_in": sum(s.bytes_in for s in self.sessions) + self.closed_bytes_in,
            "bytes_out": sum(s.bytes_out for s in self.sessions) + self.closed_bytes_out,
            "started_at": self.started_at,
            "storages": {sid: state.statistics() for sid, state in self.states.items()},
        }

    # -- running and stopping -------------------------------------------------------------

    def loop(self, timeout: float | None = None) -> None:
        """Serve in the calling thread until :meth:`close`."""
        self._loop_thread = threading.get_ident()
        ZODB.event.notify(Serving(self, address=self.addr))
        try:
            if not self._closed:
                self.event_loop.run_forever()
        finally:
            self._loop_thread = None
            if not self.event_loop.is_closed():
                self.event_loop.close()
            self._stopped.set()

    def start_thread(self, daemon: bool = True) -> threading.Thread:
        """Serve in a new thread; returns it once the loop runs."""
        thread = threading.Thread(target=self.loop, name="zeo-server", daemon=daemon)
        thread.start()
        return thread

    def close(self, join_timeout: float | None = 30) -> None:
        """Stop serving and close the storages (thread-safe, idempotent)."""
        if self._closed:
            return
        self._closed = True
        loop = self.event_loop
        if loop.is_running():
            if self._loop_thread == threading.get_ident():
                loop.create_task(self._shutdown())
                return
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            self._stopped.wait(join_timeout)
        elif not loop.is_closed():
            loop.run_until_complete(self._shutdown())
            loop.close()
            self._stopped.set()

    async def _shutdown(self) -> None:
        loop = self.event_loop
        for listener in self._listeners:
            listener.close()
        self._stop_operator_tools()
        for session in list(self.sessions):
            session.close()
        # Let connection_lost run and the aborts it queued reach the commit workers.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            self.sessions or any(s.commits.lock.holder is not None
                                 for s in self.states.values())
        ):
            await asyncio.sleep(0.01)
        for state in self.states.values():
            await loop.run_in_executor(None, state.commits.worker.shutdown, True)
            if state.relay is not None:
                await loop.run_in_executor(None, state.relay.stop)
        self.read_executor.shutdown(wait=False)
        for sid, storage in self.storages.items():
            logger.info("closing storage %r", sid)
            try:
                storage.close()
            except Exception:
                logger.exception("error closing storage %r", sid)
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        ZODB.event.notify(Closed(self))
        loop.stop()
