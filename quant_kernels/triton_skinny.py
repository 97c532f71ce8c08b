"""Fused dequantize + tensor-core product for a few rows of activations (a server's decode batch).

The GEMV (triton_gemv) multiplies each row by the unpacked weights on the CUDA cores, so its cost grows with the
rows: on an H200 eight rows cost 2.6-3.5x one row (BENCHMARKS.md, 2026-12-01), and a decode step of 16 rows took
six times the single-row step. Here each program unpacks a [BLOCK_K, BLOCK_N] tile of 2-, 4- or 8-bit weights to
fp16 once, in registers, and hands it to `tl.dot` with a [BLOCK_M, BLOCK_K] tile of activations (BLOCK_M 16 or
32: the rows, padded), so the rows ride on the tensor cores: on an H200 the 7B layers took the same time at 2 and
at 16 rows (o 12 us, gate_up 45 us), about twice a one-row GEMV, reading the weights at 27-39% of the copy
bandwidth. It is bound by the unpacking and its trip through shared memory (8-bit weights, twice the bytes, take
about the same time), not by the bytes. K is split over programs (split-K) so that narrow layers still occupy every SM; partial sums meet in the
GEMV's fp32 workspace through atomic adds, and the last program of a tile (an atomic ticket) writes it out and
zeroes its workspace again, as in the GEMV.

Weights in the kernel layout of triton_backend.prepare_weight (`triton_gemv.word_slot`); 3-bit weights (units of
three words) are not served here. A tile never spans two quantization groups: BLOCK_K divides the group size.
"""
import torch
import triton
import triton.language as tl

from .autotune_cache import Tuner, generated_configs
from .triton_gemv import Workspace, _fp16_halves

SKINNY_BITS = (2, 4, 8)
MAX_SKINNY_ROWS = 128  # rows per launch at most (BLOCK_M 128: a short prompt's prefill)
SPLIT_ROWS = 32  # split-K (and its workspace) only up to this many rows; more rows fill the SMs without it


