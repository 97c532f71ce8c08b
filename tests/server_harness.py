"""A live `talis serve` app for tests: uvicorn on 127.0.0.1 and a free port, in a thread of the test process,
serving the embedded model through a Scheduler; and reference replies from a second engine, for comparison."""

from __future__ import annotations

import asyncio
import threading
import time

import uvicorn

from talis_cli.generation import GenerationConfig
from talis_cli.server.app import ServerState, create_app
from talis_cli.server.run import bind_socket, load_served, url_of
from talis_cli.settings import RunSettings

GREEDY = GenerationConfig(temperature=0.0)


class LiveServer:
    """The app on a free loopback port. `served` None: it stays "loading" until `state.ready(...)`."""

    def __init__(self, served=None, api_key: str | None = None, cors_origins=()):
        self.lines: list[str] = []  # the server's log lines
        self.state = ServerState(api_key, log=self.lines.append)
        self.sock = bind_socket("127.0.0.1", 0)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.state, cors_origins), log_level="warning",
                                                    lifespan="off", ws="none", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the test server did not start"
            time.sleep(0.01)
        if served is not None:
            self.state.ready(served)

    @property
    def scheduler(self):
        return self.state.served.scheduler

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        if self.state.served is not None:
            self.state.served.scheduler.stop(1.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve_embedded(config: GenerationConfig = GREEDY, max_batch: int = 8, max_queue: int = 64, **kwargs) -> LiveServer:
    """A LiveServer of the embedded model, its default settings `config`."""
    return LiveServer(load_served(RunSettings(), config, max_batch, max_queue), **kwargs)


def metric_samples(text: str) -> dict:
    """Prometheus text -> {'name{labels}': value} (comments skipped)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples
