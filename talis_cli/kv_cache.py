"""The static KV cache: keys and values of every slot of the context, in the model's float dtype or in 8 bits.

An int8 cache (`--kv-cache int8`) stores each head vector of one token (head_dim values) as int8 with one fp32
scale: symmetric absmax, scale = max|x| / 127, q = round-half-up(x / scale) in [-127, 127], so a value comes back
within scale / 2 = max|x| / 254 of what was written. An fp8 cache (`--kv-cache fp8`) stores x / scale as
float8 e4m3 (round to nearest even) with scale = max|x| / 448 (e4m3's largest value): a relative error of at
most 1/16 per value (3 mantissa bits) instead of int8's uniform absmax/254, for GPUs with fp8 conversions.

Vectors are quantized where they are written (this module for the eager model,
quant_kernels.prefill_ops.rotary_to_cache for the fused prefill, the Triton decode attention for the new token)
and dequantized where they are read: back to the model dtype before attention, as `dequantize_heads` does. Every
writer divides with IEEE rounding (torch here, div_rn in the kernels), so they store the same codes. Half the
bytes of an fp16 cache, plus 4 bytes per head vector for the scale.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import UsageError

KV_CACHE_KINDS = ("fp16", "int8", "fp8")  # fp16: the model's float dtype (fp32 for a CPU model); else quantized
STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}  # what a quantized cache stores
LARGEST = {"int8": 127.0, "fp8": 448.0}  # the code a vector's absmax maps to
SCALE_BYTES = 4  # one fp32 scale per head vector of a quantized cache
MIN_ABSMAX = 1e-8  # an all-zero vector gets this absmax, so its scale is never 0 (x / 0 would be NaN)


def check_kind(kind: str) -> str:
    """`kind` if it names a KV cache type, else UsageError naming the choices."""
    if kind not in KV_CACHE_KINDS:
        raise UsageError(f"unknown KV cache type {kind!r}; choose one of {', '.join(KV_CACHE_KINDS)} (--kv-cache)")
    return kind


def check_devices(kind: str, devices) -> None:
    """UsageError when an fp8 cache would sit on a CUDA GPU: its Triton path is not verified there yet (on an H200,
    2026-12-01, the embedded model's 64 greedy tokens through the CUDA path differed from its eager fp8 path; the
    int8 cache passed the same test). devices: device names or torch.devices. The CPU path converts with torch."""
    if kind != "fp8":
        return
    for device in map(torch.device, devices):
        if device.type == "cuda":
            raise UsageError(f"--kv-cache fp8 is not yet verified on GPUs ({device}); use --kv-cache int8")


def slot_bytes(n_kv_heads: int, head_dim: int, kind: str = "fp16", float_bytes: int = 2) -> int:
    """Bytes of one cache slot (keys and values of one token) in one layer: 2 * kv_heads * head_dim * float_bytes
    for "fp16" (float_bytes: the model dtype's size), 2 * kv_heads * (head_dim + SCALE_BYTES) for "int8", "fp8"."""
    if check_kind(kind) in STORAGE:
        return 2 * n_kv_heads * (head_dim + SCALE_BYTES)
    return 2 * n_kv_heads * head_dim * float_bytes


def quantize_heads(x: torch.Tensor, kind: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] (any float dtype) -> (codes [..., head_dim], fp32 scales [...]) per vector along the last
    dim. "int8": scale = max(max|x|, MIN_ABSMAX) / 127, codes floor(x / scale + 0.5) clamped to [-127, 127];
    "fp8": scale = max(max|x|, MIN_ABSMAX) / 448, codes x / scale as float8_e4m3fn (round to nearest even)."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp_min(MIN_ABSMAX) / LARGEST[kind]
    y = xf / scale[..., None]
    if kind == "fp8":
        return y.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn), scale
    return torch.floor(y + 0.5).clamp_(-127, 127).to(torch.int8), scale


def dequantize_heads(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes (int8 or float8_e4m3fn) [..., head_dim] and fp32 scales [...] -> q * scale [..., head_dim], computed
    in fp32, rounded to `dtype` (what the Triton kernels compute before they use a cached value)."""
    return (q.float() * scale[..., None]).to(dtype)


class KVCache(nn.Module):
    """Preallocated keys and values for every slot of the context: k, v [batch, kv_heads, max_seq_len, head_dim]
    in `dtype` (kind "fp16"), or 8-bit codes (int8 or float8_e4m3fn, kinds "int8", "fp8") with k_scale, v_scale
    fp32 [batch, kv_heads, max_seq_len] (None for "fp16"). Reads return `dtype` either way."""

    def __init__(self, max_batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device,
                 kind: str = "fp16"):
        super().__init__()
        self.kind = check_kind(kind)
        self.dtype = dtype  # the activations' dtype: what is written and what reads return
        shape = (max_batch, n_kv_heads, max_seq_len, head_dim)
        store = STORAGE.get(self.kind, dtype)
        self.register_buffer("k", torch.zeros(shape, dtype=store, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=store, device=device), persistent=False)
        for name in ("k_scale", "v_scale"):  # [batch, kv_heads, max_seq_len] fp32, or None for an fp16 cache
            scale = torch.zeros(shape[:3], dtype=torch.float32, device=device) if self.quantized else None
            self.register_buffer(name, scale, persistent=False)

    @property
    def quantized(self) -> bool:
        """Whether it stores 8-bit codes with fp32 scales (kinds "int8", "fp8") rather than floats."""
        return self.kind in STORAGE

    def update(self, start: int, k, v, row: int | None = None, first: int = 0):
        """Write k, v [B, kv_heads, T, hd] at slots start..start+T-1 of rows 0..B-1 (of row `row` alone, B = 1);
        return those rows' slots first..start+T-1 (in `dtype`: an int8 cache dequantizes only those)."""
        B, _, T, _ = k.shape
        end = start + T
        rows = slice(0, B) if row is None else slice(row, row + 1)
        self._write((rows, slice(None), slice(start, end)), k, v)
        return self.read(rows, first, end)

    def update_rows(self, rows, slots, k, v, length: int):
        """Row b of k, v [B, kv_heads, 1, hd] goes to slot slots[b] of cache row rows[b] (int64 [B] each);
        returns those cache rows' first `length` slots [B, kv_heads, length, hd] (a copy)."""
        self._write((rows, slice(None), slots), k[:, :, 0], v[:, :, 0])
        return self.read(rows, 0, length)

    def read(self, rows, start: int, end: int):
        """Keys and values of cache rows `rows` (a slice or int64 indices), slots start..end-1, in `dtype`:
        [rows, kv_heads, end - start, hd] each (views of an fp16 cache, dequantized copies of an int8 one)."""
        k, v = self.k[rows, :, start:end], self.v[rows, :, start:end]
        if not self.quantized:
            return k, v
        return (dequantize_heads(k, self.k_scale[rows, :, start:end], self.dtype),
                dequantize_heads(v, self.v_scale[rows, :, start:end], self.dtype))

    def _write(self, where: tuple, k, v) -> None:
        """k, v (head vectors along their last dim) into the cache at index `where` (without the head_dim axis)."""
        if not self.quantized:
            self.k[where], self.v[where] = k, v
            return
        self.k[where], self.k_scale[where] = quantize_heads(k, self.kind)
        self.v[where], self.v_scale[where] = quantize_heads(v, self.kind)
