"""ZODB's own blob conformance suites against our ClientStorage and our server.

``ZODB.tests.testblob.storage_reusable_suite`` and ``PackableStorage.IExternalGC_suite`` are
unittest/doctest suites; each of their tests becomes one pytest test here (so a failure names
the doctest, and xdist can spread them).  Every storage the suites create starts its own server
(``ZEO.server``: our runzeo machinery serving on 127.0.0.1 from a thread of this process, so the
suites' fake clock and their monkeypatched ``os.rename`` reach it too) with a
``<blobstorage>``, and stops it when the storage is closed.
"""

from __future__ import annotations

import io
import os
import unittest
from typing import Any

import pytest
import ZODB.blob
import ZODB.tests.PackableStorage
import ZODB.tests.testblob
import ZODB.tests.util

import ZEO
from ZEO.ClientStorage import ClientStorage


class ServingClientStorage(ClientStorage):
    """A ClientStorage on a server of its own (a FileStorage ``<name>.fs`` with blobs).

    Streamed mode: the server's blob dir is ``<name>.server-blobs``, ``blob_dir`` is the
    client's cache.  Shared mode: ``blob_dir`` is the server's blob dir too.  ``pack`` clears
    the client caches afterwards, as the IExternalGC doctest expects of a storage whose pack
    removes data the client may have cached.
    """

    def __init__(self, name: str, blob_dir: str, shared: bool, pack_gc: bool = True) -> None:
        path = os.path.abspath(f"{name}.fs")
        blob_dir = os.path.abspath(blob_dir)
        server_blobs = blob_dir if shared else os.path.abspath(f"{name}.server-blobs")
        storage_conf = (
            f"<blobstorage 1>\n  blob-dir {server_blobs}\n"
            f"  <filestorage>\n    path {path}\n    pack-gc {'true' if pack_gc else 'false'}\n"
            f"  </filestorage>\n</blobstorage>\n"
        )
        addr, self._stop_server = ZEO.server(storage_conf=storage_conf)
        # blob_packing.txt looks at the blob files the server's pack must remove, through
        # ``storage.fshelper``: give it the server's directory (inspection only).
        self.fshelper = ZODB.blob.FilesystemHelper(server_blobs)
        try:
            super().__init__(addr, blob_dir=blob_dir, shared_blob_dir=shared, wait_timeout=30)
        except BaseException:
            self._stop_server()
            raise

    def pack(self, t: Any = None, referencesf: Any = None, wait: Any = 1, days: float = 0) -> None:
        super().pack(t, referencesf, wait=True, days=days)
        self._cache.clear()
        if self._blobs is not None:
            self._blobs.clear()

    def close(self) -> None:
        try:
            super().close()
        finally:
            stop, self._stop_server = self._stop_server, None
            if stop is not None:
                stop()


def _factory(shared: bool, pack_gc: bool = True):
    def create_storage(name: str = "data", blob_dir: str | None = None) -> ClientStorage:
        return ServingClientStorage(name, blob_dir or f"{name}.bobs", shared, pack_gc)

    return create_storage


def _flatten(suite: unittest.TestSuite) -> list[unittest.TestCase]:
    tests = []
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            tests.extend(_flatten(t))
        else:
            tests.append(t)
    return tests


def _suites() -> dict[str, tuple[unittest.TestCase, Any]]:
    """``{pytest id: (unittest test, layer or None)}`` for both modes and both suites."""
    cases: dict[str, tuple[unittest.TestCase, Any]] = {}
    for mode, shared in (("streamed", False), ("shared", True)):
        blob_suite = ZODB.tests.testblob.storage_reusable_suite(
            f"ZEO-{mode}-", _factory(shared), test_blob_storage_recovery=False,
            test_packing=True, test_undo=True)
        layer = getattr(blob_suite, "layer", None)
        gc_suite = ZODB.tests.PackableStorage.IExternalGC_suite(_factory(shared, pack_gc=False))
        for suite, suite_layer in ((blob_suite, layer), (gc_suite, None)):
            for test in _flatten(suite):
                name = test.id().rsplit("/", 1)[-1].replace("ZODB.tests.", "")
                cases[f"{mode}:{name}"] = (test, suite_layer)
    return cases


CASES = _suites()


class _LayerResult(unittest.TestResult):
    """Runs a zope.testrunner layer's per-test hooks around each test (unittest does not)."""

    def __init__(self, layer: Any) -> None:
        super().__init__()
        self.layer = layer

    def startTest(self, test: unittest.TestCase) -> None:
        if self.layer is not None:
            self.layer.testSetUp()
        super().startTest(test)

    def stopTest(self, test: unittest.TestCase) -> None:
        super().stopTest(test)
        if self.layer is not None:
            self.layer.testTearDown()


def _open_as_non_root(file: Any, mode: str = "r", *args: Any, **kw: Any) -> Any:
    """``open`` that refuses to write a file without write permission even for root.

    blob_transaction.txt checks that a committed blob file cannot be opened for writing;
    root bypasses file modes, so under root the doctest gets this stand-in for ``open``.
    """
    if any(c in mode for c in "wa+") and os.path.exists(file):
        if not os.stat(file).st_mode & 0o222:
            raise PermissionError(13, "Permission denied", file)
    return open(file, mode, *args, **kw)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(CASES))
def test_zodb_blob_suite(case: str, tmp_path, monkeypatch) -> None:
    test, layer = CASES[case]
    monkeypatch.chdir(tmp_path)
    dt_test = getattr(test, "_dt_test", None)
    if dt_test is not None and os.geteuid() == 0:
        dt_test.globs["open"] = _open_as_non_root
    if layer is not None:
        layer.setUp()
    try:
        result = _LayerResult(layer)
        test.run(result)
    finally:
        if layer is not None:
            layer.tearDown()
    out = io.StringIO()
    for kind, problems in (("ERROR", result.errors), ("FAIL", result.failures)):
        for failed, text in problems:
            out.write(f"{kind}: {failed.id()}\n{text}\n")
    assert result.testsRun >= 1
    assert result.wasSuccessful(), out.getvalue()


def test_suites_are_complete() -> None:
    """The suites did not shrink to nothing (e.g. by an import problem)."""
    for mode in ("streamed", "shared"):
        names = [c for c in CASES if c.startswith(mode + ":")]
        assert any("blob_transaction" in n for n in names)
        assert any("IExternalGC" in n for n in names)
        assert any("BlobUndoTests" in n for n in names)
        assert len(names) >= 20
    assert ZODB.tests.util  # the layers' module is importable
