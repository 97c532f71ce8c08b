"""Logits -> next token: penalties, temperature, top-k, top-p, min-p, typical-p, then a seeded draw.

Every function works on a batch of rows (logits float32 [B, vocab]) on the logits' own device; the only
host sync in a generation step is the caller reading the chosen tokens. Without CUDA graphs each small
kernel costs several microseconds of launch time, so the chain is built to launch few: top-k (or one sort)
first picks candidate tokens in descending order, and the later filters work on those few candidates.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Sequence

import torch

from .step_queue import to_device

if TYPE_CHECKING:
    from .generation import GenerationConfig


def apply_penalties(logits, counts, repetition: float, frequency: float, presence: float):
    """Penalize tokens already seen: logits [B, V] float, counts [B, V] float (occurrences in the window).

    repetition (CTRL / HF rule): a seen token's positive logit is divided by `repetition`, a negative one
    multiplied; frequency subtracts `frequency * count`; presence subtracts `presence` once if seen.
    """
    seen = counts > 0
    if repetition != 1.0:
        logits = torch.where(seen, logits * torch.where(logits > 0, 1.0 / repetition, repetition), logits)
    if frequency != 0.0 or presence != 0.0:
        logits = logits - (counts * frequency + seen * presence)
    return logits


def candidates(logits, top_k: int, need_order: bool):
    """(candidate logits [B, C], their token ids [B, C] or None for 'all, unsorted').

    With 0 < top_k < vocab the candidates are the k largest, in descending order; otherwise the whole
    vocabulary, sorted descending only when a later filter needs the order.
    """
    if 0 < top_k < logits.shape[-1]:
        return torch.topk(logits, top_k, dim=-1)
    if need_order:
        return torch.sort(logits, dim=-1, descending=True)
    return logits, None


def top_p_mask(sorted_probs, top_p: float):
    """Nucleus on probabilities sorted descending [B, C]: keep the shortest head whose mass reaches top_p.

    A token is kept while the mass before it is below top_p, so the first is always kept.
    """
    return torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p


def min_p_mask(probs, min_p: float):
    """Keep tokens at least min_p times as likely as the row's most likely one. probs [B, C]."""
    return probs >= min_p * probs.amax(dim=-1, keepdim=True)


def typical_mask(probs, typical_p: float):
    """Locally typical sampling on a distribution [B, C] that sums to 1 (zeros allowed): keep the tokens
    whose surprise is closest to the entropy until their mass reaches typical_p."""
    log_probs = torch.log(probs)
    entropy = -(probs * log_probs).nan_to_num().sum(dim=-1, keepdim=True)
    distance = (-log_probs - entropy).abs()  # inf for removed tokens: they sort last
    order = torch.argsort(distance, dim=-1)
    ordered = probs.gather(-1, order)
    keep_ordered = torch.cumsum(ordered, dim=-1) - ordered < typical_p
    return torch.zeros_like(keep_ordered).scatter(-1, order, keep_ordered)


def truncated_distribution(logits, cfg: "GenerationConfig"):
    """Temperature, then top-k -> top-p -> min-p -> typical-p, as llama.cpp and HF order them.

    logits [B, V] -> (probs [B, C] over the candidates, zero where filtered out and not renormalized;
    candidate token ids [B, C], or None when the candidates are the whole vocabulary in order).
    cfg.temperature > 0.
    """
    cand, ids = candidates(logits, cfg.top_k, need_order=cfg.top_p < 1.0)
    probs = torch.softmax(cand / cfg.temperature, dim=-1)  # top-k and the sort commute with the scaling
    keep = None
    if cfg.top_p < 1.0:
        keep = top_p_mask(probs, cfg.top_p)
    if cfg.min_p > 0.0:  # a ratio to the top token: renormalizing first would not change it
        keep = min_p_mask(probs, cfg.min_p) if keep is None else keep & min_p_mask(probs, cfg.min_p)
    if cfg.typical_p < 1.0:
        if keep is not None:
            probs = probs * keep
            probs = probs / probs.sum(dim=-1, keepdim=True)
        keep = typical_mask(probs, cfg.typical_p) if keep is None else keep & typical_mask(probs, cfg.typical_p)
    return (probs if keep is None else probs * keep), ids


