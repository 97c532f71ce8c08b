"""Continuous batching: requests join and leave one running batch between decode steps.

A `Scheduler` owns the generator's model and its KV cache while it runs. Requests wait in a bounded queue;
between decode steps the waiting ones are admitted into free cache rows (their prompt prefilled), then every
running row advances by one token in one decode step. A row that finishes or is cancelled frees its cache row at
once. Events are the Generator's `TokenEvent`s, delivered to a listener or through `Request.events()`.
No HTTP here: a server (or `talis generate --each-line`) drives it.
"""

from __future__ import annotations

import itertools
import os
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

from .detokenize import IncrementalDetokenizer
from .errors import TalisError
from .generation import GenerationConfig, Generator, TokenEvent, _Row

CANCELLED = "cancelled"
ERROR = "error"  # the model failed mid-step (a bug or an out-of-memory): Request.error says why
PREFILL_CHUNK = 512  # prompt tokens prefilled per step at most, so a long newcomer stalls the running rows briefly
# newcomers of one step prefilled as segments of one forward (GPUs); TALIS_PACKED_PREFILL=0: one forward each (A/B)
PACKED_PREFILL = os.environ.get("TALIS_PACKED_PREFILL", "1") != "0"


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
        self.error: str | None = None  # why it ended with finish_reason "error"
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
        if self._listener is None:
            self._events.put(event)
            return
        try:
            self._listener(self, event)
        except Exception as exc:  # a broken listener ends its own request, not the scheduler
            print(f"talis scheduler: listener of request {self.id} failed: {exc!r}", file=sys.stderr)
            self.cancel()

    def _last_event(self, reason: str, text: str = "") -> TokenEvent:
        return TokenEvent(self.prompt_index, text, [], reason)


class _Active:
    """A request that holds a cache row: prefilling its prompt, then decoding one token per step."""

    def __init__(self, request: Request, row: int, reused: int, text: _Row, generator, budget: int, out_of_room: str):
        self.request = request
        self.row = row  # its cache row
        self.prefilled = reused  # prompt tokens whose keys/values are in the row
        self.text = text  # detokenizer, stop strings, EOS (the Generator's own logic)
        self.generator = generator  # torch.Generator of its draws
        self.budget = budget  # tokens it may draw: max_new_tokens, or fewer when the context is short
        self.out_of_room = out_of_room  # the finish reason when the budget runs out ("length" or "context")
        self.drawn = 0  # tokens drawn and read on the host
        self.unread = 0  # tokens drawn by launched steps, not read yet (the last of them feeds the next step)
        self.last_token: int | None = None  # the last token read
        self.row_freed = False  # it has left (a pending step's token for it is dropped)

    def may_continue(self, eos_ids) -> bool:
        """Whether its last token may still be followed by another (a stop string, and EOS for a token not read
        yet, are known only later)."""
        return self.drawn + self.unread < self.budget and (self.unread > 0 or self.last_token not in eos_ids)

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.prompt_ids)

    @property
    def length(self) -> int:
        """Slots of its row holding its keys/values once the launched steps have run; the next token fed goes to
        this slot."""
        return self.prefilled + max(self.drawn + self.unread - 1, 0)


