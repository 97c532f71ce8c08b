"""Quantized matrix products for many rows (prefill), two ways; scripts/gpu_kernels.py times both.

- `dequantize_into` + `torch.matmul`: a kernel writes the whole fp16 weight into a scratch buffer (in the original
  row order, so x needs no permutation), then cuBLAS multiplies. Costs K*N*2 bytes of scratch and one extra pass
  over the weight, but runs the vendor GEMM at full speed. The backend uses this one: on an H100 at 2048 rows it
  reached 85-90% of fp16 cuBLAS (BENCHMARKS.md, Kernels).
- `quant_gemm`: one fused kernel; each program dequantizes a [BLOCK_K, BLOCK_N] weight tile to x's dtype in
  registers and feeds it to the tensor cores with `tl.dot`. It reached only ~155 TFLOP/s there (4x slower): the
  dequantized tile goes through shared memory before every `tl.dot` and the loads are not pipelined with it.
"""
import torch
import triton
import triton.language as tl

from .autotune_cache import Tuner, generated_configs
from .triton_gemv import _fp16_halves


@triton.jit
def _dequantized_tile(qweight_ptr, scale_zero_ptr, offs_k, offs_n, mask_k, mask_n,
                      N, group_shift, BITS: tl.constexpr):
    """fp32 [BLOCK_K, BLOCK_N] tile of W = scale * (q - zero) for rows offs_k (packed row order)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    mask = mask_k[:, None] & mask_n[None, :]
    if BITS == 3:  # units of 32 rows in three words of 4-bit slots (triton_gemv._gemv_kernel)
        row = offs_k % 8  # at slot triton_gemv.word_slot(row, 3) of word (offs_k % 32) // 8 of the unit
        shift = (((row % 2) * 4 + row // 2) * 4)[:, None]
        word = ((offs_k % 32) // 8)[:, None]
        unit = qweight_ptr + (offs_k // 32 * 3)[:, None] * N + offs_n[None, :]
        # Every row loads its unit's three words; the repeats hit L1.
        w0 = tl.load(unit, mask=mask, other=0)
        w1 = tl.load(unit + N, mask=mask, other=0)
        w2 = tl.load(unit + 2 * N, mask=mask, other=0)
        low = tl.where(word == 0, w0, tl.where(word == 1, w1, w2)) >> shift
        top = (((w0 >> shift) >> 3) & 1) | (((w1 >> shift) >> 2) & 2) | (((w2 >> shift) >> 1) & 4)
        q = tl.where(word == 3, top, low & MASK)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        # Each word is loaded by the PER_WORD rows it holds; the repeats hit L1.
        packed = tl.load(qweight_ptr + (offs_k // PER_WORD)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        row = offs_k % PER_WORD  # at slot triton_gemv.word_slot(row, BITS)
        q = (packed >> (((row % 2) * (PER_WORD // 2) + row // 2) * BITS)[:, None]) & MASK
    group_rows = (offs_k >> group_shift)[:, None] * N + offs_n[None, :]
    scale, zero = _fp16_halves(tl.load(scale_zero_ptr + group_rows, mask=mask, other=0))
    return (q.to(tl.float32) - zero) * scale


@triton.jit
def _gemm_kernel(
    x_ptr, qweight_ptr, scale_zero_ptr, perm_ptr, out_ptr,
    M, N, K, group_shift, stride_xm, stride_om,
    BITS: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, N] = x[M, perm[K]] @ W[K, N], W dequantized tile by tile into x's dtype (fp32 accumulation).

    Tensors as in `triton_gemv._gemv_kernel`. Grid: cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), launched in groups of
    GROUP_M row blocks so neighbouring programs share weight tiles in L2.
    """
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        src_k = tl.load(perm_ptr + offs_k, mask=mask_k, other=0) if HAS_PERM else offs_k
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + src_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = _dequantized_tile(qweight_ptr, scale_zero_ptr, offs_k, offs_n, mask_k, mask_n,
                              N, group_shift, BITS)
        acc = tl.dot(a, b.to(a.dtype), acc)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequantize_kernel(qweight_ptr, scale_zero_ptr, perm_ptr, out_ptr, N, K, stride_w, group_shift,
                       BITS: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[perm[k], n] = W[k, n] in out's dtype for N columns of W (qweight and scale_zero rows stride_w apart);
    out is [K, N] contiguous. Grid: (cdiv(K, BLOCK_K), cdiv(N, BLOCK_N))."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    w = _dequantized_tile(qweight_ptr, scale_zero_ptr, offs_k, offs_n, mask_k, mask_n,
                          stride_w, group_shift, BITS)
    dst_k = tl.load(perm_ptr + offs_k, mask=mask_k, other=0) if HAS_PERM else offs_k
    tl.store(out_ptr + dst_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask_k[:, None] & mask_n[None, :])


