"""Model hyper-parameters read from a checkpoint's config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import TalisError

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 4096  # hidden size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads means grouped-query attention
    head_dim: int = 128
    intermediate_size: int = 11008
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "dynamic" | "llama3", "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: list[int] = field(default_factory=lambda: [2])

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise TalisError(f"{source}: model_type {model_type!r} is not supported; talis runs {', '.join(SUPPORTED_MODEL_TYPES)} models")
        try:
            dim = int(cfg["hidden_size"])
            n_heads = int(cfg["num_attention_heads"])
            args = cls(
                vocab_size=int(cfg["vocab_size"]),
                dim=dim,
                n_layers=int(cfg["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                head_dim=int(cfg.get("head_dim") or dim // n_heads),
                intermediate_size=int(cfg["intermediate_size"]),
                norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0),
                rope_scaling=_rope_scaling(cfg),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=_as_list(cfg.get("eos_token_id")),
            )
        except KeyError as e:
            raise TalisError(f"{source}: required field {e.args[0]!r} is missing; is this a LLaMA-family config.json?") from None
        except (TypeError, ValueError) as e:
            raise TalisError(f"{source}: a field has the wrong type ({e}); check the file") from None
        args.check(source)
        return args

    def check(self, source: str = "config.json") -> None:
        if self.n_heads % self.n_kv_heads:
            raise TalisError(f"{source}: num_attention_heads ({self.n_heads}) must be a multiple of num_key_value_heads ({self.n_kv_heads})")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise TalisError(f"{source}: rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _as_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def _rope_scaling(cfg: dict) -> dict | None:
    # transformers 5 moved rope settings into "rope_parameters"; older files use "rope_scaling".
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not rs:
        return None
    rs = dict(rs)
    rs["rope_type"] = rs.get("rope_type") or rs.get("type") or "default"
    if rs["rope_type"] == "default":
        return None
    return rs


def rope_inv_freq(args: ModelArgs, max_seq_len: int):
    """Inverse frequencies [head_dim/2] (float32) with the config's rope scaling applied.

    `dynamic` (NTK) scaling is applied once for `max_seq_len`, not per step, so it matches
    transformers only once a sequence reaches that length.
    """
    import torch

    hd = args.head_dim
    theta = args.rope_theta
    rs = args.rope_scaling or {}
    kind = rs.get("rope_type", "default")
    factor = float(rs.get("factor", 1.0))
    if kind == "dynamic":
        orig = int(rs.get("original_max_position_embeddings", args.max_position_embeddings))
        if max_seq_len > orig:
            theta = theta * ((factor * max_seq_len / orig) - (factor - 1)) ** (hd / (hd - 2))
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, rs, factor)
    return inv_freq.float()


def _llama3_scale(inv_freq, rs: dict, factor: float):
    """LLaMA 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    import torch

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
