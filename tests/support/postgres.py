"""A throw-away PostgreSQL cluster for tests: initdb + pg_ctl on a Unix socket, as a non-root user.

PostgreSQL refuses to run as root (CI runs as root), so under root the cluster belongs to the
``postgres`` user (Debian's package makes it).  The cluster lives in a 0755 directory under
/tmp that this user can enter, listens on a Unix socket only (its path must stay under 107
bytes), and runs with ``fsync=off`` and friends: test data need not survive a power cut.
``pg_ctl`` starts the postmaster in its own session, so :meth:`Cluster.stop` stops it by
``pg_ctl stop`` and then by the pid in ``postmaster.pid``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

#: Why PostgreSQL tests cannot run here (None: they can).
MISSING_REASON: str | None = None


def bindir() -> Path | None:
    """The directory of ``initdb``/``pg_ctl``/``postgres``: PG_BINDIR, else Debian's newest."""
    env = os.environ.get("PG_BINDIR")
    if env:
        return Path(env)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    postgres = shutil.which("postgres")
    return Path(postgres).parent if postgres else None


def unavailable() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if bindir() is None:
        return "PostgreSQL's server binaries are missing (apt-get install postgresql-15)"
    try:
        import psycopg2  # noqa: F401
        import relstorage  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install -e '.[relstorage]')"
    if os.getuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
    return None


class Cluster:
    """One PostgreSQL cluster; :meth:`create_database` gives each test its own database."""

    def __init__(self, name: str = "zeo") -> None:
        bin_ = bindir()
        assert bin_ is not None
        self.bin = bin_
        # Short and reachable by the postgres user: /tmp/zpg-XXXX (0755).
        self.root = Path(tempfile.mkdtemp(prefix=f"zpg-{name}-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        self.data = self.root / "data"
        self.socket_dir = self.root
        self.user = "postgres" if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
        self.log = self.root / "postgres.log"
        self._databases = 0
        if os.getuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user,
                  "-E", "UTF8", "--no-sync", "--no-instructions")
        options = ("-c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=200 "
                   f"-c unix_socket_directories='{self.socket_dir}' "
                   "-c shared_buffers=32MB -c max_prepared_transactions=100")
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l",
                  str(self.log), "-o", options)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = env.get("LC_ALL", "C.UTF-8")
        return env

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        argv = [str(self.bin / tool), *args]
        preexec = None
        if os.getuid() == 0:
            pw = pwd.getpwnam("postgres")

            def preexec() -> None:
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)

        result = subprocess.run(argv, cwd=self.root, env=self._env(), preexec_fn=preexec,
                                capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr}"
                               f"{self.log.read_text() if self.log.exists() else ''}")
        return result

    def dsn(self, dbname: str) -> str:
        return f"dbname={dbname} user={self.user} host={self.socket_dir}"

    def create_database(self, prefix: str = "db") -> str:
        """A new empty database; returns its DSN."""
        self._databases += 1
        name = f"{prefix}_{os.getpid()}_{self._databases}"
        self.sql("postgres", f"CREATE DATABASE {name}")
        return self.dsn(name)

    def sql(self, dbname: str, statement: str) -> str:
        """Run ``statement`` with ``psql`` (no Python driver needed); its output."""
        return self._run("psql", "-X", "-q", "-A", "-t", "-h", str(self.socket_dir), "-U",
                         self.user, "-d", dbname, "-c", statement).stdout

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every connection is cut."""
        self._run("pg_ctl", "restart", "-w", "-m", "fast", "-D", str(self.data), "-l",
                  str(self.log))

    def stop(self) -> None:
        pid = self.pid()
        self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data), check=False)
        if pid is not None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


MISSING_REASON = unavailable()

_shared: Cluster | None = None


def shared_cluster() -> Cluster:
    """This process's cluster (one per test worker), stopped when the process exits."""
    global _shared
    if _shared is None:
        import atexit

        _shared = Cluster()
        atexit.register(_shared.stop)
    return _shared


def relstorage_section(dsn: str, name: str = "1", blob_dir: str | None = None,
                       shared_blob_dir: bool = True, extra: str = "") -> str:
    """A ``<relstorage>`` section (history-preserving) over ``dsn``, with its ``%import``."""
    blobs = ""
    if blob_dir is not None:
        blobs = (f"  blob-dir {blob_dir}\n"
                 f"  shared-blob-dir {'true' if shared_blob_dir else 'false'}\n")
    return (f"%import relstorage\n<relstorage {name}>\n{blobs}{extra}"
            f"  <postgresql>\n    dsn {dsn}\n  </postgresql>\n</relstorage>\n")
