"""Fused dequantize + GEMV for one to a few rows of activations (the decode step).

Batch-1 decoding is memory bound: the kernel reads every packed int32 word of `qweight` exactly once, unpacks it
in registers and never writes fp16 weights anywhere. Each program owns BLOCK_N output columns and one slice of K
(split-K), so even narrow layers launch enough programs to keep every SM's memory pipeline busy. Split-K partial
sums meet in a shared fp32 workspace through atomic adds; the last program to finish a column block (counted by
an atomic ticket) writes the output and zeroes its workspace slice and ticket again, so one launch does the whole
job and the workspace is always clean for the next call (launches on one stream must not overlap).

Unpacking avoids the slow int->float conversion unit: a `bits`-wide value OR-ed into the mantissa of 2**23 is the
float 2**23 + q, and one subtraction gives q exactly.
"""
import torch
import triton
import triton.language as tl

from .autotune_cache import Tuner, generated_configs

MAX_ROWS = 8  # the GEMV serves up to this many rows; more rows go to the GEMM


@triton.jit
def _gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, perm_ptr, out_ptr, workspace_ptr, tickets_ptr,
    M, N, K, group_size, zero_offset, split_k, stride_xm, stride_om, stride_zg,
    BITS: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_KW: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[m, n] = sum_k x[m, perm[k]] * scales[g, n] * (q[k, n] - (z[g, n] + zero_offset)), g = k // group_size.

    x: [M, K_in] fp16/bf16/fp32, row stride stride_xm, unit column stride.
    qweight: int32 [K * BITS / 32, N], 32 / BITS values of one column per word along K, least significant first.
    scales: fp16 [n_groups, N]; qzeros: int32 [n_groups, >= N * BITS / 32] (row stride stride_zg), packed along N
    the same way.
    perm: int32 [K] (only when HAS_PERM): row k of qweight multiplies input feature perm[k].
    out: [M, N] in x's dtype, row stride stride_om. workspace: fp32 [>= M * N], zero on entry and exit.
    tickets: int32 [>= cdiv(N, BLOCK_N)], zero on entry and exit.
    Assumes K % (32 / BITS) == 0, group_size % (32 / BITS) == 0, M <= BLOCK_M. Grid: (cdiv(N, BLOCK_N), split_k).
    """
    PER_WORD: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    zero_shift = (offs_n % PER_WORD) * BITS

    words = K // PER_WORD
    words_per_split = tl.cdiv(tl.cdiv(words, split_k), BLOCK_KW) * BLOCK_KW
    kw_begin = pid_k * words_per_split
    kw_end = tl.minimum(kw_begin + words_per_split, words)

    # Per-thread partial sums over the word rows; reduced across threads once, after the loop.
    acc = tl.zeros([BLOCK_M, BLOCK_KW, BLOCK_N], dtype=tl.float32)
    for kw0 in range(kw_begin, kw_end, BLOCK_KW):
        offs_kw = kw0 + tl.arange(0, BLOCK_KW)
        mask_kw = offs_kw < kw_end
        mask_w = mask_kw[:, None] & mask_n[None, :]
        packed = tl.load(qweight_ptr + offs_kw[:, None] * N + offs_n[None, :], mask=mask_w, other=0)
        group = (offs_kw * PER_WORD) // group_size
        scale = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=mask_w, other=0.0).to(tl.float32)
        zero_word = tl.load(qzeros_ptr + group[:, None] * stride_zg + (offs_n // PER_WORD)[None, :],
                            mask=mask_w, other=0)
        zero = ((zero_word >> zero_shift[None, :]) & MASK).to(tl.float32) + zero_offset

        dot_q = tl.zeros([BLOCK_M, BLOCK_KW, BLOCK_N], dtype=tl.float32)  # sum_j x_j * q_j per word
        sum_x = tl.zeros([BLOCK_M, BLOCK_KW], dtype=tl.float32)           # sum_j x_j per word
        for j in tl.static_range(PER_WORD):
            k = offs_kw * PER_WORD + j
            if HAS_PERM:
                k = tl.load(perm_ptr + k, mask=mask_kw, other=0)
            x_j = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                          mask=mask_m[:, None] & mask_kw[None, :], other=0.0).to(tl.float32)
            q_j = (((packed >> (BITS * j)) & MASK) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            dot_q += x_j[:, :, None] * q_j[None, :, :]
            sum_x += x_j
        acc += scale[None, :, :] * (dot_q - zero[None, :, :] * sum_x[:, :, None])

    result = tl.sum(acc, axis=1)  # [BLOCK_M, BLOCK_N]
    mask_out = mask_m[:, None] & mask_n[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if split_k == 1:
        tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        partial_ptrs = workspace_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(partial_ptrs, result, mask=mask_out)
        tl.debug_barrier()  # every thread's partial is in before the ticket is taken
        ticket = tl.atomic_add(tickets_ptr + pid_n, 1)
        if ticket == split_k - 1:
            # Read through L2 with an atomic (no stale L1 line), then clean up for the next launch.
            total = tl.atomic_add(partial_ptrs, tl.zeros_like(result), mask=mask_out)
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask_out)
            tl.store(partial_ptrs, tl.zeros_like(result), mask=mask_out)
            tl.store(tickets_ptr + pid_n, 0)


def _block_m(rows: int) -> int:
    return triton.next_power_of_2(rows)


def _fits(config: dict, key: tuple) -> bool:
    """Pruner: enough programs to fill the GPU without slicing K thinner than one block, and bounded registers."""
    block_m, n, k, bits = key[:4]
    words = k * bits // 32
    if config["SPLIT_K"] > 1 and words < 2 * config["SPLIT_K"] * config["BLOCK_KW"]:
        return False
    programs = triton.cdiv(n, config["BLOCK_N"]) * config["SPLIT_K"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
    if not sms <= programs <= 8 * sms and not (config["SPLIT_K"] == 1 and programs < sms):
        return False
    accumulators = block_m * config["BLOCK_KW"] * config["BLOCK_N"] // (32 * config["num_warps"])
    return accumulators <= 32


GEMV_TUNER = Tuner(
    "gemv",
    generated_configs(BLOCK_N=[64, 128, 256], BLOCK_KW=[8, 16], SPLIT_K=[1, 2, 4, 8, 16], num_warps=[4, 8]),
    prune=_fits,
    interpreter_config=dict(BLOCK_N=64, BLOCK_KW=8, SPLIT_K=2, num_warps=4),
)


class Workspace:
    """Zeroed fp32 partial sums and int32 tickets for split-K, one pair per device, grown on demand.

    Call `reserve` outside CUDA-graph capture (the backend does it in `prepare`) so a launch never allocates.
    """

    _buffers: dict = {}

    @classmethod
    def reserve(cls, device: torch.device, partials: int, tickets: int) -> tuple[torch.Tensor, torch.Tensor]:
        have = cls._buffers.get(device)
        if have is None or have[0].numel() < partials or have[1].numel() < tickets:
            partials = max(partials, have[0].numel() if have else 0)
            tickets = max(tickets, have[1].numel() if have else 0)
            have = (torch.zeros(partials, dtype=torch.float32, device=device),
                    torch.zeros(tickets, dtype=torch.int32, device=device))
            cls._buffers[device] = have
        return have


def gemv_workspace_size(n: int) -> tuple[int, int]:
    """(fp32 partials, int32 tickets) that any GEMV launch on N output columns may touch."""
    return MAX_ROWS * n, triton.cdiv(n, 16)


def quant_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
               perm: torch.Tensor | None, bits: int, group_size: int, zero_offset: int,
               out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """y = x @ W for x [M, K] (M <= MAX_ROWS, unit column stride), W the GPTQ weight [K, N]; returns [M, N] in x.dtype.

    group_size is the number of rows per group (K for a single group); perm as in `_gemv_kernel`.
    `out` ([M, N], unit column stride) receives the result if given. `config` forces one launch configuration
    (tests); otherwise the tuned one for this shape is used.
    """
    m, k = x.shape
    n = qweight.shape[1]
    assert m <= MAX_ROWS, f"quant_gemv serves at most {MAX_ROWS} rows, got {m}"
    assert x.stride(1) == 1 and k * bits == qweight.shape[0] * 32, "x must be [M, K] with unit column stride"
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    workspace, tickets = Workspace.reserve(x.device, *gemv_workspace_size(n))
    block_m = _block_m(m)

    def launch(cfg: dict) -> None:
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
        _gemv_kernel[grid](
            x, qweight, scales, qzeros, perm if perm is not None else qweight, out, workspace, tickets,
            m, n, k, group_size, zero_offset, cfg["SPLIT_K"], x.stride(0), out.stride(0), qzeros.stride(0),
            BITS=bits, HAS_PERM=perm is not None, BLOCK_M=block_m, BLOCK_KW=cfg["BLOCK_KW"],
            BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
        )

    key = (block_m, n, k, bits, group_size, perm is not None, str(x.dtype))
    launch(config or GEMV_TUNER.pick(key, launch))
    return out
