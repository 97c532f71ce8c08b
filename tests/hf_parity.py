"""talis' fp32 forward against a transformers model on the same weights, in the call patterns generation uses:
one forward over a whole sequence, and a prefill, a chunk at start_pos > 0, then token-by-token decode through
the KV cache (transformers through its own cache, called the same way)."""

from __future__ import annotations

import inspect

import torch

from talis_cli.engine import Engine, LoadSettings
from tests.tiny_models import save_fp16, tiny_config

TOLERANCE = 1e-4  # of the largest logit; fp32 on the CPU


def hf_random(config_cls, model_cls, seed: int = 0, **overrides):
    """A transformers model of `model_cls` (eager attention) with random weights, as tiny_models.hf_model."""
    torch.manual_seed(seed)
    config = config_cls(**tiny_config(**overrides))
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    return model


def talis_model(hf, folder, max_seq_len: int):
    """The fp32 checkpoint of `hf` written to `folder` and loaded by talis on the CPU -> talis_cli.model.Transformer."""
    save_fp16(hf, folder, dtype=torch.float32)
    return Engine.load(LoadSettings(model_dir=folder, device_map="cpu", max_seq_len=max_seq_len)).model


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert err < TOLERANCE, f"max logit difference {err:.2e} of the largest logit"


def hf_cached_logits(hf, tokens: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """transformers' logits [B, T, vocab] for `tokens` [B, T] fed through its KV cache in calls cut at `bounds`,
    then one token per call."""
    cuts = [0, *bounds, *range(bounds[-1] + 1, tokens.shape[1] + 1)]
    # transformers 5.24 renamed past_key_values to cache (the old name goes in 5.40); older releases know only it
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    past, out = None, []
    with torch.no_grad():
        for a, b in zip(cuts, cuts[1:]):
            result = hf(tokens[:, a:b], use_cache=True, **{name: past})
            past = result[name]
            out.append(result.logits)
    return torch.cat(out, dim=1)


def talis_cached_logits(model, tokens: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """talis' logits for the same calls: a forward per range of `bounds` at start_pos = its first slot, then
    token-by-token decode."""
    cuts = [0, *bounds, *range(bounds[-1] + 1, tokens.shape[1] + 1)]
    model.setup_cache(tokens.shape[0], tokens.shape[1])
    with torch.no_grad():
        return torch.cat([model(tokens[:, a:b], start_pos=a) for a, b in zip(cuts, cuts[1:])], dim=1)


def random_tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 4096, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_greedy_matches(hf, model, folder, prompt: list[int], new_tokens: int, max_seq_len: int) -> None:
    """talis' greedy tokens after `prompt` (Generator over `model`, the tokenizer in `folder`) equal transformers'
    `generate` on the same weights."""
    from talis_cli.generation import GenerationConfig, Generator
    from talis_cli.tokenizer import load_tokenizer

    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    generator = Generator(model, load_tokenizer(folder), eos_ids=[], max_seq_len=max_seq_len)
    ours = [t for ev in generator.stream(prompt, GenerationConfig(temperature=0.0, max_new_tokens=new_tokens))
            for t in ev.token_ids]
    assert ours == theirs[0, len(prompt):].tolist()