class Scheduler:
    """Runs requests on `generator`'s model with continuous batching: at most `max_batch` requests at their own
    positions in one batch (each in its own row of the KV cache), at most `max_queue` waiting.

    While it runs the model belongs to it (a generator run in between makes it forget what the rows hold). Drive
    it with step() (tests, one thread) or start() (its own daemon thread); submit() and Request.cancel() are
    safe from any thread. The cache gets max_batch + 1 rows: the last is the spare row where the CUDA-graph step's
    lanes beyond the real rows write.
    """

    def __init__(self, generator: Generator, max_batch: int = 8, max_queue: int = 64,
                 prefill_chunk: int = PREFILL_CHUNK, pipelined: bool | None = None):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError(f"max_batch {max_batch} and prefill_chunk {prefill_chunk} must be >= 1, "
                             f"max_queue {max_queue} >= 0")
        self.generator = generator
        self.model = generator.model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[Request] = deque()
        self._active: list[_Active] = []  # in admission order
        self._owner: list[_Active | None] = [None] * max_batch
        self._held: list[list[int]] = [[] for _ in range(max_batch)]  # tokens whose keys/values fill each row
        self._freed = [0] * max_batch  # when each row was last freed (least recently used first)
        self._clock = itertools.count(1)
        self._cache_key = None  # (cache version, generator runs) the rows' contents belong to
        self._history = None  # sampling.RowHistory, made with the first request that uses penalties
        self._draining = False
        self._thread: threading.Thread | None = None
        self._stop_thread = False
        # read each decode step one iteration later (default: on CUDA, where the GPU runs ahead of the host)
        self.pipelined = self.model.logits_device.type == "cuda" if pipelined is None else pipelined
        self._pending = None  # (rows, step_queue.QueuedStep) of the decode step launched and not yet read
        self._reads = None  # pinned host buffers for the drawn tokens (step_queue.host_buffers), used in turn
        self.prefill_s = 0.0  # seconds spent in prefill forwards (and first draws) so far
        self.decode_s = 0.0  # seconds spent in decode steps (and draws) so far
        self.prefill_forwards = 0  # prefill forwards run so far (a packed one counts once)
        self.prefill_tokens = 0  # prompt tokens they computed
        self.decode_steps = 0  # decode steps launched so far
        self.decoded_rows = 0  # rows those steps advanced (decoded_rows / decode_steps: the mean batch)
        self.cpu_s = 0.0  # CPU seconds of the stepping thread inside step() (its wall time less GPU and lock waits)

    # --- any thread ---------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Requests waiting for a row."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests holding a cache row (prefilling or decoding)."""
        return len(self._active)

    def submit(self, prompt_ids: list[int], cfg: GenerationConfig, *, prompt_index: int = 0,
               listener: Listener | None = None) -> Request:
        """Queue a prompt (token ids, BOS included if the model wants one) with its own settings; `prompt_index`
        picks its random stream with cfg.seed (talis_cli.sampling.row_seed), so it draws what it would alone.
        `listener(request, event)` is called on the scheduler thread for each event and must not block; without
        one, read Request.events(). Raises at once: UsageError (a setting out of range), TalisError (an empty
        prompt, or one too long for the context, with the token counts), QueueFull, Draining."""
        cfg.validate()
        prompt_ids = list(prompt_ids)
        self.generator.check_prompt(prompt_ids, cfg)
        with self._lock:
            if self._draining:
                raise Draining("the server is shutting down and takes no new requests; try again after it restarts")
            # as many as there are free rows get one at the next step: only those beyond them wait
            waiting = len(self._waiting) - self._owner.count(None)
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are already waiting for a row (the most is {self.max_queue}); "
                                "try again later")
            request = Request(next(self._ids), prompt_ids, cfg, prompt_index, listener)
            self._waiting.append(request)
            self._wake.notify()
        return request

    # --- the scheduler thread -----------------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration: drop cancelled requests, admit waiting ones into free rows, prefill (a chunk of at
        most prefill_chunk prompt tokens per step in all), one decode step for every decoding row, deliver the
        events. False when there was nothing to do.

        Pipelined (on CUDA), the decode step launched by one iteration is read by the next, which first launches
        the following step for the rows that may go on, fed with the drawn tokens still on the device, and only
        then waits for the earlier step's tokens, detokenizes and delivers: the GPU always has a step queued
        while the host streams. A row that turns out to have ended (EOS, a stop string, a cancel) wastes its
        lane of that step once."""
        cpu = time.thread_time()
        try:
            return self._step()
        finally:
            self.cpu_s += time.thread_time() - cpu

    def _step(self) -> bool:
        import torch

        with torch.inference_mode():
            self._drop_cancelled()
            self._admit()
            if not self._active and self._pending is None:
                return False
            began = time.perf_counter()
            self._prefill()
            middle = time.perf_counter()
            if self._pending is not None:
                self._resolve(launch_next=self.pipelined)
            else:
                self._launch()
            if not self.pipelined and self._pending is not None:
                self._resolve(launch_next=False)
            self.prefill_s += middle - began
            self.decode_s += time.perf_counter() - middle
        return True

    def _ensure_cache(self) -> None:
        """Rows for max_batch requests plus the spare row, and forget what rows hold if anyone else wrote them."""
        model, gen = self.model, self.generator
        if model.cache_batch < self.max_batch + 1 or model.max_seq_len != gen.max_seq_len:
            model.setup_cache(self.max_batch + 1, gen.max_seq_len)
        key = (model.cache_version, gen._runs)
        if key != self._cache_key:
            self._held = [[] for _ in range(self.max_batch)]
            self._history = None
            gen._in_cache = None  # the generator's row-0 reuse: this scheduler overwrites row 0
            self._cache_key = key

    def _admit(self) -> None:
        while self._waiting and None in self._owner:
            with self._lock:
                request = self._waiting.popleft() if self._waiting else None
            if request is None:
                return
            try:
                self._ensure_cache()
                self._start(request)
            except Exception as exc:  # it left the queue and holds no row yet: _fail_all would not reach it
                request.error = f"{type(exc).__name__}: {exc}"
                request._deliver(request._last_event(ERROR))
                raise

    def _start(self, request: Request) -> None:
        """Give `request` the free row that holds the longest start of its prompt (else the least recently used)."""
        from .sampling import row_generator, uses_penalties

        prompt = request.prompt_ids
        free = [r for r in range(self.max_batch) if self._owner[r] is None]
        row = max(free, key=lambda r: (_common_prefix(self._held[r], prompt), -self._freed[r]))
        reused = _common_prefix(self._held[row], prompt)
        del self._held[row][reused:]
        gen, cfg = self.generator, request.cfg
        budget = min(cfg.max_new_tokens, gen.max_seq_len - len(prompt))
        out_of_room = "context" if budget < cfg.max_new_tokens else "length"
        device = self.model.logits_device
        text = _Row(request.prompt_index, IncrementalDetokenizer(gen.tokenizer, prompt, gen.skip_ids), cfg,
                    gen.eos_ids)
        active = _Active(request, row, reused, text, row_generator(cfg, request.prompt_index, device), budget,
                         out_of_room)
        if uses_penalties(cfg):
            if self._history is None:
                from .sampling import RowHistory

                self._history = RowHistory(self.max_batch, gen.max_seq_len, self.model.args.vocab_size, device)
            self._history.start(row, prompt, cfg.repetition_window)
        self._owner[row] = active
        self._active.append(active)
        request.stats.reused_tokens = reused
        request.stats.queued_s = time.perf_counter() - request._submitted

    def _prefill(self) -> None:
        """Prefill the newcomers' prompts, at most prefill_chunk tokens in all this step (a long prompt goes on in
        the next steps); those whose prompt is then whole draw their first token. On a GPU the chunks of several
        newcomers run as one forward (fast_prefill.PrefillRunner.prefill_segments), so they share its weight
        reads."""
        import torch

        room, chunks = self.prefill_chunk, []
        for active in [a for a in self._active if not a.decoding]:
            if room <= 0:
                break
            start = active.prefilled
            chunks.append((active, active.request.prompt_ids[start : start + room], start))
            room -= len(chunks[-1][1])
        if not chunks:
            return
        self.prefill_tokens += sum(len(ids) for _, ids, _ in chunks)
        # the generator's fast prefill on GPUs (fast_prefill.PrefillRunner, where present), else the model's
        runner = getattr(self.generator, "prefill", None)
        if PACKED_PREFILL and runner is not None and len(chunks) > 1 and hasattr(runner, "prefill_segments"):
            logits = runner.prefill_segments([(chunk, start, a.row) for a, chunk, start in chunks])
            self.prefill_forwards += 1
            self._prefilled(chunks, logits)
            return
        device = self.model.model.embed_tokens.weight.device
        for chunk in chunks:  # one forward each: each first token goes out as soon as its prompt is in
            active, ids, start = chunk
            logits = (runner or self.model)(torch.tensor([ids], device=device), start_pos=start, last_only=True,
                                            cache_row=active.row)[:, -1]
            self.prefill_forwards += 1
            self._prefilled([chunk], logits)

    def _prefilled(self, chunks: list, logits) -> None:
        """Note the chunks (active, token ids, start) as cached; the rows whose whole prompt is now in draw their
        first token from their row of logits [len(chunks), vocab]."""
        for active, chunk, _ in chunks:
            active.prefilled += len(chunk)
            self._held[active.row].extend(chunk)
        whole = [i for i, (active, _, _) in enumerate(chunks) if active.decoding]
        if whole:
            self._draw([chunks[i][0] for i in whole], logits[whole] if len(whole) < len(chunks) else logits)

    def _launch(self) -> None:
        """Launch one decode step and draw for every decoding row that may go on (its last token is not EOS and
        its budget is not spent); it becomes the pending step. The rows of the step still pending are fed their
        drawn tokens on the device, so nothing here waits for the GPU."""
        import torch

        from .step_queue import QueuedStep, host_buffers

        eos = self.generator.eos_ids
        previous, queued = self._pending or ([], None)
        fed = [a for a in previous if not a.row_freed and a.may_continue(eos)]  # token on the device
        known = [a for a in self._active if a.decoding and a.unread == 0 and a.may_continue(eos)]
        rows = fed + known
        self._pending = None
        if not rows:
            return
        first = None
        if fed:
            first = queued.tokens
            if len(fed) < len(previous):
                from .step_queue import to_device

                keep = {id(a) for a in fed}
                first = first[to_device([i for i, a in enumerate(previous) if id(a) in keep], first.device)]
        # on the host: the CUDA-graph step copies them into its buffers at once, the eager one moves them
        tokens = torch.tensor([0] * len(fed) + [a.last_token for a in known])
        slots = torch.tensor([a.length for a in rows])
        cache_rows = torch.tensor([a.row for a in rows])
        device = self.model.logits_device
        if self._reads is None:
            self._reads = host_buffers(device, self.max_batch)
        read = self._reads[self.decode_steps % 2][: len(rows)] if self._reads else None

        def run():
            return self._draw_launch(rows, self._decode(tokens, slots, cache_rows, first))

        self._pending = (rows, QueuedStep(run, read, device))
        self.decode_steps += 1
        self.decoded_rows += len(rows)
        for a in known:
            self._held[a.row].append(a.last_token)  # the step writes its keys/values at slot a.length
        for a in rows:
            a.unread += 1

    def _decode(self, tokens, slots, cache_rows, first):
        """Logits [B, vocab] of one decode step (the CUDA-graph step where the generator has one); `first`:
        the tokens of the first rows on the device, or None."""
        import torch

        fast = getattr(self.generator.fast_decode, "decode_rows", None)
        if fast is not None:
            return fast(tokens, slots, cache_rows, first)
        if first is not None:
            tokens = torch.cat([first, tokens[first.shape[0]:].to(first.device)])
        return self.model.decode_rows(tokens, slots, cache_rows)

    def _resolve(self, launch_next: bool) -> None:
        """Launch the next step (`launch_next`), then read the pending step's tokens and deliver the events of
        the rows still running (a row freed since the launch is skipped)."""
        rows, queued = self._pending
        if launch_next:
            self._launch()
        else:
            self._pending = None
        live = []
        for a, token in zip(rows, queued.ids()):
            if a.row_freed:
                continue
            a.drawn += 1
            a.unread -= 1
            a.last_token = token
            if a.unread:  # the step launched after it was fed this token: its keys/values go in the row
                self._held[a.row].append(token)
            live.append(a)
        self._accept(live)

    def _draw(self, rows: list[_Active], logits) -> None:
        """Draw each row's next token from logits [len(rows), vocab] now and deliver the events (a prefill's
        first token)."""
        tokens = self._draw_launch(rows, logits).tolist()
        for a, token in zip(rows, tokens):
            a.drawn += 1
            a.last_token = token
        self._accept(rows)

    def _draw_launch(self, rows: list[_Active], logits):
        """Launch the draws of `rows` from logits [len(rows), vocab] -> int64 [len(rows)] on the logits' device."""
        from .sampling import draw_rows, uses_penalties
        from .step_queue import to_device

        device = logits.device
        cfgs = [a.request.cfg for a in rows]
        cache_rows = slots = None  # only rows with penalties read them: no copies to the device otherwise
        if any(uses_penalties(cfg) for cfg in cfgs):
            cache_rows = to_device([a.row for a in rows], device)
            # history slot of the token drawn now: after the prompt and every token drawn before it
            slots = to_device([len(a.request.prompt_ids) + a.drawn + a.unread for a in rows], device)
        return draw_rows(logits, cfgs, [a.generator for a in rows], self._history, cache_rows, slots)

    def _accept(self, rows: list[_Active]) -> None:
        """Deliver the event of each row's last drawn token; free the rows that end with it."""
        for a in rows:
            event = a.text.accept(a.last_token, a.out_of_room if a.drawn == a.budget else None)
            if event.finish_reason is not None:
                self._free(a)
            a.request._deliver(event)

    def _free(self, active: _Active) -> None:
        active.row_freed = True
        self._active.remove(active)
        self._owner[active.row] = None
        self._freed[active.row] = next(self._clock)

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled]
            for request in gone:
                self._waiting.remove(request)
        for request in gone:
            request._deliver(request._last_event(CANCELLED))
        for active in [a for a in self._active if a.request.cancelled]:
            self._free(active)
            active.request._deliver(active.request._last_event(CANCELLED))

    def _fail_all(self, exc: BaseException) -> None:
        """The model failed mid-step: every running request ends with finish_reason "error" (and its message);
        what the rows held is forgotten."""
        for active in list(self._active):
            self._free(active)
            active.request.error = f"{type(exc).__name__}: {exc}"
            active.request._deliver(active.request._last_event(ERROR))
        self._pending = None
        self._cache_key = None

    def _cancel_all(self) -> None:
        with self._lock:
            for request in self._waiting:
                request.cancel()
        for active in self._active:
            active.request.cancel()
        self._drop_cancelled()

    def warm_up(self) -> None:
        """Set up the cache, prefill throwaway prompts (warm_up.warm_prefill) and capture the CUDA-graph
        steps of every batch size up to max_batch now (no graphs on a CPU), so that no request waits for a kernel
        to compile or tune or a graph to be captured. start() does this on the scheduler thread first.

        Raises RuntimeError once a request holds a row or from another thread than start()'s: the throwaway
        prompts overwrite row 0 and the spare row."""
        import torch

        if self._active or (self._thread is not None and threading.current_thread() is not self._thread):
            raise RuntimeError("warm_up() overwrites rows of the cache: call it before the first request is "
                               "admitted, on the thread that steps (start() does)")
        self._ensure_cache()
        with torch.inference_mode():
            self._warm_prefill()
            capture = getattr(self.generator.fast_decode, "capture_rows", None)
            if capture is not None:
                capture(self.max_batch)

    def _warm_prefill(self) -> None:
        """warm_up.warm_prefill into the spare row (every bucket a step's prefill can reach: at most prefill_chunk
        tokens, and at most a context per row), packed with row 0 as newcomers are."""
        from .warm_up import warm_prefill

        most = min(self.prefill_chunk, self.max_batch * self.generator.max_seq_len)
        warm_prefill(self.generator, self.max_batch, most, packed_row=0 if PACKED_PREFILL else None)
        self._held[0] = []

    def _loop(self, warm: threading.Event) -> None:
        try:
            self.warm_up()
        except Exception:  # serving without graphs up front still works: they are captured on first use
            import traceback

            traceback.print_exc(file=sys.stderr)
        warm.set()
        while True:
            with self._lock:
                if self._stop_thread:
                    break
            try:
                busy = self.step()
            except Exception as exc:  # keep serving: the requests in the failed step end with an error
                import traceback

                traceback.print_exc(file=sys.stderr)
                self._fail_all(exc)
                busy = True
            if not busy:
                with self._lock:
                    if not self._stop_thread and not self._waiting:
                        self._wake.wait(timeout=0.05)
        self._cancel_all()

    def start(self) -> None:
        """Run the loop on a daemon thread (the model is used only from it); returns once that thread has set up
        the cache and captured the CUDA graphs (warm_up), so the first request does not wait for them."""
        if self._thread is not None:
            raise RuntimeError("the scheduler is already started")
        warm = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(warm,), name="talis-scheduler", daemon=True)
        self._thread.start()
        warm.wait()

    def stop(self, deadline_s: float = 10.0) -> None:
        """Take no new requests (Draining), let the accepted ones (running and waiting) go on for up to
        `deadline_s` seconds, cancel the rest (a last "cancelled" event each), and end the thread. Without
        start(), the calling thread steps."""
        with self._lock:
            self._draining = True
        end = time.monotonic() + deadline_s
        if self._thread is None:
            while time.monotonic() < end and self.step():
                pass
            self._cancel_all()
            return
        while time.monotonic() < end and (self._waiting or self._active) and self._thread.is_alive():
            time.sleep(0.005)
        with self._lock:
            self._stop_thread = True
            self._wake.notify()
        self._thread.join()


def _common_prefix(held: list[int], prompt: list[int]) -> int:
    """How many leading tokens of `prompt` a row holding `held` already has, leaving at least the prompt's last
    token to compute (its logits draw the first new token)."""
    n, limit = 0, min(len(held), len(prompt) - 1)
    while n < limit and held[n] == prompt[n]:
        n += 1
    return n
