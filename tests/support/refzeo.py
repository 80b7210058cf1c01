"""The reference peer: a real ZEO 6.2 in its own virtualenv, driven only through subprocesses.

The venv lives in ``<repo>/.cache/zeo-ref`` (git-ignored) and is rebuilt when missing.  Nothing
here imports the real ZEO into our interpreter.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REF_VENV = Path(os.environ.get("ZEO_REF_VENV", REPO / ".cache" / "zeo-ref"))
OURS_VENV = Path(os.environ.get("ZEO_OURS_VENV", REPO / ".cache" / "zeo-ours"))
REF_ZEO_VERSION = "6.2"
# zope.testing lets the reference server import ZODB.tests' classes (server-side conflict
# resolution in the undo conformance tests).
REF_REQUIREMENTS = [f"ZEO=={REF_ZEO_VERSION}", "uvloop", "msgpack", "zope.testing"]


def ref_python() -> Path:
    """Path of the reference venv's python, building the venv first if needed."""
    return _venv_python(REF_VENV, REF_REQUIREMENTS, check=_check_ref_version)


def ours_python() -> Path:
    """Path of a clean venv's python holding our dependencies (and uvloop), not our package.

    The benchmarks run our side from a snapshot of ``src/`` under this interpreter, so both
    sides start from a venv installed as a user would, not from the developer's environment
    (whose site-packages may import things at startup and so weigh on the server's memory).
    """
    return _venv_python(OURS_VENV, ours_requirements())


def ours_requirements() -> list[str]:
    """``pyproject.toml``'s dependencies, plus uvloop and the relstorage extra (for
    ``benchmarks/run.py --storage relstorage``)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise RuntimeError("reading pyproject.toml needs Python 3.11 (tomllib); on 3.10 pass "
                           "benchmarks/run.py --ours-python") from None

    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    return [*project["dependencies"], *extras["uvloop"], *extras["relstorage"]]


def _check_ref_version(py: Path) -> None:
    out = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('ZEO'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    if out != REF_ZEO_VERSION:
        raise RuntimeError(f"reference venv has ZEO {out}, wanted {REF_ZEO_VERSION}")


def _venv_python(venv: Path, requirements: list[str],
                 check: Callable[[Path], None] | None = None) -> Path:
    """The python of ``venv``, (re)built with ``requirements`` unless its marker says done."""
    py = venv / "bin" / "python"
    marker = venv / ".complete"
    text = " ".join(requirements)
    if py.exists() and marker.exists() and marker.read_text() == text:
        return py
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several pytest workers may get here at once
        if not (marker.exists() and marker.read_text() == text):
            if not py.exists():
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(py), "-m", "pip", "install", "-q", *requirements], check=True)
            if check is not None:
                check(py)
            marker.write_text(text)
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
