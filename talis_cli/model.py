"""The LLaMA forward: embeddings, decoder layers (attention + SwiGLU MLP), RMSNorm, a static KV cache.

Module names follow the checkpoints (`model.layers.N.self_attn.q_proj`, ...) so state dicts load as they are.
Linear layers are plain nn.Linear here; quantized ones are swapped in by the loader. The model never picks
devices itself: each layer runs where its weights are, and the hidden state follows it.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import rope
from .config import ModelArgs
from .kv_cache import KVCache, check_kind


def current_device(device: torch.device):
    """Makes `device` the current CUDA device for the block (nothing for a CPU): Triton launches a kernel on the
    current device whatever its tensors' device, so a layer on the second GPU must run with that one current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """x [B, heads, T, hd]; cos, sin [B, 1, T, hd]."""
    return x * cos + rotate_half(x) * sin


def attention_mask(slots, keys, pad_lens=None, window: int | None = None):
    """bool [B or 1, 1, T, S]: which key slots [S] each query slot [T] (int64) sees. Causal over slots; with
    `window`, only keys with query - key < window (transformers' sliding window); row b's first pad_lens[b] slots
    (int64 [B]) are hidden, and a padding query sees only itself, so no row is fully masked (NaN)."""
    mask = keys[None, None, :] <= slots[None, :, None]  # [1, T, S]
    if window is not None:
        mask = mask & (keys[None, None, :] > slots[None, :, None] - window)
    if pad_lens is not None:
        mask = mask & (keys[None, None, :] >= pad_lens[:, None, None])
        mask = mask | (keys[None, None, :] == slots[None, :, None])
    return mask[:, None]