def sample_from(probs, generators: torch.Generator | Sequence[torch.Generator]):
    """Draw one index per row of unnormalized probabilities [B, C] -> int64 [B]; `generators` is one generator
    for all rows, or one per row (row b's noise then comes from generators[b] only, so a row draws the same
    tokens whatever batch it is in).

    argmax(p / E) with E ~ Exp(1) is a draw from p (the exponential race); it needs no host sync.
    """
    race = torch.empty_like(probs)
    if isinstance(generators, torch.Generator) or len(generators) == 1:
        race.exponential_(1.0, generator=generators if isinstance(generators, torch.Generator) else generators[0])
    else:
        for row, generator in zip(race, generators):
            row.exponential_(1.0, generator=generator)
    return torch.argmax(probs / race, dim=-1)


def draw(logits, cfg: "GenerationConfig", generators: Sequence[torch.Generator]):
    """Penalized logits [B, V] -> tokens int64 [B]: argmax at temperature 0, else a draw from the truncated
    distribution with generators[b] for row b."""
    if cfg.temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs, ids = truncated_distribution(logits, cfg)
    choice = sample_from(probs, generators)
    return choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)


_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: the SplitMix64 increment
_MASK64 = 2**64 - 1


def row_seed(seed: int, prompt_index: int) -> int:
    """The seed of prompt `prompt_index` of a run seeded with `seed` (both >= 0) -> int in [0, 2**64).

    Prompt 0 takes `seed` itself (a single prompt draws what it drew before per-row seeds); the others a
    SplitMix64 mix of (seed, index), so neighbouring seeds and indices give unrelated streams.
    """
    if prompt_index == 0:
        return seed
    z = (seed + prompt_index * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class Sampler:
    """Chooses the next token of every row, remembering what each row has seen for the penalties.

    history: int64 [B, S] token slots (prompt, left padded) on the logits' device; pad_lens: int64 [B] or None.
    prompt_indices: each row's index among all the prompts of the run (default 0..B-1); a row's randomness depends
    only on (cfg.seed, its index), so how prompts are batched does not change what they draw. cfg.seed None
    draws a fresh run seed.
    The penalty window covers the prompt as well as the reply, as llama.cpp's repeat_last_n does.
    """

    def __init__(self, cfg: "GenerationConfig", history, pad_lens, n_filled: int, vocab_size: int,
                 prompt_indices: Sequence[int] | None = None):
        self.cfg = cfg
        device = history.device
        B = history.shape[0]
        seed = cfg.seed if cfg.seed is not None else secrets.randbits(64)
        indices = range(B) if prompt_indices is None else prompt_indices
        self.generators = [torch.Generator(device=device).manual_seed(row_seed(seed, i)) for i in indices]
        self.uses_penalties = (
            cfg.repetition_penalty != 1.0 or cfg.frequency_penalty != 0.0 or cfg.presence_penalty != 0.0
        )
        if not self.uses_penalties:
            return
        B, S = history.shape
        self.history = history
        self.filled = n_filled  # slots 0..filled-1 hold tokens
        slots = torch.arange(S, device=device)
        pads = pad_lens[:, None] if pad_lens is not None else 0
        self.slot_weight = (slots[None, :] >= pads).float()  # [B, S] 1 for real tokens, 0 for padding
        self.slot_unweight = -self.slot_weight  # what a slot leaving the window takes off
        self.one = torch.ones(B, 1, device=device)
        in_window = slots[:n_filled] >= n_filled - cfg.repetition_window if cfg.repetition_window else True
        self.counts = torch.zeros(B, vocab_size, device=device)  # float [B, V] occurrences in the window
        self.counts.scatter_add_(1, history[:, :n_filled], self.slot_weight[:, :n_filled] * in_window)

    def __call__(self, logits):
        """logits float [B, V] -> next tokens int64 [B]."""
        cfg = self.cfg
        if self.uses_penalties:
            logits = apply_penalties(
                logits, self.counts, cfg.repetition_penalty, cfg.frequency_penalty, cfg.presence_penalty
            )
        return draw(logits, cfg, self.generators)

    def append(self, tokens):
        """Record the chosen tokens int64 [B] in the next slot (and drop the slot leaving the window)."""
        if not self.uses_penalties:
            return
        slot = self.filled
        self.history[:, slot] = tokens
        self.counts.scatter_add_(1, tokens[:, None], self.one)
        leaving = slot - self.cfg.repetition_window
        if self.cfg.repetition_window and leaving >= 0:
            self.counts.scatter_add_(1, self.history[:, leaving : leaving + 1], self.slot_unweight[:, leaving : leaving + 1])
        self.filled += 1


# --- rows at their own positions (talis_cli.scheduler) ------------------------------------------------------------
_DRAW_FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "repetition_window",
                "frequency_penalty", "presence_penalty")


