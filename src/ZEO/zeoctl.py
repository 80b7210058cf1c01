"""``zeoctl``: control a ZEO server through zdaemon (start, stop, restart, status, logreopen...).

It is zdaemon's ``zdctl`` reading the server's own config file with ``zeoctl.xml``: the
``runzeo`` schema plus a required ``<runner>`` section (``program runzeo -C zeo.conf``,
``socket-name``...).  ``logreopen`` sends SIGUSR2, which makes runzeo reopen its log files.
"""

from __future__ import annotations

import os
import sys

import zdaemon
from zdaemon import zdctl

SCHEMA_DIR = os.path.dirname(os.path.abspath(__file__))
ZDRUN = os.path.join(os.path.dirname(os.path.abspath(zdaemon.__file__)), "zdrun.py")


USAGE = """\
Usage: zeoctl -C zeo.conf [action [arguments]]

Control a ZEO server run in the background by zdaemon.  zeo.conf is the server's own
configuration with a <runner> section added (see examples/zeoctl.conf):

  <runner>
    program runzeo -C /etc/zeo/zeoctl.conf
    socket-name /var/lib/zeo/zdaemon.sock
  </runner>

Actions:
  start       start the server and the daemon manager that restarts it if it dies
  stop        stop the server (SIGTERM) and the daemon manager
  restart     stop, then start
  status      tell whether the server runs, and its pid
  logreopen   make the server reopen its log files (SIGUSR2), after log rotation
  kill SIG    send a signal to the server
  fg          run the server in the foreground (Ctrl-C stops it)
  help        list every action

Without an action, zeoctl reads actions from its own prompt.

Options:
  -C FILE     the configuration file (required)
  -h          this message
"""


class ZEOCtlOptions(zdctl.ZDCtlOptions):
    """zdctl's options with ZEO's schema, and zdaemon's own zdrun as the daemon manager
    (zdctl would otherwise re-run ``sys.argv[0]``, which may be a wrapper script)."""

    def __init__(self) -> None:
        super().__init__()
        # Set before realize(): zdctl's own default for -S is zdaemon's schema.
        self.schemadir = SCHEMA_DIR
        self.schemafile = "zeoctl.xml"

    def realize(self, *args, **kw) -> None:
        kw.setdefault("doc", USAGE)
        super().realize(*args, **kw)
        if not getattr(self, "zdrun", None):  # set by realize() from the config
            self.zdrun = ZDRUN


def main(args: list[str] | None = None) -> None:
    """Console script: ``zeoctl -C zeo.conf start|stop|restart|status|logreopen|...``."""
    if args is None:
        args = sys.argv[1:]
    options = ZEOCtlOptions()
    zdctl.main(args, options)


if __name__ == "__main__":
    main()