@dataclass
class CacheRows:
    """Where each row of a decode step sits: cache row rows[b], slot slots[b] (int64 [B] on the layer's device);
    the step reads the first `length` slots (max(slots) + 1) of those rows."""

    rows: torch.Tensor
    slots: torch.Tensor
    length: int

    def to(self, device) -> "CacheRows":
        return CacheRows(self.rows.to(device), self.slots.to(device), self.length)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.q_proj = nn.Linear(args.dim, q_out, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.dim, kv_out, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.dim, kv_out, bias=args.attention_bias)
        self.o_proj = nn.Linear(q_out, args.dim, bias=args.attention_bias)
        self.qkv_proj: nn.Module | None = None  # q, k, v fused into one layer at load (quant_kernels.fuse)
        self.kv_cache: KVCache | None = None

    def project_qkv(self, x):
        """x [..., dim] -> q [..., heads*hd], k and v [..., kv_heads*hd]."""
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.split_qkv(self.qkv_proj(x))

    def split_qkv(self, qkv):
        """The fused projection's output [..., (heads + 2*kv_heads)*hd] -> views q, k, v."""
        kv_out = self.n_kv_heads * self.head_dim
        return qkv.split([self.n_heads * self.head_dim, kv_out, kv_out], dim=-1)

    def forward(self, x, cos, sin, start_pos: int, mask, key_start: int = 0, cache_row: int | None = None,
                rows: "CacheRows | None" = None):
        """x [B, T, dim] at cache slots start_pos..; with a cache, attends to its slots key_start..start_pos+T-1
        (earlier ones are outside every query's sliding window) of rows 0..B-1, or of row `cache_row` (B = 1).
        With `rows` (T = 1), row b sits at its own slot of its own cache row (Transformer.decode_rows)."""
        B, T, _ = x.shape  # batch, time, hidden
        q, k, v = self.project_qkv(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if rows is not None:
            k, v = self.kv_cache.update_rows(rows.rows, rows.slots, k, v, rows.length)
        elif self.kv_cache is not None:
            k, v = self.kv_cache.update(start_pos, k, v, cache_row, first=key_start)
        # mask None means plain causal attention over exactly these T tokens.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)
        self.gate_up_proj: nn.Module | None = None  # gate and up fused into one layer at load (quant_kernels.fuse)

    def project_gate_up(self, x):
        """x [..., dim] -> gate, up [..., intermediate]."""
        if self.gate_up_proj is None:
            return self.gate_proj(x), self.up_proj(x)
        return self.gate_up_proj(x).chunk(2, dim=-1)

    def forward(self, x):
        gate, up = self.project_gate_up(x)
        return self.down_proj(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, start_pos, mask, key_start: int = 0, cache_row: int | None = None, rows=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, mask, key_start, cache_row, rows)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """Holds the modules under the `model.` prefix of a checkpoint."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.max_seq_len = args.max_position_embeddings
        self._inv_freq: torch.Tensor | None = None
        self.cache_version = 0  # bumped by setup_cache
        self.kv_cache_kind = "fp16"  # what setup_cache allocates: "fp16" (the model dtype), "int8", "fp8"

    # --- cache -------------------------------------------------------------------------------------
    def setup_cache(self, max_batch: int, max_seq_len: int) -> None:
        """Allocate a static KV cache for `max_batch` rows of `max_seq_len` slots, each on its layer's device, of
        type `kv_cache_kind` (UsageError for an unknown one)."""
        kind = check_kind(self.kv_cache_kind)
        self.max_seq_len = max_seq_len
        self._inv_freq = None
        self.cache_version += 1  # anything that captured the old buffers (CUDA graphs) must start again
        for layer in self.model.layers:
            w = layer.input_layernorm.weight
            layer.self_attn.kv_cache = KVCache(max_batch, max_seq_len, self.args.n_kv_heads, self.args.head_dim,
                                               w.dtype, w.device, kind)

    def clear_cache(self) -> None:
        self.cache_version += 1
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    # --- where the output is ----------------------------------------------------------------------------
    @property
    def logits_device(self) -> torch.device:
        """Where lm_head runs and the logits come out: its weights' device (a quantized head's GPTQ tensors; on a
        split model not the embedding's)."""
        head = self.lm_head
        return next(itertools.chain(head.parameters(), head.buffers())).device

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype of activations and the KV cache (a quantized lm_head has no float `weight`)."""
        return self.model.norm.weight.dtype

    @property
    def has_cache(self) -> bool:
        return self.model.layers[0].self_attn.kv_cache is not None

    @property
    def cache_batch(self) -> int:
        """Rows the cache holds (0 without a cache); call setup_cache again for a larger batch."""
        cache = self.model.layers[0].self_attn.kv_cache
        return 0 if cache is None else cache.k.shape[0]

    # --- forward -----------------------------------------------------------------------------------
    def rotary(self, positions, dtype):
        """cos, sin [B, 1, T, hd] for integer positions [B, T] of one forward (with dynamic NTK scaling, the
        frequencies follow the largest position: talis_cli.rope)."""
        if rope.is_dynamic(self.args):
            inv_freq = rope.dynamic_inv_freq(self.args, positions)
        else:
            if self._inv_freq is None or self._inv_freq.device != positions.device:
                self._inv_freq = rope.inv_freq(self.args).to(positions.device)
            inv_freq = self._inv_freq
        freqs = positions.float()[..., None] * inv_freq  # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos(), emb.sin()
        scale = rope.attention_factor(self.args)
        if scale != 1.0:  # YaRN's mscale
            cos, sin = cos * scale, sin * scale
        return cos.to(dtype), sin.to(dtype)

    def forward(self, tokens, start_pos: int = 0, pad_lens=None, last_only: bool = False,
                cache_row: int | None = None):
        """tokens [B, T] -> float32 logits [B, T, vocab] ([B, 1, vocab] with last_only).

        With a cache, `tokens` fill slots start_pos..start_pos+T-1 of cache rows 0..B-1, or of cache row
        `cache_row` alone (B = 1: one request's prefill, chunk by chunk); row b's first pad_lens[b] slots are left
        padding (masked out, rotary positions shifted back by pad_lens[b]). Without a cache, the tokens
        attend only to each other. With args.sliding_window W, a query sees only the keys less than W slots back.
        """
        B, T = tokens.shape
        embed = self.model.embed_tokens
        x = embed(tokens.to(embed.weight.device))
        device = x.device
        slots = torch.arange(start_pos, start_pos + T, device=device)
        positions = slots.expand(B, T)
        use_cache = self.has_cache
        window = self.args.sliding_window
        if pad_lens is not None:
            pad_lens = pad_lens.to(device)
            positions = (positions - pad_lens[:, None]).clamp(min=0)
        # the cache slots any query here may see: the earlier ones are outside every sliding window
        key_start = max(0, start_pos - window + 1) if use_cache and window else 0
        keys = torch.arange(key_start, start_pos + T, device=device) if use_cache else slots
        mask = None  # None: plain causal attention, the first query at the first key
        if pad_lens is not None or (T > 1 and (len(keys) != T or (window is not None and T > window))):
            mask = attention_mask(slots, keys, pad_lens, window)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.model.layers:
            w = layer.input_layernorm.weight
            if x.device != w.device:  # a device-map boundary: only the hidden state moves
                x, cos, sin = x.to(w.device), cos.to(w.device), sin.to(w.device)
                mask = mask.to(w.device) if mask is not None else None
            with current_device(w.device):
                x = layer(x, cos, sin, start_pos, mask, key_start, cache_row)
        if last_only:
            x = x[:, -1:]
        return self.head(x)

    def head(self, x):
        """Final norm and lm_head: hidden states [B, T, dim] -> float32 logits [B, T, vocab]."""
        x = self.model.norm(x.to(self.model.norm.weight.device))
        device = self.logits_device
        with current_device(device):
            return self.lm_head(x.to(device)).float()

    def decode_rows(self, tokens, slots, rows):
        """One decode step of rows at their own positions: tokens, slots, rows int64 [B] -> float32 logits
        [B, vocab].

        Row b writes its token's keys/values at slot slots[b] of cache row rows[b] and attends to slots
        0..slots[b] of that row (rotary position = slot; with a sliding window W only the last W of them), as
        forward(tokens[b:b+1, None], start_pos=slots[b], cache_row=rows[b]) would. Rows must be distinct.
        """
        assert self.has_cache, "decode_rows needs a KV cache (setup_cache)"
        embed = self.model.embed_tokens
        x = embed(tokens.to(embed.weight.device))[:, None]  # [B, 1, dim]
        device = x.device
        length = int(slots.max()) + 1  # before the move: no device sync for host slots
        slots, rows = slots.to(device), rows.to(device)
        if rope.is_dynamic(self.args):  # the frequencies follow each row's own length, as it alone would use
            pairs = [self.rotary(slots[b : b + 1, None], x.dtype) for b in range(len(slots))]
            cos, sin = torch.cat([c for c, _ in pairs]), torch.cat([s for _, s in pairs])
        else:
            cos, sin = self.rotary(slots[:, None], x.dtype)  # [B, 1, 1, hd]
        keys = torch.arange(length, device=device)[None, :]
        mask = keys <= slots[:, None]  # [B, length]: each row sees its own slots only
        if self.args.sliding_window is not None:
            mask = mask & (keys > slots[:, None] - self.args.sliding_window)
        mask = mask[:, None, None, :]  # [B, 1, 1, length]
        at = CacheRows(rows, slots, length)
        for layer in self.model.layers:
            w = layer.input_layernorm.weight
            if x.device != w.device:
                x, cos, sin, mask = x.to(w.device), cos.to(w.device), sin.to(w.device), mask.to(w.device)
                at = at.to(w.device)
            with current_device(w.device):
                x = layer(x, cos, sin, 0, mask, rows=at)
        return self.head(x)[:, -1]
