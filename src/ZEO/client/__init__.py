"""The ZEO client: :class:`~ZEO.client.storage.ClientStorage` and its parts.

``ZEO.client(...)`` is also ZEO's helper function that opens a ClientStorage.  Importing this
package rebinds the ``ZEO.client`` attribute to the package, so the package module is made
callable with the same meaning, and ``ZEO.client(addr, ...)`` keeps working either way.
"""

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kw: Any):
        from .storage import ClientStorage

        return ClientStorage(*args, **kw)


sys.modules[__name__].__class__ = _CallableModule
