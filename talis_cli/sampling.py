"""Logits -> next token: penalties, temperature, top-k, top-p, min-p, typical-p, then a seeded draw.

Every function works on a batch of rows (logits float32 [B, vocab]) on the logits' own device; the only
host sync in a generation step is the caller reading the chosen tokens. Filters mark removed tokens with
-inf so the next filter sees the renormalized distribution.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .generation import GenerationConfig


def apply_penalties(logits, counts, repetition: float, frequency: float, presence: float):
    """Penalize tokens already seen: logits [B, V] float, counts [B, V] (occurrences in the window).

    repetition (CTRL / HF rule): a seen token's positive logit is divided by `repetition`, a negative one
    multiplied; frequency subtracts `frequency * count`; presence subtracts `presence` once if seen.
    """
    seen = counts > 0
    if repetition != 1.0:
        penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalized, logits)
    if frequency != 0.0:
        logits = logits - frequency * counts.to(logits.dtype)
    if presence != 0.0:
        logits = logits - presence * seen.to(logits.dtype)
    return logits


def top_k_filter(logits, k: int):
    """Keep the k largest logits of each row [B, V]; k <= 0 or k >= V keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _keep_smallest_mass(logits, order_key, mass: float):
    """Keep, per row, the shortest prefix of tokens sorted by ascending `order_key` whose probability reaches `mass`.

    A token is kept when the probability of the tokens before it is still below `mass`, so the first token
    is always kept.
    """
    probs = torch.softmax(logits, dim=-1)
    order = torch.argsort(order_key, dim=-1)
    sorted_probs = probs.gather(-1, order)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop_sorted = mass_before >= mass
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def top_p_filter(logits, p: float):
    """Nucleus: keep the most likely tokens until their probability reaches p; p >= 1 keeps all."""
    if p >= 1.0:
        return logits
    return _keep_smallest_mass(logits, -logits, p)


def min_p_filter(logits, min_p: float):
    """Keep tokens whose probability is at least min_p times the row's top probability; 0 keeps all."""
    if min_p <= 0.0:
        return logits
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logits < threshold, float("-inf"))


def typical_filter(logits, typical_p: float):
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy until their
    probability reaches typical_p; typical_p >= 1 keeps all."""
    if typical_p >= 1.0:
        return logits
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).nan_to_num().sum(dim=-1, keepdim=True)
    distance = (-log_probs - entropy).abs()  # inf for removed tokens: they sort last
    return _keep_smallest_mass(logits, distance, typical_p)


def filter_logits(logits, cfg: "GenerationConfig"):
    """Temperature then the truncation filters, in the order llama.cpp and HF apply them. cfg.temperature > 0."""
    logits = logits / cfg.temperature
    logits = top_k_filter(logits, cfg.top_k)
    logits = top_p_filter(logits, cfg.top_p)
    logits = min_p_filter(logits, cfg.min_p)
    return typical_filter(logits, cfg.typical_p)


def sample_from(logits, generator: torch.Generator):
    """Draw one token per row of logits [B, V] -> int64 [B].

    argmax(p / E) with E ~ Exp(1) is a draw from p (the exponential race); it needs no host sync.
    """
    probs = torch.softmax(logits, dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / race, dim=-1)


class Sampler:
    """Chooses the next token of every row, remembering what each row has seen for the penalties.

    history: int64 [B, S] token slots (prompt, left padded) on the logits' device; pad_lens: int64 [B] or None.
    The penalty window covers the prompt as well as the reply, as llama.cpp's repeat_last_n does.
    """

    def __init__(self, cfg: "GenerationConfig", history, pad_lens, n_filled: int, vocab_size: int):
        self.cfg = cfg
        device = history.device
        self.generator = torch.Generator(device=device)
        if cfg.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(cfg.seed)
        self.uses_penalties = (
            cfg.repetition_penalty != 1.0 or cfg.frequency_penalty != 0.0 or cfg.presence_penalty != 0.0
        )
        if not self.uses_penalties:
            return
        B = history.shape[0]
        self.history = history
        self.filled = n_filled  # slots 0..filled-1 hold tokens
        self.pad_lens = pad_lens if pad_lens is not None else torch.zeros(B, dtype=torch.long, device=device)
        slots = torch.arange(n_filled, device=device)
        real = slots[None, :] >= self.pad_lens[:, None]
        if cfg.repetition_window > 0:
            real &= slots[None, :] >= n_filled - cfg.repetition_window
        self.counts = torch.zeros(B, vocab_size, dtype=torch.int32, device=device)
        self.counts.scatter_add_(1, history[:, :n_filled], real.to(torch.int32))

    def __call__(self, logits):
        """logits float [B, V] -> next tokens int64 [B]."""
        cfg = self.cfg
        if self.uses_penalties:
            logits = apply_penalties(
                logits, self.counts, cfg.repetition_penalty, cfg.frequency_penalty, cfg.presence_penalty
            )
        if cfg.temperature == 0:
            return torch.argmax(logits, dim=-1)
        return sample_from(filter_logits(logits, cfg), self.generator)

    def append(self, tokens):
        """Record the chosen tokens int64 [B] in the next slot (and drop the slot leaving the window)."""
        if not self.uses_penalties:
            return
        slot = self.filled
        self.history[:, slot] = tokens
        self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=torch.int32))
        window = self.cfg.repetition_window
        leaving = slot - window
        if window > 0 and leaving >= 0:
            old = self.history[:, leaving : leaving + 1]
            was_counted = (self.pad_lens[:, None] <= leaving).to(torch.int32)
            self.counts.scatter_add_(1, old, -was_counted)
        self.filled += 1
