"""Compile the few-row tensor-core kernel (triton_skinny) for Hopper (sm_90) without a GPU and count the SASS
instructions of its K loop per weight, as scripts/gemv_sass.py does for the GEMV.

    PYTHONPATH=. python3 scripts/skinny_sass.py [--bits 4] [--block-m 16] [--block-n 128] [--block-k 64]
                                                [--stages 3] [--sass FILE]

The counts depend on the Triton version: use the GPU machine's (see scripts/gemv_sass.py).
"""
import argparse
import collections
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from quant_kernels import triton_skinny as skinny
from scripts.gemv_sass import INSTRUCTION, disassemble, main_loop

DIVISIBLE_BY_16 = ["x_ptr", "qweight_ptr", "scale_zero_ptr", "out_ptr", "workspace_ptr", "tickets_ptr",
                   "N", "K", "stride_xm", "stride_om"]


def compile_skinny(opts) -> triton.compiler.CompiledKernel:
    kernel = skinny._skinny_kernel
    signature = {"x_ptr": "*fp16", "qweight_ptr": "*i32", "scale_zero_ptr": "*i32", "out_ptr": "*fp16",
                 "workspace_ptr": "*fp32", "tickets_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
                 "group_shift": "i32", "split_k": "i32", "stride_xm": "i32", "stride_om": "i32"}
    constants = dict(BITS=opts.bits, BLOCK_M=opts.block_m, BLOCK_N=opts.block_n,
                     BLOCK_K=opts.block_k, EMULATE=False)
    signature.update({name: "constexpr" for name in constants})
    names = list(kernel.arg_names)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in DIVISIBLE_BY_16}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=opts.warps, num_stages=opts.stages))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--block-m", type=int, default=16)
    parser.add_argument("--block-n", type=int, default=128)
    parser.add_argument("--block-k", type=int, default=64)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--sass", help="also write the whole SASS listing here")
    opts = parser.parse_args()
    sass, usage = disassemble(compile_skinny(opts).asm["cubin"])
    if opts.sass:
        with open(opts.sass, "w") as f:
            f.write(sass)
    loop = main_loop(sass)
    counts = collections.Counter(INSTRUCTION.match(line).group(1) for line in loop)
    weights = opts.block_k * opts.block_n // (32 * opts.warps)  # per thread and iteration
    registers = ", ".join(re.findall(r"REG:\d+", usage))
    print(f"triton {triton.__version__}, {opts.bits}-bit, tile {opts.block_m}x{opts.block_n}x{opts.block_k}, "
          f"{opts.warps} warps: {registers}")
    print(f"main loop: {len(loop)} instructions for {weights} weights a thread ({len(loop) / weights:.2f} a weight)")
    print("  " + ", ".join(f"{op} {n}" for op, n in counts.most_common(20)))


if __name__ == "__main__":
    main()
