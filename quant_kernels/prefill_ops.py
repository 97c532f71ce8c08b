"""Triton kernels of the prefill path (talis_cli.fast_prefill): the work between the projections that the eager
model spreads over many small launches. Both take a ragged batch: the tokens of several prompts (or chunks of
them) back to back, each token with its own cache row and slot, so one launch per layer serves every newcomer of a
scheduler step, and a CUDA graph can replay any mix of them (the layout lives in device tensors, not in the
launch).

- `rotary_to_cache`: rotary on q and k of T tokens, q written out for `ragged_attention`, k and v written straight
  into the KV cache at each token's (row, slot). The eager forward spends ~20 launches per layer on this
  (reshapes, rotate_half's chunk and cat, products, the cache copies). An 8-bit cache (int8 or fp8) gets each key
  and value vector quantized as it is written (triton_ops.quantize_heads).
- `ragged_attention`: causal attention of those queries over their cache rows (the prompt's earlier slots and the
  keys just written), a block of queries of one prompt per program, online softmax over blocks of keys (the
  method of FlashAttention, Dao et al. 2022), sliding windows and 8-bit caches included.

Rounding follows the eager model (talis_cli.model.apply_rotary): both products rounded to the model dtype, then
their sum, as `triton_ops._rotate` does for one token; an 8-bit cache is read back as
talis_cli.kv_cache.dequantize_heads gives it. Tensors on CUDA, or on CPU under TRITON_INTERPRET=1.
"""
import torch
import triton
import triton.language as tl

from .triton_ops import check_cache, quantize_heads

BLOCK_M = 64  # queries per ragged_attention program (one prompt's consecutive tokens)


