"""Interfaces and events published by ZEO."""

import zope.interface


class StaleCache:
    """Event published when a client drops its cache because the server cannot say
    which objects changed while it was away (``zope.event``/``ZODB.event`` notify)."""

    def __init__(self, storage):
        self.storage = storage


class IServeable(zope.interface.Interface):
    """A storage a ZEO server can serve with extra server support."""

    def lastInvalidations(size):
        """Return up to ``size`` most recent ``(tid, [oids])``, oldest first."""


class IClientCache(zope.interface.Interface):
    """The cache a ClientStorage keeps of object records."""

    def load(oid):
        """``(data, tid)`` of the current record, or None."""

    def loadBefore(oid, tid):
        """``(data, start, end)`` of the record current before ``tid``, or None."""

    def store(oid, start_tid, end_tid, data):
        """Remember a record; ``end_tid`` None means current."""

    def invalidate(oid, tid):
        """The current record of ``oid`` ended at ``tid`` (None: forget ``oid``)."""

    def getLastTid():
        """The last transaction id the cache is up to date with."""

    def setLastTid(tid):
        """Move the cache's last tid forward."""

    def clear():
        """Forget everything."""

    def close():
        """Release resources."""
