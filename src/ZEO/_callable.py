"""``ZEO.client`` and ``ZEO.server`` are both ZEO's helper functions and our subpackages.

Importing a subpackage rebinds the attribute of ``ZEO`` to the module, so each subpackage
module is made callable with the function's meaning: ``ZEO.client(addr)`` and
``ZEO.server(...)`` work whether or not the subpackage was imported.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any


class CallableModule(types.ModuleType):
    """A module that calls ``__zeo_function__`` when called."""

    __zeo_function__: Callable[..., Any]

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self.__zeo_function__(*args, **kw)


def make_callable(module_name: str, function: Callable[..., Any]) -> None:
    module = sys.modules[module_name]
    module.__class__ = CallableModule
    module.__zeo_function__ = function  # type: ignore[attr-defined]
    module.__doc__ = (module.__doc__ or "") + f"\n\nCalling this module calls {function.__doc__}"
