"""Is another distribution that owns the ``ZEO`` package installed beside zeo-ng?

zeo-ng and ZEO both install the ``ZEO`` package: installed together, their files mix, and
uninstalling ZEO then removes files of zeo-ng while pip still lists it.  The tools say so
in one line at start.
"""

from __future__ import annotations

import os
import re
import sys

_ZEO_METADATA = re.compile(r"zeo-(\d[^-]*?)(?:-py[^-]*)?\.(dist|egg)-info$", re.IGNORECASE)


def other_zeo_distributions() -> list[str]:
    """``ZEO-<version>`` for each metadata directory of the ZEO distribution on ``sys.path``.

    Reads directory listings only (``importlib.metadata`` reads every distribution's files,
    which takes seconds in a large environment).
    """
    found = []
    for entry in dict.fromkeys(sys.path):
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            m = _ZEO_METADATA.match(name)
            if m:
                found.append(f"ZEO {m.group(1)}")
    return found


def warning() -> str | None:
    """The one-line warning to show, or None."""
    others = other_zeo_distributions()
    if not others:
        return None
    return (f"warning: {', '.join(sorted(set(others)))} is installed in this environment "
            "beside zeo-ng, and both own the ZEO package: run 'pip uninstall ZEO', then "
            "reinstall zeo-ng")
