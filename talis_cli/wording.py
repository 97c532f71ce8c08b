"""Words shared by the frontends (one-shot CLI, chat REPL) and the engine's errors: settings as users write them,
and what to do when a prompt or a reply does not fit the context. No terminal code here."""

from __future__ import annotations

import json


def format_setting(name: str, value) -> str:
    """A GenerationConfig value as users write it: seed `random` for None, stop strings quoted or `none`."""
    if name == "seed" and value is None:
        return "random"
    if name == "stop":
        return ", ".join(json.dumps(s, ensure_ascii=False) for s in value) if value else "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def context_advice(prompt_tokens: int, wanted: int, limit: int, verb: str = "pass") -> str:
    """What to do about a prompt of `prompt_tokens` that leaves no room in the allocated context, for a model
    trained for `limit` tokens: allocate `wanted` slots (prompt and reply, never past the limit) when the prompt
    fits the model at all, else shorten it."""
    if prompt_tokens >= limit:
        return f"shorten it: the model's whole context is {limit} tokens"
    return f"{verb} --max-seq-len {min(wanted, limit)} (the model allows up to {limit}) or shorten it"


def context_full_advice(size: int, limit: int) -> str:
    """What makes room after a reply stopped at the end of an allocated context of `size` tokens, for a model
    trained for `limit`: a larger --max-seq-len while there is one, else a shorter prompt."""
    if size < limit:
        return f"--max-seq-len can allocate up to {limit}"
    return "that is the model's whole context; a shorter prompt leaves more room"
