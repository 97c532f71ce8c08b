"""Small fused Triton kernels for the decode step: each replaces several eager PyTorch launches.

- `rms_norm`: optional residual add (written back in place) + RMSNorm + weight, one pass over the row.
- `rotary_cache_write`: rotary embedding of q and k read straight from the projection output, k and v written
  into the static KV cache at the current slot; the slot is a device tensor, so a CUDA graph can replay it.
- `silu_mul`: silu(gate) * up.
- `decode_attention`: one query token per row against the filled slots of the static cache, split along the
  sequence (flash-decoding) so short batches still fill the GPU; a second tiny kernel merges the splits.

Rounding follows the eager model (talis_cli.model) step by step in the model dtype, so greedy tokens match.
Every function takes [B, features] rows (B the batch, one token each); tensors on CUDA, or on CPU under
TRITON_INTERPRET=1.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, N, eps, stride_x, stride_r, stride_o,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """out[r] = w * to_dtype(h * rsqrt(mean(h^2) + eps)), h = x[r] (+ res[r], stored back into res[r])."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        res = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(res.dtype)
        tl.store(res_ptr + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    normed = (xf * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, N] (unit column stride); weight [N]; residual [B, N] or None -> normalized [B, N] in weight's dtype.

    With `residual`, the norm is of residual + x, and that sum is written into `residual` (the residual stream).
    `out` ([B, N], unit column stride) receives the result if given.
    """
    B, N = x.shape
    if out is None:
        out = torch.empty((B, N), dtype=weight.dtype, device=x.device)
    res = residual if residual is not None else x
    _rms_norm_kernel[(B,)](x, res, weight, out, N, eps, x.stride(0), res.stride(0), out.stride(0),
                           HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(N),
                           num_warps=8 if N >= 4096 else 4)
    return out


@triton.jit
def _rotary_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, pad_ptr, q_out_ptr, k_cache_ptr,
                         v_cache_ptr, stride_q, stride_k, stride_v, stride_cb, stride_ch, stride_cs,
                         n_heads, n_kv_heads, HD: tl.constexpr):
    """Program (b, h): h < n_heads rotates q head h into q_out [B, n_heads, HD]; the next n_kv_heads rotate k
    heads into k_cache[b, h', slot]; the last n_kv_heads copy v heads into v_cache[b, h', slot].

    cos, sin: [max_seq_len, HD] tables in the model dtype; the rotary position of row b is slot - pad[b]
    (clamped at 0). slot: int64 [1]; pad: int64 [B]. Caches: [batch, kv_heads, max_seq_len, HD].
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, HD)
    half: tl.constexpr = HD // 2
    partner = (offs + half) % HD
    slot = tl.load(slot_ptr)
    position = tl.maximum(slot - tl.load(pad_ptr + b), 0)
    if h < n_heads + n_kv_heads:
        if h < n_heads:
            src = q_ptr + b * stride_q + h * HD
        else:
            src = k_ptr + b * stride_k + (h - n_heads) * HD
        x = tl.load(src + offs)
        x_partner = tl.load(src + partner)
        rotated_half = tl.where(offs < half, -x_partner, x_partner)  # cat(-x2, x1)
        cos = tl.load(cos_ptr + position * HD + offs)
        sin = tl.load(sin_ptr + position * HD + offs)
        # two products rounded to the model dtype, then their sum: what x * cos + rotate_half(x) * sin gives
        a = (x.to(tl.float32) * cos.to(tl.float32)).to(x.dtype)
        c = (rotated_half.to(tl.float32) * sin.to(tl.float32)).to(x.dtype)
        y = (a.to(tl.float32) + c.to(tl.float32)).to(x.dtype)
        if h < n_heads:
            tl.store(q_out_ptr + (b * n_heads + h) * HD + offs, y)
        else:
            dst = k_cache_ptr + b * stride_cb + (h - n_heads) * stride_ch + slot * stride_cs
            tl.store(dst + offs, y)
    else:
        kv_h = h - n_heads - n_kv_heads
        v = tl.load(v_ptr + b * stride_v + kv_h * HD + offs)
        tl.store(v_cache_ptr + b * stride_cb + kv_h * stride_ch + slot * stride_cs + offs, v)


def rotary_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       slot: torch.Tensor, pad_lens: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       n_heads: int, n_kv_heads: int, q_out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate q, k of one new token per row; store k, v at cache slot `slot`; return rotated q [B, n_heads, hd].

    q [B, n_heads*hd], k and v [B, n_kv_heads*hd] (unit column stride, e.g. views of a fused projection);
    cos, sin [max_seq_len, hd]; slot int64 [1]; pad_lens int64 [B]; caches [batch, n_kv_heads, max_seq_len, hd];
    `q_out` (contiguous [B, n_heads, hd]) receives the rotated q if given.
    """
    B = q.shape[0]
    hd = cos.shape[1]
    assert k_cache.stride(3) == 1 and v_cache.stride() == k_cache.stride(), "caches must share a contiguous layout"
    if q_out is None:
        q_out = torch.empty((B, n_heads, hd), dtype=q.dtype, device=q.device)
    _rotary_cache_kernel[(B, n_heads + 2 * n_kv_heads)](
        q, k, v, cos, sin, slot, pad_lens, q_out, k_cache, v_cache, q.stride(0), k.stride(0), v.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), n_heads, n_kv_heads, HD=hd, num_warps=1,
    )
    return q_out


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, N, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
    """out[b, n] = to_dtype(silu(gate[b, n])) * up[b, n]; grid (B, cdiv(N, BLOCK))."""
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(gate_ptr + b * stride_g + offs, mask=mask, other=0.0)
    u = tl.load(up_ptr + b * stride_u + offs, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    silu = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + b * stride_o + offs, (silu.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate, up [B, N] (unit column stride) -> silu(gate) * up [B, N] (into `out` if given)."""
    B, N = gate.shape
    if out is None:
        out = torch.empty((B, N), dtype=gate.dtype, device=gate.device)
    block = 1024
    _silu_mul_kernel[(B, triton.cdiv(N, block))](gate, up, out, N, gate.stride(0), up.stride(0), out.stride(0),
                                                 BLOCK=block, num_warps=4)
    return out


