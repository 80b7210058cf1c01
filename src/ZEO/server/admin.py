"""The admin control socket: steer a running server from the same machine.

A Unix socket (mode 0600 by default, so only the server's user may use it) served on the
server's event loop.  The protocol is line based: each request is one line, either a JSON object
``{"command": "disconnect", "args": ["3"]}`` or plain words (``disconnect 3``, handy with
``socat``); each reply is one line of JSON, ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``.

Commands: ``status`` (the server's statistics), ``clients`` (one dict per connection: ``id``,
``label``, ``peer``, ``storage``...), ``disconnect CLIENT`` (an id, label or peer; closes every
match), ``reopen-logs`` (after log rotation, as SIGUSR2 does), ``stop`` (clean shutdown, as
SIGTERM does), ``help``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import weakref
from typing import TYPE_CHECKING, Any

from .storage_server import remove_stale_unix_socket

if TYPE_CHECKING:
    from .session import Session
    from .storage_server import StorageServer

logger = logging.getLogger("ZEO.server.admin")

DEFAULT_MODE = 0o600
MAX_LINE = 64 * 1024
COMMANDS = ("status", "clients", "disconnect", "reopen-logs", "stop", "help")


class AdminError(Exception):
    """The admin socket answered with an error, or could not be reached."""


class AdminServer:
    """Serve the admin protocol at ``path`` on ``server``'s loop; :meth:`close` removes it."""

    def __init__(self, server: StorageServer, path: str, mode: int = DEFAULT_MODE) -> None:
        self.server = server
        self.path = path
        self._ids: weakref.WeakKeyDictionary[Session, int] = weakref.WeakKeyDictionary()
        self._next_id = 1
        remove_stale_unix_socket(path, "admin socket")
        loop = server.event_loop
        # Created with a tight umask so the socket is never reachable by others, even briefly.
        old_umask = os.umask(0o177)
        try:
            self._listener = loop.run_until_complete(
                loop.create_unix_server(lambda: _AdminProtocol(self), path)
            )
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        logger.info("admin socket at %s", path)

    # -- commands (on the loop) --------------------------------------------------------

    def client_id(self, session: Session) -> int:
        cid = self._ids.get(session)
        if cid is None:
            cid = self._ids[session] = self._next_id
            self._next_id += 1
        return cid

    def clients(self) -> list[dict]:
        out = []
        for session in list(self.server.sessions):
            info = {"id": self.client_id(session)}
            info.update(session.statistics())
            out.append(info)
        return out

    def status(self) -> dict:
        stats = self.server.statistics()
        stats["pid"] = os.getpid()
        stats["admin_socket"] = self.path
        return stats

    def disconnect(self, which: str) -> dict:
        matches = [s for s in list(self.server.sessions)
                   if which in (str(self.client_id(s)), s.client_label, s.label, s.peer)]
        if not matches:
            raise AdminError(f"no client {which!r}")
        for session in matches:
            logger.info("admin: disconnecting %s", session.label)
            session.close()
        return {"disconnected": [self.client_id(s) for s in matches]}

    def reopen_logs(self) -> str:
        from ZConfig.components.logger import loghandler

        loghandler.reopenFiles()
        logger.info("Log files reopened successfully")
        return "log files reopened"

    def stop(self) -> str:
        logger.info("admin: stop requested")
        # Reply first; close() from the loop thread schedules the shutdown.
        self.server.event_loop.call_soon(self.server.close)
        return "stopping"

    def handle(self, line: bytes) -> dict:
        """One request line -> one reply dict."""
        try:
            command, args = parse_request(line)
            if command == "status":
                result: Any = self.status()
            elif command == "clients":
                result = self.clients()
            elif command == "disconnect":
                if len(args) != 1:
                    raise AdminError("usage: disconnect CLIENT (an id, label or peer)")
                result = self.disconnect(str(args[0]))
            elif command == "reopen-logs":
                result = self.reopen_logs()
            elif command == "stop":
                result = self.stop()
            elif command == "help":
                result = list(COMMANDS)
            else:
                raise AdminError(f"unknown command {command!r}; try: {', '.join(COMMANDS)}")
        except AdminError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:
            logger.exception("admin command failed")
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return {"ok": True, "result": result}

    def close(self) -> None:
        """Stop listening and remove the socket file (on the loop or before it runs)."""
        self._listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def parse_request(line: bytes) -> tuple[str, list]:
    """``(command, args)`` of a request line (JSON object or plain words)."""
    text = line.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        try:
            req = json.loads(text)
        except ValueError as e:
            raise AdminError(f"bad JSON request: {e}")
        if not isinstance(req, dict) or not isinstance(req.get("command"), str):
            raise AdminError('a JSON request needs a "command" string')
        args = req.get("args", [])
        if not isinstance(args, list):
            args = [args]
        return req["command"], args
    words = text.split()
    if not words:
        raise AdminError("empty request")
    return words[0], words[1:]


class _AdminProtocol(asyncio.Protocol):
    def __init__(self, admin: AdminServer) -> None:
        self.admin = admin
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                self._reply(self.admin.handle(line))
        if len(self.buf) > MAX_LINE:
            self._reply({"ok": False, "error": "request line too long"})
            self.transport.close()  # type: ignore[union-attr]

    def _reply(self, reply: dict) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(reply, default=str).encode() + b"\n")


def admin_request(path: str, command: str, *args: Any, timeout: float = 30.0) -> Any:
    """Send one command to the admin socket at ``path``; return its result.

    Raises :class:`AdminError` with the server's message for an error reply, and ``OSError``
    when the socket cannot be reached.
    """
    request = json.dumps({"command": command, "args": list(args)}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise AdminError(f"no reply from {path}")
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise AdminError(reply.get("error", "unknown error"))
    return reply.get("result")
