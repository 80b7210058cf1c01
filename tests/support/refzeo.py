"""The reference peer: a real ZEO 6.2 in its own virtualenv, driven only through subprocesses.

The venv lives in ``<repo>/.cache/zeo-ref`` (git-ignored) and is rebuilt when missing.  Nothing
here imports the real ZEO into our interpreter.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REF_VENV = Path(os.environ.get("ZEO_REF_VENV", REPO / ".cache" / "zeo-ref"))
REF_ZEO_VERSION = "6.2"
# zope.testing lets the reference server import ZODB.tests' classes (server-side conflict
# resolution in the undo conformance tests).
REF_REQUIREMENTS = [f"ZEO=={REF_ZEO_VERSION}", "uvloop", "msgpack", "zope.testing"]
_MARKER_TEXT = " ".join(REF_REQUIREMENTS)


def ref_python() -> Path:
    """Path of the reference venv's python, building the venv first if needed."""
    py = REF_VENV / "bin" / "python"
    marker = REF_VENV / ".complete"
    if py.exists() and marker.exists() and marker.read_text() == _MARKER_TEXT:
        return py
    REF_VENV.parent.mkdir(parents=True, exist_ok=True)
    lock_path = REF_VENV.parent / "zeo-ref.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several pytest workers may get here at once
        if not (marker.exists() and marker.read_text() == _MARKER_TEXT):
            if not py.exists():
                subprocess.run([sys.executable, "-m", "venv", str(REF_VENV)], check=True)
            subprocess.run(
                [str(py), "-m", "pip", "install", "-q", *REF_REQUIREMENTS],
                check=True,
            )
            out = subprocess.run(
                [str(py), "-c", "import importlib.metadata as m; print(m.version('ZEO'))"],
                check=True, capture_output=True, text=True,
            ).stdout.strip()
            if out != REF_ZEO_VERSION:
                raise RuntimeError(f"reference venv has ZEO {out}, wanted {REF_ZEO_VERSION}")
            marker.write_text(_MARKER_TEXT)
    return py


def ref_bin(name: str) -> Path:
    """A console script of the reference venv (``runzeo``, ``zeopack``, ``zeo-nagios``...)."""
    ref_python()
    return REF_VENV / "bin" / name


def run_ref(code: str, *args: str, timeout: float = 120, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run Python ``code`` with the reference ZEO; ``args`` become ``sys.argv[1:]``."""
    full_env = dict(os.environ)
    full_env.pop("PYTHONPATH", None)
    if env:
        full_env.update(env)
    return subprocess.run(
        [str(ref_python()), "-c", code, *args],
        capture_output=True, text=True, timeout=timeout, check=check, env=full_env,
    )
