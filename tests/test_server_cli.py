"""`talis serve` as a command: the ready line, SIGTERM drains and exits 0, one-line errors for a port in use or a
bad host (before any model loads)."""

import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest


def talis(*args) -> list[str]:
    return [sys.executable, "-m", "talis_cli", *args]


def read_line(process: subprocess.Popen, timeout: float) -> str:
    """The next stdout line of `process`, failing after `timeout` seconds."""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    assert selector.select(timeout), f"no line from talis serve in {timeout} s"
    return process.stdout.readline()


def test_sigterm_drains_and_exits_0():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(talis("serve", "--port", "0", "--temperature", "0", "--drain-timeout", "1"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = read_line(process, 60)
        assert line.startswith("talis serve: http://127.0.0.1:") and "(model talis-default, max batch 8" in line
        url = line.split()[2]
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        received, first = [], threading.Event()

        def stream():  # a long reply, still running when the signal comes
            with httpx.stream("POST", url + "/v1/completions", timeout=30,
                              json={"prompt": "And God said", "max_tokens": 500, "stream": True}) as response:
                for chunk in response.iter_lines():
                    received.append(chunk)
                    first.set()

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert first.wait(30)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        while httpx.get(url + "/health", timeout=10).status_code == 200:  # the signal lands
            assert time.monotonic() - started < 1
            time.sleep(0.02)
        refused = httpx.post(url + "/v1/completions", json={"prompt": "And God said"}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - started < 1 + 3 + 5  # drain deadline + connection close + slack
        reader.join(10)
        assert not reader.is_alive() and "data: [DONE]" not in received  # the row was cancelled at the deadline
        stderr = process.stderr.read()
        assert "POST /v1/completions 200" in stderr and "Traceback" not in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.fixture
def taken_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("args, code, message", [
    (("--port", "{port}"), 1, "error: port {port} on 127.0.0.1 is in use: stop what listens there or pick another --port"),
    (("--host", "203.0.113.9"), 1, "error: 203.0.113.9 is not an address of this machine; check --host"),
    (("--api-key", " "), 2, "error: --api-key (or TALIS_API_KEY) is empty; give a key, or leave it unset for no key"),
])
def test_one_line_errors(taken_port, args, code, message):
    args = [arg.format(port=taken_port) for arg in args]
    done = subprocess.run(talis("serve", *args), capture_output=True, text=True, timeout=60)
    assert done.returncode == code
    assert done.stderr == message.format(port=taken_port) + "\n" and done.stdout == ""


def test_a_model_that_fails_to_load_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    done = subprocess.run(talis("serve", "--port", "0", "--model", str(tmp_path)), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
