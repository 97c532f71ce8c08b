"""Fused dequantize + tensor-core product for 3-128 rows of activations (a server's decode batch, a short prefill).

The GEMV (triton_gemv) multiplies each row by the unpacked weights on the CUDA cores, so its cost grows with the
rows (on an H200 eight rows of the 7B layers cost 2.5-3.0x one row, BENCHMARKS.md 2026-12-01, eighth session).
Here each program unpacks a tile of 2-, 4- or 8-bit weights to fp16 once, in registers, and hands it to `tl.dot`
with a tile of BLOCK_M rows (16-128, padded), so the rows ride on the tensor cores. Per pair of weights the
unpacking is one shift, one lop3 and one exact fp16x2 subtraction of the zero point (`_weight_tile`), written
straight into the tensor cores' registers; up to 32 rows the scale multiplies the tile's fp32 product instead of
every weight. The weight tile is the left operand, which Hopper's wgmma takes from registers, and the rows are the
narrow right operand. On an H200 the 7B layers took the same time at 2 and at 16 rows (o 8.3 us, gate_up 23.8 us:
36-74% of the copy bandwidth; the four layers 1.2x a one-row GEMV) and at 128 rows beat dequantize + cuBLAS (down
35 us against 73) (BENCHMARKS.md, 2026-12-01, ninth session; scripts/skinny_sass.py counts the instructions per
weight). K is split over programs (split-K) so that narrow layers still occupy every SM; partial sums meet in the
GEMV's fp32 workspace through atomic adds, and the last program of a tile (an atomic ticket) writes it out and
zeroes its workspace again, as in the GEMV. Act-order rows are gathered into the weight's row order once per call.

Weights in the kernel layout of triton_backend.prepare_weight (`triton_gemv.word_slot`); 3-bit weights (units of
three words) are not served here. A tile never spans two quantization groups: BLOCK_K divides the group size.
"""
import torch
import triton
import triton.language as tl

from .autotune_cache import Tuner, generated_configs, interpreting
from .triton_gemv import Workspace, _fp16_halves

SKINNY_BITS = (2, 4, 8)
MAX_SKINNY_ROWS = 128  # rows per launch at most (BLOCK_M 128: a short prompt's prefill)


@triton.jit
def _fp16x2(values):
    """int32 words holding fp16 `values` (fp32 in) in both halves."""
    half = values.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return half | (half << 16)


# $0 = (($1 >> $2) & $3) | $4 - $5 on two fp16 lanes: unpack a pair of weights (the mask $3 and the exponent $4 make
# each half 2**(10 - o) + q) and subtract 2**(10 - o) + zero ($5), exactly; _SCALED_PAIR_ASM multiplies by the
# scale ($6) besides.
_PAIR_ASM = tl.constexpr("{ .reg .b32 t;\n shr.u32 t, $1, $2;\n lop3.b32 t, t, $3, $4, 0xea;\n sub.f16x2 $0, t, $5; }")
_SCALED_PAIR_ASM = tl.constexpr("{ .reg .b32 t;\n shr.u32 t, $1, $2;\n lop3.b32 t, t, $3, $4, 0xea;\n"
                                " sub.f16x2 t, t, $5;\n mul.f16x2 $0, t, $6; }")


