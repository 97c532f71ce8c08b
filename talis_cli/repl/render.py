"""What the terminal shows around generation: load progress, streamed replies, stats lines and blocks.

Everything here writes through rich consoles, which honour NO_COLOR and drop colour when not on a terminal.
"""

import contextlib
import sys
import time
from typing import Optional

from rich.console import Console
from rich.text import Text

from talis_cli.wording import context_full_advice

GIB, MIB = 1024**3, 1024**2


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(label: str = "loading", unit: str = "tensors", min_seconds: float = 0.5, lines: bool = False):
    """Yield a `progress(done, total, message)` callback that shows a bar on stderr once the work outlasts
    `min_seconds`. When stderr is not a terminal nothing is drawn, so pipes and logs stay clean; with `lines`
    (work that runs for minutes) one plain line is written there each time `done` grows instead."""
    console = stderr_console()
    if not console.is_terminal:
        yield _progress_lines(console, label, unit) if lines else None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.perf_counter()
    bar = Progress(TextColumn(label), BarColumn(), TextColumn(f"{{task.completed}}/{{task.total}} {unit}"),
                   TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True)
    task = None

    def progress(done: int, total: int, message: str = "") -> None:
        nonlocal task
        if task is None:
            if time.perf_counter() - started < min_seconds:
                return
            bar.start()
            task = bar.add_task("", total=total)
        bar.update(task, completed=done, total=total, description=message if unit != "tensors" else "")

    try:
        yield progress
    finally:
        if task is not None:
            bar.stop()


def _progress_lines(console: Console, label: str, unit: str):
    """A progress callback writing `label: done/total unit (elapsed s)` once per increase of `done`."""
    started, shown = time.perf_counter(), [0]

    def progress(done: int, total: int, message: str = "") -> None:
        if done > shown[0]:
            shown[0] = done
            console.print(f"{label}: {done}/{total} {unit} ({time.perf_counter() - started:.0f} s)",
                          markup=False, highlight=False)
            console.file.flush()

    return progress


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def computed_prompt_tokens(stats) -> int:
    """Prompt tokens the prefill computed: all of them but those whose keys and values were still cached."""
    return stats.prompt_tokens - stats.reused_tokens


def timings_of(stats) -> dict:
    """Timings of a GenerationStats as a JSON-ready dict (seconds and tokens per second; the prefill rate
    counts computed prompt tokens only)."""
    prefill_tokens = computed_prompt_tokens(stats)
    decode_tokens = max(stats.new_tokens - 1, 0)  # the first new token comes out of the prefill
    return dict(prefill_s=round(stats.prefill_s, 6), decode_s=round(stats.decode_s, 6),
                first_token_s=round(stats.first_token_s, 6),
                prefill_tok_s=round(_rate(prefill_tokens, stats.prefill_s), 2),
                decode_tok_s=round(_rate(decode_tokens, stats.decode_s), 2))


