"""Writing to stdout for every command: text now, and a quiet end when the reader of a pipe has gone."""

import os
import sys


def write_out(text: str) -> None:
    """Write to stdout now; when the reader has gone (`| head`), stop quietly with exit code 0."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
        raise SystemExit(0) from None


def silence_stdout() -> None:
    """After the reader of a pipe left: point stdout at /dev/null so the exit-time flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
