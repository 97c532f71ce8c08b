"""Compile the GEMV for Hopper (sm_90) without a GPU and count the SASS instructions of its main loop.

    PYTHONPATH=. python3 scripts/gemv_sass.py [--bits 4] [--block-kw 4] [--warps 8] [--act-order] [--sass FILE]

Triton's wheel carries ptxas and nvdisasm, so the instruction mix of a kernel change can be read on any machine
before spending GPU time on it. The counts depend on the Triton version: use the GPU machine's (`pip install
--target DIR triton==VERSION`, then `PYTHONPATH=DIR:.`). Arguments are specialized as a real decode launch
specializes them (pointers and the sizes of LLaMA shapes divisible by 16, one row).
"""
import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from quant_kernels import triton_gemv as gemv

INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", re.M)
DIVISIBLE_BY_16 = ["x16_ptr", "x32_ptr", "qweight_ptr", "scale_zero_ptr", "perm_ptr", "out_ptr", "workspace_ptr",
                   "tickets_ptr", "N", "K", "split_k", "stride_xm", "stride_om"]


def compile_gemv(bits: int, block_kw: int, warps: int, act_order: bool) -> triton.compiler.CompiledKernel:
    kernel = gemv._gemv_kernel
    signature = {"x16_ptr": "*i16", "x32_ptr": "*i32", "qweight_ptr": "*i32", "scale_zero_ptr": "*i32",
                 "perm_ptr": "*i32", "out_ptr": "*fp16", "workspace_ptr": "*fp32", "tickets_ptr": "*i32",
                 "N": "i32", "K": "i32", "group_shift": "i32", "split_k": "i32", "stride_xm": "i32",
                 "stride_om": "i32"}
    constants = dict(M=1, BITS=bits, HAS_PERM=act_order, EVEN_K=True, VECTOR_X=not act_order, BLOCK_M=1,
                     BLOCK_KW=block_kw, BLOCK_N=128 * warps, EMULATE=False, PDL=True,
                     **gemv.asm_arguments(bits, emulate=False))
    signature.update({name: "constexpr" for name in constants})
    names = list(kernel.arg_names)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in DIVISIBLE_BY_16}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


def disassemble(cubin: bytes) -> tuple[str, str]:
    """(SASS text, resource usage) of a cubin, from the tools in Triton's wheel."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([f"{tools}/nvdisasm", "-c", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([f"{tools}/cuobjdump", "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return sass, usage


def main_loop(sass: str) -> list[str]:
    """The instructions of the longest backward branch's body (the K loop)."""
    lines = sass.splitlines()
    best: list[str] = []
    for i, line in enumerate(lines):
        target = re.search(r"BRA `?\(?(\.L_x_\d+)", line)
        if not target:
            continue
        starts = [j for j, t in enumerate(lines[:i]) if t.startswith(target.group(1) + ":")]
        if starts:
            body = [t for t in lines[starts[0]:i + 1] if INSTRUCTION.match(t)]
            best = max(best, body, key=len)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--block-kw", type=int, default=4,
                        help="BLOCK_KW as the kernel receives it: units per block (a unit is three words for 3 bits)")
    parser.add_argument("--warps", type=int, default=8)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--sass", help="also write the whole SASS listing here")
    opts = parser.parse_args()
    kernel = compile_gemv(opts.bits, opts.block_kw, opts.warps, opts.act_order)
    sass, usage = disassemble(kernel.asm["cubin"])
    if opts.sass:
        with open(opts.sass, "w") as f:
            f.write(sass)
    loop = main_loop(sass)
    counts = collections.Counter(INSTRUCTION.match(line).group(1) for line in loop)
    # per thread and iteration: BLOCK_KW units (one word, or three for 3 bits) x 4 columns (16-byte loads)
    words = opts.block_kw * gemv.unit_words(opts.bits) * 4
    registers = ", ".join(re.findall(r"REG:\d+", usage))
    print(f"triton {triton.__version__}, {opts.bits}-bit, BLOCK_KW {opts.block_kw}, {opts.warps} warps"
          f"{', act-order' if opts.act_order else ''}: {registers}")
    weights = words * 32 // opts.bits
    print(f"main loop: {len(loop)} instructions for {words} words a thread ({len(loop) / words:.1f} per word, "
          f"{len(loop) / weights:.2f} per weight)")
    print("  " + ", ".join(f"{op} {n}" for op, n in counts.most_common(16)))


if __name__ == "__main__":
    main()
