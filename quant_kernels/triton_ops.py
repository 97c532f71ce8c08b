"""Small fused Triton kernels for the decode step: each replaces several eager PyTorch launches.

- `rms_norm`: optional residual add (written back in place) + RMSNorm + weight, one pass over the row.
- `silu_mul`: silu(gate) * up.
- `decode_attention`: the whole attention of one new token per row in one launch: rotary on q and k read straight
  from the projection output, k and v written into the static KV cache at the current slot, softmax over the
  filled slots split along the sequence (flash-decoding, so short batches still fill the GPU), the splits merged
  by the last one to finish. The slot is a device tensor, so a CUDA graph can replay the launch; it is one slot
  for a left-padded batch, or one per row with each row in a cache row of its own (continuous batching). The cache
  may be int8 or fp8 (e4m3) with one fp32 scale per head vector (`quantize_heads`, as talis_cli.kv_cache does it
  in torch).

Rounding follows the eager model (talis_cli.model) step by step in the model dtype, so greedy tokens match.
Every function takes [B, features] rows (B the batch, one token each); tensors on CUDA, or on CPU under
TRITON_INTERPRET=1. On Hopper they launch with programmatic dependent launch (quant_kernels.pdl).
"""
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import allow_next_kernel, pdl_args, wait_for_previous_kernel


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, gather_ptr, out_ptr, N, eps, stride_x, stride_r, stride_o,
                     HAS_RES: tl.constexpr, HAS_GATHER: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[r] = w * to_dtype(h * rsqrt(mean(h^2) + eps)), h = x[r] (+ res[r], stored back into res[r]);
    with HAS_GATHER, out[r, j] is that value for feature gather[j]. One program per row."""
    allow_next_kernel(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    # the output's features and their weights are constant: loaded before the wait, like weights
    src = tl.load(gather_ptr + offs, mask=mask, other=0) if HAS_GATHER else offs
    w = tl.load(w_ptr + src, mask=mask, other=0.0).to(tl.float32)
    wait_for_previous_kernel(PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        res = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(res.dtype)
        tl.store(res_ptr + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    normed = (xf * inv_rms).to(x.dtype).to(tl.float32)
    if HAS_GATHER:  # into the consumer's order in registers (re-reading the row in that order cost ~1 us a norm)
        normed = tl.gather(normed, src, 0)
    tl.store(out_ptr + row * stride_o + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None, gather: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, N] (unit column stride); weight [N]; residual [B, N] or None -> normalized [B, N] in weight's dtype.

    With `residual`, the norm is of residual + x, and that sum is written into `residual` (the residual stream).
    `out` ([B, N], unit column stride) receives the result if given. `gather` (int32 [N]) permutes the output's
    features: column j holds feature gather[j] (the order an act-order GEMV reads, triton_backend.input_gather).
    """
    B, N = x.shape
    if out is None:
        out = torch.empty((B, N), dtype=weight.dtype, device=x.device)
    res = residual if residual is not None else x
    _rms_norm_kernel[(B,)](x, res, weight, gather if gather is not None else weight, out, N, eps,
                           x.stride(0), res.stride(0), out.stride(0),
                           HAS_RES=residual is not None, HAS_GATHER=gather is not None,
                           BLOCK=triton.next_power_of_2(N),
                           num_warps=8 if N >= 4096 else 4, **pdl_args(x.device))
    return out


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, gather_ptr, out_ptr, N, stride_g, stride_u, stride_o, BLOCK: tl.constexpr,
                     HAS_GATHER: tl.constexpr, PDL: tl.constexpr):
    """out[b, n] = to_dtype(silu(gate[b, src])) * up[b, src], src = gather[n] or n; grid (B, cdiv(N, BLOCK))."""
    allow_next_kernel(PDL)
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    src = tl.load(gather_ptr + offs, mask=mask, other=0) if HAS_GATHER else offs
    wait_for_previous_kernel(PDL)
    g = tl.load(gate_ptr + b * stride_g + src, mask=mask, other=0.0)
    u = tl.load(up_ptr + b * stride_u + src, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    silu = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + b * stride_o + offs, (silu.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None,
             gather: torch.Tensor | None = None) -> torch.Tensor:
    """gate, up [B, N] (unit column stride) -> silu(gate) * up [B, N] (into `out` if given); `gather` (int32
    [N]) permutes the output's features as in `rms_norm`."""
    B, N = gate.shape
    if out is None:
        out = torch.empty((B, N), dtype=gate.dtype, device=gate.device)
    # Gathered loads touch one sector per element, which an SM's load unit serves one at a time: with a gather,
    # many one-warp programs spread them over the SMs.
    block, warps = (128, 1) if gather is not None else (1024, 4)
    _silu_mul_kernel[(B, triton.cdiv(N, block))](gate, up, gather if gather is not None else gate, out, N,
                                                 gate.stride(0), up.stride(0), out.stride(0), BLOCK=block,
                                                 HAS_GATHER=gather is not None, num_warps=warps,
                                                 **pdl_args(gate.device))
    return out


@triton.jit
def _rotate(src, cos, sin, offs, HD: tl.constexpr):
    """One head [HD] rotated: two products rounded to the model dtype, then their sum, as the eager
    x * cos + rotate_half(x) * sin does."""
    x = tl.load(src + offs)
    x_partner = tl.load(src + (offs + HD // 2) % HD)
    rotated_half = tl.where(offs < HD // 2, -x_partner, x_partner)  # cat(-x2, x1)
    a = (x.to(tl.float32) * cos.to(tl.float32)).to(x.dtype)
    c = (rotated_half.to(tl.float32) * sin.to(tl.float32)).to(x.dtype)
    return (a.to(tl.float32) + c.to(tl.float32)).to(x.dtype)


@triton.jit
def _round_to_e4m3(y):
    """y fp32 with |y| <= 448 rounded to the nearest float8 e4m3 value (ties to even), still in fp32, so the cast
    that stores it is exact (Triton's interpreter rounds some casts wrongly, e.g. -31.89 to -16): steps of
    2^(exponent - 3) in the normal range, 2^-9 below 2^-6 (the subnormals)."""
    exponent = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)
    inv_step = ((3 - exponent + 127) << 23).to(tl.float32, bitcast=True)  # 2^(3 - exponent), exact
    r = y * inv_step  # exact: a power of two
    f = tl.floor(r)
    d = r - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return (f + up.to(tl.float32)) / inv_step


@triton.jit
def quantize_heads(x, FP8: tl.constexpr):
    """Head vectors x [..., HD] (along the last axis) -> (q, scale) with scale fp32 [..., 1]. int8: scale =
    max(max|x|, 1e-8) / 127, q = floor(x / scale + 0.5) clamped to [-127, 127]; FP8: scale = max(max|x|, 1e-8) /
    448, q = x / scale rounded to e4m3. q is fp32 holding those codes exactly. IEEE divisions (div_rn, which
    contraction into an FMA cannot change), so torch's quantization gives the same codes."""
    xf = x.to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(xf), axis=-1, keep_dims=True), 1e-8)
    if FP8:
        scale = tl.math.div_rn(absmax, 448.0)
        q = _round_to_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(xf, scale), -448.0), 448.0))
    else:
        scale = tl.math.div_rn(absmax, 127.0)
        q = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(xf, scale) + 0.5), -127.0), 127.0)
    return q, scale


