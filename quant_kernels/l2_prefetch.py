"""Pull the start of a coming GEMV's weights into L2 while the kernels before it leave DRAM idle.

At batch 1 the decode step alternates bandwidth-bound GEMVs with latency-bound kernels (attention at short
contexts, the single-program RMSNorm, SiLU*mul) during which DRAM has little to do. A prefetch kernel launched
just before such a kernel (programmatic dependent launch, quant_kernels.pdl) issues `prefetch.global.L2` for the
first bytes of the next GEMV's weights, so that GEMV reads them from L2. Weights are never written while
decoding, so the prefetch runs before waiting for anything; it still waits before it ends, which keeps the PDL
chain's promise that a kernel past its wait sees every earlier kernel finished.

TALIS_L2_PREFETCH_MB (read when a launch is made, so at CUDA-graph capture) is the budget per GEMV in MiB; 0
turns prefetching off. Nothing happens on CPU tensors or under TRITON_INTERPRET=1 (no PTX there).
"""
import os

import torch
import triton
import triton.language as tl

from .autotune_cache import interpreting
from .pdl import allow_next_kernel, pdl_args, wait_for_previous_kernel

LINE = 128  # bytes per L2 line; one prefetch instruction each
LINES_PER_PROGRAM = 1024
DEFAULT_MB = "8"

# $1: the line's address; $2: nonzero to prefetch. $0: a dummy result (Triton's inline asm returns a value).
_PREFETCH_ASM = tl.constexpr("{ .reg .pred p; setp.ne.b32 p, $2, 0;\n"
                             " @p prefetch.global.L2::evict_last [$1];\n mov.u32 $0, 0; }")


@triton.jit
def _prefetch_kernel(a_start, a_bytes, b_start, b_bytes, BLOCK: tl.constexpr, LINE: tl.constexpr,
                     PDL: tl.constexpr):
    """Program p prefetches lines [p * BLOCK, (p + 1) * BLOCK) of the byte ranges [a_start, a_start + a_bytes)
    and [b_start, b_start + b_bytes) (device addresses as integers)."""
    allow_next_kernel(PDL)
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * LINE
    tl.inline_asm_elementwise(_PREFETCH_ASM, "=r,l,r", [a_start + offs, (offs < a_bytes).to(tl.int32)],
                              dtype=tl.int32, is_pure=False, pack=1)
    tl.inline_asm_elementwise(_PREFETCH_ASM, "=r,l,r", [b_start + offs, (offs < b_bytes).to(tl.int32)],
                              dtype=tl.int32, is_pure=False, pack=1)
    wait_for_previous_kernel(PDL)


def budget_bytes() -> int:
    return int(float(os.environ.get("TALIS_L2_PREFETCH_MB", DEFAULT_MB)) * 2**20)


def split_budget(sizes: list[int], budget: int) -> list[int]:
    """Bytes to prefetch from the start of each range of `sizes` bytes, in order, `budget` bytes in all."""
    taken = []
    for size in sizes:
        taken.append(max(0, min(size, budget)))
        budget -= taken[-1]
    return taken


class L2Prefetch:
    """The prefetch launch for the first `budget_bytes()` of up to two contiguous CUDA tensors, in order (for a
    GEMV: its packed weights, then its scales); a no-op where prefetching is off or impossible."""

    def __init__(self, *tensors: torch.Tensor | None):
        tensors = [t for t in tensors if t is not None and t.is_cuda and t.is_contiguous()]
        assert len(tensors) <= 2, "one prefetch launch covers two tensors"
        taken = split_budget([t.numel() * t.element_size() for t in tensors], budget_bytes())
        # each tensor is kept with its range, so its address stays valid
        self.ranges = [(t.data_ptr(), take, t) for t, take in zip(tensors, taken) if take > 0]
        self.enabled = bool(self.ranges) and not interpreting()

    def __call__(self) -> None:
        if not self.enabled:
            return
        (a, a_bytes, t), (b, b_bytes, _) = (self.ranges + [(0, 0, None)])[:2]
        lines = triton.cdiv(max(a_bytes, b_bytes), LINE)
        _prefetch_kernel[(triton.cdiv(lines, LINES_PER_PROGRAM),)](a, a_bytes, b, b_bytes, BLOCK=LINES_PER_PROGRAM,
                                                                   LINE=LINE, num_warps=4, **pdl_args(t.device))
