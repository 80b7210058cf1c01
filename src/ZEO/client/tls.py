"""TLS for the client: a :class:`~ZEO.client.connection.Transport` over a plain socket.

An ``ssl.SSLSocket`` must not be read by one thread while another writes to it, and the
client's reader thread blocks in ``recv`` while callers ``sendall``.  So TLS runs here in
memory (``ssl.SSLObject`` between two ``ssl.MemoryBIO``) and only the plain socket is
shared between threads:

* ``_lock`` guards the ``SSLObject`` and the BIOs; it is never held during socket I/O.
* TLS records leave through one FIFO (``_outbox``) in the order the ``SSLObject`` made them,
  written by whoever holds ``_send_lock``.  A caller's ``sendall`` waits for that lock (so it
  blocks under back-pressure as on a plain socket); the reader thread, when reading produced
  records of its own (post-handshake messages such as a TLS 1.3 ``KeyUpdate`` reply), only
  *tries* the lock and otherwise leaves them to the thread holding it, which re-checks the
  outbox after releasing.  So the reader never waits for a writer.

Until the first application byte arrives, every TLS failure is raised as :class:`TLSError`
with a message naming the likely cause (a plain server, a refused client certificate, an
unverifiable server certificate).  In TLS 1.3 the server checks the client's certificate
after the client has finished its handshake, so a refusal shows up on that first read.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Any

from ZEO.Exceptions import ClientDisconnected

from .connection import SocketTransport

RECV_SIZE = 1 << 18
SEND_PIECE = 1 << 20

#: The start of a plain ZEO greeting frame (``Z5``/``M5``, zeo-facts §1.2).
_PLAIN_GREETINGS = (b"\x00\x00\x00\x02Z", b"\x00\x00\x00\x02M")


class TLSError(ClientDisconnected):
    """TLS could not be set up with a server (not retried quickly: fix the configuration)."""


def _describe(addr: Any, e: ssl.SSLError) -> str:
    """A message naming what most likely went wrong in a failed TLS exchange."""
    reason = (getattr(e, "reason", None) or "").upper()
    if isinstance(e, ssl.SSLCertVerificationError):
        return (f"TLS: the server certificate of {addr!r} did not verify: "
                f"{e.verify_message or e}")
    if "ALERT" in reason:
        return (f"TLS: the server at {addr!r} refused the handshake ({e.reason}); "
                "it probably rejected our client certificate (missing, expired, or not "
                "signed by a CA it trusts)")
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                  "HTTP_REQUEST", "UNKNOWN_PROTOCOL"):
        return f"TLS: the server at {addr!r} does not speak TLS ({e.reason})"
    return f"TLS handshake with {addr!r} failed: {e}"


class TLSTransport(SocketTransport):
    """TLS over ``sock``; ``recv`` (one reader thread) and ``sendall`` may run at once.

    ``sock`` stays reachable as ``self.sock`` so that its timeout can be set (the greeting
    wait uses it).  Build it with :func:`open_tls_transport`, which does the handshake.
    """

    def __init__(self, sock: socket.socket, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO, addr: Any = None) -> None:
        super().__init__(sock)
        self.addr = addr
        self._sslobj = sslobj
        self._incoming = incoming
        self._outgoing = outgoing
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._outbox: list[bytes] = []
        self._established = False  # application data seen: the server accepted us
        self._closed = False

    # -- the TLS state (under _lock) ----------------------------------------------------

    def _take_outgoing(self) -> None:
        """Move what the SSLObject produced into the outbox (caller holds ``_lock``)."""
        if self._outgoing.pending:
            self._outbox.append(self._outgoing.read())

    # -- writing -----------------------------------------------------------------------

    def _drain(self) -> None:
        """Write the outbox in order (caller holds ``_send_lock``)."""
        while True:
            with self._lock:
                if not self._outbox:
                    return
                chunks = self._outbox
                self._outbox = []
            self.sock.sendall(b"".join(chunks))

    def _drain_if_free(self) -> None:
        """Write the outbox unless another thread is writing (it will see the outbox)."""
        while self._outbox and self._send_lock.acquire(False):
            try:
                self._drain()
            finally:
                self._send_lock.release()

    def sendall_parts(self, parts: list[bytes]) -> None:
        self.sendall(b"".join(parts))  # one TLS record stream: encrypted pieces anyway

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        with self._send_lock:
            # In pieces, so that a big store is not held twice in memory (plain + records).
            for start in range(0, len(view), SEND_PIECE):
                with self._lock:
                    if self._closed:
                        raise OSError("the TLS transport is closed")
                    self._sslobj.write(view[start:start + SEND_PIECE])
                    self._take_outgoing()
                self._drain()
        self._drain_if_free()  # records the reader queued while we held the lock

    # -- reading -----------------------------------------------------------------------

    def recv(self, n: int) -> bytes:
        """Up to ``n`` decrypted bytes; ``b""`` at the end of the stream."""
        try:
            return self._recv(n)
        except ssl.SSLError as e:
            if self._established:
                raise
            raise TLSError(_describe(self.addr, e)) from e

    def _recv(self, n: int) -> bytes:
        while True:
            with self._lock:
                try:
                    data: bytes | None = self._sslobj.read(n)
                except ssl.SSLWantReadError:
                    data = None
                except ssl.SSLZeroReturnError:  # close_notify
                    data = b""
                except ssl.SSLEOFError:  # the socket ended without close_notify
                    data = b""
                self._take_outgoing()
            if self._outbox:
                self._drain_if_free()
            if data is not None:
                if data:
                    self._established = True
                elif not self._established:
                    raise TLSError(
                        f"TLS: the server at {self.addr!r} closed the connection right after "
                        "the handshake; it probably refused our client certificate (missing, "
                        "expired, or not signed by a CA it trusts)")
                return data
            raw = self.sock.recv(RECV_SIZE)
            with self._lock:
                if raw:
                    self._incoming.write(raw)
                else:
                    self._incoming.write_eof()

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Send ``close_notify`` when no write is under way, then close the socket."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._sslobj.unwrap()
            except (ssl.SSLError, ValueError):
                pass  # SSLWantReadError: our close_notify is out, theirs not awaited
            self._take_outgoing()
        if self._send_lock.acquire(False):
            try:
                with self._lock:
                    data = b"".join(self._outbox)
                    self._outbox = []
                self.sock.send(data, socket.MSG_DONTWAIT)
            except OSError:
                pass
            finally:
                self._send_lock.release()
        super().close()


def open_tls_transport(sock: socket.socket, addr: Any, context: ssl.SSLContext,
                       server_hostname: str | None, timeout: float) -> TLSTransport:
    """Run the client side of a TLS handshake on the connected ``sock`` within ``timeout``.

    ``server_hostname`` defaults to the host of a TCP ``addr``; a Unix socket address needs
    one when ``context.check_hostname`` is on.  Raises :class:`TLSError` (the socket is
    then closed by the caller).
    """
    if server_hostname is None and not isinstance(addr, str):
        server_hostname = addr[0]
    if server_hostname is None and context.check_hostname:
        raise TLSError(
            f"TLS to the Unix socket {addr!r} needs a server host name to check the "
            "server certificate against: pass ssl_server_hostname= (or server-hostname "
            "in <ssl>), or turn check_hostname off")
    incoming = ssl.MemoryBIO()
    outgoing = ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_side=False,
                              server_hostname=server_hostname)
    deadline = time.monotonic() + timeout
    first = b""
    try:
        while True:
            try:
                sslobj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            if outgoing.pending:
                sock.sendall(outgoing.read())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            raw = sock.recv(RECV_SIZE)
            if not raw:
                raise TLSError(
                    f"TLS: the server at {addr!r} closed the connection during the TLS "
                    "handshake (is it a TLS server?)")
            if len(first) < 5:
                first += raw[:5]
            incoming.write(raw)
        if outgoing.pending:  # our Finished (TLS 1.3), possibly with a certificate
            sock.sendall(outgoing.read())
    except TimeoutError:
        raise TLSError(f"TLS handshake with {addr!r} timed out after {timeout} s "
                       "(is it a TLS server?)") from None
    except ssl.SSLError as e:
        if first.startswith(_PLAIN_GREETINGS):
            raise TLSError(
                f"TLS: the server at {addr!r} sent a plain ZEO greeting ({first[4:6]!r}): "
                "it does not use TLS; connect without ssl=") from e
        raise TLSError(_describe(addr, e)) from e
    except ValueError as e:  # e.g. a bad server_hostname
        raise TLSError(f"TLS setup for {addr!r} failed: {e}") from e
    sock.settimeout(None)
    return TLSTransport(sock, sslobj, incoming, outgoing, addr)
