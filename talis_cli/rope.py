"""Rotary position embedding (RoPE) frequencies with the rope scalings of config.json, as transformers computes them.

Types (config.json `rope_scaling` / `rope_parameters`, `rope_type`):
- default: inv_freq[i] = 1 / theta^(2i / head_dim).
- linear: inv_freq / factor.
- llama3: LLaMA 3.1's wavelength bands (long wavelengths slowed by `factor`, a smooth ramp between the bands).
- yarn: YaRN (arXiv 2309.00071): an inv_freq blend of interpolated and extrapolated frequencies over a linear ramp
  between the `beta_fast` / `beta_slow` rotation counts, and an attention factor (mscale) multiplied into cos and
  sin; transformers' `_compute_yarn_parameters`.
- dynamic: dynamic NTK. A forward whose longest row reaches length L (the largest position + 1) rotates its
  queries and keys with theta * (factor * L / max_position_embeddings - (factor - 1))^(hd / (hd - 2)) when
  L > max_position_embeddings, else unscaled; keys already in the KV cache keep the rotation they were given.
  This is transformers' `dynamic_rope_update` on a fresh model (its threshold is max_position_embeddings; an
  `original_max_position_embeddings` in the dict is not read).

All frequencies are float32 [head_dim / 2], computed in float32 as transformers does.
"""

from __future__ import annotations

import math

import torch

from .config import ModelArgs


def rope_type(args: ModelArgs) -> str:
    return (args.rope_scaling or {}).get("rope_type", "default")


def is_dynamic(args: ModelArgs) -> bool:
    """True when the frequencies depend on the sequence length (dynamic NTK): see `dynamic_inv_freq`."""
    return rope_type(args) == "dynamic"


def _exponents(hd: int, device=None) -> torch.Tensor:
    """2i / hd for i < hd/2, float32."""
    return torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd


def inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] (float32, CPU) of the config's rope scaling; the unscaled ones for
    `dynamic` (what it uses up to max_position_embeddings)."""
    hd, theta = args.head_dim, args.rope_theta
    rs = args.rope_scaling or {}
    kind = rope_type(args)
    if kind == "yarn":
        return _yarn_inv_freq(args, rs)
    base = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if kind == "linear":
        base = base / float(rs.get("factor", 1.0))
    elif kind == "llama3":
        base = _llama3_scale(base, rs, float(rs.get("factor", 1.0)))
    return base.float()


def dynamic_inv_freq(args: ModelArgs, positions: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK inverse frequencies [head_dim/2] (float32, on positions' device) for a forward over integer
    `positions` (any shape): the sequence length is positions.max() + 1, never less than max_position_embeddings
    (where the formula gives the unscaled frequencies). Device ops only (no host sync): a CUDA graph can capture it.
    """
    hd = args.head_dim
    factor = float(args.rope_scaling.get("factor", 1.0))
    original = args.max_position_embeddings
    seq_len = torch.clamp(positions.max() + 1, min=original)
    theta = args.rope_theta * ((factor * seq_len / original) - (factor - 1)) ** (hd / (hd - 2))
    return 1.0 / (theta ** _exponents(hd, positions.device))


def attention_factor(args: ModelArgs) -> float:
    """The factor on cos and sin (YaRN's mscale); 1.0 for the other types."""
    if rope_type(args) != "yarn":
        return 1.0
    rs = args.rope_scaling
    given = rs.get("attention_factor")
    if given is not None:
        return float(given)
    factor = _yarn_factor(args, rs)
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def trained_context(args: ModelArgs) -> int:
    """The longest context the config declares: max_position_embeddings, times `factor` for linear and dynamic
    scaling, and at least original_max_position_embeddings * factor for yarn."""
    limit = args.max_position_embeddings
    rs = args.rope_scaling or {}
    kind = rope_type(args)
    if kind in ("linear", "dynamic"):
        limit = int(limit * float(rs.get("factor", 1.0)))
    elif kind == "yarn":
        limit = max(limit, int(yarn_original_context(args) * _yarn_factor(args, rs)))
    return limit


def yarn_original_context(args: ModelArgs) -> int:
    """The pre-training context YaRN scales from: config.json's top-level original_max_position_embeddings, else
    the rope dict's, else max_position_embeddings (transformers' standardize_rope_params)."""
    rs = args.rope_scaling or {}
    return int(args.original_max_position_embeddings or rs.get("original_max_position_embeddings")
               or args.max_position_embeddings)


def _yarn_factor(args: ModelArgs, rs: dict) -> float:
    factor = rs.get("factor")
    return float(factor) if factor is not None else args.max_position_embeddings / yarn_original_context(args)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(args: ModelArgs, rs: dict) -> torch.Tensor:
    hd, theta = args.head_dim, args.rope_theta
    factor = _yarn_factor(args, rs)
    original = yarn_original_context(args)
    beta_fast = rs.get("beta_fast") or 32  # rotations: above it, frequencies are kept (extrapolated)
    beta_slow = rs.get("beta_slow") or 1  # below it, they are divided by factor (interpolated)

    def correction_dim(rotations: float) -> float:
        """The dimension whose wavelength fits `rotations` times into the original context."""
        return hd * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(hd // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** _exponents(hd)
    extrapolation = 1 - ramp  # weight of the unscaled frequency
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _llama3_scale(inv_freq: torch.Tensor, rs: dict, factor: float) -> torch.Tensor:
    """LLaMA 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    low = float(rs.get("low_freq_factor", 1.0))
    high = float(rs.get("high_freq_factor", 4.0))
    orig = float(rs.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = orig / low, orig / high
    smooth = (orig / wavelen - low) / (high - low)
    ramp = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, ramp, out)
