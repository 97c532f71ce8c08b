"""Triton kernels of the prefill path (talis_cli.fast_prefill): the work between the projections that the eager
model spreads over many small launches.

- `rotary_to_cache`: rotary on q and k of T tokens of one row, q written out in the layout attention reads
  ([heads, T, hd]), k and v written straight into the KV cache at slots start..start+T-1. The eager forward
  spends ~20 launches per layer on this (reshapes, rotate_half's chunk and cat, products, the cache copies).
  An 8-bit cache (int8 or fp8) gets each key and value vector quantized as it is written
  (triton_ops.quantize_heads).

Rounding follows the eager model (talis_cli.model.apply_rotary): both products rounded to the model dtype, then
their sum, as `triton_ops._rotate` does for one token. Tensors on CUDA, or on CPU under TRITON_INTERPRET=1.
"""
import torch
import triton
import triton.language as tl

from .triton_ops import check_cache, quantize_heads


@triton.jit
def _rotary_to_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr,
                            v_scale_ptr, T, stride_q, stride_k, stride_v, stride_ch, stride_cs, stride_sh, stride_ss,
                            n_heads, HD: tl.constexpr, BLOCK_T: tl.constexpr, QUANT: tl.constexpr,
                            FP8: tl.constexpr):
    """Program (t, h): tokens [t*BLOCK_T, (t+1)*BLOCK_T) of head h, h < n_heads a query head, else kv head
    h - n_heads. Token i uses row i of cos, sin [T, HD] (the caller offsets them to the first token's position).

    q [T, n_heads*HD], k, v [T, kv_heads*HD] with row strides; q_out [n_heads, T, HD] contiguous; the caches are
    one row of the KV cache, [kv_heads, slots, HD] (strides stride_ch, stride_cs, 1), offset to the first slot.
    With QUANT the caches are int8 (float8 e4m3 with FP8) and k_scale, v_scale fp32 [kv_heads, slots] (strides
    stride_sh, stride_ss), offset likewise: each vector is stored quantized, its scale beside it.
    """
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    offs_d = tl.arange(0, HD)
    mask = (offs_t < T)[:, None]
    table = offs_t[:, None] * HD + offs_d[None, :]
    cos = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
    partner_d = (offs_d + HD // 2) % HD
    if h < n_heads:
        src, stride = q_ptr + h * HD, stride_q
    else:
        src, stride = k_ptr + (h - n_heads) * HD, stride_k
    rows = src + offs_t[:, None] * stride
    x = tl.load(rows + offs_d[None, :], mask=mask, other=0.0)
    partner = tl.load(rows + partner_d[None, :], mask=mask, other=0.0)
    rotated_half = tl.where(offs_d[None, :] < HD // 2, -partner, partner)  # cat(-x2, x1)
    a = (x.to(tl.float32) * cos).to(x.dtype)
    c = (rotated_half.to(tl.float32) * sin).to(x.dtype)
    out = (a.to(tl.float32) + c.to(tl.float32)).to(x.dtype)
    if h < n_heads:
        tl.store(q_out_ptr + h * T * HD + offs_t[:, None] * HD + offs_d[None, :], out, mask=mask)
    else:
        kv_h = h - n_heads
        cache = kv_h * stride_ch + offs_t[:, None] * stride_cs + offs_d[None, :]
        v = tl.load(v_ptr + offs_t[:, None] * stride_v + kv_h * HD + offs_d[None, :], mask=mask, other=0.0)
        if QUANT:
            scales = kv_h * stride_sh + offs_t[:, None] * stride_ss  # [BLOCK_T, 1]
            k_q, k_scale = quantize_heads(out, FP8)
            v_q, v_scale = quantize_heads(v, FP8)
            tl.store(k_cache_ptr + cache, k_q.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(v_cache_ptr + cache, v_q.to(v_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(k_scale_ptr + scales, k_scale, mask=mask)
            tl.store(v_scale_ptr + scales, v_scale, mask=mask)
        else:
            tl.store(k_cache_ptr + cache, out.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(v_cache_ptr + cache, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_to_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, out: torch.Tensor | None = None,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary and cache write of T tokens of one row; returns the rotated queries [n_heads, T, hd] in q's dtype
    (into `out`, contiguous, if given).

    q [T, n_heads*hd], k and v [T, n_kv_heads*hd] (unit column stride: views of a fused projection are fine);
    cos, sin [T, hd] contiguous, row i for token i (the model's tables sliced at its position); k_cache, v_cache
    [n_kv_heads, max_seq_len, hd] (one row of talis_cli.model.KVCache, unit last stride, one layout): the rotated
    keys and the values go to slots start..start+T-1. hd must be a power of two.
    An 8-bit cache (talis_cli.kv_cache): int8 or float8_e4m3fn k_cache, v_cache and their scales k_scale, v_scale
    fp32 [n_kv_heads, max_seq_len] (one layout); each vector is quantized as it is written.
    """
    T, hd = q.shape[0], cos.shape[1]
    n_heads, n_kv_heads = q.shape[1] // hd, k_cache.shape[0]
    assert hd & (hd - 1) == 0, "head_dim must be a power of two"
    assert cos.shape == (T, hd) and cos.is_contiguous() and sin.is_contiguous(), "cos, sin must be [T, hd]"
    assert k_cache.stride(2) == 1 and v_cache.stride() == k_cache.stride(), "caches must share a contiguous layout"
    assert start + T <= k_cache.shape[1], "the tokens must fit in the cache"
    quant = check_cache(k_cache, v_cache, k_scale, v_scale)
    scale_args = (k_scale[:, start:], v_scale[:, start:]) if quant else (k_cache, v_cache)
    scale_strides = k_scale.stride() if quant else (0, 0)
    for t in (q, k, v):
        assert t.stride(1) == 1, "q, k, v need unit column stride"
    if out is None:
        out = torch.empty((n_heads, T, hd), dtype=q.dtype, device=q.device)
    block_t = 16 if hd >= 128 else 32
    _rotary_to_cache_kernel[(triton.cdiv(T, block_t), n_heads + n_kv_heads)](
        q, k, v, cos, sin, out, k_cache[:, start:], v_cache[:, start:], *scale_args, T, q.stride(0), k.stride(0),
        v.stride(0), k_cache.stride(0), k_cache.stride(1), *scale_strides, n_heads, HD=hd, BLOCK_T=block_t,
        QUANT=quant, FP8=k_cache.dtype == torch.float8_e4m3fn, num_warps=4,
    )
    return out