@triton.jit
def _weight_tile(qweight_ptr, scale_zero_ptr, offs_w, offs_n, mask_w, mask_n, N, group, BITS: tl.constexpr,
                 BLOCK_K: tl.constexpr, SCALED: tl.constexpr, EMULATE: tl.constexpr):
    """fp16 [BLOCK_N, BLOCK_K] (K contiguous): q - zero, times the scale if SCALED, of words offs_w (one group) and
    columns offs_n; also the group's scales (fp32 [BLOCK_N]).

    In the kernel layout (triton_gemv.word_slot) rows 2p and 2p+1 of a word sit at bit offsets BITS*p and
    16 + BITS*p; a pair whose values end above bit 10 of their half is shifted down by 8 first, leaving them at
    offset o. One mask and one OR of the exponent of 2**(10 - o) (a single lop3) make each half the exact fp16
    2**(10 - o) + q, so a pair of weights takes three instructions (four scaled) and no int-to-float conversion
    (which runs at a quarter of the fp16 rate on an SM, BENCHMARKS.md 2026-12-01); q - zero is exact and
    the product with the scale rounds once, as in the dequantize kernel. Without SCALED the caller scales the
    tile's fp32 product instead (fewer instructions when the rows are few)."""
    PAIRS: tl.constexpr = 16 // BITS
    packed = tl.load(qweight_ptr + offs_w[None, :] * N + offs_n[:, None], mask=mask_n[:, None] & mask_w[None, :],
                     other=0)
    scale, zero = _fp16_halves(tl.load(scale_zero_ptr + group * N + offs_n, mask=mask_n, other=0))
    bit = tl.arange(0, PAIRS) * BITS
    shift = tl.where(bit + BITS <= 10, 0, 8)
    o = bit - shift
    mask = (((1 << BITS) - 1) << o) * 0x10001
    exponent = ((25 - o) << 10) * 0x10001  # fp16 2**(10 - o) in both halves
    base = (1 << (10 - o)).to(tl.float32)
    if EMULATE:  # the interpreter runs no PTX: the same steps in Triton operations, each half on its own
        pairs = ((packed[:, :, None] >> shift[None, None, :]) & mask[None, None, :]) | exponent[None, None, :]
        zero16 = (zero[:, None] + base[None, :]).to(tl.float16)[:, None, :]
        low = (pairs & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True) - zero16
        high = (pairs >> 16).to(tl.int16).to(tl.float16, bitcast=True) - zero16
        if SCALED:
            low *= scale.to(tl.float16)[:, None, None]
            high *= scale.to(tl.float16)[:, None, None]
    else:
        pairs = tl.inline_asm_elementwise(
            _SCALED_PAIR_ASM if SCALED else _PAIR_ASM, "=r,r,r,r,r,r,r",
            [packed[:, :, None], shift[None, None, :], mask[None, None, :], exponent[None, None, :],
             _fp16x2(zero[:, None] + base[None, :])[:, None, :], _fp16x2(scale)[:, None, None]],
            dtype=tl.int32, is_pure=True, pack=1)
        low = pairs.to(tl.int16).to(tl.float16, bitcast=True)
        high = (pairs >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    # k = word * 32 / BITS + 2p + half
    return tl.reshape(tl.join(low, high), [offs_n.shape[0], BLOCK_K]), scale


@triton.jit
def _skinny_kernel(
    x_ptr, qweight_ptr, scale_zero_ptr, out_ptr, workspace_ptr, tickets_ptr,
    M, N, K, group_shift, split_k, stride_xm, stride_om,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EMULATE: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] * scale[g, n] * (q[k, n] - zero[g, n]), g = k >> group_shift (x already in the
    weight's row order: quant_skinny permutes it for act-order).

    x: fp16 [M, K], row stride stride_xm, unit column stride; qweight: int32 [K * BITS / 32, N], scale_zero,
    workspace (fp32, >= M * N, zero on entry and exit) and tickets (int32, >= cdiv(M, BLOCK_M) *
    cdiv(N, BLOCK_N), zero on entry and exit) as in `triton_gemv._gemv_kernel`; out [M, N], row stride
    stride_om. Assumes K % 32 == 0 and BLOCK_K dividing 2**group_shift. The tile computes the transposed product
    out^T = W^T x^T: the weight tile is the tensor cores' left operand (Hopper's wgmma takes it straight from the
    registers the unpacking wrote) and the rows the narrow right one. Offered both orientations, the tuner had
    chosen this one over the rows on the left (out = x W) for all tuned keys but one on an H200, and at 64-128 rows
    the other took twice the instructions (BENCHMARKS.md, 2026-12-01). Grid: (cdiv(N, BLOCK_N), split_k,
    cdiv(M, BLOCK_M)), the last 1 in quant_skinny, whose BLOCK_M (`rows_block`) is at least M.
    """
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    # a tile's scale on its fp32 product (one multiply per output) costs less than on every weight pair up to 32 rows
    SCALE_AFTER: tl.constexpr = BLOCK_M <= 32
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    k_per_split = tl.cdiv(tl.cdiv(K, split_k), BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # out^T
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        offs_w = k0 // PER_WORD + tl.arange(0, WORDS)
        w, scale = _weight_tile(qweight_ptr, scale_zero_ptr, offs_w, offs_n, offs_w * PER_WORD < k_end, mask_n, N,
                                k0 >> group_shift, BITS, BLOCK_K, not SCALE_AFTER, EMULATE)
        a = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None], mask=mask_m[None, :] & mask_k[:, None],
                    other=0.0)  # x^T
        if SCALE_AFTER:
            acc += tl.dot(w, a) * scale[:, None]
        else:
            acc = tl.dot(w, a, acc)
    acc = tl.trans(acc)

    mask_out = mask_m[:, None] & mask_n[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if split_k == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        partial_ptrs = workspace_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(partial_ptrs, acc, mask=mask_out, sem="relaxed")
        tl.debug_barrier()  # every partial of this program is added before its ticket (acq_rel) is taken
        tile = pid_m * tl.num_programs(0) + pid_n
        ticket = tl.atomic_add(tickets_ptr + tile, 1, sem="acq_rel")
        if ticket == split_k - 1:  # the last of the tile: the others' partials are all in (read through L2)
            total = tl.load(partial_ptrs, mask=mask_out, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask_out)
            tl.store(partial_ptrs, tl.zeros_like(acc), mask=mask_out)
            tl.store(tickets_ptr + tile, 0)


def skinny_workspace_size(n: int) -> tuple[int, int]:
    """(fp32 partials, int32 tickets) that any launch on N output columns may touch."""
    return MAX_SKINNY_ROWS * n, triton.cdiv(MAX_SKINNY_ROWS, 16) * triton.cdiv(n, 32)


def _fits(config: dict, key: tuple) -> bool:
    """Pruner (key: rows block, N, K, bits, group_shift, ...): a tile inside one group, every split at least one
    block of K, between half a program and 16 programs per SM."""
    _, n, k, _, group_shift = key[:5]
    group = 1 << min(group_shift, 30)
    if config["BLOCK_K"] > group or k < config["SPLIT_K"] * config["BLOCK_K"]:
        return False
    if config["BLOCK_K"] == 32 and group > 32:  # only for groups of 32: larger tiles take fewer instructions a weight
        return False
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
    programs = triton.cdiv(n, config["BLOCK_N"]) * config["SPLIT_K"]
    return sms // 2 <= programs <= 16 * sms


SKINNY_TUNER = Tuner(
    "skinny",
    generated_configs(BLOCK_N=[64, 128], BLOCK_K=[32, 64, 128], SPLIT_K=[1, 2, 4, 8, 16], num_warps=[4],
                      num_stages=[3]),
    prune=_fits,
    interpreter_config=dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, num_warps=4, num_stages=1),
)


def skinny_key(rows: int, n: int, k: int, bits: int, group_shift: int) -> tuple:
    """The tuner's key of a launch: (rows block, N, K, bits, group_shift)."""
    return rows_block(rows), n, k, bits, group_shift


def rows_block(rows: int) -> int:
    """BLOCK_M for `rows` rows: 16 (the smallest tensor-core tile), 32, 64 or 128."""
    return max(16, triton.next_power_of_2(rows))


def quant_skinny(x: torch.Tensor, qweight: torch.Tensor, scale_zero: torch.Tensor,
                 perm: torch.Tensor | None, bits: int, group_shift: int,
                 out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """y = x @ W for x [M, K] (M <= MAX_SKINNY_ROWS, unit column stride), W the GPTQ weight [K, N] of `bits` in
    SKINNY_BITS; returns [M, N] in x.dtype, computed in fp16 with fp32 sums (x of another dtype is converted).

    Arguments as in `triton_gemv.quant_gemv` (the same PreparedWeight.args()); groups of at least 32 rows.
    `config` forces one launch configuration (tests); otherwise the one tuned for this shape and rows block.
    Raises ValueError for 3-bit weights or more than MAX_SKINNY_ROWS rows.
    """
    m, k = x.shape
    n = qweight.shape[1]
    if bits not in SKINNY_BITS or m > MAX_SKINNY_ROWS:
        raise ValueError(f"quant_skinny serves {SKINNY_BITS}-bit weights and at most {MAX_SKINNY_ROWS} rows, "
                         f"got {bits} bits and {m} rows")
    assert x.stride(1) == 1 and k * bits == qweight.shape[0] * 32, "x must be [M, K] with unit column stride"
    x16 = x if x.dtype == torch.float16 else x.to(torch.float16)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if perm is not None:  # one gather of the few rows beats a gather per tile (BENCHMARKS.md, 2026-12-01)
        x16 = x16.index_select(1, perm)
    workspace, tickets = Workspace.reserve(x.device, *skinny_workspace_size(n))
    block_m = rows_block(m)

    def launch(cfg: dict) -> None:
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"], triton.cdiv(m, block_m))
        _skinny_kernel[grid](
            x16, qweight, scale_zero, out, workspace, tickets,
            m, n, k, group_shift, cfg["SPLIT_K"], x16.stride(0), out.stride(0),
            BITS=bits, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            EMULATE=interpreting(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    key = skinny_key(m, n, k, bits, group_shift)
    launch(config or SKINNY_TUNER.pick(key, launch))
    return out


def usable(bits: int, group_shift: int) -> bool:
    """Whether `quant_skinny` serves a layer: 2, 4 or 8 bits in groups of at least 32 rows (the smallest BLOCK_K)."""
    return bits in SKINNY_BITS and group_shift >= 5
