"""`talis generate`'s one-shot runs: prompts generated in batches, results written in prompt order.

With `--each-line` the prompts go through the continuous-batching scheduler (talis_cli.scheduler): up to
--batch-size run at once, and a finished line's row is taken by the next line at once. Result N is on line N:
a line that cannot run (blank, too long for the context, ...) gets an empty line (or a JSON object with an
`error` field naming it), the other lines still run, and the run reports the failure. Frontend code, but free of
typer: the CLI passes in how to report a failed line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import TalisError
from .output import write_out

LINE_BREAKS_TO_SPACES = str.maketrans("\r\n", "  ")


@dataclass
class Prompt:
    """One prompt of a run."""

    text: str  # as the user gave it (the JSON record's "prompt")
    ids: Optional[list] = None  # its token ids; None when it cannot run
    error: Optional[str] = None  # why it cannot run, naming its line


def encode_prompts(texts: list[str], encode: Callable[[str], tuple], each_line: bool) -> tuple[list[Prompt], list]:
    """(a Prompt per text, the extra stop strings their encodings ask for); `encode(text)` -> (ids, stops).

    With `each_line` the texts are stdin's lines: a blank one, or one `encode` refuses with a TalisError, gets
    an error naming its line instead of ids; otherwise an encoding error propagates.
    """
    prompts, stops = [], []
    for number, text in enumerate(texts, start=1):
        if each_line and not text.strip():
            prompts.append(Prompt(text, error=f"line {number} is blank; its output line is left empty"))
            continue
        try:
            ids, extra = encode(text)
        except TalisError as exc:
            if not each_line:
                raise
            prompts.append(Prompt(text, error=f"line {number}: {exc}"))
            continue
        prompts.append(Prompt(text, list(ids)))
        stops += extra
    return prompts, stops


def check_prompts(generator, prompts: list[Prompt], config) -> None:
    """Mark each prompt the generator would refuse (empty, longer than the context, ...) with that error."""
    for number, prompt in enumerate(prompts, start=1):
        if prompt.ids is None:
            continue
        try:
            generator.check_prompt(prompt.ids, config)
        except TalisError as exc:
            prompt.ids, prompt.error = None, f"line {number}: {exc}"


def run_batches(generator, prompts: list[Prompt], config, batch_size: int, writer,
                on_error: Callable[[str], None] = lambda message: None):
    """Generate for every runnable prompt, `batch_size` at a time, feeding `writer`; a prompt with an error
    is handed to `writer.fail` and `on_error` instead. Returns the GenerationStats summed over the batches
    (None when no prompt ran). Row i of the run samples with the seed of prompt i, so batching does not change
    the text (talis_cli.sampling.row_seed)."""
    from .generation import GenerationStats

    for index, prompt in enumerate(prompts):
        if prompt.error is not None:
            on_error(prompt.error)
            writer.fail(index, prompt.error)
    totals = None
    for indices in plan_batches(prompts, batch_size, generator.max_seq_len - config.max_new_tokens):
        events = generator.stream_batch([prompts[i].ids for i in indices], config, prompt_indices=indices)
        for event in events:
            writer.add(indices[event.index], event)
        stats = generator.last_stats
        writer.end_batch(indices, stats)
        if totals is None:
            totals = GenerationStats(0, first_token_s=stats.first_token_s)
        for name in ("prompt_tokens", "reused_tokens", "new_tokens", "prefill_s", "decode_s"):
            setattr(totals, name, getattr(totals, name) + getattr(stats, name))
    return totals


def run_scheduled(generator, prompts: list[Prompt], config, max_batch: int, writer,
                  on_error: Callable[[str], None] = lambda message: None):
    """As run_batches, through a Scheduler with `max_batch` rows: every runnable prompt is queued at once, each
    with its own prompt index (so its seed, talis_cli.sampling.row_seed), and `writer.end_batch([i], stats)` is
    called as prompt i finishes, with its own GenerationStats. Returns the run's GenerationStats (None when no
    prompt ran): token counts summed, prefill_s and decode_s the seconds the scheduler spent in each."""
    from .generation import GenerationStats
    from .scheduler import Scheduler

    for index, prompt in enumerate(prompts):
        if prompt.error is not None:
            on_error(prompt.error)
            writer.fail(index, prompt.error)
    runnable = [i for i, p in enumerate(prompts) if p.error is None]
    if not runnable:
        return None
    scheduler = Scheduler(generator, max_batch=max_batch, max_queue=len(runnable))
    events: list = []  # (request, event) in the order the scheduler delivered them
    requests = {scheduler.submit(prompts[i].ids, config, prompt_index=i,
                                 listener=lambda r, e: events.append((r, e))).id: i for i in runnable}
    totals, first = GenerationStats(0), None
    try:
        while scheduler.step() or events:
            for request, event in events:
                index = requests[request.id]
                writer.add(index, event)
                if event.finish_reason is not None:
                    stats = request_stats(request.stats)
                    writer.end_batch([index], stats)
                    for name in ("prompt_tokens", "reused_tokens", "new_tokens"):
                        setattr(totals, name, getattr(totals, name) + getattr(stats, name))
                    first = stats.first_token_s if first is None else min(first, stats.first_token_s)
            events.clear()
    finally:
        scheduler.stop(deadline_s=0)  # after an interruption: the rows still running are cancelled
    totals.prefill_s, totals.decode_s, totals.first_token_s = scheduler.prefill_s, scheduler.decode_s, first or 0.0
    return totals


def request_stats(stats):
    """A scheduler request's RequestStats as the GenerationStats a frontend shows (its prefill: from leaving the
    queue to its first token)."""
    from .generation import GenerationStats

    return GenerationStats(stats.prompt_tokens, stats.reused_tokens, stats.new_tokens,
                           prefill_s=max(stats.first_token_s - stats.queued_s, 0.0), decode_s=stats.decode_s,
                           first_token_s=stats.first_token_s)


def plan_batches(prompts: list[Prompt], batch_size: int, roomy_len: int) -> list[list[int]]:
    """The runnable prompts' indices in batches of at most `batch_size` (each in prompt order).

    A batch's prompts share one context, padded to the longest, so a prompt longer than `roomy_len` (the context
    minus the token budget) would shorten the others' replies: it runs alone, and each reply is what the prompt
    would get alone.
    """
    batches, current = [], []
    for index, prompt in enumerate(prompts):
        if prompt.error is not None:
            continue
        if len(prompt.ids) > roomy_len:
            batches.append([index])
            continue
        current.append(index)
        if len(current) == batch_size:
            batches.append(current)
            current = []
    return batches + [current] if current else batches


class _InOrder:
    """Releases per-prompt results in prompt order: `done(i)` marks prompt i finished, and every finished
    prompt at the head is handed to `release` in turn."""

    def __init__(self, count: int):
        self.finished = [False] * count
        self.head = 0  # the earliest unfinished prompt

    def done(self, indices) -> None:
        for index in indices:
            self.finished[index] = True
        while self.head < len(self.finished) and self.finished[self.head]:
            self.release(self.head)
            self.head += 1

    def release(self, index: int) -> None:
        raise NotImplementedError


class StreamWriter(_InOrder):
    """Writes each prompt's text in prompt order: the earliest unfinished prompt streams live, later ones wait.
    With `one_line`, a result's own line breaks become spaces, so line N of the output answers prompt N."""

    def __init__(self, count: int, one_line: bool = False):
        super().__init__(count)
        self.pending = [""] * count  # text of prompts that are not at the head yet
        self.one_line = one_line

    def add(self, index: int, event) -> None:
        text = event.text.translate(LINE_BREAKS_TO_SPACES) if self.one_line else event.text
        if index == self.head:
            write_out(text)
        else:
            self.pending[index] += text
        if event.finish_reason is not None:
            self.done([index])

    def fail(self, index: int, message: str) -> None:
        self.pending[index] = ""  # its line stays empty
        self.done([index])

    def end_batch(self, indices, stats) -> None:
        self.done(indices)

    def release(self, index: int) -> None:
        # the head's text has streamed already; the next prompt's waiting text goes out as it becomes the head
        write_out("\n")
        if index + 1 < len(self.pending):
            write_out(self.pending[index + 1])
            self.pending[index + 1] = ""