@triton.jit
def _unpacked_fp16(packed, shifts, MASK: tl.constexpr):
    """fp16 1024 + q for the values q at bit offsets `shifts` of int32 words (broadcast together): OR-ing q (< 1024)
    into the mantissa of fp16 1024.0 (0x6400) is exact and costs no int-to-float conversion, which runs at a quarter
    of the rate of fp16 arithmetic on an SM and had bound this kernel (BENCHMARKS.md, 2026-12-01)."""
    return (((packed >> shifts) & MASK) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _skinny_kernel(
    x_ptr, qweight_ptr, scale_zero_ptr, perm_ptr, out_ptr, workspace_ptr, tickets_ptr,
    M, N, K, group_shift, split_k, stride_xm, stride_om,
    BITS: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
):
    """out[m, n] = sum_k x[m, perm[k]] * scale[g, n] * (q[k, n] - zero[g, n]), g = k >> group_shift.

    x: fp16 [M, K_in], row stride stride_xm, unit column stride; qweight: int32 [K * BITS / 32, N], scale_zero,
    perm, workspace (fp32, >= M * N, zero on entry and exit) and tickets (int32, >= cdiv(M, BLOCK_M) *
    cdiv(N, BLOCK_N), zero on entry and exit) as in `triton_gemv._gemv_kernel`; out [M, N], row stride
    stride_om. Assumes K % 32 == 0 and BLOCK_K dividing 2**group_shift. SWAP computes the transposed product
    out^T = W^T x^T, so that the weight tile is the tensor cores' left operand (the one Hopper's wgmma takes from
    registers, with BLOCK_N its 64-row side) and the few rows are its narrow right one. Grid: (cdiv(N, BLOCK_N),
    split_k, cdiv(M, BLOCK_M)).
    """
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # bit offset of row r of a word (triton_gemv.word_slot): rows 2p and 2p+1 at slots p and PER_WORD / 2 + p
    r = tl.arange(0, PER_WORD)
    shifts = ((r % 2) * (PER_WORD // 2) + r // 2) * BITS

    k_per_split = tl.cdiv(tl.cdiv(K, split_k), BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        src_k = tl.load(perm_ptr + offs_k, mask=mask_k, other=0) if HAS_PERM else offs_k
        offs_w = k0 // PER_WORD + tl.arange(0, WORDS)
        mask_w = offs_w * PER_WORD < k_end
        scale, zero = _fp16_halves(tl.load(scale_zero_ptr + (k0 >> group_shift) * N + offs_n, mask=mask_n, other=0))
        # (1024 + q) - (1024 + zero) is a small exact integer in fp16, so the product rounds once, as the dequantize
        # kernel's does
        zero = (zero + 1024.0).to(tl.float16)
        scale = scale.to(tl.float16)
        if SWAP:
            packed = tl.load(qweight_ptr + offs_w[None, :] * N + offs_n[:, None], mask=mask_n[:, None] & mask_w[None, :],
                             other=0)
            # each word unpacked once into its PER_WORD rows: [BLOCK_N, words, PER_WORD] -> [BLOCK_N, BLOCK_K]
            w = tl.reshape(_unpacked_fp16(packed[:, :, None], shifts[None, None, :], MASK), [BLOCK_N, BLOCK_K])
            w = (w - zero[:, None]) * scale[:, None]
            a = tl.load(x_ptr + offs_m[None, :] * stride_xm + src_k[:, None], mask=mask_m[None, :] & mask_k[:, None],
                        other=0.0)
            acc = tl.dot(w, a, acc)
        else:
            packed = tl.load(qweight_ptr + offs_w[:, None] * N + offs_n[None, :], mask=mask_w[:, None] & mask_n[None, :],
                             other=0)
            # [words, PER_WORD, BLOCK_N] -> [BLOCK_K, BLOCK_N]
            w = tl.reshape(_unpacked_fp16(packed[:, None, :], shifts[None, :, None], MASK), [BLOCK_K, BLOCK_N])
            w = (w - zero[None, :]) * scale[None, :]
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + src_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)
            acc = tl.dot(a, w, acc)
    if SWAP:
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
    """(fp32 partials, int32 tickets) that any split-K launch (at most SPLIT_ROWS rows) on N output columns may
    touch."""
    return SPLIT_ROWS * n, triton.cdiv(SPLIT_ROWS, 16) * triton.cdiv(n, 32)


def _fits(config: dict, key: tuple) -> bool:
    """Pruner (key: rows block, N, K, bits, group_shift, ...): a tile inside one group, every split at least one
    block of K, no split above SPLIT_ROWS rows, between half a program and 16 programs per SM."""
    block_m, n, k, bits, group_shift = key[:5]
    if config["BLOCK_K"] > (1 << min(group_shift, 30)) or k < config["SPLIT_K"] * config["BLOCK_K"]:
        return False
    if block_m > SPLIT_ROWS:
        return config["SPLIT_K"] == 1
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
    programs = triton.cdiv(n, config["BLOCK_N"]) * config["SPLIT_K"]
    return sms // 2 <= programs <= 16 * sms


SKINNY_TUNER = Tuner(
    "skinny",
    generated_configs(BLOCK_N=[64, 128], BLOCK_K=[32, 64, 128], SPLIT_K=[1, 2, 4, 8, 16], SWAP=[0, 1],
                      num_warps=[4], num_stages=[3]),
    prune=_fits,
    interpreter_config=dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, SWAP=1, num_warps=4, num_stages=1),
)


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
    Raises ValueError for 3-bit weights, more than MAX_SKINNY_ROWS rows, or a forced split-K above SPLIT_ROWS rows.
    """
    m, k = x.shape
    n = qweight.shape[1]
    if bits not in SKINNY_BITS or m > MAX_SKINNY_ROWS:
        raise ValueError(f"quant_skinny serves {SKINNY_BITS}-bit weights and at most {MAX_SKINNY_ROWS} rows, "
                         f"got {bits} bits and {m} rows")
    if config and config["SPLIT_K"] > 1 and m > SPLIT_ROWS:
        raise ValueError(f"split-K serves at most {SPLIT_ROWS} rows, got {m}")
    assert x.stride(1) == 1 and k * bits == qweight.shape[0] * 32, "x must be [M, K] with unit column stride"
    x16 = x if x.dtype == torch.float16 else x.to(torch.float16)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    workspace, tickets = Workspace.reserve(x.device, *skinny_workspace_size(n))
    block_m = rows_block(m)

    def launch(cfg: dict) -> None:
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"], triton.cdiv(m, block_m))
        _skinny_kernel[grid](
            x16, qweight, scale_zero, perm if perm is not None else qweight, out, workspace, tickets,
            m, n, k, group_shift, cfg["SPLIT_K"], x16.stride(0), out.stride(0),
            BITS=bits, HAS_PERM=perm is not None, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            SWAP=bool(cfg.get("SWAP", 0)), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    key = (block_m, n, k, bits, group_shift, perm is not None)
    launch(config or SKINNY_TUNER.pick(key, launch))
    return out


def usable(bits: int, group_shift: int) -> bool:
    """Whether `quant_skinny` serves a layer: 2, 4 or 8 bits in groups of at least 32 rows (the smallest BLOCK_K)."""
    return bits in SKINNY_BITS and group_shift >= 5