def _fits(config: dict, key: tuple) -> bool:
    """Pruner: no tile much taller than the rows there are; K blocks no deeper than K."""
    block_m, n, k = key[:3]
    return config["BLOCK_M"] <= max(16, block_m) and config["BLOCK_K"] <= max(32, k)


def _sensible(config: dict) -> bool:
    """Tiles up to 128x128 outputs; 8 warps exactly for the largest tiles."""
    outputs = config["BLOCK_M"] * config["BLOCK_N"]
    return outputs <= 128 * 128 and (config["num_warps"] == 8) == (outputs == 128 * 128)


GEMM_TUNER = Tuner(
    "gemm",
    [c for c in generated_configs(BLOCK_M=[16, 32, 64, 128], BLOCK_N=[64, 128, 256], BLOCK_K=[32, 64],
                                  num_warps=[4, 8], num_stages=[3]) if _sensible(c)],
    prune=_fits,
    interpreter_config=dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1),
)


def quant_gemm(x: torch.Tensor, qweight: torch.Tensor, scale_zero: torch.Tensor,
               perm: torch.Tensor | None, bits: int, group_shift: int,
               out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """y = x @ W for x [M, K] (unit column stride) and the GPTQ weight W [K, N]; returns [M, N] in x.dtype.

    Arguments as in `triton_gemv.quant_gemv`; any M.
    """
    m, k = x.shape
    n = qweight.shape[1]
    assert x.stride(1) == 1 and k * bits == qweight.shape[0] * 32, "x must be [M, K] with unit column stride"
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)

    def launch(cfg: dict) -> None:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _gemm_kernel[grid](
            x, qweight, scale_zero, perm if perm is not None else qweight, out,
            m, n, k, group_shift, x.stride(0), out.stride(0),
            BITS=bits, HAS_PERM=perm is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"], GROUP_M=8, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    launch(config or GEMM_TUNER.pick(gemm_key(x, qweight, perm, bits, group_shift), launch))
    return out


def gemm_key(x: torch.Tensor, qweight: torch.Tensor, perm: torch.Tensor | None, bits: int, group_shift: int) -> tuple:
    """The tuner's key of a `quant_gemm` call (rows rounded up to a power of two)."""
    return (triton.next_power_of_2(x.shape[0]), qweight.shape[1], x.shape[1], bits, group_shift, perm is not None,
            str(x.dtype))


def dequantize_into(out: torch.Tensor, qweight: torch.Tensor, scale_zero: torch.Tensor,
                    perm: torch.Tensor | None, bits: int, group_shift: int, first_column: int = 0) -> torch.Tensor:
    """Write columns first_column ... first_column + out.shape[1] - 1 of the dense weight [K, N] (original row
    order) into `out` (contiguous [K, columns], fp16/bf16/fp32) and return it."""
    k = qweight.shape[0] * 32 // bits
    n = out.shape[1]
    assert out.shape[0] == k and out.is_contiguous() and first_column + n <= qweight.shape[1]
    block_k, block_n = 32, 128
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _dequantize_kernel[grid](qweight[:, first_column:], scale_zero[:, first_column:],
                             perm if perm is not None else qweight, out, n, k, qweight.stride(0), group_shift,
                             BITS=bits, HAS_PERM=perm is not None, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4)
    return out