@triton.jit
def _attention_split_kernel(q_ptr, k_ptr, v_ptr, slot_ptr, pad_ptr, part_ptr, stride_cb, stride_ch, stride_cs,
                            n_heads, group, chunk, scale, SPLITS: tl.constexpr, HD: tl.constexpr,
                            BLOCK_S: tl.constexpr):
    """Program (b, h, s): softmax partials of q[b, h] over keys [s*chunk, (s+1)*chunk) that are filled
    (< slot + 1) and not padding (>= pad[b]). Writes part[b, h, s] = (acc[HD], running max, sum of exp).

    q: [B, n_heads, HD]; caches: [batch, kv_heads, max_seq_len, HD]; kv head = h // group.
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    offs_d = tl.arange(0, HD)
    n_keys = tl.load(slot_ptr).to(tl.int32) + 1
    pad = tl.load(pad_ptr + b).to(tl.int32)
    q = tl.load(q_ptr + (b * n_heads + h) * HD + offs_d).to(tl.float32) * scale
    base = b * stride_cb + (h // group) * stride_ch
    start = split * chunk
    end = tl.minimum(start + chunk, n_keys)
    m = -1e30  # finite, so a split with no visible key merges as weight 0 without NaN
    l = 0.0
    acc = tl.zeros([HD], dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        visible = (offs_s < end) & (offs_s >= pad)
        ptrs = base + offs_s[:, None] * stride_cs + offs_d[None, :]
        k = tl.load(k_ptr + ptrs, mask=visible[:, None], other=0.0).to(tl.float32)
        scores = tl.where(visible, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + ptrs, mask=visible[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new
    out = part_ptr + ((b * n_heads + h) * SPLITS + split) * (HD + 2)
    tl.store(out + offs_d, acc)
    tl.store(out + HD, m)
    tl.store(out + HD + 1, l)


@triton.jit
def _attention_merge_kernel(part_ptr, out_ptr, n_heads, SPLITS: tl.constexpr, HD: tl.constexpr):
    """Program (b, h): out[b, h*HD:(h+1)*HD] = softmax-weighted merge of the SPLITS partials."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, HD)
    base = part_ptr + (b * n_heads + h) * SPLITS * (HD + 2) + offs_s * (HD + 2)
    m = tl.load(base + HD)
    l = tl.load(base + HD + 1)
    acc = tl.load(base[:, None] + offs_d[None, :])
    weight = tl.exp(m - tl.max(m, axis=0))
    y = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(out_ptr + (b * n_heads + h) * HD + offs_d, y.to(out_ptr.dtype.element_ty))


def attention_splits(capacity: int, rows: int, sms: int) -> tuple[int, int]:
    """(splits, chunk) for keys up to `capacity` over `rows` = batch * heads programs: about two programs per SM,
    chunks of at least 64 keys, splits a power of two (the merge kernel loads them as one block)."""
    splits = 1
    while splits < 64 and rows * splits < 2 * sms and capacity > 64 * splits:
        splits *= 2
    return splits, triton.cdiv(capacity, splits)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor,
                     pad_lens: torch.Tensor, capacity: int, n_sms: int = 132, out: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Attention of one new token per row over cache slots [pad_lens[b], slot]; returns [B, n_heads * hd].

    q [B, n_heads, hd] (already rotated); caches [batch, n_kv_heads, max_seq_len, hd]; slot int64 [1];
    pad_lens int64 [B]. `capacity` (>= slot + 1) fixes the launch shape, so one CUDA graph serves every slot
    below it. `out` (contiguous [B, n_heads * hd]) receives the result if given.
    """
    B, n_heads, hd = q.shape
    n_kv_heads = k_cache.shape[1]
    splits, chunk = attention_splits(capacity, B * n_heads, n_sms)
    parts = torch.empty((B, n_heads, splits, hd + 2), dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty((B, n_heads * hd), dtype=q.dtype, device=q.device)
    _attention_split_kernel[(B, n_heads, splits)](
        q, k_cache, v_cache, slot, pad_lens, parts, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        n_heads, n_heads // n_kv_heads, chunk, hd ** -0.5, SPLITS=splits, HD=hd, BLOCK_S=32, num_warps=4,
    )
    _attention_merge_kernel[(B, n_heads)](parts, out, n_heads, SPLITS=splits, HD=hd, num_warps=1)
    return out
