"""Conflict resolution on the server, with records unpickled under an allow-list.

ZODB's own resolution (``ZODB.ConflictResolution``) imports whatever class a record names and
calls it: a client allowed to write could store a record whose class is ``os.system`` and
make the server run it by provoking a conflict.  :class:`ConflictResolver` replaces a served
storage's ``tryToResolveConflict``: the records are unpickled with a ``find_global`` that
only returns *classes* the operator allows (:class:`ClassAllowList`); any other global comes
back as ZODB's inert ``BadClass`` placeholder, which is fine as the class of a persistent
reference (a BTree bucket holding application objects) but fails if anything calls it.  A
conflict that needs anything else stays unresolved: the voter gets its ConflictError.
"""

from __future__ import annotations

import importlib
import io
import logging
from collections.abc import Iterable
from typing import Any

from ZODB._compat import PersistentPickler, PersistentUnpickler, _protocol
from ZODB.ConflictResolution import BadClass, PersistentReferenceFactory, persistent_id
from ZODB.POSException import ConflictError
from ZODB.utils import oid_repr

from ..protocol.codecs import check_record_memo
from ..protocol.errors import RemoteProtocolError

logger = logging.getLogger("ZEO.StorageServer")

#: What the server may unpickle to resolve conflicts unless told more: the classes that
#: resolve conflicts in ZODB itself and its usual companions.  ``module.*`` allows every
#: class of a module and of the modules below it.
DEFAULT_CONFLICT_CLASSES = (
    "BTrees.*",
    "persistent.mapping.PersistentMapping",
    "persistent.list.PersistentList",
    "persistent.Persistent",
    "ZODB.blob.Blob",
    "zodbpickle.binary",
    "builtins.dict", "builtins.list", "builtins.tuple", "builtins.set", "builtins.frozenset",
    "__builtin__.dict", "__builtin__.list", "__builtin__.tuple", "__builtin__.set",
    "__builtin__.frozenset",
)


class Unresolvable(Exception):
    """The conflict cannot be resolved on this server (logged at debug level)."""


class ClassAllowList:
    """Which ``(module, name)`` globals resolve to a class; see DEFAULT_CONFLICT_CLASSES.

    Only a ``type`` is ever returned: functions and other callables of an allowed module are
    refused like anything else.
    """

    def __init__(self, extra: Iterable[str] = ()) -> None:
        self.classes: set[tuple[str, str]] = set()
        self.modules: list[str] = []
        for spec in (*DEFAULT_CONFLICT_CLASSES, *extra):
            module, _, name = spec.strip().rpartition(".")
            if not module or not name:
                raise ValueError(f"not a module.Class or module.* name: {spec!r}")
            if name == "*":
                self.modules.append(module)
            else:
                self.classes.add((module, name))
        self._cache: dict[tuple[str, str], Any] = {}

    def allows(self, module: str, name: str) -> bool:
        if (module, name) in self.classes:
            return True
        return any(module == m or module.startswith(m + ".") for m in self.modules)

    def find_global(self, module: Any, name: Any) -> Any:
        """The class ``module.name`` if allowed and importable, else a ``BadClass``."""
        key = (module, name)
        found = self._cache.get(key)
        if found is None:
            found = BadClass(module, name)
            if type(module) is str and type(name) is str and self.allows(module, name):
                try:
                    obj = getattr(importlib.import_module(module), name)
                except (ImportError, AttributeError):
                    obj = None
                if isinstance(obj, type):
                    found = obj
            if len(self._cache) < 10000:
                self._cache[key] = found
        return found


class ConflictResolver:
    """``tryToResolveConflict`` for one storage, with records unpickled through ``allowed``.

    The contract is ZODB's: return the resolved record, or raise ConflictError.
    """

    def __init__(self, storage: Any, allowed: ClassAllowList) -> None:
        self.storage = storage
        self.allowed = allowed

    def __call__(self, oid: bytes, committedSerial: bytes, oldSerial: bytes,  # noqa: N803
                 newpickle: bytes, committedData: bytes = b"") -> bytes:
        try:
            return self._resolve(oid, committedSerial, oldSerial, newpickle, committedData)
        except (Unresolvable, ConflictError) as e:
            logger.debug("conflict on oid %s unresolved: %s", oid_repr(oid), e)
        except RemoteProtocolError as e:
            logger.warning("conflict on oid %s left unresolved: %s", oid_repr(oid), e)
        except Exception:
            logger.exception("conflict resolution failed on oid %s", oid_repr(oid))
        raise ConflictError(oid=oid, serials=(committedSerial, oldSerial), data=newpickle)

    def _unpickler(self, record: bytes, refs: PersistentReferenceFactory,
                   class_only: bool = False) -> Any:
        # A forged memo index would make the unpickler allocate gigabytes: walked first.
        # The walk is Python, one step an opcode: a large record costs milliseconds, so a
        # record whose class cannot resolve is not walked past its class.
        check_record_memo(record, class_only)
        return PersistentUnpickler(self.allowed.find_global, refs.persistent_load,
                                   io.BytesIO(record))

    def _resolve(self, oid: bytes, committed_serial: bytes, old_serial: bytes,
                 new_record: bytes, committed_data: bytes) -> bytes:
        storage = self.storage
        untransform = getattr(storage, "_crs_untransform_record_data", None) or _same
        transform = getattr(storage, "_crs_transform_record_data", None) or _same
        refs = PersistentReferenceFactory()
        new_record = untransform(new_record)
        unpickler = self._unpickler(new_record, refs, class_only=True)
        meta = unpickler.load()
        if isinstance(meta, tuple):
            klass, args = meta[0], meta[1] or ()
            if isinstance(klass, tuple):
                klass = self.allowed.find_global(*klass)
        else:
            klass, args = meta, ()
        if not isinstance(klass, type):
            raise Unresolvable(f"class {klass!r:.100} is not allowed (conflict-resolution-class)")
        if not hasattr(klass, "_p_resolveConflict"):
            raise Unresolvable(f"{klass.__module__}.{klass.__qualname__} does not resolve")
        check_record_memo(new_record)  # the state too, now that it will be unpickled
        instance = klass.__new__(klass, *args)
        new_state = unpickler.load()
        old_data = storage.loadSerial(oid, old_serial)
        committed_data = committed_data or storage.loadSerial(oid, committed_serial)
        old_state = self._state(untransform(old_data), refs)
        committed_state = self._state(untransform(committed_data), refs)
        resolve = instance._p_resolveConflict  # type: ignore[attr-defined]
        resolved = resolve(old_state, committed_state, new_state)
        out = io.BytesIO()
        pickler = PersistentPickler(persistent_id, out, _protocol)
        pickler.dump(meta)
        pickler.dump(resolved)
        return transform(out.getvalue())

    def _state(self, record: bytes, refs: PersistentReferenceFactory) -> Any:
        unpickler = self._unpickler(record, refs)
        unpickler.load()  # the class
        return unpickler.load()


def _same(data: bytes) -> bytes:
    return data
