"""Errors meant for the user: one line that names the problem and what to do."""


class TalisError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""

    exit_code = 1


class UsageError(TalisError):
    """Bad arguments or settings (exit code 2)."""

    exit_code = 2
