"""The relay: commits made through other servers of the same database, published in tid order.

Several of our servers may serve one RelStorage database (a fleet).  Each commits through its
own commit path and publishes its own commits; a :class:`Relay` per served MVCC storage finds
everyone else's and hands them to the loop (``StorageState.publish_found``), oldest first,
with the exact oids of each (history-preserving databases list them per transaction).

The database is the source of truth; a PostgreSQL ``NOTIFY`` sent after each of our commits
(:data:`CHANNEL`) only wakes the other servers' relays early.  Without it (a standby, a
pooler, ``relay-notify false``) the relay polls every ``relay-poll-interval`` seconds.  Two
more catch-ups keep ZEO's ordering rules without waiting for the relay: the commit path asks
for the commits between the last published tid and its own before publishing its own
(``MVCCStorage.transactions_between``), and ``register``/``lastTransaction`` catch up first.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .storage_server import StorageState

logger = logging.getLogger("ZEO.StorageServer")

#: The PostgreSQL notification channel our servers commit on.
CHANNEL = "zeo_ng_commit"


class Relay:
    """One thread that polls (and listens to) the database behind ``state``.

    Thread contract: :meth:`wake` from any thread; the found commits go to the loop through
    ``call_soon_threadsafe``.  :meth:`statistics` is read on the loop.
    """

    def __init__(self, state: StorageState, interval: float, notify: bool) -> None:
        self.state = state
        self.interval = max(0.01, float(interval))
        self.notify = notify
        self._stop = threading.Event()
        self._wake_r, self._wake_w = _pipe()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"zeo-relay-{state.storage_id}")
        self.polls = 0
        #: Commits the last poll found that were not published yet.
        self.pending = 0
        self.notifications = 0
        self.relayed = 0
        self.errors = 0
        #: The newest tid the relay has seen in the database, and when.
        self.seen_tid = state.published_tid
        self.seen_at = time.time()
        self.listening = False
        self._polled_at = 0.0
        #: The database was found behind the published tid: the storage is refused.
        self.behind = False
        self._behind_once = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.wake()
        self._thread.join(10)

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def statistics(self) -> dict[str, Any]:
        """Lag behind the database (tids and seconds), polls, notifications, relayed commits."""
        from ZODB.TimeStamp import TimeStamp

        published = self.state.published_tid
        lag_s = 0.0
        if self.seen_tid > published:
            lag_s = max(0.0, TimeStamp(self.seen_tid).timeTime()
                        - TimeStamp(published).timeTime())
        return {"polls": self.polls, "notifications": self.notifications,
                "relayed": self.relayed, "errors": self.errors, "listening": self.listening,
                "lag_seconds": lag_s, "lag_transactions": self.pending,
                "seen_tid": self.seen_tid.hex()}

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        storage = self.state.storage
        listener = None
        while not self._stop.is_set():
            if self.notify and listener is None:
                listener = storage.listen(CHANNEL)
                self.listening = listener is not None
            waiting = [self._wake_r] + ([listener.fileno()] if listener is not None else [])
            try:
                ready, _, _ = select.select(waiting, [], [], self.interval)
            except (OSError, ValueError):
                ready = []
                self._drop(listener)
                listener = None
            if self._stop.is_set():
                break
            if self._wake_r in ready:
                _drain(self._wake_r)
            foreign = 0
            if listener is not None and listener.fileno() in ready:
                try:
                    foreign = storage.drain_notifications(listener)
                    self.notifications += foreign
                except Exception:
                    logger.warning("relay: the notification connection failed; polling only "
                                   "until it is back", exc_info=True)
                    self._drop(listener)
                    listener = None
            # Poll when another server committed, when woken, or every interval; our own
            # commits' notifications need none (the commit path published them).
            now = time.monotonic()
            if foreign or self._wake_r in ready or now - self._polled_at >= self.interval:
                self._polled_at = now
                self._poll()
        self._drop(listener)

    def _drop(self, listener: Any) -> None:
        if listener is not None:
            try:
                listener.close()
            except Exception:
                pass
        self.listening = False

    def _poll(self) -> None:
        state = self.state
        try:
            found = state.storage.transactions_between(state.published_tid, None)
        except Exception:
            self.errors += 1
            logger.warning("relay: polling %r failed", state.storage_id, exc_info=True)
            time.sleep(min(1.0, self.interval))
            return
        self.polls += 1
        if not found:
            self._check_not_behind()
        if found:
            newest = found[-1][0]
            if newest > self.seen_tid:
                self.seen_tid = newest
                self.seen_at = time.time()
            published = state.published_tid
            self.pending = sum(1 for tid, _oids in found if tid > published)
            if newest > published:
                state.loop.call_soon_threadsafe(state.publish_found, found)


    def _check_not_behind(self) -> None:
        """A database whose newest commit is older than what we told clients (a standby
        promoted before it caught up, a restored backup) would show them time going back:
        stop serving the storage instead, loudly."""
        state = self.state
        # Read before the query: every tid published by then is in the database, so a
        # newest older than it cannot be a commit landing meanwhile.  Twice in a row, too.
        published = state.published_tid
        try:
            newest = state.storage.newest_committed()
        except Exception:
            return
        if newest is None or newest >= published:
            self._behind_once = False
            return
        if not self._behind_once:
            self._behind_once = True
            return
        if not self.behind:
            self.behind = True
            logger.critical(
                "storage %r: the database's newest commit %s is older than %s, which clients "
                "were told of (a standby promoted behind its primary? a restored backup?): "
                "refusing to serve it; restart the server once the database is right",
                state.storage_id, newest.hex(), published.hex())
            state.loop.call_soon_threadsafe(state.refuse_service,
                                            "the database went back in time")


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass
