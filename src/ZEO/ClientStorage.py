"""Historical import path: ``from ZEO.ClientStorage import ClientStorage``."""

from .client.storage import ClientStorage, check_blob_size_script

__all__ = ["ClientStorage", "check_blob_size_script"]