@triton.jit
def _cached_kv(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, base, scale_base, s0, end, pad, offs_d,
               stride_cs, stride_ss, BLOCK_S: tl.constexpr, QUANT: tl.constexpr):
    """Cached keys and values [BLOCK_S, HD] of slots s0.. (zeros where not visible: >= end or < pad) as stored,
    and with QUANT their scales [BLOCK_S] (else unused zeros)."""
    offs_s = s0 + tl.arange(0, BLOCK_S)
    visible = (offs_s < end) & (offs_s >= pad)
    ptrs = base + offs_s[:, None] * stride_cs + offs_d[None, :]
    k = tl.load(k_cache_ptr + ptrs, mask=visible[:, None], other=0.0)
    v = tl.load(v_cache_ptr + ptrs, mask=visible[:, None], other=0.0)
    if QUANT:
        k_scale = tl.load(k_scale_ptr + scale_base + offs_s * stride_ss, mask=visible, other=0.0)
        v_scale = tl.load(v_scale_ptr + scale_base + offs_s * stride_ss, mask=visible, other=0.0)
    else:
        k_scale = tl.zeros([BLOCK_S], dtype=tl.float32)
        v_scale = k_scale
    return k, v, k_scale, v_scale


@triton.jit
def _as_float(x, scale, dtype: tl.constexpr, QUANT: tl.constexpr):
    """Cached values x [..., HD] in fp32 as the model sees them: with QUANT, x * scale[..., None] rounded to
    `dtype` first (talis_cli.kv_cache.dequantize_heads)."""
    if QUANT:
        return (x.to(tl.float32) * scale[:, None]).to(dtype).to(tl.float32)
    return x.to(tl.float32)


