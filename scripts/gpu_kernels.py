"""Check and time every Triton GPTQ kernel on a GPU, with the baselines measured in the same run.

1. runs tests/test_triton_kernels.py (the GPU marks included);
2. measures the device-to-device copy bandwidth;
3. per LLaMA linear shape: the batch-1 GEMV (tuned; checked against the reference first), fp16 cuBLAS, torch's
   int4 kernel (`_weight_int4pack_mm`), the few-row GEMV, and prefill (fused GEMM vs dequantize + cuBLAS);
4. prints one table (us, TB/s, % of copy bandwidth, TFLOP/s for prefill) and writes it as JSON.

Times come from `autotune_cache.graph_time_us`: launches captured in a CUDA graph (no Python launch overhead),
L2 emptied before each, while rotating over weight copies larger than L2 together. Usage on the device machine:
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 scripts/gpu_kernels.py [--skip-tests] [--shapes 7B,65B] [--json FILE]
"""
import argparse
import itertools
import json
import subprocess
import sys

import torch
import triton

from quant_kernels import gptq_format
from quant_kernels.autotune_cache import graph_time_us
from quant_kernels.quant_linear import QuantLinear
from quant_kernels.triton_backend import prepare_weight
from quant_kernels.triton_gemm import GEMM_TUNER, dequantize_into, gemm_key, quant_gemm
from quant_kernels.triton_gemv import quant_gemv
from quant_kernels.triton_skinny import SKINNY_BITS, SKINNY_TUNER, quant_skinny, skinny_key

MODELS = {"7B": (4096, 11008), "13B": (5120, 13824), "33B": (6656, 17920), "65B": (8192, 22016)}  # dim, ffn


def linear_shapes(dim: int, ffn: int) -> list[tuple[str, int, int]]:
    """(name, K = in_features, N = out_features) of one decoder layer, with the fused projections."""
    return [("o", dim, dim), ("gate", dim, ffn), ("down", ffn, dim), ("qkv", dim, 3 * dim), ("gate_up", dim, 2 * ffn)]


def median_us(fn) -> float:
    fn()  # compile, tune and allocate before capture
    return graph_time_us(fn)


