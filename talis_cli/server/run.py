"""Start and stop `talis serve`: bind, serve with uvicorn while the model loads, drain on SIGINT/SIGTERM.

Order: bind the socket first (a port in use or a bad host is one line, before any loading), serve at once (/health
and /v1/ answer 503 while the model loads, on a thread of its own), print one line with the URL when the model is
ready. The first SIGINT/SIGTERM drains: new requests get 503, running ones may finish until the deadline, the rest
are cancelled, then uvicorn closes the connections and `serve` returns (exit 0). A second SIGINT quits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import signal
import socket
import threading
import time
from pathlib import Path

import uvicorn

from talis_cli.errors import TalisError

from .app import EMBEDDED_MODEL_ID, ServedModel, ServerState, create_app

GRACEFUL_CLOSE_S = 3.0  # after the drain: time for connections to close before uvicorn cancels their tasks


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one). TalisError in one line when that cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise TalisError(f"cannot listen on {host}: {exc.strerror}; check --host (e.g. 127.0.0.1 or 0.0.0.0)") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise TalisError(f"port {port} on {host} is in use: stop what listens there or pick another --port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise TalisError(f"{host} is not an address of this machine; check --host") from None
        if exc.errno == errno.EACCES:
            raise TalisError(f"no permission to listen on port {port}; pick a port above 1023 with --port") from None
        raise TalisError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def load_served(settings, config, max_batch: int, max_queue: int) -> ServedModel:
    """Load the model `settings` name and start its scheduler (settings: talis_cli.settings.RunSettings;
    config: the server's default GenerationConfig). Without --threads, torch leaves one core more free than
    `talis generate` does (talis_cli.threads says why)."""
    from talis_cli.engine import Engine
    from talis_cli.threads import SERVER_RESERVED_CORES

    load = dataclasses.replace(settings.load_settings(), reserve_cores=SERVER_RESERVED_CORES)
    return serve_engine(Engine.load(load), settings, config, max_batch, max_queue)


def serve_engine(engine, settings, config, max_batch: int, max_queue: int) -> ServedModel:
    """A loaded engine as the server's model: its chat template resolved, its Scheduler started (from now on the
    scheduler's thread owns the engine's model)."""
    from talis_cli.chat_templates import resolve_template
    from talis_cli.scheduler import Scheduler

    template = resolve_template(settings.template, engine.tokenizer)
    scheduler = Scheduler(engine.generator, max_batch=max_batch, max_queue=max_queue)
    scheduler.start()
    return ServedModel(engine, scheduler, model_id(settings), config, template, settings.system,
                       created=int(time.time()))


def model_id(settings) -> str:
    """The id GET /v1/models shows: the model folder's name, or EMBEDDED_MODEL_ID for the embedded model."""
    return Path(settings.model).resolve().name if settings.model else EMBEDDED_MODEL_ID


class BackgroundServer:
    """The app on host:port (0: a free port) in a thread of this process, for tests and benchmarks (no signal
    handling, no drain: close() stops it). `served` None: it answers 503 "loading" until `state.ready(...)`.

    url: where it listens; state: its ServerState; lines: its log lines (not printed)."""

    def __init__(self, served: ServedModel | None = None, *, api_key: str | None = None,
                 cors_origins: tuple[str, ...] = (), host: str = "127.0.0.1", port: int = 0,
                 start_timeout_s: float = 10.0):
        self.lines: list[str] = []
        self.state = ServerState(api_key, log=self.lines.append)
        sock = bind_socket(host, port)
        self.url = url_of(sock)
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.state, tuple(cors_origins)), log_level="warning",
                                                    access_log=False, lifespan="off", ws="none",
                                                    timeout_graceful_shutdown=GRACEFUL_CLOSE_S))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[sock])),
                                       name="talis-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server thread did not start")
            time.sleep(0.01)
        if served is not None:
            self.state.ready(served)

    def close(self, drain_s: float = 1.0) -> None:
        """Stop the server and its scheduler (running requests get `drain_s` seconds)."""
        self.server.should_exit = True
        self.thread.join(GRACEFUL_CLOSE_S + 5)
        if self.state.served is not None:
            self.state.served.scheduler.stop(drain_s)

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Server(uvicorn.Server):
    """uvicorn's server with our signal handling (a drain first) instead of its own."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def serve(settings, config, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_queue: int = 64, cors_origins: tuple[str, ...] = (), drain_s: float = 10.0,
          announce=print) -> None:
    """Run `talis serve` until SIGINT/SIGTERM. TalisError (one line) when the socket or the model fails.

    announce: called once with the line that gives the URL, when the model is ready."""
    sock = bind_socket(host, port)
    state = ServerState(api_key)
    app = create_app(state, tuple(cors_origins))
    server = _Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", ws="none",
                                    timeout_graceful_shutdown=GRACEFUL_CLOSE_S))
    failure: list[BaseException] = []

    async def main():
        loop = asyncio.get_running_loop()
        drains: list[threading.Thread] = []
        phase = threading.Lock()  # a signal's "draining" and the load's "ready" one at a time

        def on_signal():
            if drains:  # a second signal: quit now
                server.should_exit = server.force_exit = True
                return
            with phase:
                state.phase = "draining"
            drains.append(threading.Thread(target=drain, name="talis-drain", daemon=True))
            drains[0].start()

        def drain():  # a daemon thread: a second signal does not wait for it
            if state.served is not None:
                state.served.scheduler.stop(drain_s)
            server.should_exit = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)

        def load():  # a daemon thread: a signal during the load does not wait for it
            try:
                served = load_served(settings, config, max_batch, max_queue)
            except BaseException as exc:  # reported after the server stops
                failure.append(exc)
                server.should_exit = True
                return
            with phase:  # else a signal between the check and ready() would drain before state.served is set
                loading = state.phase == "loading"
                if loading:
                    state.ready(served)
            if loading:
                announce(f"talis serve: {url_of(sock)} (model {served.model_id}, max batch {max_batch}; "
                         "Ctrl-C stops)")
            else:
                served.scheduler.stop(0)

        threading.Thread(target=load, name="talis-load", daemon=True).start()
        try:
            await server.serve(sockets=[sock])
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    asyncio.run(main())
    if failure:
        raise failure[0]
