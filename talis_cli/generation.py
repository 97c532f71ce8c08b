"""Streaming generation: GenerationConfig, TokenEvent, GenerationStats and the Generator.

The chain is prefill (one forward over the padded prompts) -> sample -> decode step -> sample -> ...; the
per-token step is the single call `Generator._decode_step`, so a CUDA-graph runner can replace it. On CUDA each
step is queued before the tokens of the step before it are handed out (talis_cli.step_queue).
torch is imported only when generation starts, so reading presets and flags stays quick.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .detokenize import IncrementalDetokenizer, special_ids_to_skip
from .errors import TalisError, UsageError
from .wording import context_advice
from .tokenizer import padding_id


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens. Defaults follow llama.cpp's; `validate()` checks every range."""

    max_new_tokens: int = 256  # tokens to generate at most, >= 1 (also capped by the free context)
    temperature: float = 0.8  # >= 0; divides the logits; 0 = greedy (exact argmax)
    top_k: int = 40  # >= 0; keep the k most likely tokens; 0 disables
    top_p: float = 0.95  # in (0, 1]; keep the most likely tokens until their probability reaches top_p; 1 disables
    min_p: float = 0.05  # in [0, 1]; drop tokens less likely than min_p times the top token; 0 disables
    typical_p: float = 1.0  # in (0, 1]; locally typical sampling mass; 1 disables
    repetition_penalty: float = 1.0  # > 0; seen tokens' logits shrink (> 1) or grow (< 1); 1 disables
    repetition_window: int = 64  # >= 0; tokens looked back for all penalties (prompt included); 0 = all
    frequency_penalty: float = 0.0  # in [-2, 2]; subtracted once per occurrence in the window
    presence_penalty: float = 0.0  # in [-2, 2]; subtracted once if the token occurs in the window
    seed: int | None = None  # 0..2**64-1: same seed, same tokens (per prompt index); None or -1 draws a fresh seed
    stop: tuple[str, ...] = field(default_factory=tuple)  # strings that end the reply (not included in it)

    def __post_init__(self):
        for name, (kind, _, _) in _RULES.items():  # JSON and flags give 0 for 0.0
            value = getattr(self, name)
            if kind is float and _is_kind(value, int):
                object.__setattr__(self, name, float(value))
        if self.seed == -1 and _is_kind(self.seed, int):  # llama.cpp's and ollama's "fresh random seed"
            object.__setattr__(self, "seed", None)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))

    def validate(self) -> "GenerationConfig":
        """Raise UsageError naming the first bad key, its value and the allowed range; return self."""
        for name, (kind, ok, allowed) in _RULES.items():
            value = getattr(self, name)
            if not _is_kind(value, kind) or not ok(value):
                shown = list(value) if isinstance(value, tuple) else value  # stop is a list to the user
                raise UsageError(f"{name} = {shown!r} is out of range: allowed {allowed}")
        return self

    def with_overrides(self, **overrides) -> "GenerationConfig":
        """A copy with the given fields replaced (None means 'not given' and keeps the value), validated."""
        unknown = sorted(set(overrides) - set(FIELD_NAMES))
        if unknown:
            raise UsageError(f"unknown generation setting {unknown[0]!r}; known: {', '.join(FIELD_NAMES)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **given).validate()


def _is_kind(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "seed":
        return value is None or _is_kind(value, int)
    return isinstance(value, tuple) and all(isinstance(s, str) and s for s in value)


MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds

# field -> (type, check, allowed range in words)
_RULES = {
    "max_new_tokens": (int, lambda v: v >= 1, "an integer >= 1"),
    "temperature": (float, lambda v: 0 <= v < math.inf, ">= 0 (0 = greedy), finite"),
    "top_k": (int, lambda v: v >= 0, "an integer >= 0 (0 disables)"),
    "top_p": (float, lambda v: 0 < v <= 1, "0 < top_p <= 1 (1 disables)"),
    "min_p": (float, lambda v: 0 <= v <= 1, "0 <= min_p <= 1 (0 disables)"),
    "typical_p": (float, lambda v: 0 < v <= 1, "0 < typical_p <= 1 (1 disables)"),
    "repetition_penalty": (float, lambda v: 0 < v < math.inf, "> 0 (1 disables), finite"),
    "repetition_window": (int, lambda v: v >= 0, "an integer >= 0 (0 = the whole context)"),
    "frequency_penalty": (float, lambda v: -2 <= v <= 2, "-2 <= frequency_penalty <= 2"),
    "presence_penalty": (float, lambda v: -2 <= v <= 2, "-2 <= presence_penalty <= 2"),
    "seed": ("seed", lambda v: v is None or 0 <= v <= MAX_SEED, f"an integer 0..{2**64 - 1}, or -1 for a fresh random seed"),
    "stop": ("stop", lambda v: True, "a list of non-empty strings"),
}
FIELD_NAMES = tuple(f.name for f in dataclasses.fields(GenerationConfig))


def allowed_values(name: str) -> str:
    """The allowed range of a GenerationConfig field, in words (for error messages)."""
    return _RULES[name][2]


@dataclass
class TokenEvent:
    """One new token of one prompt."""

    index: int  # which prompt of the batch (always 0 for stream())
    text: str  # text this token completed; "" while a character or a possible stop string is held back
    token_ids: list[int]  # the new token
    finish_reason: str | None = None  # None while going on; on the row's last event "eos" | "stop" | "length"
    # (max_new_tokens reached) | "context" (the context is full: no slot for another token)
    # ("interrupted" is the consumer's to report: closing the stream ends it without another event)


@dataclass
class GenerationStats:
    prompt_tokens: int  # real prompt tokens, padding not counted
    reused_tokens: int = 0  # prompt tokens whose keys/values were still in the cache (not computed again)
    new_tokens: int = 0  # tokens produced over all rows
    prefill_s: float = 0.0  # prompt forward and first draw
    decode_s: float = 0.0  # decode steps and draws (GPU time on CUDA: talis_cli.step_queue); not the consumer's
    first_token_s: float = 0.0  # from the call to the first token, set-up included


class StopStringFilter:
    """Cuts text at the first stop string; holds back a tail that could still become one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to show, whether a stop string was found). After a stop, the text ends before it."""
        text = self.held + delta
        if not self.stops:
            return text, False
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = self._stop_prefix_len(text)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is the beginning of some stop string."""
        for n in range(min(len(text), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class _Row:
    """Text state of one prompt of a batch: detokenizer, stop-string filter, whether it has finished."""

    def __init__(self, index: int, detokenizer: IncrementalDetokenizer, cfg: GenerationConfig, eos_ids):
        self.index = index
        self.detokenizer = detokenizer
        self.stop_filter = StopStringFilter(cfg.stop)
        self.eos_ids = eos_ids
        self.finished = False

    def accept(self, token_id: int, last: str | None) -> TokenEvent:
        """The event for a new token; `last` is the finish reason when the budget ends here ("length" or
        "context"), else None."""
        if token_id in self.eos_ids:
            return self._finish(token_id, "", "eos")
        text, stopped = self.stop_filter.feed(self.detokenizer.push(token_id))
        if stopped:
            self.finished = True
            return TokenEvent(self.index, text, [token_id], "stop")
        if last:
            return self._finish(token_id, text, last)
        return TokenEvent(self.index, text, [token_id])

    def _finish(self, token_id: int, text: str, reason: str) -> TokenEvent:
        """Release all held-back text (it may still complete a stop string)."""
        self.finished = True
        tail, stopped = self.stop_filter.feed(self.detokenizer.flush())
        if stopped:
            return TokenEvent(self.index, text + tail, [token_id], "stop")
        return TokenEvent(self.index, text + tail + self.stop_filter.flush(), [token_id], reason)


class Generator:
    """Streams tokens and text from a model with a static KV cache (talis_cli.model.Transformer interface)."""

    def __init__(self, model, tokenizer, eos_ids: Sequence[int], max_seq_len: int, context_limit: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.max_seq_len = max_seq_len  # slots of the KV cache
        self.context_limit = context_limit or max_seq_len  # the most the model allows (for advice in errors)
        self.skip_ids = special_ids_to_skip(tokenizer)
        self.pad_id = padding_id(tokenizer, model.args.vocab_size)  # a pad token may lie beyond the embedding
        self.last_stats: GenerationStats | None = None
        self._pad_lens = None  # int64 [B] left padding of the running batch, None when there is none
        self.fast_decode = None  # a runner (tokens, pos, pad_lens) -> logits replacing the step (fast_decode.py)
        self.prefill = None  # a runner (tokens [1, T], start_pos) -> logits [1, 1, vocab] for one prompt
        # (cache version, token ids whose keys/values fill row 0's first slots): a chat's next prompt starts with
        # the previous prompt and reply, so only the new part needs a forward pass.
        self._in_cache: tuple[int, list[int]] | None = None
        self._runs = 0  # generations started; only the latest may record what the cache holds

    def stream(self, prompt_ids: Sequence[int], cfg: GenerationConfig) -> Iterator[TokenEvent]:
        """Events for one prompt (token ids, BOS included if the model wants one)."""
        return self.stream_batch([prompt_ids], cfg)

    def stream_batch(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
                     prompt_indices: Sequence[int] | None = None) -> Iterator[TokenEvent]:
        """Events for several prompts generated together (left padded); each row stops at its own end.

        prompt_indices: each prompt's index among all the prompts of a run (default 0..B-1); a row's sampling
        noise depends only on (cfg.seed, its index), so a batch of any size draws what the prompts alone would.
        Raises TalisError at once for an empty prompt or one that leaves no room in the context.
        """
        cfg.validate()
        prompts = [list(p) for p in prompts]
        if not prompts:
            raise UsageError("no prompts given; pass at least one")
        for i, p in enumerate(prompts):
            self.check_prompt(p, cfg, f"prompt {i + 1}" if len(prompts) > 1 else "the prompt")
        if prompt_indices is not None and len(prompt_indices) != len(prompts):
            raise ValueError(f"{len(prompt_indices)} prompt indices for {len(prompts)} prompts")
        return self._generate(prompts, cfg, prompt_indices)

    def check_prompt(self, prompt_ids: Sequence[int], cfg: GenerationConfig, which: str = "the prompt") -> None:
        """TalisError (naming the prompt as `which`) when `prompt_ids` is empty or leaves no room in the context
        for a first new token, with advice that works; what stream_batch checks before any work."""
        n = len(prompt_ids)
        if n == 0:
            raise TalisError(f"{which} is empty; give at least one token")
        room = self.max_seq_len - 1  # one slot stays free for the first new token
        if n > room:
            advice = context_advice(n, n + cfg.max_new_tokens, self.context_limit)
            raise TalisError(
                f"{which} is {n} tokens, {n - room} too many for a context of {self.max_seq_len} "
                f"(room for {room} plus one new token); {advice}"
            )

    def _decode_step(self, tokens, pos: int):
        """The hot step: tokens int64 [B, 1] at cache slot `pos` -> logits float32 [B, vocab]."""
        if self.fast_decode is not None:
            return self.fast_decode(tokens, pos, self._pad_lens)
        return self.model(tokens, start_pos=pos, pad_lens=self._pad_lens)[:, -1]

    def _ensure_cache(self, batch: int) -> None:
        if self.model.cache_batch < batch or self.model.max_seq_len != self.max_seq_len:
            self.model.setup_cache(batch, self.max_seq_len)

    def _reusable_prefix(self, prompts: list[list[int]]) -> int:
        """How many leading prompt tokens already sit in the cache (one prompt only); at least one token is
        always computed again, for the logits of the first new token."""
        if len(prompts) != 1 or self._in_cache is None or self._in_cache[0] != self.model.cache_version:
            return 0
        cached, prompt = self._in_cache[1], prompts[0]
        n, limit = 0, min(len(cached), len(prompt) - 1)
        while n < limit and cached[n] == prompt[n]:
            n += 1
        return n

    def _generate(self, prompts: list[list[int]], cfg: GenerationConfig, prompt_indices=None) -> Iterator[TokenEvent]:
        import torch

        from .sampling import Sampler
        from .step_queue import QueuedStep, host_buffers

        t_call = time.perf_counter()
        lens = [len(p) for p in prompts]
        B, T = len(prompts), max(lens)  # batch, longest prompt
        budget = min(cfg.max_new_tokens, self.max_seq_len - T)
        out_of_room = "context" if budget < cfg.max_new_tokens else "length"  # why the last step is the last
        stats = self.last_stats = GenerationStats(prompt_tokens=sum(lens))
        device = self.model.logits_device  # where logits, samples and the token history live
        history = torch.full((B, self.max_seq_len), self.pad_id, dtype=torch.long)  # [B, S] slot -> token
        for b, p in enumerate(prompts):
            history[b, T - len(p) : T] = torch.tensor(p, dtype=torch.long)
        history = history.to(device)
        pad_lens = torch.tensor([T - n for n in lens], device=device) if min(lens) < T else None
        self._pad_lens = pad_lens
        self._ensure_cache(B)
        self._runs += 1
        run = self._runs
        reused = stats.reused_tokens = self._reusable_prefix(prompts)
        in_cache = prompts[0][:reused]  # grows as slots are written; row 0 only matters for a single prompt
        self._in_cache = None
        rows = [
            _Row(b, IncrementalDetokenizer(self.tokenizer, p, self.skip_ids), cfg, self.eos_ids)
            for b, p in enumerate(prompts)
        ]

        try:
            t0 = time.perf_counter()
            with torch.inference_mode():
                if self.prefill is not None and B == 1:  # fast_prefill.py
                    logits = self.prefill(history[:, reused:T], reused)[:, -1]
                else:
                    logits = self.model(history[:, reused:T], start_pos=reused, pad_lens=pad_lens,
                                        last_only=True)[:, -1]
                in_cache = list(prompts[0])
                sampler = Sampler(cfg, history, pad_lens, T, logits.shape[-1], prompt_indices)
                tokens = sampler(logits)  # int64 [B]
                sampler.append(tokens)
            ids = tokens.tolist()
            stats.prefill_s = time.perf_counter() - t0
            stats.first_token_s = time.perf_counter() - t_call

            buffers = host_buffers(device, B)
            expect = getattr(self.fast_decode, "expect", None)
            if expect is not None:  # the CUDA-graph runner captures only the buckets this run may reach ahead
                expect(T + budget - 2)  # the last decode step's slot

            def queue(step: int) -> QueuedStep:
                """The decode step of the tokens drawn last (slot T + step) and the next draw, launched."""
                def run():
                    with torch.inference_mode():
                        drawn = sampler(self._decode_step(tokens[:, None], T + step))
                        sampler.append(drawn)
                    return drawn
                return QueuedStep(run, buffers[step % 2] if buffers else None, device)

            ahead = bool(buffers)  # on CUDA the next step is queued before this one's tokens are handed out
            queued = None
            for step in range(budget):
                is_last = step == budget - 1
                last = out_of_room if is_last else None
                if ahead and not is_last:
                    queued = queue(step)  # wasted only when every row ends at this token
                for row in rows:
                    if not row.finished:
                        stats.new_tokens += 1
                        yield row.accept(ids[row.index], last)
                if is_last or all(row.finished for row in rows):
                    return
                queued = queued or queue(step)
                in_cache.append(ids[0])  # the step writes this token's keys and values at slot T + step
                tokens, ids = queued.tokens, queued.ids()
                stats.decode_s += queued.seconds
                queued = None
        finally:  # also when the consumer stops early or Ctrl-C lands mid-step: only completed writes count
            if B == 1 and run == self._runs:  # a stream closed after a newer one started knows nothing
                self._in_cache = (self.model.cache_version, in_cache)
