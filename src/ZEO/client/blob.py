"""Blobs on the client: the streamed blob cache, its pruning, and shared-directory mode.

Two modes (zeo-facts §5), chosen by ``ClientStorage(shared_blob_dir=...)``:

**Streamed** (:class:`BlobCache`; ``blob_dir`` is private to the client or shared by several
clients on one host).  An upload goes at ``storeBlob`` time, before the vote, so the server's
commit lock is never held while blob bytes travel: ``storea`` first, then ``storeBlobStart``,
``storeBlobChunk`` (59000 bytes each, read from the file one chunk at a time) and
``storeBlobEnd``.  After ``tpc_finish`` the staged file is renamed into the cache under the new
tid.  A download asks the server to ``sendBlob``; the connection's reader thread writes the
``receiveBlobChunk`` calls to ``<blob>.dl`` and renames it into place on ``receiveBlobStop``,
all before the ``sendBlob`` reply wakes the caller.  Neither side holds a whole blob in memory.

The directory uses ZEO's ``zeocache`` layout, so a ZEO 6.2 client may share it::

    <blob_dir>/.layout                      "zeocache"
    <blob_dir>/<u64(oid) % 997>/<u64(oid) // 997>.<16 hex tid>.blob
    <blob_dir>/<u64(oid) % 997>/.lock       download lock of that oid directory
    <blob_dir>/tmp/                         temporaryDirectory(): uncommitted and staged files
    <blob_dir>/check_size.lock, check_size.attempt

**Locks and what pruning never deletes.**  Three locks, all ``flock``-based so they work
between threads and between processes:

* the *directory lock* ``<oid dir>/.lock`` (zc.lockfile) is held by a downloader from before
  it looks for the file until the file is renamed into place;
* a *reader lock*: :meth:`BlobCache.open_committed` takes a shared ``flock`` on the blob file
  itself and keeps it until the returned file object is closed;
* the *pruner lock* ``check_size.lock``: one pruner at a time per directory.  A process that
  finds it busy touches ``check_size.attempt``; the running pruner sees the marker and makes
  another pass, so no request to prune is lost.

The pruner sums the ``*.blob`` files and deletes the least recently used first (by atime,
which :meth:`BlobCache.lookup` sets explicitly on every hit, so ``noatime``/``relatime`` mounts
do not matter) until the total is at most ``size - size * check // 100``.  Before deleting a
file it takes that oid directory's lock without waiting (skipping the directory if a download
holds it) and then an exclusive non-blocking ``flock`` on the file (skipping it if a reader
holds it open).  Deleting an open file would free no space anyway.  The one unprotected window
is a caller of :meth:`lookup`/``loadBlob`` who opens the returned path itself later;
``openCommittedBlobFile`` closes it by re-checking after its lock (and downloading again).

**Shared** (:class:`SharedBlobDir`; ``blob_dir`` is the server's own blob directory, e.g. on
NFS).  Nothing is streamed: the client moves the blob into the oid's directory under a unique
``*.tmp`` name and sends ``storeBlobShared`` with that basename; loads read the server's files
directly.  No cache, no pruning.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import zc.lockfile
import ZODB.blob
from ZODB.POSException import POSKeyError
from ZODB.utils import oid_repr, tid_repr, u64

logger = logging.getLogger("ZEO.ClientStorage.blob")

CHUNK_SIZE = 59000
LAYOUT = "zeocache"
BUCKETS = 997
LOCK_NAME = ".lock"
PRUNE_LOCK = "check_size.lock"
PRUNE_ATTEMPT = "check_size.attempt"
#: How long a downloader waits for another thread or process downloading the same directory.
LOCK_TIMEOUT = 600.0

Send = Callable[..., None]


def _makedirs(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)


def _try_lock(path: str) -> zc.lockfile.LockFile | None:
    """The lock file at ``path`` if it is free now, else None."""
    try:
        return zc.lockfile.LockFile(path)
    except zc.lockfile.LockError:
        return None


def _lock(path: str, timeout: float = LOCK_TIMEOUT) -> zc.lockfile.LockFile:
    """Wait (polling) for the lock file at ``path``; raise ``TimeoutError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        lock = _try_lock(path)
        if lock is not None:
            return lock
        if time.monotonic() > deadline:
            raise TimeoutError(f"could not lock {path} in {timeout}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK_SIZE)
            if not chunk:
                return
            yield chunk


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _stage(filename: str, directory: str, prefix: str) -> str:
    """Move the caller's blob file to a fresh unique name in ``directory``; return that path.

    The storage owns the file once ``storeBlob`` is called (ZODB's contract), so moving it is
    allowed; on another file system it is copied (and ZODB logs "Copied blob file").
    """
    fd, path = tempfile.mkstemp(suffix=".tmp", prefix=prefix, dir=directory)
    os.close(fd)
    ZODB.blob.rename_or_copy_blob(filename, path, chmod=False)
    return path


class BlobStore:
    """What :class:`ClientStorage` needs from either mode.  Holds the staged blobs of the one
    transaction a ClientStorage runs at a time."""

    shared = False

    def __init__(self, blob_dir: str) -> None:
        self.blob_dir = os.path.abspath(blob_dir)
        self.temp_dir = os.path.join(self.blob_dir, "tmp")
        self._staged: list[tuple[bytes, str]] = []

    def temporary_directory(self) -> str:
        _makedirs(self.temp_dir)
        return self.temp_dir

    def store(self, send: Send, oid: bytes, serial: bytes, data: bytes, filename: str,
              txn_id: Any) -> None:
        """Send the blob half of ``storeBlob`` (``storea`` must already have been sent)."""
        raise NotImplementedError

    def load(self, oid: bytes, serial: bytes, fetch: Callable[[bytes, bytes], Any]) -> str:
        """The path of the committed blob file of ``(oid, serial)``; POSKeyError if none."""
        raise NotImplementedError

    def open_committed(self, oid: bytes, serial: bytes, fetch: Callable[[bytes, bytes], Any],
                       blob: Any = None) -> Any:
        """An open committed blob file (a ``ZODB.blob.BlobFile`` when ``blob`` is given)."""
        path = self.load(oid, serial, fetch)
        if blob is None:
            return open(path, "rb")
        return ZODB.blob.BlobFile(path, "r", blob)

    def server_call(self, name: str, args: tuple) -> None:
        raise AttributeError(f"unexpected server call {name!r} in shared blob mode")

    def finish(self, tid: bytes) -> None:
        """Reader thread, after ``tpc_finish``: the staged blobs were committed as ``tid``."""
        self._staged = []

    def abort(self) -> None:
        """The transaction ended without (or after) :meth:`finish`: drop what is staged."""
        staged, self._staged = self._staged, []
        for _oid, path in staged:
            _remove(path)

    def clear(self) -> None:
        """Forget cached files (no-op unless there is a cache)."""

    def close(self) -> None:
        self.abort()

    def statistics(self) -> dict:
        return {"mode": "shared" if self.shared else "streamed", "blob_dir": self.blob_dir}


class SharedBlobDir(BlobStore):
    """Shared-directory mode: ``blob_dir`` is the server's blob directory."""

    shared = True

    def __init__(self, blob_dir: str) -> None:
        super().__init__(blob_dir)
        self.fshelper = ZODB.blob.FilesystemHelper(self.blob_dir)
        self.fshelper.create()
        self.temp_dir = self.fshelper.temp_dir

    def store(self, send: Send, oid: bytes, serial: bytes, data: bytes, filename: str,
              txn_id: Any) -> None:
        directory = self.fshelper.getPathForOID(oid, create=True)
        path = _stage(filename, directory, tid_repr(serial) if serial else "new")
        self._staged.append((oid, path))
        send("storeBlobShared", oid, serial, data, os.path.basename(path), txn_id)

    def load(self, oid: bytes, serial: bytes, fetch: Callable[[bytes, bytes], Any]) -> str:
        path = self.fshelper.getBlobFilename(oid, serial)
        if not os.path.exists(path):
            raise POSKeyError("No blob file at", path)
        return path

    def finish(self, tid: bytes) -> None:
        self._staged = []  # the server renamed them into place at vote

    def abort(self) -> None:
        # The server removes what it did not consume; remove what it never heard of.
        super().abort()


class BlobCache(BlobStore):
    """Streamed mode: a bounded, LRU-pruned blob cache, safe to share between processes."""

    def __init__(self, blob_dir: str, size: int | None = None, check: int = 10) -> None:
        super().__init__(blob_dir)
        if size is not None and not 0 <= check < 100:
            raise ValueError("blob_cache_size_check must be a percentage below 100")
        _makedirs(self.blob_dir)
        self._check_layout()
        self.temporary_directory()
        self.size = size
        self.check_bytes = (size * check // 100) if size is not None else 0
        self.target = (size - self.check_bytes) if size is not None else None
        self._downloads: dict[tuple[bytes, bytes], tuple[BinaryIO, str]] = {}
        self._downloads_lock = threading.Lock()
        self._added = 0
        self._prune_lock = threading.Lock()
        self._prune_thread: threading.Thread | None = None
        self._prune_again = False
        self.prunes = 0
        self.downloads = 0
        if size is not None:
            self._start_pruner()

    def _check_layout(self) -> None:
        marker = os.path.join(self.blob_dir, ZODB.blob.LAYOUT_MARKER)
        try:
            with open(marker) as f:
                layout = f.read().strip()
        except FileNotFoundError:
            # Another process may create the cache at the same moment: publish the marker
            # whole (write aside, then rename) so that no reader ever sees it empty.
            fd, tmp = tempfile.mkstemp(dir=self.blob_dir, prefix=".layout-")
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(LAYOUT)
            os.replace(tmp, marker)
            return
        if layout != LAYOUT:
            raise ValueError(
                f"{self.blob_dir} has blob layout {layout!r}; a streamed-mode client needs "
                f"{LAYOUT!r} (use shared_blob_dir=True for a server's blob directory)")

    # -- layout ------------------------------------------------------------------------------

    def oid_dir(self, oid: bytes) -> str:
        return os.path.join(self.blob_dir, str(u64(oid) % BUCKETS))

    def path(self, oid: bytes, tid: bytes) -> str:
        return os.path.join(self.oid_dir(oid), f"{u64(oid) // BUCKETS}.{tid.hex()}.blob")

    # -- upload --------------------------------------------------------------------------------

    def store(self, send: Send, oid: bytes, serial: bytes, data: bytes, filename: str,
              txn_id: Any) -> None:
        path = _stage(filename, self.temporary_directory(), oid_repr(oid) + "-")
        self._staged.append((oid, path))
        send("storeBlobStart")
        for chunk in _file_chunks(path):
            send("storeBlobChunk", chunk)
        send("storeBlobEnd", oid, serial, data, txn_id)

    def finish(self, tid: bytes) -> None:
        staged, self._staged = self._staged, []
        added = 0
        for oid, staged_path in staged:
            target = self.path(oid, tid)
            try:
                _makedirs(os.path.dirname(target))
                added += os.path.getsize(staged_path)
                ZODB.blob.rename_or_copy_blob(staged_path, target, chmod=True)
            except OSError:
                # The blob is committed; it will be downloaded when needed.
                logger.exception("could not move committed blob %s into the cache",
                                 oid_repr(oid))
                _remove(staged_path)
        self.added(added)

    # -- download ------------------------------------------------------------------------------

    def lookup(self, oid: bytes, tid: bytes) -> str | None:
        """The cached file of ``(oid, tid)`` with its access time refreshed, or None."""
        path = self.path(oid, tid)
        try:
            os.utime(path, (time.time(), os.stat(path).st_mtime))
        except FileNotFoundError:
            return None
        except OSError:  # e.g. someone else's file in a shared cache: still usable
            if not os.path.exists(path):
                return None
        return path

    def load(self, oid: bytes, serial: bytes, fetch: Callable[[bytes, bytes], Any]) -> str:
        path = self.lookup(oid, serial)
        if path is not None:
            return path
        directory = self.oid_dir(oid)
        _makedirs(directory)
        lock = _lock(os.path.join(directory, LOCK_NAME))
        try:
            path = self.lookup(oid, serial)  # another thread or process may have got it
            if path is not None:
                return path
            try:
                fetch(oid, serial)  # the reader thread writes the file before this returns
            finally:
                self._drop_download(oid, serial)
            path = self.path(oid, serial)
            if not os.path.exists(path):
                raise POSKeyError("No blob file", oid, serial)
            self.downloads += 1
            size = os.path.getsize(path)
        finally:
            lock.close()
        self.added(size)
        return path

    def open_committed(self, oid: bytes, serial: bytes, fetch: Callable[[bytes, bytes], Any],
                       blob: Any = None) -> Any:
        for _attempt in range(100):
            path = self.load(oid, serial, fetch)
            try:
                f = open(path, "rb") if blob is None else ZODB.blob.BlobFile(path, "r", blob)
            except FileNotFoundError:
                continue  # pruned between load and open: download again
            # Readers share the lock; the pruner needs it exclusively to delete the file.
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            if os.fstat(f.fileno()).st_nlink:
                return f
            f.close()  # pruned before our lock: download again
        raise POSKeyError("blob file keeps vanishing from the cache", oid, serial)

    def server_call(self, name: str, args: tuple) -> None:
        """Reader thread: ``receiveBlobStart``/``Chunk``/``Stop`` of a ``sendBlob``."""
        if name == "receiveBlobChunk":
            oid, serial, chunk = args
            entry = self._downloads.get((oid, serial))
            if entry is None:
                raise ValueError(f"blob chunk for {oid_repr(oid)} without receiveBlobStart")
            entry[0].write(chunk)
        elif name == "receiveBlobStart":
            oid, serial = args
            target = self.path(oid, serial)
            _makedirs(os.path.dirname(target))
            partial = target + ".dl"
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with self._downloads_lock:
                old = self._downloads.pop((oid, serial), None)
                self._downloads[(oid, serial)] = (open(fd, "wb", buffering=1 << 20), partial)
            if old is not None:
                old[0].close()
        elif name == "receiveBlobStop":
            oid, serial = args
            with self._downloads_lock:
                entry = self._downloads.pop((oid, serial), None)
            if entry is None:
                raise ValueError(f"receiveBlobStop for {oid_repr(oid)} without a start")
            f, partial = entry
            f.close()
            os.chmod(partial, 0o400)
            os.replace(partial, self.path(oid, serial))
        else:
            raise AttributeError(f"unknown blob server call {name!r}")

    def _drop_download(self, oid: bytes, serial: bytes) -> None:
        """After the ``sendBlob`` call: remove a download the server never finished."""
        with self._downloads_lock:
            entry = self._downloads.pop((oid, serial), None)
        if entry is not None:
            entry[0].close()
            _remove(entry[1])

    # -- size control ----------------------------------------------------------------------

    def added(self, nbytes: int) -> None:
        """Count bytes added to the cache; start a pruning pass once enough were added."""
        if self.size is None or not nbytes:
            return
        with self._prune_lock:
            self._added += nbytes
            if self._added < self.check_bytes:
                return
            self._added = 0
        self._start_pruner()

    def _start_pruner(self) -> None:
        with self._prune_lock:
            thread = self._prune_thread
            if thread is not None and thread.is_alive():
                self._prune_again = True
                return
            self._prune_again = False
            self._prune_thread = thread = threading.Thread(
                target=self._prune_loop, name=f"blob cache pruner {self.blob_dir}", daemon=True)
        thread.start()

    def _prune_loop(self) -> None:
        while True:
            try:
                self.prune_now()
            except Exception:
                logger.exception("pruning the blob cache %s failed", self.blob_dir)
            with self._prune_lock:
                if not self._prune_again:
                    self._prune_thread = None
                    return
                self._prune_again = False

    def prune_now(self) -> int | None:
        """Prune to the target now (this thread); the cache's byte total, or None if another
        process is pruning (it will make another pass for us)."""
        assert self.target is not None
        self.prunes += 1
        return prune(self.blob_dir, self.target)

    def join_pruner(self, timeout: float | None = None) -> None:
        """Wait for a running pruning pass (tests, close)."""
        thread = self._prune_thread
        if thread is not None:
            thread.join(timeout)

    def clear(self) -> None:
        """Remove every cached blob file that is not in use (see :func:`prune`)."""
        prune(self.blob_dir, 0)

    def close(self) -> None:
        super().close()
        with self._downloads_lock:
            downloads, self._downloads = self._downloads, {}
        for f, partial in downloads.values():
            f.close()
            _remove(partial)

    def statistics(self) -> dict:
        stats = super().statistics()
        stats.update(size=self.size, target=self.target, downloads=self.downloads,
                     prunes=self.prunes)
        return stats


def cached_files(blob_dir: str) -> list[tuple[float, int, str]]:
    """``(atime, size, path)`` of every ``*.blob`` file of a ``zeocache`` directory."""
    result = []
    for entry in os.scandir(blob_dir):
        if not (entry.is_dir(follow_symlinks=False) and entry.name.isdigit()):
            continue
        try:
            files = list(os.scandir(entry.path))
        except FileNotFoundError:
            continue
        for f in files:
            if f.name.endswith(".blob"):
                try:
                    st = f.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                result.append((st.st_atime, st.st_size, f.path))
    return result


def _remove_unless_open(path: str) -> bool:
    """Delete ``path`` unless a reader holds its shared lock; True if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return False
            raise
        _remove(path)
        return True
    finally:
        os.close(fd)


def prune(blob_dir: str, target: int) -> int | None:
    """Delete least recently used blob files of ``blob_dir`` until they total ``<= target``.

    Skips oid directories whose download lock is held and files a reader holds open.  Only one
    pruner runs per directory; if another holds the lock, touch the attempt marker (that
    pruner then makes one more pass) and return None.  Otherwise return the remaining total.
    """
    lock = _try_lock(os.path.join(blob_dir, PRUNE_LOCK))
    attempt = os.path.join(blob_dir, PRUNE_ATTEMPT)
    if lock is None:
        with open(attempt, "w"):
            pass
        return None
    try:
        while True:
            _remove(attempt)
            total = _prune_pass(blob_dir, target)
            if not os.path.exists(attempt):
                return total
    finally:
        lock.close()


def _prune_pass(blob_dir: str, target: int) -> int:
    files = cached_files(blob_dir)
    total = sum(size for _atime, size, _path in files)
    if total <= target:
        return total
    files.sort()
    removed = 0
    for _atime, size, path in files:
        if total <= target:
            break
        dir_lock = _try_lock(os.path.join(os.path.dirname(path), LOCK_NAME))
        if dir_lock is None:
            continue  # a download is running in that directory
        try:
            if _remove_unless_open(path):
                total -= size
                removed += 1
        finally:
            dir_lock.close()
    logger.debug("pruned %d blob files from %s; %d bytes remain", removed, blob_dir, total)
    return total


def open_blob_store(blob_dir: str | None, shared: bool, size: int | None,
                    check: int | None) -> BlobStore | None:
    """The blob support of a ClientStorage, or None without ``blob_dir``."""
    if blob_dir is None:
        return None
    if shared:
        return SharedBlobDir(blob_dir)
    return BlobCache(blob_dir, size, 10 if check is None else check)


def check_blob_size_script(args: list[str] | None = None) -> None:
    """``check_blob_size_script([blob_dir, target_bytes])``: prune a blob cache once."""
    import sys

    if args is None:
        args = sys.argv[1:]
    blob_dir, target = args
    total = prune(blob_dir, int(target))
    if total is None:
        print("another process is pruning", blob_dir)
    else:
        print(f"{blob_dir}: {total} bytes of blobs")


__all__ = ["BlobCache", "BlobStore", "SharedBlobDir", "check_blob_size_script", "open_blob_store",
           "prune"]
