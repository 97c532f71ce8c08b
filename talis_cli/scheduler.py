"""Continuous batching: requests join and leave one running batch between decode steps.

A `Scheduler` owns the generator's model and its KV cache while it runs. Requests wait in a bounded queue;
between decode steps the waiting ones are admitted into free cache rows (their prompt prefilled), then every
running row advances by one token in one decode step. A row that finishes or is cancelled frees its cache row at
once. Events are the Generator's `TokenEvent`s, delivered to a listener or through `Request.events()`.
No HTTP here: a server (or `talis generate --each-line`) drives it.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

from .errors import TalisError
from .generation import GenerationConfig, Generator, TokenEvent

CANCELLED = "cancelled"


class QueueFull(TalisError):
    """submit() while `max_queue` requests already wait (a server answers 429)."""


class Draining(TalisError):
    """submit() after stop() began (a server answers 503)."""


@dataclass
class RequestStats:
    """What one request cost; times in seconds from its submit()."""

    prompt_tokens: int
    reused_tokens: int = 0  # prompt tokens whose keys/values were already cached (prefix reuse)
    new_tokens: int = 0
    queued_s: float = 0.0  # submit -> its prefill starts
    first_token_s: float = 0.0  # submit -> first token event (time to first token)
    decode_s: float = 0.0  # first token -> last token
    finish_reason: str | None = None  # "eos" | "stop" | "length" | "context" | "cancelled"


Listener = Callable[["Request", TokenEvent], None]


class Request:
    """One prompt in the scheduler: its ids, its own sampling settings, its stats and its stream of events."""

    def __init__(self, id: int, prompt_ids: list[int], cfg: GenerationConfig, prompt_index: int,
                 listener: Listener | None):
        self.id = id
        self.prompt_ids = prompt_ids
        self.cfg = cfg
        self.prompt_index = prompt_index
        self.stats = RequestStats(prompt_tokens=len(prompt_ids))
        self.done = False  # its last event has been delivered
        self._listener = listener
        self._events: queue.SimpleQueue | None = None if listener else queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._submitted = time.perf_counter()
        self._first_at: float | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Thread-safe: the request leaves at the scheduler's next step (freeing its cache row) and gets a last
        event with finish_reason "cancelled"; nothing happens once it is done."""
        self._cancelled.set()

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Blocking iterator over this request's events, ending after the one that carries finish_reason.
        TimeoutError when one wait exceeds `timeout` seconds. Only for a request submitted without a listener."""
        if self._events is None:
            raise RuntimeError("this request's events go to its listener")
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no event from request {self.id} in {timeout} s") from None
            yield event
            if event.finish_reason is not None:
                return

    # --- the scheduler thread's side ------------------------------------------------------------------
    def _deliver(self, event: TokenEvent) -> None:
        now = time.perf_counter()
        stats = self.stats
        if event.token_ids:
            stats.new_tokens += len(event.token_ids)
            if self._first_at is None:
                self._first_at = now
                stats.first_token_s = now - self._submitted
            stats.decode_s = now - self._first_at
        if event.finish_reason is not None:
            stats.finish_reason = event.finish_reason
            self.done = True
        if self._listener is not None:
            self._listener(self, event)
        else:
            self._events.put(event)

    def _cancelled_event(self) -> TokenEvent:
        return TokenEvent(self.prompt_index, "", [], CANCELLED)


class Scheduler:
    """Runs requests on `generator`'s model with continuous batching, at most `max_batch` at a time, with at most
    `max_queue` waiting. While it runs, the model belongs to it: use the generator only after stop().

    Drive it with step() (tests, one thread) or start() (its own daemon thread); submit() and Request.cancel()
    are safe from any thread.
    """

    def __init__(self, generator: Generator, max_batch: int = 8, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch {max_batch} must be >= 1 and max_queue {max_queue} >= 0")
        self.generator = generator
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[Request] = deque()
        self._running: dict[int, tuple[Request, Iterator[TokenEvent]]] = {}
        self._draining = False
        self._thread: threading.Thread | None = None
        self._stop_thread = False

    # --- any thread ---------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, prompt_ids: list[int], cfg: GenerationConfig, *, prompt_index: int = 0,
               listener: Listener | None = None) -> Request:
        """Queue a prompt (token ids) with its settings; `prompt_index` picks its random stream with cfg.seed
        (talis_cli.sampling.row_seed); `listener(request, event)` is called on the scheduler thread and must not
        block. Raises at once: UsageError (a bad setting), TalisError (empty prompt, or too long for the context:
        with the token counts), QueueFull, Draining."""
        cfg.validate()
        prompt_ids = list(prompt_ids)
        self.generator.check_prompt(prompt_ids, cfg)
        with self._lock:
            if self._draining:
                raise Draining("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (the most is {self.max_queue}); "
                                "try again later")
            request = Request(next(self._ids), prompt_ids, cfg, prompt_index, listener)
            self._waiting.append(request)
            self._wake.notify()
        return request

    # --- the scheduler thread -----------------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration: drop cancelled requests, admit waiting ones into free rows, advance every running row
        by one token, deliver the events. False when there was nothing to do."""
        self._drop_cancelled()
        while len(self._running) < 1 and self._waiting:  # this first version runs one request at a time
            with self._lock:
                request = self._waiting.popleft() if self._waiting else None
            if request is None:
                break
            request.stats.queued_s = time.perf_counter() - request._submitted
            events = self.generator.stream_batch([request.prompt_ids], request.cfg,
                                                 prompt_indices=[request.prompt_index])
            self._running[request.id] = (request, events)
            stats = self.generator.last_stats
            if stats is not None:
                request.stats.reused_tokens = stats.reused_tokens
        if not self._running:
            return False
        for key, (request, events) in list(self._running.items()):
            event = next(events, None)
            if event is None:  # cannot happen: the generator ends each row with a finish reason
                event = TokenEvent(request.prompt_index, "", [], "length")
            if event.index != request.prompt_index:
                event.index = request.prompt_index
            if request.stats.new_tokens == 0:
                stats = self.generator.last_stats
                request.stats.reused_tokens = stats.reused_tokens if stats else 0
            request._deliver(event)
            if event.finish_reason is not None:
                del self._running[key]
        return True

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled]
            for request in gone:
                self._waiting.remove(request)
        for request in gone:
            request._deliver(request._cancelled_event())
        for key, (request, events) in list(self._running.items()):
            if request.cancelled:
                events.close()
                del self._running[key]
                request._deliver(request._cancelled_event())

    def _cancel_all(self) -> None:
        with self._lock:
            for request in self._waiting:
                request.cancel()
        for request, _ in self._running.values():
            request.cancel()
        self._drop_cancelled()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stop_thread:
                    break
            if not self.step():
                with self._lock:
                    if not self._stop_thread and not self._waiting:
                        self._wake.wait(timeout=0.05)
        self._cancel_all()

    def start(self) -> None:
        """Run the loop on a daemon thread (the model is used only from it)."""
        if self._thread is not None:
            raise RuntimeError("the scheduler is already started")
        self._thread = threading.Thread(target=self._loop, name="talis-scheduler", daemon=True)
        self._thread.start()

    def stop(self, deadline_s: float = 10.0) -> None:
        """Take no new requests (Draining), let the accepted ones run for up to `deadline_s` seconds, cancel the
        rest (a last "cancelled" event each), and end the thread. Without start(), the caller's thread steps."""
        with self._lock:
            self._draining = True
        end = time.monotonic() + deadline_s
        if self._thread is None:
            while time.monotonic() < end and self.step():
                pass
            self._cancel_all()
            return
        while time.monotonic() < end and (self._waiting or self._running):
            time.sleep(0.01)
        with self._lock:
            self._stop_thread = True
            self._wake.notify()
        self._thread.join()
