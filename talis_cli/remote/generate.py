"""`talis generate --url`: one-shot prompts sent to `talis serve`, results written as the local run writes them.

With --each-line every line is its own request, up to `concurrency` in flight at once (the server batches
them), and the writers of talis_cli.oneshot put result N on line N whatever order the replies finish in.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Optional

from talis_cli.errors import TalisError, UsageError
from talis_cli.generation import GenerationConfig, GenerationStats
from talis_cli.oneshot import Prompt, encode_prompts
from talis_cli.remote.client import ServerClient, ServerError

# Flags that shape a local model or its tokenizer; with --url the server's own settings decide.
LOCAL_ONLY_FLAGS = ("model", "checkpoint", "wbits", "groupsize", "device_map", "max_memory", "max_seq_len",
                    "kv_cache", "backend", "threads", "allow_pickle", "tokenizer")


def refuse_local_flags(load, given: dict) -> None:
    """UsageError naming the first flag that only a local model uses (`load`: LoadFlags; `given`: other flags by
    name, e.g. {"--template": value}), since with --url the server's model, template and tokenizer answer."""
    for name in LOCAL_ONLY_FLAGS:
        if getattr(load, name, None) is not None:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} sets up a local model, and with --url the server's model answers; "
                             f"drop {flag} (or --url), or pass it to `talis serve`")
    for flag, value in given.items():
        if value:
            raise UsageError(f"{flag} applies to a local model; with --url the server renders and tokenizes "
                             f"prompts with its own settings; drop {flag} (or --url)")


def remote_prompts(texts: list[str], each_line: bool) -> list[Prompt]:
    """A Prompt per text; the server tokenizes, so only blank --each-line lines are refused here."""
    prompts, _ = encode_prompts(texts, lambda text: ((), ()), each_line)
    return prompts


def line_seeds(config: GenerationConfig, count: int) -> list[GenerationConfig]:
    """The config of each prompt of the run: a seeded run gives prompt i the seed local batching gives its row
    (talis_cli.sampling.row_seed), so every line draws what it draws locally; prompt 0 keeps the seed itself."""
    if config.seed is None or config.temperature == 0 or count == 1:
        return [config] * count
    from talis_cli.sampling import row_seed  # (imports torch; only a seeded, sampled --each-line run needs it)

    return [config.with_overrides(seed=row_seed(config.seed, index)) for index in range(count)]


def run_remote(client: ServerClient, prompts: list[Prompt], config: GenerationConfig, writer, *,
               chat_messages: Optional[Callable[[str], list]] = None, concurrency: int = 1, each_line: bool = False,
               on_error: Callable[[str], None] = lambda message: None) -> Optional[GenerationStats]:
    """Send every runnable prompt to the server, at most `concurrency` at once, feeding `writer` (add / fail /
    end_batch, as talis_cli.oneshot.run_batches does) from this thread; returns the stats summed over the
    replies (None when none ran).

    `chat_messages(text)`: the messages to send for a prompt (chat completions), or None for raw completions.
    A request the server refuses for itself (400/422: a bad prompt) fails only its line with `each_line`;
    any other error (server down, 401, 429) ends the run with that ServerError. Ctrl-C closes the connections,
    which cancels the requests on the server.
    """
    for index, prompt in enumerate(prompts):
        if prompt.error is not None:
            on_error(prompt.error)
            writer.fail(index, prompt.error)
    todo: "queue.SimpleQueue[int]" = queue.SimpleQueue()
    runnable = [index for index, prompt in enumerate(prompts) if prompt.error is None]
    for index in runnable:
        todo.put(index)
    configs = line_seeds(config, len(prompts))
    results: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()  # (index, event | None, stats | error | None)
    stopping = threading.Event()

    def send(index: int) -> None:
        text = prompts[index].text
        if chat_messages is None:
            reply = client.complete(text, configs[index])
        else:
            reply = client.chat(chat_messages(text), configs[index])
        with reply:
            for event in reply:
                if stopping.is_set():
                    return  # leaving the `with` drops the connection: the server cancels the row
                results.put((index, event, None))
        results.put((index, None, reply.stats))

    def worker() -> None:
        while not stopping.is_set():
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            try:
                send(index)
            except TalisError as exc:
                results.put((index, None, exc))
            except Exception as exc:  # never leave the main thread waiting for a result that cannot come
                results.put((index, None, ServerError(f"the request failed: {type(exc).__name__}: {exc}")))

    threads = [threading.Thread(target=worker, daemon=True, name=f"talis-client-{n}")
               for n in range(min(max(concurrency, 1), len(runnable)))]
    for thread in threads:
        thread.start()
    totals, remaining = None, len(runnable)
    try:
        while remaining:
            index, event, outcome = results.get()
            if event is not None:
                writer.add(index, event)
                continue
            remaining -= 1
            if isinstance(outcome, ServerError) and outcome.per_prompt and each_line:
                message = f"line {index + 1}: {outcome}"
                prompts[index].error = message
                on_error(message)
                writer.fail(index, message)
            elif isinstance(outcome, Exception):
                raise outcome
            else:
                stats = outcome or GenerationStats(0)
                writer.end_batch([index], stats)
                totals = _add(totals, stats)
    finally:
        stopping.set()
    return totals


def _add(totals: Optional[GenerationStats], stats: GenerationStats) -> GenerationStats:
    if totals is None:
        return GenerationStats(stats.prompt_tokens, stats.reused_tokens, stats.new_tokens, stats.prefill_s,
                               stats.decode_s, stats.first_token_s)
    for name in ("prompt_tokens", "reused_tokens", "new_tokens", "prefill_s", "decode_s"):
        setattr(totals, name, getattr(totals, name) + getattr(stats, name))
    return totals


def generate_remote(url: str, api_key: Optional[str], texts: list[str], config: GenerationConfig, *,
                    system: Optional[str], chat: bool, each_line: bool, concurrency: int, json_lines: bool,
                    show_stats: bool, launched: float, on_error: Callable[[str], None]) -> bool:
    """`talis generate --url`: write the server's replies to `texts` as a local run writes them (text streamed,
    or JSON lines with --json; result N on line N with --each-line); True when a prompt failed.

    `chat` sends each text as the user message after `system` (POST /v1/chat/completions, rendered by the
    server's template), else as raw text (POST /v1/completions, BOS added by the server as locally).
    `--stats` prints the block of a local run from the server's timings (no load phases, no memory).
    """
    import time

    from talis_cli.oneshot import JsonLinesWriter, StreamWriter
    from talis_cli.repl.render import print_stats_block

    prompts = remote_prompts(texts, each_line)
    writer = JsonLinesWriter(prompts, config.seed) if json_lines else StreamWriter(len(prompts), one_line=each_line)

    def chat_messages(text: str) -> list:
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]

    with ServerClient(url, api_key, connections=concurrency) as client:
        totals = run_remote(client, prompts, config, writer, chat_messages=chat_messages if chat else None,
                            concurrency=concurrency if each_line else 1, each_line=each_line, on_error=on_error)
    if show_stats and totals is not None:
        print_stats_block(totals, load_s=None, total_s=time.perf_counter() - launched, seed=config.seed,
                          show_memory=False)
    return any(prompt.error for prompt in prompts)