@triton.jit
def _attend_block(q_rows, k, v, k_scale, v_scale, s0, end, pad, scale, m, l, acc, BLOCK_S: tl.constexpr,
                  QUANT: tl.constexpr, PRECISION: tl.constexpr):
    """One block of cached slots s0.. (k, v [BLOCK_S, HD] as stored, their scales with QUANT) folded into the
    online softmax (m, l [16], acc [16, HD] fp32) of the query rows q_rows [16, HD] (model dtype): scores in fp32
    from the exact products of the model-dtype q and keys (PRECISION "ieee" for fp32 models, whose products the
    default tf32 would round), times `scale`; probabilities rounded to the model dtype for the value product, as
    fused attention kernels do."""
    offs_s = s0 + tl.arange(0, BLOCK_S)
    visible = (offs_s < end) & (offs_s >= pad)
    if QUANT:
        k = _as_float(k, k_scale, q_rows.dtype, QUANT).to(q_rows.dtype)
        v = _as_float(v, v_scale, q_rows.dtype, QUANT).to(q_rows.dtype)
    scores = tl.dot(q_rows, tl.trans(k), input_precision=PRECISION) * scale
    scores = tl.where(visible[None, :], scores, float("-inf"))
    m_next = tl.maximum(m, tl.max(scores, axis=1))
    p = tl.exp(scores - m_next[:, None])
    alpha = tl.exp(m - m_next)
    acc = acc * alpha[:, None] + tl.dot(p.to(q_rows.dtype), v, input_precision=PRECISION)
    return m_next, l * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, pad_ptr, rows_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr,
    v_scale_ptr, part_ptr, tickets_ptr, out_ptr, scatter_ptr, stride_q, stride_k, stride_v, stride_cb, stride_ch,
    stride_cs, stride_sb, stride_sh, stride_ss, n_heads, group, chunk, scale, window, SPLITS: tl.constexpr,
    HD: tl.constexpr, BLOCK_S: tl.constexpr, HAS_SCATTER: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PER_ROW: tl.constexpr, QUANT: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr, STAGES: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (b, h, s): head h of row b over cache slots [lo + s*chunk, lo + (s+1)*chunk), one launch for the
    whole step; lo is 0, or with HAS_WINDOW the first slot of the sliding window (slot - window + 1, at least 0),
    so only the window's slots are read.

    - rotates q[b, h] and the new k of kv head h // group (position slot - pad[b], clamped at 0);
    - reads cached keys below `slot` that are not padding (>= pad[b]), and takes the new token's k, v from
      registers, so no program waits for the cache write; the split holding `slot` writes k, v there (once per
      kv head);
    - leaves its softmax partial (acc[HD], max, sum) in part[b, h, s]; the last split to finish (an atomic
      ticket per (b, h)) merges them into out[b, h*HD:(h+1)*HD] (feature f at column scatter[f] with
      HAS_SCATTER) and resets the ticket to 0.

    Decode attention at short contexts is a chain of dependent memory round trips, not a bandwidth problem: the
    first block of cached slots (written only by this layer's launches of earlier steps) and the rotary tables
    load before the wait for the projection that produces q, k, v. The later blocks stream through Triton's
    software pipeline (STAGES blocks in flight) into tl.dot, q being row 0 of a 16-row tile: at many rows and
    long contexts the launch is bandwidth-bound.

    q [B, n_heads*HD], k and v [B, kv_heads*HD] with row strides; cos, sin [max_seq_len, HD] in the model dtype;
    slot int64 [1]; pad int64 [B]; caches [batch, kv_heads, max_seq_len, HD]; part fp32 [B, n_heads, SPLITS,
    HD + 2]; tickets int32 [B * n_heads], zero on entry and exit; out [B, n_heads*HD].
    With PER_ROW, slot is int64 [B] (row b's own slot) and row b reads and writes cache row rows[b] (int64 [B])
    instead of row b.
    With QUANT the caches are int8 (float8 e4m3 with FP8) and k_scale, v_scale fp32 [batch, kv_heads, max_seq_len]
    (strides stride_sb, stride_sh, stride_ss): cached vectors are dequantized to the model dtype where read, and
    the new token's k, v are quantized (quantize_heads) both where stored and where this step uses them, as the
    eager model, which writes them into the cache before it reads it, does.
    """
    allow_next_kernel(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    offs_d = tl.arange(0, HD)
    # slot, pad, rows and the tables are set before the step's first kernel
    if PER_ROW:
        slot = tl.load(slot_ptr + b).to(tl.int32)
        cache_row = tl.load(rows_ptr + b)
    else:
        slot = tl.load(slot_ptr).to(tl.int32)
        cache_row = b
    pad = tl.load(pad_ptr + b).to(tl.int32)
    position = tl.maximum(slot - pad, 0)
    kv_h = h // group
    cols = h * HD + offs_d  # the output columns of this head's features (loaded here, off the merge's path)
    if HAS_SCATTER:
        cols = tl.load(scatter_ptr + cols)
    cos = tl.load(cos_ptr + position * HD + offs_d)
    sin = tl.load(sin_ptr + position * HD + offs_d)
    base = cache_row * stride_cb + kv_h * stride_ch
    scale_base = cache_row * stride_sb + kv_h * stride_sh
    if HAS_WINDOW:
        start = tl.maximum(slot + 1 - window, 0) + split * chunk
    else:
        start = split * chunk
    end = tl.minimum(start + chunk, slot)
    k, v, k_scale, v_scale = _cached_kv(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, base, scale_base, start,
                                        end, pad, offs_d, stride_cs, stride_ss, BLOCK_S, QUANT)
    wait_for_previous_kernel(PDL)
    q = _rotate(q_ptr + b * stride_q + h * HD, cos, sin, offs_d, HD)
    k_new = _rotate(k_ptr + b * stride_k + kv_h * HD, cos, sin, offs_d, HD)
    v_new = tl.load(v_ptr + b * stride_v + kv_h * HD + offs_d)
    if QUANT:  # the new token as the cache will hold it
        k_q, k_new_scale = quantize_heads(k_new[None, :], FP8)
        v_q, v_new_scale = quantize_heads(v_new[None, :], FP8)
        k_q, v_q = tl.reshape(k_q, [HD]), tl.reshape(v_q, [HD])
        k_new_scale, v_new_scale = tl.max(k_new_scale), tl.max(v_new_scale)
        k_new, v_new = (k_q * k_new_scale).to(q.dtype), (v_q * v_new_scale).to(q.dtype)

    # q as row 0 of a tile of 16 (the smallest tensor-core tile): scores and values go through tl.dot, whose
    # operands Triton streams through shared memory in a software pipeline, instead of fp32 copies of every key
    # and value in registers (240 a thread at 64 keys, one program per SM: ~1.6 TB/s at 8-16 rows, 2026-12-01)
    q_rows = tl.where(tl.arange(0, 16)[:, None] == 0, q[None, :], 0.0).to(q.dtype)
    m = tl.full([16], -1e30, tl.float32)  # finite, so a split with no visible key merges with weight 0, not NaN
    l = tl.zeros([16], dtype=tl.float32)
    acc = tl.zeros([16, HD], dtype=tl.float32)
    m, l, acc = _attend_block(q_rows, k, v, k_scale, v_scale, start, end, pad, scale, m, l, acc, BLOCK_S, QUANT,
                              PRECISION)
    for s0 in tl.range(start + BLOCK_S, end, BLOCK_S, num_stages=STAGES):
        k, v, k_scale, v_scale = _cached_kv(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, base, scale_base,
                                            s0, end, pad, offs_d, stride_cs, stride_ss, BLOCK_S, QUANT)
        m, l, acc = _attend_block(q_rows, k, v, k_scale, v_scale, s0, end, pad, scale, m, l, acc, BLOCK_S, QUANT,
                                  PRECISION)
    first = tl.arange(0, 16) == 0  # back to q's row alone
    m = tl.max(tl.where(first, m, -1e30), axis=0)
    l = tl.sum(tl.where(first, l, 0.0), axis=0)
    acc = tl.sum(tl.where(first[:, None], acc, 0.0), axis=0)
    qf = q.to(tl.float32) * scale
    if (slot >= start) & (slot < start + chunk):  # this split holds the new token
        score = tl.sum(k_new.to(tl.float32) * qf, axis=0)
        m_next = tl.maximum(m, score)
        p = tl.exp(score - m_next)
        alpha = tl.exp(m - m_next)
        acc = acc * alpha + p * v_new.to(tl.float32)
        l = l * alpha + p
        m = m_next
        if h % group == 0:
            new = base + slot * stride_cs + offs_d
            if QUANT:
                tl.store(k_cache_ptr + new, k_q.to(k_cache_ptr.dtype.element_ty))
                tl.store(v_cache_ptr + new, v_q.to(v_cache_ptr.dtype.element_ty))
                tl.store(k_scale_ptr + scale_base + slot * stride_ss, k_new_scale)
                tl.store(v_scale_ptr + scale_base + slot * stride_ss, v_new_scale)
            else:
                tl.store(k_cache_ptr + new, k_new)
                tl.store(v_cache_ptr + new, v_new)

    row = b * n_heads + h
    if SPLITS == 1:  # nothing to merge
        tl.store(out_ptr + b * n_heads * HD + cols, (acc / l).to(out_ptr.dtype.element_ty))
        return
    part = part_ptr + (row * SPLITS + split) * (HD + 2)
    tl.store(part + offs_d, acc)
    tl.store(part + HD, m)
    tl.store(part + HD + 1, l)
    tl.debug_barrier()  # every thread's partial stored before the ticket (acq_rel) says this split is in
    ticket = tl.atomic_add(tickets_ptr + row, 1)
    if ticket == SPLITS - 1:
        offs_s = tl.arange(0, SPLITS)
        parts = part_ptr + row * SPLITS * (HD + 2) + offs_s * (HD + 2)
        # .cg reads through L2: other programs' partials are not in this SM's L1
        ms = tl.load(parts + HD, cache_modifier=".cg")
        ls = tl.load(parts + HD + 1, cache_modifier=".cg")
        accs = tl.load(parts[:, None] + offs_d[None, :], cache_modifier=".cg")
        weight = tl.exp(ms - tl.max(ms, axis=0))
        y = tl.sum(accs * weight[:, None], axis=0) / tl.sum(ls * weight, axis=0)
        tl.store(out_ptr + b * n_heads * HD + cols, y.to(out_ptr.dtype.element_ty))
        tl.store(tickets_ptr + row, 0)


CODE_DTYPES = (torch.int8, torch.float8_e4m3fn)  # the 8-bit caches


def check_cache(k_cache, v_cache, k_scale, v_scale) -> bool:
    """Whether the caches hold 8-bit codes (then with their scales, all of one layout and dtype), else floats."""
    quant = k_cache.dtype in CODE_DTYPES
    assert v_cache.dtype == k_cache.dtype, "k_cache and v_cache must share a dtype"
    assert not quant or (k_scale is not None and v_scale is not None and v_scale.stride() == k_scale.stride()), \
        "an 8-bit cache needs k_scale, v_scale of one layout"
    return quant


@dataclass(frozen=True)
class AttentionLaunch:
    """How one decode-attention launch covers the cache: `splits` programs per (row, head), each over `chunk`
    slots, read `block` slots per loop iteration by `warps` warps, with `stages` blocks in flight (Triton's
    software pipeline through shared memory)."""
    splits: int
    chunk: int
    block: int = 128
    warps: int = 4
    stages: int = 2


def attention_launch(capacity: int, programs: int, sms: int, block: int | None = None, warps: int = 4,
                     stages: int | None = None, per_sm: int | None = None,
                     min_chunk: int | None = None) -> AttentionLaunch:
    """The launch for keys up to `capacity` over `programs` = batch * heads (row, head) pairs: splits a power of
    two (the merge loads them as one block) while programs * splits stays below per_sm * sms and chunks keep at
    least `min_chunk` keys (default: one block). per_sm defaults to TALIS_ATTENTION_PROGRAMS_PER_SM, else 1.
    Blocks of 128 slots two stages deep, or above 3 programs per SM, 32 slots three deep (smaller programs, more
    of them resident): the fastest or within 3.5% of it in scripts/sweep_attention.py on an H200 for 7B at 1-32
    rows and 256 or 2048 slots, except 1 row at 2048 (10.0 us against 9.5) (BENCHMARKS.md, 2026-12-01, eleventh
    session). Arguments given override the choice."""
    many = programs > 3 * sms  # 7B: 16 rows and more on 132 SMs
    block = block or (32 if many else 128)
    stages = stages or (3 if many else 2)
    if per_sm is None:
        per_sm = int(os.environ.get("TALIS_ATTENTION_PROGRAMS_PER_SM", "1"))
    min_chunk = min_chunk or block
    splits = 1
    while splits < 64 and programs * splits < per_sm * sms and capacity > min_chunk * splits:
        splits *= 2
    return AttentionLaunch(splits, triton.cdiv(capacity, splits), block, warps, stages)


_TICKETS: dict = {}
_RETIRED: list = []  # outgrown ticket buffers: CUDA graphs captured with them still use them
MIN_TICKETS = 8192  # (batch lanes x heads) served without growing: 64 lanes of 128 heads


def _tickets(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 tickets, one buffer per device, grown on demand (first grown by an eager run, outside any
    CUDA-graph capture); kernels leave them zero. An outgrown buffer is kept, not freed: graphs captured with it
    (smaller batches) go on using it, and freed memory reused by another tensor would be corrupted by their
    atomics."""
    have = _TICKETS.get(device)
    if have is None or have.numel() < count:
        if have is not None:
            _RETIRED.append(have)
        have = _TICKETS[device] = torch.zeros(max(count, MIN_TICKETS), dtype=torch.int32, device=device)
    return have


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     slot: torch.Tensor, pad_lens: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     capacity: int, n_sms: int = 132, out: torch.Tensor | None = None,
                     scatter: torch.Tensor | None = None, window: int | None = None,
                     rows: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, launch: AttentionLaunch | None = None) -> torch.Tensor:
    """Attention of one new token per row: rotary on q and k, k and v stored at cache slot `slot`, softmax over
    slots [max(pad_lens[b], slot - window + 1), slot]; returns [B, n_heads * hd] in q's dtype (into `out`,
    contiguous, if given).
    `scatter` (int32 [n_heads * hd]) writes feature f to column scatter[f]: pass triton_backend.input_scatter of an
    act-order o_proj to hand it its input in the order it reads.

    q [B, n_heads*hd], k and v [B, n_kv_heads*hd] (unit column stride, e.g. views of a fused projection);
    cos, sin [max_seq_len, hd]; slot int64 [1]; pad_lens int64 [B]; caches [batch, n_kv_heads, max_seq_len, hd].
    `capacity` (> slot) fixes the launch shape, so one CUDA graph serves every slot below it. With a sliding
    `window` (a query sees the keys less than `window` slots back), only those slots are read, and a capacity of
    at least `window` serves every slot.
    Rows at their own positions: with `rows` (int64 [B], distinct except for lanes whose output is ignored), row b
    uses cache row rows[b] and its own slot, slot int64 [B] (capacity > every slot); pass pad_lens zeros.
    An 8-bit cache (talis_cli.kv_cache): int8 or float8_e4m3fn caches and their scales k_scale, v_scale fp32
    [batch, n_kv_heads, max_seq_len] (one layout); the new token's k, v are quantized in the kernel, stored and
    used as stored.
    `launch` overrides attention_launch's choice (scripts/sweep_attention.py compares them).
    """
    B = q.shape[0]
    hd = cos.shape[1]
    assert hd >= 16 and hd & (hd - 1) == 0, "head_dim must be a power of two of at least 16 (a tl.dot operand)"
    # (talis_cli.fast_decode.attention_kernel_takes keeps other models on the plain path)
    per_row = rows is not None
    assert slot.numel() == (B if per_row else 1), "slot: one per row with `rows`, else one for the batch"
    n_heads, n_kv_heads = q.shape[1] // hd, k_cache.shape[1]
    assert k_cache.stride(3) == 1 and v_cache.stride() == k_cache.stride(), "caches must share a contiguous layout"
    quant = check_cache(k_cache, v_cache, k_scale, v_scale)
    scale_strides = k_scale.stride() if quant else (0, 0, 0)
    launch = launch or attention_launch(capacity, B * n_heads, n_sms)
    splits = launch.splits
    parts = torch.empty((B, n_heads, splits, hd + 2), dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty((B, n_heads * hd), dtype=q.dtype, device=q.device)
    _decode_attention_kernel[(B, n_heads, splits)](
        q, k, v, cos, sin, slot, pad_lens, rows if per_row else slot, k_cache, v_cache,
        k_scale if quant else k_cache, v_scale if quant else v_cache, parts, _tickets(q.device, B * n_heads), out,
        scatter if scatter is not None else out, q.stride(0), k.stride(0), v.stride(0), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), *scale_strides, n_heads, n_heads // n_kv_heads, launch.chunk,
        hd ** -0.5, window or 0, SPLITS=splits, HD=hd, BLOCK_S=launch.block, HAS_SCATTER=scatter is not None,
        HAS_WINDOW=window is not None, PER_ROW=per_row, QUANT=quant, FP8=k_cache.dtype == torch.float8_e4m3fn,
        STAGES=launch.stages, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=launch.warps,
        **pdl_args(q.device),
    )
    return out