@triton.jit
def _rotary_to_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, row_ptr, slot_ptr, q_out_ptr,
                            k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, T, stride_q, stride_k, stride_v,
                            stride_cb, stride_ch, stride_cs, stride_sb, stride_sh, stride_ss, n_heads,
                            HD: tl.constexpr, BLOCK_T: tl.constexpr, QUANT: tl.constexpr, FP8: tl.constexpr):
    """Program (t, h): tokens [t*BLOCK_T, (t+1)*BLOCK_T) of head h, h < n_heads a query head, else kv head
    h - n_heads. Token i is rotated by row pos[i] of cos, sin [*, HD]; a kv head's key and value go to slot
    slot[i] of cache row row[i] (nowhere when slot[i] < 0: padding).

    q [T, n_heads*HD], k, v [T, kv_heads*HD] with row strides; q_out [T, n_heads*HD] contiguous; the caches
    [batch, kv_heads, slots, HD] (strides stride_cb, stride_ch, stride_cs, 1). With QUANT the caches are int8
    (float8 e4m3 with FP8) and k_scale, v_scale fp32 [batch, kv_heads, slots] (strides stride_sb, stride_sh,
    stride_ss): each vector is stored quantized, its scale beside it.
    """
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    offs_d = tl.arange(0, HD)
    in_range = offs_t < T
    mask = in_range[:, None]
    position = tl.load(pos_ptr + offs_t, mask=in_range, other=0)
    table = position[:, None] * HD + offs_d[None, :]
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
        tl.store(q_out_ptr + offs_t[:, None] * (n_heads * HD) + h * HD + offs_d[None, :], out, mask=mask)
    else:
        kv_h = h - n_heads
        row = tl.load(row_ptr + offs_t, mask=in_range, other=0)
        slot = tl.load(slot_ptr + offs_t, mask=in_range, other=-1)
        mask = (in_range & (slot >= 0))[:, None]
        slot = tl.maximum(slot, 0)
        cache = row[:, None] * stride_cb + kv_h * stride_ch + slot[:, None] * stride_cs + offs_d[None, :]
        v = tl.load(v_ptr + offs_t[:, None] * stride_v + kv_h * HD + offs_d[None, :], mask=mask, other=0.0)
        if QUANT:
            scales = row[:, None] * stride_sb + kv_h * stride_sh + slot[:, None] * stride_ss  # [BLOCK_T, 1]
            k_q, k_scale = quantize_heads(out, FP8)
            v_q, v_scale = quantize_heads(v, FP8)
            tl.store(k_cache_ptr + cache, k_q.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(v_cache_ptr + cache, v_q.to(v_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(k_scale_ptr + scales, k_scale, mask=mask)
            tl.store(v_scale_ptr + scales, v_scale, mask=mask)
        else:
            tl.store(k_cache_ptr + cache, out.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(v_cache_ptr + cache, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _cache_strides(k_cache, v_cache, k_scale, v_scale) -> tuple[bool, tuple, tuple]:
    """(8-bit?, (k_scale, v_scale) or placeholders, their strides) of one layer's cache [batch, kv_heads, S, hd]."""
    assert k_cache.stride(3) == 1 and v_cache.stride() == k_cache.stride(), "caches must share a contiguous layout"
    quant = check_cache(k_cache, v_cache, k_scale, v_scale)
    return quant, ((k_scale, v_scale) if quant else (k_cache, v_cache)), (k_scale.stride() if quant else (0, 0, 0))


def rotary_to_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    positions: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, out: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary and cache write of T tokens, each at its own place; returns the rotated queries [T, n_heads*hd] in
    q's dtype (into `out`, contiguous, if given).

    q [T, n_heads*hd], k and v [T, n_kv_heads*hd] (unit column stride: views of a fused projection are fine);
    cos, sin [P, hd] contiguous tables; positions, rows, slots int64 [T] on q's device: token i is rotated by
    table row positions[i] and its key and value go to slot slots[i] of cache row rows[i] (slots[i] = -1: not
    stored, for padding); k_cache, v_cache [batch, n_kv_heads, max_seq_len, hd] (one layer of
    talis_cli.kv_cache.KVCache). hd must be a power of two.
    An 8-bit cache (talis_cli.kv_cache): int8 or float8_e4m3fn k_cache, v_cache and their scales k_scale, v_scale
    fp32 [batch, n_kv_heads, max_seq_len] (one layout); each vector is quantized as it is written.
    """
    T, hd = q.shape[0], cos.shape[1]
    n_heads, n_kv_heads = q.shape[1] // hd, k_cache.shape[1]
    assert hd & (hd - 1) == 0, "head_dim must be a power of two"
    assert cos.is_contiguous() and sin.is_contiguous() and cos.shape == sin.shape, "cos, sin must be [P, hd]"
    assert positions.shape == rows.shape == slots.shape == (T,), "one position, row and slot per token"
    quant, scales, scale_strides = _cache_strides(k_cache, v_cache, k_scale, v_scale)
    for t in (q, k, v):
        assert t.stride(1) == 1, "q, k, v need unit column stride"
    if out is None:
        out = torch.empty((T, n_heads * hd), dtype=q.dtype, device=q.device)
    block_t = 16 if hd >= 128 else 32
    _rotary_to_cache_kernel[(triton.cdiv(T, block_t), n_heads + n_kv_heads)](
        q, k, v, cos, sin, positions, rows, slots, out, k_cache, v_cache, *scales, T, q.stride(0), k.stride(0),
        v.stride(0), *k_cache.stride()[:3], *scale_strides, n_heads, HD=hd, BLOCK_T=block_t, QUANT=quant,
        FP8=k_cache.dtype == torch.float8_e4m3fn, num_warps=4,
    )
    return out


@triton.jit
def _ragged_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_ptr, out_ptr,
                             stride_cb, stride_ch, stride_cs, stride_sb, stride_sh, stride_ss, n_heads, group, scale,
                             window, HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             HAS_WINDOW: tl.constexpr, QUANT: tl.constexpr, IEEE: tl.constexpr):
    """Program (j, h): the queries of block j for head h. block[j] = (cache row, index of its first query in q,
    query count <= BLOCK_M, slot of its first query); a count of 0 is an unused entry. Query i of the block sits
    at slot start + i of the row and sees the row's keys at slots 0..start + i (with HAS_WINDOW only the last
    `window` of them), keys it finds in the cache (rotary_to_cache has written the block's own).

    q [T, n_heads*HD] contiguous; caches [batch, kv_heads, slots, HD] (strides stride_c*, unit last), with QUANT
    8-bit codes whose fp32 scales [batch, kv_heads, slots] have strides stride_s*; out [T, n_heads*HD].
    """
    j = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(block_ptr + 4 * j)
    first = tl.load(block_ptr + 4 * j + 1)
    count = tl.load(block_ptr + 4 * j + 2)
    start = tl.load(block_ptr + 4 * j + 3)
    if count > 0:
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HD)
        offs_n = tl.arange(0, BLOCK_N)
        valid = offs_m < count
        q_slot = start + offs_m
        at = (first + offs_m)[:, None] * (n_heads * HD) + h * HD + offs_d[None, :]
        q = tl.load(q_ptr + at, mask=valid[:, None], other=0.0)
        kv_h = h // group
        base = row * stride_cb + kv_h * stride_ch
        scale_base = row * stride_sb + kv_h * stride_sh
        end = start + count  # keys at slots below it
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(start - window + 1, 0)
        m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)  # finite: a query with no key yet stays NaN-free
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HD], dtype=tl.float32)
        for s0 in range(lo, end, BLOCK_N):
            offs_s = s0 + offs_n
            present = offs_s < end
            kv_at = base + offs_s[:, None] * stride_cs + offs_d[None, :]
            k = tl.load(k_cache_ptr + kv_at, mask=present[:, None], other=0.0)
            v = tl.load(v_cache_ptr + kv_at, mask=present[:, None], other=0.0)
            if QUANT:  # as the eager model reads them: code * scale, rounded to the model dtype
                scale_at = scale_base + offs_s * stride_ss
                k_scale = tl.load(k_scale_ptr + scale_at, mask=present, other=0.0)
                v_scale = tl.load(v_scale_ptr + scale_at, mask=present, other=0.0)
                k = (k.to(tl.float32) * k_scale[:, None]).to(q.dtype)
                v = (v.to(tl.float32) * v_scale[:, None]).to(q.dtype)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                scores = tl.dot(q, tl.trans(k)) * scale
            visible = present[None, :] & (offs_s[None, :] <= q_slot[:, None])
            if HAS_WINDOW:
                visible = visible & (offs_s[None, :] > q_slot[:, None] - window)
            scores = tl.where(visible, scores, float("-inf"))
            m_next = tl.maximum(m_i, tl.max(scores, axis=1))
            p = tl.exp(scores - m_next[:, None])
            alpha = tl.exp(m_i - m_next)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_next
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # 0 only in rows past count, which are not stored
        tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=valid[:, None])


def query_blocks(segments, block_m: int = BLOCK_M) -> list[tuple[int, int, int, int]]:
    """The ragged_attention blocks of `segments` [(token count, first slot, cache row)] laid back to back:
    (cache row, first query index, query count, first query slot) for each run of at most `block_m` queries of
    one segment."""
    blocks, offset = [], 0
    for T, start, row in segments:
        for i in range(0, T, block_m):
            blocks.append((row, offset + i, min(block_m, T - i), start + i))
        offset += T
    return blocks


def ragged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                     window: int | None = None, out: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of a ragged batch of queries over their cache rows -> [T, n_heads*hd] in q's dtype (into
    `out`, contiguous, if given; rows no block covers are left as they are).

    q [T, n_heads*hd] contiguous, rotated (rotary_to_cache's output); k_cache, v_cache [batch, n_kv_heads,
    max_seq_len, hd], already holding every key and value the queries see (theirs included); blocks int64 [NB, 4]
    on q's device, query_blocks' entries (rows of zeros are unused entries, so a CUDA graph can replay a table of
    fixed size; int32 entries would make the kernel's cache offsets 32-bit, wrong past 2**31 elements); `window`:
    a query sees only the keys less than `window` slots back (Mistral's sliding window). An 8-bit cache: int8 or
    float8_e4m3fn codes and their fp32 scales k_scale, v_scale [batch, n_kv_heads, max_seq_len], read back as
    talis_cli.kv_cache.dequantize_heads gives them. Scores are scaled by hd ** -0.5; grouped-query attention takes
    query head h to kv head h // (n_heads // n_kv_heads).
    """
    T = q.shape[0]
    n_kv_heads, hd = k_cache.shape[1], k_cache.shape[3]
    n_heads = q.shape[1] // hd
    assert q.is_contiguous() and blocks.dim() == 2 and blocks.shape[1] == 4, "q contiguous, blocks [NB, 4]"
    quant, scales, scale_strides = _cache_strides(k_cache, v_cache, k_scale, v_scale)
    if out is None:
        out = torch.empty((T, n_heads * hd), dtype=q.dtype, device=q.device)
    if blocks.shape[0]:
        _ragged_attention_kernel[(blocks.shape[0], n_heads)](
            q, k_cache, v_cache, *scales, blocks, out, *k_cache.stride()[:3], *scale_strides, n_heads,
            n_heads // n_kv_heads, hd ** -0.5, window or 0, HD=hd, BLOCK_M=BLOCK_M, BLOCK_N=64,
            HAS_WINDOW=window is not None, QUANT=quant, IEEE=q.dtype == torch.float32, num_warps=4,
        )
    return out