def draw_key(cfg: "GenerationConfig") -> tuple:
    """The settings that decide how a row's logits become its token: rows that share them are drawn together."""
    return tuple(getattr(cfg, name) for name in _DRAW_FIELDS)


def uses_penalties(cfg: "GenerationConfig") -> bool:
    return cfg.repetition_penalty != 1.0 or cfg.frequency_penalty != 0.0 or cfg.presence_penalty != 0.0


def row_generator(cfg: "GenerationConfig", prompt_index: int, device) -> torch.Generator:
    """The random generator of one request: seeded from (cfg.seed, prompt_index) as Sampler seeds a row (a fresh
    seed when cfg.seed is None)."""
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(64)
    return torch.Generator(device=device).manual_seed(row_seed(seed, prompt_index))


class RowHistory:
    """Token history and penalty counts per cache row, for requests at their own positions (the scheduler).

    history: int64 [rows, max_seq_len] (slot -> token: the prompt, then the drawn tokens); counts: float32
    [rows, vocab], occurrences within each row's penalty window; both on `device` (the logits').
    """

    def __init__(self, rows: int, max_seq_len: int, vocab_size: int, device):
        self.history = torch.zeros((rows, max_seq_len), dtype=torch.long, device=device)
        self.counts = torch.zeros((rows, vocab_size), dtype=torch.float32, device=device)

    def start(self, row: int, prompt: Sequence[int], window: int) -> None:
        """A new request in cache row `row`: its prompt fills the first slots; the counts cover the last `window`
        of them (all with 0), as Sampler counts a prompt."""
        n = len(prompt)
        self.history[row, :n] = torch.tensor(prompt, dtype=torch.long)
        lo = max(0, n - window) if window else 0
        self.counts[row].zero_()
        self.counts[row].scatter_add_(0, self.history[row, lo:n], torch.ones(n - lo, device=self.counts.device))

    def append(self, rows, slots, tokens, window: int) -> None:
        """Record tokens int64 [B] at slots [B] of cache rows [B] (distinct), dropping the slot that leaves each
        row's window, as Sampler.append does."""
        self.history[rows, slots] = tokens
        self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.float32), accumulate=True)
        if window:
            leaving = slots - window
            weight = -(leaving >= 0).float()
            gone = self.history[rows, leaving.clamp(min=0)]
            self.counts.index_put_((rows, gone), weight, accumulate=True)


def draw_rows(logits, cfgs: Sequence["GenerationConfig"], generators: Sequence[torch.Generator],
              history: RowHistory | None = None, rows=None, slots=None):
    """One token per row of logits float32 [B, V], row b with its own settings cfgs[b] and generators[b] ->
    int64 [B] on the logits' device. Rows with the same draw_key are drawn in one chain of launches. Rows that use
    penalties read and update `history` at their cache rows `rows` (int64 [B]), the new token going to `slots`
    (int64 [B]: each row's sequence length before it). A row draws what Sampler draws for it alone."""
    groups: dict[tuple, list[int]] = {}
    for b, cfg in enumerate(cfgs):
        groups.setdefault(draw_key(cfg), []).append(b)
    out = None
    for members in groups.values():
        cfg = cfgs[members[0]]
        whole = len(members) == len(cfgs)
        sel = None if whole else to_device(members, logits.device)  # no wait for a step queued ahead
        part = logits if whole else logits[sel]
        penalized = uses_penalties(cfg)
        if penalized:
            at = rows if whole else rows[sel]
            part = apply_penalties(part, history.counts[at], cfg.repetition_penalty, cfg.frequency_penalty,
                                   cfg.presence_penalty)
        tokens = draw(part, cfg, [generators[b] for b in members])
        if penalized:
            history.append(at, slots if whole else slots[sel], tokens, cfg.repetition_window)
        if whole:
            return tokens
        if out is None:
            out = torch.empty(len(cfgs), dtype=torch.long, device=logits.device)
        out[sel] = tokens
    return out
