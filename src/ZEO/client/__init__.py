"""The ZEO client: :class:`~ZEO.client.storage.ClientStorage` and its parts."""

from .. import client as _open_client  # ZEO's function: the package is bound after this runs
from .._callable import make_callable

make_callable(__name__, _open_client)
