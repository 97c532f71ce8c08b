"""Model hyper-parameters read from a checkpoint's config.json."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import TalisError

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")  # computed in talis_cli.rope


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
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "dynamic" | "llama3" | "yarn", "factor": ..., ...}
    max_position_embeddings: int = 2048
    original_max_position_embeddings: int | None = None  # top-level in some configs (Phi-3); yarn reads it first
    sliding_window: int | None = None  # Mistral: a query sees keys at most W-1 positions back; None: all keys
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
                original_max_position_embeddings=_int_or_none(cfg.get("original_max_position_embeddings")),
                sliding_window=_sliding_window(cfg, model_type),
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
        if self.sliding_window is not None and self.sliding_window < 1:
            raise TalisError(f"{source}: sliding_window must be a positive number of tokens or null, "
                             f"not {self.sliding_window}")


def _as_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def _int_or_none(v) -> int | None:
    return None if v is None else int(v)


def _sliding_window(cfg: dict, model_type: str) -> int | None:
    """Mistral's `sliding_window` (transformers' MistralConfig reads an absent key as 4096, null as none; its
    LLaMA ignores the key); Qwen2-style configs turn it off with `use_sliding_window: false`."""
    if model_type != "mistral" or cfg.get("use_sliding_window") is False:
        return None
    window = cfg.get("sliding_window", 4096)  # (model_type is mistral here)
    return _int_or_none(window)


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