def memory_in_use() -> str:
    """VRAM in use / peak per GPU when CUDA is initialised, else the process's resident memory."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return ", ".join(f"GPU{i} {torch.cuda.memory_allocated(i) / GIB:.2f}/{torch.cuda.max_memory_allocated(i) / GIB:.2f} GiB"
                         for i in range(torch.cuda.device_count()))
    return f"RSS {_resident_bytes() / MIB:.0f} MiB"


def _resident_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, in KiB on Linux


def stats_line(stats, show_memory: bool = True) -> str:
    """One line after a reply: prompt tokens computed (and reused from the cache), prefill rate, generated
    tokens, decode rate, first token, memory (this process's: left out for a server's reply)."""
    t = timings_of(stats)
    cached = f" (+{stats.reused_tokens} cached)" if stats.reused_tokens else ""
    memory = f" | {memory_in_use()}" if show_memory else ""
    return (f"prompt {computed_prompt_tokens(stats)} tok{cached}, {t['prefill_tok_s']:.1f} tok/s | "
            f"reply {stats.new_tokens} tok, {t['decode_tok_s']:.1f} tok/s | "
            f"first token {t['first_token_s'] * 1000:.1f} ms{memory}")


def print_stats_block(stats, load_s: Optional[float], total_s: float, console: Optional[Console] = None,
                      load_phases: Optional[dict] = None, seed: Optional[int] = None, show_memory: bool = True,
                      graph_captures: Optional[tuple[int, float]] = None) -> None:
    """The --stats block on stderr, laid out like `ollama run --verbose`; `load_phases` ({name: seconds}, summing
    to `load_s`) are listed under the load duration; `seed` is the run's sampling seed. A run on a server has
    no load (`load_s` None) and this process's memory says nothing of it (`show_memory` False).
    `graph_captures`: (CUDA graphs captured during the run, their host seconds), on the CUDA-graph path."""
    t = timings_of(stats)
    phases = [(f"  {name}", f"{seconds:.3f} s") for name, seconds in (load_phases or {}).items()]
    load = [("load duration", f"{load_s:.3f} s")] if load_s is not None else []
    rows = [("total duration", f"{total_s:.3f} s"), *load, *phases,
            ("prompt eval count", f"{computed_prompt_tokens(stats)} token(s)"),
            *([("prompt cached", f"{stats.reused_tokens} token(s)")] if stats.reused_tokens else []),
            ("prompt eval duration", f"{stats.prefill_s * 1000:.1f} ms"),
            ("prompt eval rate", f"{t['prefill_tok_s']:.2f} tokens/s"),
            ("eval count", f"{stats.new_tokens} token(s)"), ("eval duration", f"{stats.decode_s * 1000:.1f} ms"),
            ("eval rate", f"{t['decode_tok_s']:.2f} tokens/s"),
            ("time to first token", f"{stats.first_token_s * 1000:.1f} ms"),
            *([("graphs captured", f"{graph_captures[0]} during the run, {graph_captures[1] * 1000:.1f} ms")]
              if graph_captures is not None else []),
            *([("seed", str(seed))] if seed is not None else []),
            *([("memory", memory_in_use())] if show_memory else [])]
    console = console or stderr_console()
    for name, value in rows:
        console.print(Text.assemble((f"{name + ':':<22}", "bold"), value))


class ContextFullNotice:
    """Passes events on to a writer and notes the prompts whose reply stopped because the context was full
    (finish reason "context"), to say so on stderr once generation is over."""

    def __init__(self, writer):
        self.writer = writer
        self.cut: list[int] = []

    def add(self, index: int, event) -> None:
        if event.finish_reason == "context":
            self.cut.append(index)
        self.writer.add(index, event)

    def fail(self, index: int, message: str) -> None:
        self.writer.fail(index, message)

    def end_batch(self, indices, stats) -> None:
        self.writer.end_batch(indices, stats)

    def report(self, engine, count: int) -> None:
        if not self.cut:
            return
        which = "the reply" if count == 1 else "the replies to prompts " + ", ".join(str(i + 1) for i in sorted(self.cut))
        size = engine.max_seq_len
        advice = context_full_advice(size, engine.context_limit)
        stderr_console().print(f"note: {which} stopped at the end of the context ({size} tokens) before "
                               f"--max-new-tokens; {advice}", markup=False, highlight=False)


class ReplyRenderer:
    """Streams a reply's text to a console as it arrives, then the stats line under it."""

    def __init__(self, console: Console, show_memory: bool = True):
        self.console = console
        self.show_memory = show_memory
        self.ended_with_newline = True

    def start(self) -> None:
        self.ended_with_newline = True

    def feed(self, text: str) -> None:
        if text:
            self.console.print(Text(text, style="cyan"), end="", soft_wrap=True)
            self.console.file.flush()
            self.ended_with_newline = text.endswith("\n")

    def end(self, stats, interrupted: bool, context_full: str = "") -> None:
        """Close the reply: a note when it was interrupted or `context_full` (the note to show when the context
        filled up), then the stats line."""
        if not self.ended_with_newline:
            self.console.print()
        if interrupted:
            self.console.print(Text("(stopped; the partial reply is kept)", style="yellow"))
        if context_full:
            self.console.print(Text(context_full, style="yellow"))
        if stats is not None:
            self.console.print(Text(stats_line(stats, self.show_memory), style="dim"))


def oom_message(exc: BaseException) -> Optional[str]:
    """One line for a CUDA out-of-memory error (what ran out, what to try); None for any other error."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(exc, torch.cuda.OutOfMemoryError):
        return None
    import re

    asked = re.search(r"Tried to allocate ([\d.]+ \w+)\. GPU (\d+)", str(exc))
    what = f"GPU {asked.group(2)} ran out of memory allocating {asked.group(1)}" if asked else "a GPU ran out of memory"
    return f"{what}; try a shorter --max-seq-len, a smaller model, or a --device-map that spreads the layers"


def _human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024


def print_tree(console, data: dict, indent: int = 0) -> None:
    """Nested settings as indented `key: value` lines (byte counts made readable)."""
    for key, value in data.items():
        label = Text(" " * indent + f"{key}:", style="bold")
        if isinstance(value, dict):
            console.print(label)
            print_tree(console, value, indent + 2)
            continue
        if isinstance(value, int) and not isinstance(value, bool) and key.endswith("bytes"):
            value = _human_bytes(value)
        elif isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value)) or "-"
        elif value is None:
            value = "none"
        console.print(label, str(value))
