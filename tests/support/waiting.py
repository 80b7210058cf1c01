"""Waiting in tests: one helper for a condition, one for a log text."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0,
               what: str = "condition") -> bool:
    """Poll ``predicate`` until it is true; True, or AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return True


def wait_for_log(source: Any, text: str, timeout: float = 30.0) -> str:
    """Wait until ``text`` is in the log of ``source`` (a path, or a server process with a
    ``log()`` method); return the log."""
    def read() -> str:
        if isinstance(source, Path):
            return source.read_text(errors="replace") if source.exists() else ""
        return source.log()

    deadline = time.monotonic() + timeout
    while True:
        log = read()
        if text in log:
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the log after {timeout}s:\n{log[-3000:]}")
        time.sleep(0.05)
