"""Streaming generation: GenerationConfig, TokenEvent, GenerationStats and the Generator.

The chain is prefill (one forward over the padded prompts) -> sample -> decode step -> sample -> ...; the
per-token step is the single call `Generator._decode_step`, so a CUDA-graph runner can replace it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .detokenize import IncrementalDetokenizer, special_ids_to_skip
from .errors import TalisError, UsageError
from .sampling import Sampler


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
    seed: int | None = None  # same seed, same tokens; None draws a fresh seed
    stop: tuple[str, ...] = field(default_factory=tuple)  # strings that end the reply (not included in it)

    def __post_init__(self):
        for name, (kind, _, _) in _RULES.items():  # JSON and flags give 0 for 0.0
            value = getattr(self, name)
            if kind is float and _is_kind(value, int):
                object.__setattr__(self, name, float(value))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))

    def validate(self) -> "GenerationConfig":
        """Raise UsageError naming the first bad key, its value and the allowed range; return self."""
        for name, (kind, ok, allowed) in _RULES.items():
            value = getattr(self, name)
            if not _is_kind(value, kind) or not ok(value):
                raise UsageError(f"{name} = {value!r} is out of range: allowed {allowed}")
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


# field -> (type, check, allowed range in words)
_RULES = {
    "max_new_tokens": (int, lambda v: v >= 1, "an integer >= 1"),
    "temperature": (float, lambda v: v >= 0, ">= 0 (0 = greedy)"),
    "top_k": (int, lambda v: v >= 0, "an integer >= 0 (0 disables)"),
    "top_p": (float, lambda v: 0 < v <= 1, "0 < top_p <= 1 (1 disables)"),
    "min_p": (float, lambda v: 0 <= v <= 1, "0 <= min_p <= 1 (0 disables)"),
    "typical_p": (float, lambda v: 0 < v <= 1, "0 < typical_p <= 1 (1 disables)"),
    "repetition_penalty": (float, lambda v: v > 0, "> 0 (1 disables)"),
    "repetition_window": (int, lambda v: v >= 0, "an integer >= 0 (0 = the whole context)"),
    "frequency_penalty": (float, lambda v: -2 <= v <= 2, "-2 <= frequency_penalty <= 2"),
    "presence_penalty": (float, lambda v: -2 <= v <= 2, "-2 <= presence_penalty <= 2"),
    "seed": ("seed", lambda v: True, "an integer or null"),
    "stop": ("stop", lambda v: True, "a list of non-empty strings"),
}
FIELD_NAMES = tuple(f.name for f in dataclasses.fields(GenerationConfig))