def rotating(make, bytes_each: int):
    """Enough copies from `make()` to exceed twice the L2 together, and a function cycling through them."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copies = [make() for _ in range(max(2, -(-2 * l2 // bytes_each)))]
    cycle = itertools.cycle(copies)
    return copies, lambda: next(cycle)


def random_layer(k: int, n: int, bits: int, group_size: int, act_order: bool) -> QuantLinear:
    """Random GPTQ tensors made on the GPU (any int32 word is a valid packed word)."""
    groups = gptq_format.num_groups(k, group_size)
    words = dict(dtype=torch.int32, device="cuda")
    g_idx = gptq_format.default_g_idx(k, group_size, "cuda")
    if act_order:
        g_idx = g_idx[torch.randperm(k, device="cuda")]
    return QuantLinear.from_quantized(
        torch.randint(-2**31, 2**31 - 1, (k * bits // 32, n), **words),
        torch.randint(-2**31, 2**31 - 1, (groups, -(-n * bits // 32)), **words),
        torch.rand(groups, n, device="cuda", dtype=torch.float16) * 0.01 + 0.001, g_idx, bits, group_size)


def quant_bytes(k: int, n: int, bits: int, group_size: int) -> int:
    """Bytes a batch-1 product must read in the standard format: weights, scales, zeros, x, plus the output."""
    groups = gptq_format.num_groups(k, group_size)
    return k * n * bits // 8 + groups * n * 2 + groups * n * bits // 8 + 2 * k + 2 * n


def relative_error(out: torch.Tensor, dense: torch.Tensor, x: torch.Tensor) -> float:
    ref = x.float() @ dense
    return ((out.float() - ref).norm() / ref.norm()).item()


def copy_bandwidth() -> float:
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_us(lambda: dst.copy_(src)) / 1e6  # TB/s


def int4pack_us(k: int, n: int, group_size: int) -> float | None:
    """torch's int4 kernel at batch 1 (bf16 activations), or None where this torch build lacks it."""
    try:
        def make():
            packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
            return (torch.ops.aten._convert_weight_to_int4pack(packed, 8),
                    torch.rand(k // group_size, n, 2, device="cuda", dtype=torch.bfloat16))
        copies, nxt = rotating(make, k * n // 2)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm(x, *copies[0][:1], group_size, copies[0][1])

        def run():
            weight, scales_zeros = nxt()
            torch.ops.aten._weight_int4pack_mm(x, weight, group_size, scales_zeros)
        return median_us(run)
    except (RuntimeError, NotImplementedError) as error:
        print(f"  _weight_int4pack_mm unavailable: {str(error).splitlines()[0]}")
        return None


VARIANTS = {"4b": (4, 128, False), "4b-act": (4, 128, True), "8b": (8, 128, False)}  # bits, group size, act-order


def bench_shape(model: str, name: str, k: int, n: int, copy_tbs: float, rows_list, prefill_rows,
                skinny_rows=(), variants=tuple(VARIANTS)) -> list[dict]:
    results = []

    def record(kernel: str, us: float, nbytes: int | None = None, flops: float | None = None, **extra):
        row = dict(model=model, layer=name, k=k, n=n, kernel=kernel, us=round(us, 2), **extra)
        if nbytes:
            row["tbs"] = round(nbytes / us / 1e6, 3)
            row["pct_copy"] = round(100 * row["tbs"] / copy_tbs, 1)
        if flops:
            row["tflops"] = round(flops / us / 1e6, 1)
        results.append(row)
        print("  " + "  ".join(f"{key}={value}" for key, value in row.items() if key not in ("model", "k", "n")))

    fp16_bytes = 2 * k * n
    dense, next_dense = rotating(lambda: torch.randn(k, n, device="cuda", dtype=torch.float16), fp16_bytes)
    x1 = torch.randn(1, k, device="cuda", dtype=torch.float16)
    record("fp16 cuBLAS M=1", median_us(lambda: x1 @ next_dense()), fp16_bytes)
    del dense
    us = int4pack_us(k, n, 128)
    if us:
        record("torch int4pack M=1 g128", us, quant_bytes(k, n, 4, 128))

    for bits, group_size, act_order in (VARIANTS[v] for v in variants):
        if bits == 8 and model not in ("7B", "65B"):
            continue
        nbytes = quant_bytes(k, n, bits, group_size)
        layers, next_layer = rotating(lambda: random_layer(k, n, bits, group_size, act_order), nbytes)
        weights = [prepare_weight(layer) for layer in layers]
        by_id = {id(layer): weight for layer, weight in zip(layers, weights)}
        tag = f"{bits}b g{group_size}{' act' if act_order else ''}"
        first = layers[0]
        dense = gptq_format.dequantize(first.qweight, first.qzeros, first.scales, first.g_idx, bits, 1).float()
        for rows in rows_list if (bits, act_order) == (4, False) else rows_list[:1]:
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            out = quant_gemv(x, *weights[0].args())  # tunes this shape
            error = relative_error(out, dense, x)
            assert error < 1e-3, f"GEMV error {error} at {tag} rows={rows}"
            us = median_us(lambda: quant_gemv(x, *by_id[id(next_layer())].args()))
            record(f"gemv {tag} M={rows}", us, nbytes + 2 * (rows - 1) * (k + n), err=f"{error:.1e}")
        for rows in skinny_rows if bits in SKINNY_BITS else ():
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            out = quant_skinny(x, *weights[0].args())  # tunes this shape and rows block
            error = relative_error(out, dense, x)
            assert error < 1e-3, f"skinny error {error} at {tag} rows={rows}"
            chosen = SKINNY_TUNER.pick(skinny_key(rows, n, k, bits, weights[0].group_shift), None)
            us = median_us(lambda: quant_skinny(x, *by_id[id(next_layer())].args()))
            record(f"skinny {tag} M={rows}", us, nbytes + 2 * (rows - 1) * (k + n), err=f"{error:.1e}",
                   config="/".join(str(v) for v in chosen.values()))
        for rows in prefill_rows if (bits, act_order) == (4, False) else ():
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            flops = 2 * rows * k * n
            out = quant_gemm(x, *weights[0].args())
            error = relative_error(out, dense, x)
            assert error < 1e-3, f"GEMM error {error} at {tag} rows={rows}"
            chosen = GEMM_TUNER.pick(gemm_key(x, weights[0].qweight, weights[0].perm, bits, weights[0].group_shift), None)
            record(f"fused gemm {tag} M={rows}", median_us(lambda: quant_gemm(x, *by_id[id(next_layer())].args())),
                   flops=flops, err=f"{error:.1e}", config="/".join(str(v) for v in chosen.values()))
            scratch = torch.empty(k, n, device="cuda", dtype=torch.float16)
            record(f"dequant+cuBLAS {tag} M={rows}",
                   median_us(lambda: x @ dequantize_into(scratch, *by_id[id(next_layer())].args())), flops=flops)
            record(f"dequant only {tag}", median_us(lambda: dequantize_into(scratch, *by_id[id(next_layer())].args())),
                   nbytes + fp16_bytes)
            record(f"fp16 cuBLAS M={rows}", median_us(lambda: x @ scratch), flops=flops)
    torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--shapes", default="7B,13B,33B,65B")
    parser.add_argument("--rows", default="1,2,4,8", help="GEMV row counts (4-bit g128)")
    parser.add_argument("--prefill", default="16,256,2048", help="GEMM row counts (4-bit g128)")
    parser.add_argument("--skinny", default="2,4,8,16,32", help="row counts of the tensor-core kernel (triton_skinny)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="weight variants among " + ", ".join(VARIANTS))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    if not args.skip_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "tests/test_triton_kernels.py"])
        print(f"kernel tests: exit code {tests.returncode}")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB, "
          f"torch {torch.__version__}, triton {triton.__version__}")
    copy_tbs = copy_bandwidth()
    print(f"copy bandwidth: {copy_tbs:.3f} TB/s (read + write)")
    rows_list = [int(r) for r in args.rows.split(",")]
    prefill_rows = [int(r) for r in args.prefill.split(",") if r]
    skinny_rows = [int(r) for r in args.skinny.split(",") if r]
    results = []
    for model in args.shapes.split(","):
        for name, k, n in linear_shapes(*MODELS[model]):
            print(f"{model} {name} {k}x{n}")
            results += bench_shape(model, name, k, n, copy_tbs, rows_list,
                                   prefill_rows if name in ("o", "gate_up", "down") else [], skinny_rows,
                                   args.variants.split(","))

    print(f"\n{'model':5} {'layer':8} {'K x N':>12} {'kernel':34} {'us':>8} {'TB/s':>6} {'%copy':>6} {'TFLOP/s':>8}")
    for r in results:
        print(f"{r['model']:5} {r['layer']:8} {str(r['k']) + 'x' + str(r['n']):>12} {r['kernel']:34} {r['us']:8.2f} "
              f"{r.get('tbs', ''):>6} {r.get('pct_copy', ''):>6} {r.get('tflops', ''):>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=props.name, copy_tbs=copy_tbs, torch=torch.__version__,
                           triton=triton.__version__, results=results), f, indent=1)


if __name__ == "__main__":
    main()
