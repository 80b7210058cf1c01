"""Start real server processes (ours or the reference ZEO) from a ZConfig file, for tests.

Both are started the way users start them: ``runzeo -C zeo.conf``.  The address is a Unix
socket or 127.0.0.1 with a port picked by the kernel, read back from the server's log.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .refzeo import ref_bin

LISTEN_RE = re.compile(r"listening on (.+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_address(addr, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until something accepts connections at ``addr`` ((host, port) or a socket path)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            if isinstance(addr, str):
                s = socket.socket(socket.AF_UNIX)
            else:
                s = socket.socket()
            with s:
                s.settimeout(1)
                s.connect(addr)
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no server at {addr!r} after {timeout}s")
            time.sleep(0.02)


class ServerProcess:
    """A ``runzeo`` subprocess. ``addr`` is what clients connect to."""

    def __init__(self, argv: list[str], addr, log_path: Path, env: dict | None = None,
                 kind: str = "ours"):
        self.argv = argv
        self.kind = kind  # "ours" or "ref"
        self.addr = addr
        self.log_path = log_path
        full_env = dict(os.environ)
        if argv[0] != sys.executable:
            # The reference venv must import its own ZEO, never ours from PYTHONPATH.
            full_env.pop("PYTHONPATH", None)
        if env:
            full_env.update(env)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=full_env)
        try:
            wait_for_address(addr, proc=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"server failed to start: {self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``: 30 s for ours, 5 s for the reference ZEO,
        which often misses a SIGTERM that lands while it handles a client disconnect
        (zeo-facts §11)."""
        if timeout is None:
            timeout = 5.0 if self.kind == "ref" else 30.0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def write_config(directory: Path, storage_conf: str, zeo_extra: str = "", addr=None,
                 imports: str = "") -> tuple[Path, object]:
    """Write ``zeo.conf`` in ``directory``; return (path, address clients should use)."""
    if addr is None:
        addr = ("127.0.0.1", free_port())
    addr_text = addr if isinstance(addr, str) else f"{addr[0]}:{addr[1]}"
    conf = directory / "zeo.conf"
    conf.write_text(
        f"{imports}\n<zeo>\n  address {addr_text}\n{zeo_extra}\n</zeo>\n{storage_conf}\n"
    )
    return conf, addr


def filestorage_conf(path: Path, name: str = "1", blob_dir: Path | None = None) -> str:
    fs = f"<filestorage {name}>\n  path {path}\n</filestorage>"
    if blob_dir is None:
        return fs
    inner = f"<filestorage>\n  path {path}\n</filestorage>"
    return f"<blobstorage {name}>\n  blob-dir {blob_dir}\n  {inner}\n</blobstorage>"


def start_server(kind: str, directory: Path, storage_conf: str, zeo_extra: str = "",
                 addr=None, env: dict | None = None) -> ServerProcess:
    """Start ``kind`` ("ours" or "ref") with ``runzeo -C`` on a fresh config in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    conf, addr = write_config(directory, storage_conf, zeo_extra, addr)
    if kind == "ours":
        argv = [sys.executable, "-m", "ZEO.runzeo", "-C", str(conf)]
    elif kind == "ref":
        argv = [str(ref_bin("runzeo")), "-C", str(conf)]
    else:
        raise ValueError(kind)
    return ServerProcess(argv, addr, directory / f"{kind}-server.log", env=env, kind=kind)
