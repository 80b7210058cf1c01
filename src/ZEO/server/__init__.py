"""The ZEO server: :class:`StorageServer` and its sessions."""

from .storage_server import Closed, Serving, StorageServer

__all__ = ["StorageServer", "Serving", "Closed"]


# Importing this subpackage rebinds the attribute ``ZEO.server``, which is also ZEO's ad hoc
# server function: keep ``ZEO.server(...)`` working by making this module callable.
def _make_callable() -> None:
    import sys
    import types

    class _CallableServerModule(types.ModuleType):
        def __call__(self, *args, **kw):
            """``ZEO.server(...)``: see :func:`ZEO._adhoc.server`."""
            from .._adhoc import server

            return server(*args, **kw)

    sys.modules[__name__].__class__ = _CallableServerModule


_make_callable()
del _make_callable
