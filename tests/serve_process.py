"""`talis serve` as users start it, for client tests: a subprocess on 127.0.0.1 and a port the OS picks (--port 0),
stopped with SIGTERM at the end. The server's request log goes to a file, so no pipe fills up."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90


def free_port() -> int:
    """A loopback port nothing listens on (closed again at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client_env(**extra) -> dict:
    """The environment of a `talis` subprocess: this checkout first, offline, no inherited key."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("TALIS_API_KEY", None)
    env.update(extra)
    return env


@contextlib.contextmanager
def talis_serve(*args: str, log_path: Path):
    """Yield the URL of a `talis serve *args` subprocess once it has announced it (fails the test otherwise)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "talis_cli", "serve", "--port", "0", *args], cwd=REPO,
                                   env=client_env(), stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        deadline, line = time.monotonic() + START_TIMEOUT_S, ""
        while "talis serve:" not in line:
            left = deadline - time.monotonic()
            if left <= 0 or process.poll() is not None:
                raise AssertionError(f"talis serve did not start: {log_path.read_text()[-2000:]}")
            if select.select([process.stdout], [], [], min(left, 1.0))[0]:
                line = process.stdout.readline()
        yield re.search(r"http://[\d.]+:\d+", line).group(0)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        process.stdout.close()
