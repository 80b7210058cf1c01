"""The synchronous wire client of :mod:`ZEO.wire`, plus what only tests need."""

from __future__ import annotations

from ZEO.wire import ConnectionClosed, RemoteError
from ZEO.wire import WireClient as _WireClient

__all__ = ["ConnectionClosed", "RemoteError", "WireClient", "commit_one"]


class WireClient(_WireClient):
    def read_message(self) -> tuple:
        """The next one-way call from the server (``invalidateTransaction``, ``info``...)."""
        while not self.oneways:
            self._read_some(self.timeout) or self._timed_out()
        return self.oneways.pop(0)

    def _timed_out(self) -> None:
        raise TimeoutError("no message from the server")

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within ``timeout``."""
        try:
            while self._read_some(timeout):
                pass
        except ConnectionClosed:
            return True
        return False


def commit_one(addr, storage_id: str = "1", data: bytes = b"data") -> bytes:
    """Commit one new object through a fresh connection; return the tid."""
    with WireClient(addr) as c:
        c.call("register", storage_id, False)
        (oid,) = c.call("new_oids", 1)
        c.async_call("tpc_begin", 1, "", "", {}, None, " ")
        c.async_call("storea", oid, b"\0" * 8, data, 1)
        c.call("vote", 1)
        return c.call("tpc_finish", 1)
