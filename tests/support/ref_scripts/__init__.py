"""Long-lived real-ZEO 6.2 client processes for interop tests (see ``driver.py``)."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import time
from pathlib import Path
from typing import Any

from ..refzeo import ref_python

DRIVER = Path(__file__).with_name("driver.py")


class RefError(Exception):
    """A command failed in the reference process: ``args == (class name, message)``."""

    @property
    def class_name(self) -> str:
        return self.args[0]


class RefDriver:
    """One reference-venv python running ``driver.py``; send commands, get results.

    Every command has a timeout; ``close()`` (or the context manager) ends the process.
    """

    def __init__(self, timeout: float = 60.0) -> None:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [str(ref_python()), str(DRIVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env, bufsize=1,
        )
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)

    def __call__(self, op: str, **kw: Any) -> Any:
        """Run ``op`` and return its result; raise :class:`RefError` if it raised there."""
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + self.timeout
        while not self._sel.select(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"reference driver: no answer to {op} in {self.timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"reference driver died: {self.proc.stderr.read()[-3000:]}")
        result = json.loads(line)
        if "error" in result:
            raise RefError(result["error"], result["msg"], result.get("tb", ""))
        return result["ok"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(20)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()
        self._sel.close()
        self.proc.stdout.close()
        self.proc.stderr.close()

    def __enter__(self) -> RefDriver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