class JsonLinesWriter(_InOrder):
    """One JSON object per prompt, in prompt order, each written once its prompt's batch has ended; a prompt
    that could not run gets `{"prompt": ..., "error": "line N: ..."}`."""

    def __init__(self, prompts: list[Prompt], seed: int | None = None):
        super().__init__(len(prompts))
        self.records = [dict(prompt=p.text, text="", prompt_tokens=len(p.ids or ()), generated_tokens=0,
                             finish_reason=None) for p in prompts]
        if seed is not None:  # the run's seed: --seed with it draws the same again (line numbers included)
            for record in self.records:
                record["seed"] = seed

    def add(self, index: int, event) -> None:
        record = self.records[index]
        record["text"] += event.text
        record["generated_tokens"] += len(event.token_ids)
        record["finish_reason"] = event.finish_reason or record["finish_reason"]

    def fail(self, index: int, message: str) -> None:
        record = self.records[index]
        self.records[index] = dict(prompt=record["prompt"], text="", error=message,
                                   **({"seed": record["seed"]} if "seed" in record else {}))
        self.done([index])

    def end_batch(self, indices, stats) -> None:
        from .repl.render import timings_of

        for index in indices:
            self.records[index]["timings"] = timings_of(stats)
        if len(indices) == 1:  # a prompt alone: its own counts (a server's reply streams text, not token ids)
            self.records[indices[0]].update(prompt_tokens=stats.prompt_tokens, generated_tokens=stats.new_tokens)
        self.done(indices)

    def release(self, index: int) -> None:
        write_out(json.dumps(self.records[index], ensure_ascii=False) + "\n")
