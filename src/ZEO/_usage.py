"""The one error of the command-line tools (``runzeo``, ``zeo``, ``zeopack``...): the user
asked for something that cannot be done as asked.  Each tool prints its message on one line
and exits with its usage status (2)."""


class UsageError(Exception):
    """Bad options, arguments or configuration."""
