"""Windowed perplexity, as GPTQ-for-LLaMa evaluates it: the text is cut into windows of `ctx` tokens and
the negative log-likelihood of every predicted token is averaged. With `stride` < ctx the windows overlap
and only each window's last `stride` tokens are scored (each token scored once, with more context)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import UsageError


def allocate_for_window(model_dir, ctx: int, max_seq_len: int | None) -> int | None:
    """The context to allocate for windows of `ctx` tokens (before the weights load): `max_seq_len` when given,
    else enough for one window. UsageError when the window exceeds the given context or the model's own."""
    from .engine import DEFAULT_MODEL_DIR
    from .loaders.base import read_model_args
    from .rope import trained_context

    limit = trained_context(read_model_args(Path(model_dir) if model_dir else DEFAULT_MODEL_DIR))
    if ctx > limit:
        raise UsageError(f"--ctx {ctx} is longer than the model's context of {limit} tokens; use --ctx {limit} or less")
    if max_seq_len is not None and ctx > max_seq_len:
        raise UsageError(f"--ctx {ctx} is longer than the context allocated by --max-seq-len {max_seq_len}; "
                         f"raise --max-seq-len to {ctx} (the model allows up to {limit}) or use a smaller --ctx")
    return max_seq_len if max_seq_len is not None else ctx


def perplexity(engine, text: str, ctx: int = 512, stride: int | None = None, max_windows: int | None = None,
               progress=None) -> float:
    """exp(mean negative log-likelihood) of `text` over windows of `ctx` tokens; UsageError when a window is
    longer than the engine's context (engine.max_seq_len)."""
    if ctx > engine.max_seq_len:
        raise UsageError(f"--ctx {ctx} is longer than the context of {engine.max_seq_len} tokens; "
                         f"use --ctx {engine.max_seq_len} or less")
    ids = engine.encode(text, add_bos=False)
    return perplexity_of_ids(engine.model, ids, ctx, stride, max_windows, progress)


@torch.no_grad()
def perplexity_of_ids(model, ids: list[int], ctx: int, stride: int | None = None, max_windows: int | None = None,
                      progress=None) -> float:
    stride = stride or ctx
    if ctx < 2 or not 0 < stride <= ctx:
        raise UsageError(f"--ctx must be >= 2 and 0 < --stride <= --ctx (got ctx {ctx}, stride {stride})")
    if len(ids) < ctx + 1:
        raise UsageError(f"the text has {len(ids)} tokens, fewer than --ctx {ctx} + 1; pass a longer file or a smaller --ctx")
    tokens = torch.tensor(ids, dtype=torch.long)
    starts = list(range(0, len(ids) - ctx, stride))[:max_windows]
    nll, counted = 0.0, 0
    had_cache, cache_batch, cache_len = model.has_cache, model.cache_batch, model.max_seq_len
    # Each window attends only to itself. An 8-bit KV cache changes the keys and values attention reads, so the
    # windows then go through a one-row cache, as a prompt's prefill does; an fp16 cache would change nothing.
    through_cache = model.kv_cache_kind != "fp16"
    if through_cache:
        model.setup_cache(1, ctx)
    else:
        model.clear_cache()
    try:
        for i, start in enumerate(starts):
            window = tokens[start:start + ctx + 1]
            logits = model(window[None, :-1], start_pos=0)[0]
            targets = window[1:].to(logits.device)
            scored = ctx if start == 0 else stride  # overlapping windows score only their new tokens
            losses = torch.nn.functional.cross_entropy(logits[-scored:], targets[-scored:], reduction="sum")
            nll += losses.item()
            counted += scored
            if progress:
                progress(i + 1, len(starts), f"ppl {math.exp(nll / counted):.3f}")
    finally:
        if had_cache:
            model.setup_cache(cache_batch, cache_len)
        elif through_cache:
            model.clear_cache()
    return math.exp(nll / counted)
